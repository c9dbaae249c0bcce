"""Blocked sparse attention in portable torch: forward and backward, CPU and GPU.

Queries are cut into blocks of ``BLOCK`` rows. Each query block gathers exactly the key rows its
pattern allows (``Pattern.kv_ranges`` mapped onto the given key positions, or the content-chosen
blocks for top-k) and runs one dense, masked softmax over them; neighbouring query blocks are
grouped into chunks whose score tensor stays under ``CHUNK_ELEMS`` so that memory is O(n·D) plus
one chunk of work, whatever n is. Within a chunk every query sees all its keys at once, so the
softmax needs no online rescaling. Which rows each chunk gathers is the plan
(``kernels.blocked_plan``; with document ids ``kernels.blocked_docs``); this module is the math.

Backward is FlashAttention's (Dao 2023, Alg. 2): only q, k, v, out and lse are saved; scores are
recomputed per chunk and ``p = exp(s − lse)``. The gradient of ``lse`` is supported too (sequence
parallelism merges partials by LSE): since ∂lse/∂s = p, it enters as ``dS = p ∘ (dP − (Δ − dlse))``
with Δ = rowsum(dO ∘ O).

GQA is computed without repeating K/V: the G query heads that share a key/value head are folded
into the rows of one matmul against that head's gathered keys.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from kernels.blocked_docs import DOC_PLANS, doc_plan
from kernels.blocked_plan import Chunk, Plan, cached_device_plan, content_plan, position_runs, positional_plan
from kernels.contract import AttnResult
from kernels.inputs import check_docs, check_inputs
from kernels.stats import AttnStats
from model.pattern import Pattern

# --- the math of one chunk --------------------------------------------------------------------------

def _q_chunk(x: torch.Tensor, c: Chunk, groups: int) -> torch.Tensor:
    """Rows of chunk c from x [B, Hg·G, Qp, D] as [B, Hg, nb, G·BLOCK, D] (heads folded into rows)."""
    B, H, _, D = x.shape
    xc = x[:, :, c.row0 : c.row0 + c.nb * c.block].reshape(B, H // groups, groups, c.nb, c.block, D)
    return xc.permute(0, 1, 3, 2, 4, 5).reshape(B, H // groups, c.nb, groups * c.block, D)


def _put_rows(dst: torch.Tensor, src: torch.Tensor, c: Chunk, groups: int) -> None:
    """Inverse of ``_q_chunk``: write src [B, Hg, nb, G·BLOCK, D'] into rows of dst [B, H, Qp, D'];
    a per-row quantity (dst [B, H, Qp], src [B, Hg, nb, G·BLOCK]) gets a trailing axis of 1."""
    if dst.dim() == 3:
        dst, src = dst.unsqueeze(-1), src.unsqueeze(-1)
    B, H, _, Dx = dst.shape
    view = src.reshape(B, H // groups, c.nb, groups, c.block, Dx).permute(0, 1, 3, 2, 4, 5)
    dst[:, :, c.row0 : c.row0 + c.nb * c.block] = view.reshape(B, H, c.nb * c.block, Dx)


def _apply_mask(s6: torch.Tensor, masked) -> None:
    """Set the disallowed scores to −inf, span by span (see ``blocked_plan.mask_spans``)."""
    for c0, c1, m in masked or ():
        s6[..., c0:c1].masked_fill_(m, float("-inf"))


def _mask_exp_fwd(s6: torch.Tensor, masked):
    """In place on s6 [B, Hg, nb, G, BLOCK, Kc]: e = exp(s − rowmax) over allowed keys. A row with
    no allowed key (document masking) gets rowmax 0 instead of −inf, so e = 0 rather than NaN."""
    _apply_mask(s6, masked)
    mx = s6.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)
    e = s6.sub_(mx).exp_()
    return e, e.sum(-1, keepdim=True), mx


def _mask_exp_bwd(s6: torch.Tensor, masked, lse6: torch.Tensor):
    """In place on s6: p = exp(s − lse), the forward's probabilities."""
    _apply_mask(s6, masked)
    return s6.sub_(lse6).exp_()


