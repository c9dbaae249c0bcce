"""Sparse attention kernels behind one contract (``kernels.contract``):

    sparse_attention(q, k, v, pattern, q_pos=None, k_pos=None, backend="auto", return_stats=False,
                     scale=None, seq_len=None, sinks=None, q_doc=None, k_doc=None) -> AttnResult
    attend(q, k, v, pattern, call: AttnCall, backend="auto") -> AttnResult

``sparse_attention`` is the keyword form for users and tests; it builds the ``AttnCall`` and calls
``attend``, which every adapter (the model's attention function, the SP strategies, the decode cache,
the coverage recorder) calls with the call it was handed. The result is always (out, lse, stats),
stats None unless ``return_stats``.

q [B, H, Q, D]; k, v [B, Hkv, K, D] (GQA when Hkv < H); q_pos [Q], k_pos [K] absolute positions
(default arange), so a sequence shard — queries a sub-range, keys ``[globals | range]`` — is computed
exactly. ``lse`` [B, H, Q] fp32 lets partial results be merged (kernels.stats.merge_two); ``stats``
are the per-query partials of entropy, max logit and global mass (kernels.stats.AttnStats).

``sinks`` [H] (fp32, differentiable): learned sink logits, one extra softmax column per head with no
value (gpt-oss). Backends whose row of ``BACKENDS`` says ``sinks`` start each row's online softmax
from it; for every other backend ``attend`` joins it from (out, lse) afterwards
(``kernels.stats.apply_sinks``), so any backend supports it.
``call.q_global`` [B, H, Q, D] (model.global_rope=fixed): the keys a query sees only because they are
global are scored with it (``kernels.global_part``): ``attend`` runs the pattern's local part on the
chosen backend and the global keys as a second, dense partial, merged by LSE.
``q_doc`` [B, Q], ``k_doc`` [B, K] LongTensors: packed documents (``model.pattern.documents``): a
query sees a key only if the pattern allows it and both are in the same document, except global keys
(seen by all) and, when bidirectional, global queries (see all). Backends whose row says
``documents`` apply it in the kernel; ``attend`` sends any other backend's call to ``blocked``.
"""

from __future__ import annotations

import functools

import torch

from kernels.contract import BACKENDS as TABLE
from kernels.contract import AttnCall, AttnResult
from kernels.global_part import attend_apart
from kernels.inputs import EmptyRowError, check_inputs
from kernels.reference import reference_attention
from kernels.stats import join_sinks
from model.pattern import Pattern


# Each backend behind one signature: (q, k, v, pattern, call) -> AttnResult. Imported on first use:
# flex needs torch's FlexAttention, fused a build.
def _reference(q, k, v, pattern, c: AttnCall) -> AttnResult:
    return reference_attention(q, k, v, pattern, c.q_pos, c.k_pos, c.scale, c.seq_len, c.return_stats, c.q_doc,
                               c.k_doc, c.sinks)


def _blocked(q, k, v, pattern, c: AttnCall) -> AttnResult:
    from kernels.blocked import blocked_attention

    return blocked_attention(q, k, v, pattern, c.q_pos, c.k_pos, c.scale, c.seq_len, c.return_stats, c.q_doc, c.k_doc)


def _flex(q, k, v, pattern, c: AttnCall) -> AttnResult:
    from kernels.flex import flex_attention_backend

    return flex_attention_backend(q, k, v, pattern, c.q_pos, c.k_pos, c.scale, c.seq_len, c.return_stats, c.q_doc,
                                  c.k_doc)


def _fused(q, k, v, pattern, c: AttnCall, layout=None) -> AttnResult:
    # C++ band kernel (CPU, fp32, Window); choose_backend sends what it cannot take to blocked
    from kernels.fused import fused_attention

    return fused_attention(q, k, v, pattern, c.q_pos, c.k_pos, c.scale, c.seq_len, c.return_stats, c.sinks, c.q_doc,
                           c.k_doc, layout)


