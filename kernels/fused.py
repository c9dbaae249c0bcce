"""Fused CPU attention for band patterns: C++ (AVX2/FMA or AVX-512, ATen's OpenMP threads), forward and backward.

Applies to ``Window`` patterns with dilation 1 (window, sink, longformer, bidirectional windows),
fp32 or bf16 CPU tensors with head_dim a multiple of 8 (bf16: the native bf16 kernel, vdpbf16ps with
fp32 accumulation, where kernels/cpu.py finds avx512_bf16 and head_dim % 16 == 0; otherwise the fp32
kernel on fp32 copies, the output rounded once), and keys laid out as a shard holds them:
``[globals | one contiguous run]`` — the keys whose positions are below ``num_global`` first (in
ascending order), then consecutive positions (``k_pos`` defaults to arange, which is of that form).
Query positions may be anything. Everything else, and every machine where the extension cannot be
built, goes to ``kernels.blocked``: ``kernels.choose_backend`` decides, once per call, with ``applies``
(the build failure says so in one warning line).

The kernel (kernels/csrc): 64-query × 64-key tiles; a query tile visits only the global prefix and
the tiles of its band, and masks only the edge tiles, by comparing positions; keys and values are
read in place; online softmax with a polynomial exp; scores are held transposed (S^T[key][query])
so the per-query softmax state is lane-wise. Backward recomputes P from the saved lse (Dao 2023)
and carries the lse gradient: dS = P ∘ (dP − (Δ − dlse)), Δ = rowsum(dO ∘ O). GQA shares K/V
between the G query heads without copies. Autograd keeps only q, k, v, out and lse.

Learned sinks (``sinks`` [H], gpt-oss) are joined inside the kernel: every query row's online softmax
starts from the sink (running max s_h, running sum 1), so out and lse come out with the sink column
already included, at no extra pass over [B, H, Q, D] (``kernels.stats.apply_sinks`` after the kernel
costs a fixed ~18 ms at 16k tokens, 8% of the forward on one thread). Backward needs nothing new for
the keys (P is recomputed from that lse); the sink's own gradient is Σ_q p_sink·(dlse − Δ) per head.

Packed documents (``q_doc`` [B, Q], ``k_doc`` [B, K], ``model.pattern.documents.document_rule``) are masked
inside the kernel too: per query tile the id range of its queries is compared with each band tile's id
range, tiles that share no document are skipped (so short documents make attention cheaper), tiles that
are all one document run unmasked, and the rest are masked elementwise by id equality; global-prefix
tiles and bidirectional global queries are exempt. Ranges are computed from the ids, so unsorted ids
are correct too (they only skip less). A row the documents leave empty (a shard's partial over remote
keys) gives out 0 and lse −inf, as the reference.

One source, one build per instruction set (``ISA_FLAGS``; kernels/csrc/fused_simd.h is the only file
that knows the width): AVX2 + FMA (6 × 16 micro-kernel in 16 ymm registers) and AVX-512F (6 × 64 in 32
zmm registers), the best the CPU has (``kernels.cpu``) unless ``HALOFORMER_FUSED_ISA=avx2|avx512``
says otherwise. Each is built on first use into ``.cache/torch_extensions/haloformer_fused_<isa>``
(~1 min, then cached); ``HALOFORMER_FUSED=0`` stops ``backend="auto"`` from choosing the kernel.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

import kernels.cpu as cpu
from kernels.contract import BACKENDS, AttnResult
from kernels.cpu import fused_choice
from kernels.cpu import info as cpu_info
from kernels.inputs import EmptyRowError, check_docs, check_inputs
from kernels.stats import AttnStats
from model.pattern import Pattern, Window

ROOT = Path(__file__).resolve().parent.parent
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("fused_bind.cpp", "fused_fwd.cpp", "fused_bwd.cpp")
# One build per instruction set, from the same sources (kernels/csrc/fused_simd.h picks the width from
# the -m flags). No -ffast-math: the kernel relies on ±inf.
COMMON_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno"]
ISA_FLAGS = {"avx2": ["-mavx2", "-mfma"], "avx512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl"]}

_exts: dict[str, object] = {}  # isa -> the loaded extension, or None after a failed build (warned once)


def build_dir(isa: str) -> Path:
    return ROOT / ".cache" / "torch_extensions" / f"haloformer_fused_{isa}"


def active_isa() -> str:
    """The build the kernel runs (``kernels.cpu.fused_choice``: the best this CPU has unless
    ``$HALOFORMER_FUSED_ISA`` says otherwise); ``none`` where it has neither AVX2 nor AVX-512."""
    return fused_choice().isa


def extension(isa: str | None = None):
    """The compiled extension, built on first call: for ``isa`` where given, else for ``active_isa()`` —
    and, where that build fails and ``$HALOFORMER_FUSED_ISA`` did not pin it, the next build this CPU
    runs (an AVX-512 machine whose compiler cannot target it keeps the AVX2 kernel). None (after one
    warning per failed build) where none can be built."""
    if isa is not None:
        return _build(isa, "the blocked kernel")
    first = active_isa()
    order = [first] if os.environ.get(cpu.ISA_ENV) or first == "none" else list(cpu_info().fused_isas)
    for i, name in enumerate(order):
        ext = _build(name, f"the {order[i + 1]} build" if i + 1 < len(order) else "the blocked kernel")
        if ext is not None:
            return ext
    return None


def _build(isa: str, instead: str):
    if isa in _exts:
        return _exts[isa]
    why, ext = None, None
    if isa == "none":
        why = f"CPU ({cpu_info().model}) has no AVX2"
    elif shutil.which(os.environ.get("CXX", "c++")) is None:
        why = "no C++ compiler found"
    else:
        try:
            from torch.utils.cpp_extension import load

            build_dir(isa).mkdir(parents=True, exist_ok=True)
            ext = load(name=f"haloformer_fused_{isa}", sources=[str(CSRC / s) for s in SOURCES],
                       extra_cflags=COMMON_FLAGS + ISA_FLAGS[isa], extra_ldflags=["-fopenmp"],
                       build_directory=str(build_dir(isa)), verbose=False)
        except Exception as e:  # any build or load failure: the next build, or the portable kernel, takes over
            why = f"{isa} build failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
    if why:
        warnings.warn(f"kernels.fused: {why}; using {instead} instead", RuntimeWarning, stacklevel=3)
    _exts[isa] = ext
    return ext


def pattern_supported(q: torch.Tensor, pattern: Pattern) -> bool:
    """What ``backend="auto"`` checks before choosing ``fused`` (positions are checked per call)."""
    return (os.environ.get("HALOFORMER_FUSED", "1") != "0" and q.device.type == "cpu" and q.dtype in BACKENDS["fused"].dtypes
            and type(pattern) is Window and pattern.dilation == 1 and q.shape[-1] % 8 == 0)


@dataclass(frozen=True)
class Geometry:
    """Keys = [P global keys | L keys at positions kbase, kbase+1, ...]; what the C++ side needs."""

    q_pos: torch.Tensor  # [Q] int64
    k_pos: torch.Tensor  # [K] int64
    prefix: int
    kbase: int
    q_doc: torch.Tensor | None = None  # [B, Q] int32 document ids, or None
    k_doc: torch.Tensor | None = None  # [B, K] int32

    def args(self, pattern: Window) -> tuple:
        return (self.q_pos, self.k_pos, self.prefix, self.kbase, pattern.window_left, pattern.window_right,
                pattern.num_global, pattern.causal, self.q_doc, self.k_doc)


def _docs32(q_doc: torch.Tensor, k_doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids as contiguous int32; ids beyond int32 are renumbered (only equality matters)."""
    lo, hi = min(int(q_doc.min()), int(k_doc.min())), max(int(q_doc.max()), int(k_doc.max()))
    if lo < -(2 ** 31) or hi >= 2 ** 31:
        _, inv = torch.unique(torch.cat([q_doc.reshape(-1), k_doc.reshape(-1)]), return_inverse=True)
        q_doc, k_doc = inv[: q_doc.numel()].view_as(q_doc), inv[q_doc.numel():].view_as(k_doc)
    return q_doc.int().contiguous(), k_doc.int().contiguous()