def _ds(dp: torch.Tensor, delta: torch.Tensor, p: torch.Tensor):
    """In place on dp: dS = p ∘ (dP − Δ')."""
    return dp.sub_(delta).mul_(p)


@functools.cache  # process-wide, never cleared: a compiled step is the same function every time
def _elementwise(name: str, compiled: bool):
    """The elementwise step ``name``, fused by torch.compile when ``SETTINGS.compile``: each step is
    3–5 passes over the chunk's scores, which a fused loop makes one. Off by default: the first
    compile costs ~30 s per process."""
    fn = {"fwd": _mask_exp_fwd, "bwd": _mask_exp_bwd, "ds": _ds}[name]
    return torch.compile(fn, dynamic=True) if compiled else fn


@dataclass
class KernelSettings:
    """Switches of this kernel for the whole process (every model, every thread): one instance,
    ``SETTINGS``, read at each call. ``compile``: fuse the elementwise steps (``_elementwise``); it
    starts as HALOFORMER_COMPILE=1 in the environment at import, and ``set_compile`` changes it."""

    compile: bool = False


SETTINGS = KernelSettings(compile=os.environ.get("HALOFORMER_COMPILE", "0") == "1")


def set_compile(flag: bool) -> None:
    """Turn the torch.compile'd elementwise steps on or off for every later call in this process."""
    SETTINGS.compile = flag


def clear_caches() -> None:
    """Forget every memoised plan of this kernel (positional, per device, with documents). Results do
    not change; the next call rebuilds its plan. Needed after patching a planning constant
    (``blocked_plan.CHUNK_ELEMS``); the compiled elementwise steps are kept."""
    positional_plan.cache_clear()
    cached_device_plan.cache_clear()
    DOC_PLANS.clear()


def _probs(qs: torch.Tensor, kc: torch.Tensor, c: Chunk, groups: int, lse=None):
    """Exponentiated scores [B, Hg, nb, G·BLOCK, Kc] of scaled queries qs against gathered keys.

    Forward (``lse`` None): returns (e = exp(s − rowmax), rowsum of e, rowmax); e is left
    unnormalised because dividing the [rows, D] output by the row sum is 9× cheaper than dividing
    the [rows, Kc] probabilities. Backward: p = exp(s − lse), the forward's probabilities.
    """
    s = torch.matmul(qs, kc.transpose(-1, -2))
    s6 = s.view(*s.shape[:3], groups, c.block, s.shape[-1])
    if lse is not None:
        lse6 = lse.view(*s.shape[:3], groups, c.block, 1)
        return _elementwise("bwd", SETTINGS.compile)(s6, c.masked, lse6).view(s.shape)
    e, denom, mx = _elementwise("fwd", SETTINGS.compile)(s6, c.masked)
    return e.view(s.shape), denom.view(*s.shape[:-1], 1), mx.view(s.shape[:-1])