KERNELS = {"reference": _reference, "blocked": _blocked, "flex": _flex, "fused": _fused}
assert KERNELS.keys() == TABLE.keys()
BACKENDS = ("auto", *KERNELS)
DOC_BACKENDS = tuple(name for name, b in TABLE.items() if b.documents)
SINK_BACKENDS = tuple(name for name, b in TABLE.items() if b.sinks)


def check_sinks(sinks: torch.Tensor | None, heads: int) -> None:
    """The sinks shape rule, in one place (kernels and SP strategies): one logit per query head."""
    if sinks is not None and tuple(sinks.shape) != (heads,):
        raise ValueError(f"sinks: must be [H] = [{heads}] (one logit per query head), got {list(sinks.shape)}")


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern,
                     q_pos: torch.Tensor | None = None, k_pos: torch.Tensor | None = None,
                     backend: str = "auto", return_stats: bool = False, scale: float | None = None,
                     seq_len: int | None = None, sinks: torch.Tensor | None = None,
                     q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None) -> AttnResult:
    """Sparse attention with the pattern, keyword form; see the module docstring for the contract."""
    return attend(q, k, v, pattern, AttnCall(q_pos, k_pos, seq_len, scale, sinks, q_doc, k_doc, return_stats),
                  backend)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, call: AttnCall,
           backend: str = "auto") -> AttnResult:
    """Sparse attention of one described call: the backend is chosen here, once (``choose_backend``)."""
    check_inputs(q, k, v, call.q_pos, call.k_pos)
    check_sinks(call.sinks, q.shape[1])
    if call.global_part:
        return attend_apart(q, k, v, pattern, call, functools.partial(attend, backend=backend))
    name, layout = _select(q, k, pattern, call, backend)
    kernel = functools.partial(_fused, layout=layout) if name == "fused" else KERNELS[name]
    if TABLE[name].sinks:  # the kernel joins the sinks itself
        return kernel(q, k, v, pattern, call)
    return join_sinks(kernel(q, k, v, pattern, call.without_sinks()), call.sinks)


def choose_backend(q: torch.Tensor, k: torch.Tensor, pattern: Pattern, call: AttnCall, backend: str = "auto") -> str:
    """The backend that runs this call, decided here and nowhere else: ``backend`` itself or ``auto``'s
    pick (``pick_backend``); then ``blocked`` for a call with documents the chosen backend cannot mask
    (the table's ``documents``) and for a ``fused`` call the C++ kernel cannot take (its key layout,
    dtypes, an empty call, or no build: ``kernels.fused.applies``)."""
    return _select(q, k, pattern, call, backend)[0]


def _select(q, k, pattern, call, backend) -> tuple[str, object]:
    """(``choose_backend``'s name, the fused kernel's key layout when that is the name, else None)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {', '.join(BACKENDS)}; got {backend!r}")
    name = pick_backend(q, pattern, call.return_stats) if backend == "auto" else backend
    if call.docs and not TABLE[name].documents:
        return "blocked", None
    if name == "fused":
        from kernels.fused import applies

        layout = applies(q, k, pattern, call)
        return ("fused", layout) if layout is not None else ("blocked", None)
    return name, None


def pick_backend(q: torch.Tensor, pattern: Pattern, return_stats: bool) -> str:
    """``flex`` only where it runs forward and backward (CUDA, positional pattern, no stats);
    ``fused`` for fp32 band patterns on CPU (kernels.fused); ``blocked`` everywhere else.
    FlexAttention has no CPU backward, so ``auto`` never picks it on CPU."""
    if q.is_cuda and not pattern.content_based and (TABLE["flex"].stats or not return_stats):
        from kernels.flex import flex_available

        if flex_available():
            return "flex"
    if not q.is_cuda:
        from kernels.fused import pattern_supported

        if pattern_supported(q, pattern):  # fp32 Window band on CPU: the fused C++ kernel
            return "fused"
    return "blocked"


__all__ = ["sparse_attention", "attend", "AttnCall", "AttnResult", "reference_attention", "EmptyRowError", "BACKENDS",
           "DOC_BACKENDS", "SINK_BACKENDS", "TABLE", "KERNELS", "choose_backend", "pick_backend", "check_sinks"]