def geometry(q: torch.Tensor, k: torch.Tensor, pattern: Pattern, q_pos, k_pos) -> Geometry | str:
    """The key layout, or why the fused kernel does not apply (then ``blocked`` runs)."""
    if not pattern_supported(q, pattern):
        return "needs fp32 or bf16 CPU tensors, head_dim % 8 == 0 and a Window pattern with dilation 1"
    if k.dtype != q.dtype or k.device.type != "cpu":
        return "needs CPU keys and values in the queries' dtype"
    Q, K = q.shape[2], k.shape[2]
    q_pos = torch.arange(Q) if q_pos is None else q_pos.detach().cpu().long().contiguous()
    k_pos = torch.arange(K) if k_pos is None else k_pos.detach().cpu().long().contiguous()
    is_global = k_pos < pattern.num_global
    P = int(is_global.sum())
    if not bool(is_global[:P].all()) or (P > 1 and not bool((k_pos[1:P] > k_pos[: P - 1]).all())):
        return "keys below num_global must come first, in ascending order"
    kbase = int(k_pos[P]) if K > P else pattern.num_global
    if K > P and not torch.equal(k_pos[P:], torch.arange(kbase, kbase + K - P)):
        return "keys after the globals must have consecutive positions"
    return Geometry(q_pos, k_pos, P, kbase)


def applies(q: torch.Tensor, k: torch.Tensor, pattern: Pattern, call) -> Geometry | None:
    """The key layout when the fused kernel runs this call, else None (``kernels.choose_backend`` asks,
    once per call, and hands the layout on): the pattern and dtypes it takes, its key layout
    (``geometry``), at least one query, and a build."""
    if q.shape[2] == 0:
        return None
    g = geometry(q, k, pattern, call.q_pos, call.k_pos)
    return g if isinstance(g, Geometry) and extension() is not None else None