def _scatter(acc: torch.Tensor, c: Chunk, grad: torch.Tensor, margin: int) -> None:
    """Add gathered-key gradients grad [B, Hg, nb, Kc, D] back into acc [B·Hkv, margin + K + margin, D]."""
    D = grad.shape[-1]
    if c.band is None:  # generic: scatter by flat row index (rows of head h live at h·K)
        K = acc.shape[1] - 2 * margin
        rows = c.idx + (c.idx // K) * 2 * margin + margin  # flat index into the margin-padded layout
        acc.view(-1, D).index_add_(0, rows.reshape(-1), grad.reshape(-1, D))
        return
    n_prefix, a0, band_len = c.band
    BH = acc.shape[0]
    if n_prefix:  # the globals are shared by every block: sum over blocks, then add once
        acc[:, margin : margin + n_prefix] += grad[:, :, :, :n_prefix].sum(2).reshape(BH, n_prefix, D)
    # Overlap-add: block i's band starts at a0 + i·BLOCK, so its t-th BLOCK of rows lands on the
    # rows [a0 + (i + t)·BLOCK, +BLOCK): one strided add per t covers every block of the chunk.
    band = grad[:, :, :, n_prefix:].reshape(BH, c.nb, band_len // c.block, c.block, D)
    for t in range(band_len // c.block):
        start = margin + a0 + t * c.block
        acc[:, start : start + c.nb * c.block].view(BH, c.nb, c.block, D).add_(band[:, :, t])


def _chunk_stats(e, l, lse_c, mx, c: Chunk, groups: int, maybe_empty: bool):
    """(m, max_logit, global_mass) of one chunk from e = exp(s − rowmax) and its row sums l.

    With p = e / l: Σ p·s = lse + Σ p·log p and Σ p·log p = Σ e·log e / l − log l, so the stats need
    neither the scores nor the normalised probabilities. Empty rows: m 0, max −inf, mass 0."""
    m = lse_c + torch.special.xlogy(e, e).sum(-1) / l - l.log()
    gm = (e.view(*e.shape[:3], groups, c.block, -1) * c.is_global).sum(-1).reshape(mx.shape) / l
    if maybe_empty:
        empty = torch.isneginf(lse_c)
        m, gm = m.masked_fill(empty, 0.0), gm.masked_fill(empty, 0.0)
        mx = mx.masked_fill(empty, float("-inf"))
    return m, mx, gm


class BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, scale: float, want_stats: bool):
        B, H, Q, D = q.shape
        Hkv = k.shape[1]
        groups = H // Hkv if plan.heads_folded else 1
        Qp = sum(c.nb * c.block for c in plan.chunks)
        acc = torch.promote_types(q.dtype, torch.float32)  # bf16/fp16 accumulate in fp32
        qs = torch.nn.functional.pad(q, (0, 0, 0, Qp - Q)).mul_(scale)  # padded, pre-scaled queries (one copy)
        kf, vf = k.reshape(-1, D), v.reshape(-1, D)
        out = q.new_empty(B, H, Qp, D, dtype=acc)
        lse = q.new_empty(B, H, Qp, dtype=acc)
        stats = [q.new_empty(B, H, Qp, dtype=acc) for _ in range(3)] if want_stats else None
        for c in plan.chunks:
            kc, vc = kf[c.idx], vf[c.idx]  # [B, Hg, nb, Kc, D]
            e, denom, mx = _probs(_q_chunk(qs, c, groups).to(acc), kc.to(acc), c, groups)
            lse_c = mx + denom.squeeze(-1).log()  # -inf on a row with no key (mx 0, denom 0)
            if plan.maybe_empty:
                denom = denom.clamp_min(torch.finfo(acc).tiny)  # e is 0 there: the output row is 0
            _put_rows(out, torch.matmul(e, vc.to(acc)).div_(denom), c, groups)
            _put_rows(lse, lse_c, c, groups)
            if want_stats:
                for dst, val in zip(stats, _chunk_stats(e, denom.squeeze(-1), lse_c, mx, c, groups, plan.maybe_empty)):
                    _put_rows(dst, val, c, groups)
        out, lse = out[:, :, :Q].to(q.dtype), lse[:, :, :Q].contiguous()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.groups = plan, scale, groups
        ctx.mark_non_differentiable(*(stats or []))
        if want_stats:
            return out, lse, *[s[:, :, :Q].contiguous() for s in stats]
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse, *_):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale, groups = ctx.plan, ctx.scale, ctx.groups
        B, H, Q, D = q.shape
        Qp = sum(c.nb * c.block for c in plan.chunks)
        pad = lambda t, value=0.0: torch.nn.functional.pad(t, (0, 0, 0, Qp - Q) if t.dim() == 4 else (0, Qp - Q), value=value)
        acc = torch.promote_types(q.dtype, torch.float32)
        d_out = torch.zeros_like(out) if d_out is None else d_out
        delta = (d_out.to(acc) * out.to(acc)).sum(-1)  # Δ = rowsum(dO ∘ O)
        if d_lse is not None:
            delta = delta - d_lse.to(acc)
        # Padded query rows get lse = +inf so that their recomputed p is 0, not exp(s) · 0 = NaN.
        qs, do, lse_p, delta = pad(q.to(acc)).mul_(scale), pad(d_out.to(acc)), pad(lse, float("inf")), pad(delta)
        if plan.maybe_empty:  # rows with no key (lse = -inf): p must be 0 there too
            lse_p = lse_p.masked_fill(torch.isneginf(lse_p), float("inf"))
        kf, vf = k.reshape(-1, D).to(acc), v.reshape(-1, D).to(acc)
        dq = torch.zeros(B, H, Qp, D, dtype=acc, device=q.device)
        # dK/dV accumulate in [B·Hkv, margin + K + margin, D] so band rows outside [0, K) land somewhere.
        dk, dv = (torch.zeros(B * k.shape[1], k.shape[2] + 2 * plan.margin, D, dtype=acc, device=q.device) for _ in range(2))
        for c in plan.chunks:
            kc, vc = kf[c.idx], vf[c.idx]
            qc, doc = _q_chunk(qs, c, groups), _q_chunk(do, c, groups)
            p = _probs(qc, kc, c, groups, lse=_q_chunk(lse_p[..., None], c, groups).squeeze(-1))
            _scatter(dv, c, torch.matmul(p.transpose(-1, -2), doc), plan.margin)
            ds = torch.matmul(doc, vc.transpose(-1, -2))
            ds = _elementwise("ds", SETTINGS.compile)(ds, _q_chunk(delta[..., None], c, groups), p)
            _put_rows(dq, torch.matmul(ds, kc) * scale, c, groups)
            _scatter(dk, c, torch.matmul(ds.transpose(-1, -2), qc), plan.margin)
        dq = dq[:, :, :Q].to(q.dtype)
        m = plan.margin
        dk, dv = (t.view(B * k.shape[1], -1, D)[:, m : m + k.shape[2]] for t in (dk, dv))
        return dq, dk.reshape(k.shape).to(k.dtype), dv.reshape(v.shape).to(v.dtype), None, None, None


def blocked_attention(q, k, v, pattern: Pattern, q_pos=None, k_pos=None, scale=None, seq_len=None, return_stats=False,
                      q_doc=None, k_doc=None):
    """``AttnResult`` (out, lse, AttnStats or None); the contract of ``kernels.sparse_attention``. With document
    ids the plan gathers only keys some query of each block may see (``kernels.blocked_docs``)."""
    B, H, Q, D, Hkv, K = check_inputs(q, k, v, q_pos, k_pos)
    q_doc, k_doc = check_docs(q_doc, k_doc, B, Q, K)
    q_pos = torch.arange(Q) if q_pos is None else q_pos.detach().cpu().long()
    k_pos = torch.arange(K) if k_pos is None else k_pos.detach().cpu().long()
    if K > 1 and not bool((k_pos[1:] > k_pos[:-1]).all()):
        order = torch.argsort(k_pos)  # the planner maps ranges by binary search: sort the keys
        k_pos, k, v = k_pos[order], k[:, :, order.to(k.device)], v[:, :, order.to(v.device)]
        k_doc = None if k_doc is None else k_doc[:, order]
        if K > 1 and not bool((k_pos[1:] > k_pos[:-1]).all()):
            raise ValueError("k_pos: key positions must be distinct")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    seq_len = int(max(q_pos.max(), k_pos.max())) + 1 if seq_len is None else seq_len
    if q_doc is not None:
        plan = doc_plan(pattern, q, k, q_pos, k_pos, q_doc, k_doc, seq_len)
    elif pattern.content_based:
        plan = content_plan(pattern, q, k, q_pos, k_pos, seq_len)
    else:
        plan = positional_plan(pattern, position_runs(q_pos), position_runs(k_pos), seq_len, B * H)
        plan = cached_device_plan(plan, q.device, B, Hkv, K)
    res = BlockedAttention.apply(q, k.contiguous(), v.contiguous(), plan, scale, return_stats)
    if return_stats:
        out, lse, m, mx, gm = res
        return AttnResult(out, lse, AttnStats(m=m, max_logit=mx, global_mass=gm))
    return AttnResult(*res, None)