def _check_rows(g: Geometry, pattern: Window, K: int) -> None:
    """EmptyRowError (before any compute) for a query with no allowed key among those given."""
    qi = g.q_pos
    ok = torch.zeros_like(qi, dtype=torch.bool)
    if g.prefix:
        ok |= (qi >= g.k_pos[0]) if pattern.causal else torch.ones_like(ok)
    if not pattern.causal and K:
        ok |= qi < pattern.num_global
    L = K - g.prefix
    if L:
        hi = qi if pattern.causal else qi + pattern.window_right
        ok |= torch.maximum(qi - pattern.window_left, torch.tensor(g.kbase)) <= torch.minimum(hi, torch.tensor(g.kbase + L - 1))
    if not bool(ok.all()):
        raise EmptyRowError(f"query at position {int(qi[~ok][0])} has no allowed key among the {K} keys given")


class FusedAttention(torch.autograd.Function):
    """(out, lse[, m, max_logit, global_mass]); with ``sinks`` [H] fp32 every output includes the sink.
    q, k, v fp32, or bf16 for the native bf16 kernel: out is returned (and saved) in their dtype, lse and
    the statistics in fp32; the gradients come back from the kernel in fp32 and autograd rounds them to
    the inputs' dtype."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, args: tuple, scale: float, want_stats: bool, ext):
        res = ext.forward(q, k, v, sinks, *args, scale, want_stats)
        out, lse = res[0].to(q.dtype), res[1]
        ctx.save_for_backward(q, k, v, sinks, out, lse)
        ctx.args, ctx.scale, ctx.ext = args, scale, ext  # the build that ran forward runs backward
        ctx.mark_non_differentiable(*res[2:])
        return (out, *res[1:])

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_lse, *_):
        q, k, v, sinks, out, lse = ctx.saved_tensors
        d_out = torch.zeros_like(out) if d_out is None else d_out.to(out.dtype).contiguous()
        d_lse = None if d_lse is None else d_lse.float().contiguous()  # ∂lse/∂s = p: dlse adds p·dlse to dS
        grads = ctx.ext.backward(q, k, v, sinks, d_out, out, lse, d_lse, *ctx.args, ctx.scale)
        d_sinks = grads[3] if sinks is not None else None  # [H]: Σ over batch and queries of p_sink·(dlse − Δ)
        return grads[0], grads[1], grads[2], d_sinks, None, None, None, None


def fused_attention(q, k, v, pattern: Pattern, q_pos=None, k_pos=None, scale=None, seq_len=None, return_stats=False,
                    sinks=None, q_doc=None, k_doc=None, layout: Geometry | None = None):
    """``AttnResult`` (out, lse, AttnStats or None): the contract of ``kernels.sparse_attention``, learned
    ``sinks`` [H] and document ids included, for a call the kernel takes (``applies``; through
    ``kernels.attend`` every other call has gone to ``blocked`` already). A call it cannot take is a
    ValueError saying why. ``layout``: the call's ``applies`` result, so it is not worked out twice."""
    B, H, Q, D, Hkv, K = check_inputs(q, k, v, q_pos, k_pos)
    q_doc, k_doc = check_docs(q_doc, k_doc, B, Q, K)
    g = geometry(q, k, pattern, q_pos, k_pos) if layout is None else layout
    ext = extension()  # resolved once per call: forward and backward use this build
    if isinstance(g, str) or Q == 0 or ext is None:
        why = g if isinstance(g, str) else "no queries" if Q == 0 else "the extension could not be built"
        raise ValueError(f"fused_attention: {why}; kernels.attend runs such a call on the blocked kernel")
    _check_rows(g, pattern, K)  # the pattern's empty rows are errors; the documents' are out 0, lse −inf
    if q_doc is not None:
        g = Geometry(g.q_pos, g.k_pos, g.prefix, g.kbase, *_docs32(q_doc, k_doc))
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s32 = None if sinks is None else sinks.float().contiguous()  # autograd casts its gradient back
    # bf16 in: the native bf16 kernel where this CPU runs it (kernels.cpu.fused_choice) and head_dim % 16
    # == 0, else the fp32 kernel on fp32 copies (autograd rounds the gradients back); out is rounded to
    # bf16 once either way, lse and the statistics stay fp32 as the contract says. fp32 in: no copies.
    native = q.dtype == torch.bfloat16 and D % 16 == 0 and ext.bf16 and fused_choice().bf16 == "native"
    cast = (lambda t: t.contiguous()) if native else (lambda t: t.float().contiguous())
    res = FusedAttention.apply(cast(q), cast(k), cast(v), s32, g.args(pattern), scale, return_stats, ext)
    res = (res[0].to(q.dtype), *res[1:])
    if not return_stats:
        return AttnResult(*res, None)
    out, lse, m, mx, gm = res
    # The sink's probability p_sink = exp(s_h − lse), lse including the sink (kernels.stats.apply_sinks).
    sink_mass = None if sinks is None else torch.exp(s32.detach()[None, :, None] - lse.detach())  # (B, H, Q)
    return AttnResult(out, lse, AttnStats(m=m, max_logit=mx, global_mass=gm, sink_mass=sink_mass))
