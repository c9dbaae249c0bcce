"""Blocked sparse attention in portable torch: forward and backward, CPU and GPU.

Queries are cut into blocks of ``BLOCK`` rows. Each query block gathers exactly the key rows its
pattern allows (``Pattern.kv_ranges`` mapped onto the given key positions, or the content-chosen
blocks for top-k) and runs one dense, masked softmax over them; neighbouring query blocks are
grouped into chunks whose score tensor stays under ``CHUNK_ELEMS`` so that memory is O(n·D) plus
one chunk of work, whatever n is. Within a chunk every query sees all its keys at once, so the
softmax needs no online rescaling.

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

from kernels.inputs import check_inputs
from kernels.reference import EmptyRowError, check_docs, document_rule
from kernels.stats import AttnStats
from model.pattern import Pattern, block_mean

BLOCK = 128  # query rows per block of positional plans (measured best of 32/64/128 at 16k on CPU)
CHUNK_ELEMS = 1 << 22  # score elements per chunk (16 MiB fp32): bounds the working set (and was fastest)


@dataclass
class Chunk:
    """Query rows [row0, row0 + nb·BLOCK) of the padded queries and the keys they gather."""

    row0: int
    nb: int  # query blocks in this chunk
    idx: torch.Tensor  # [Bi, Hg, nb, Kc] flat key-row indices into k.reshape(-1, D)
    masked: tuple | None  # spans ((c0, c1, m), ...): m True where NOT allowed, broadcastable to
    # [Bi, Hg, nb, 1, BLOCK, c1 − c0] over key columns [c0, c1); columns outside every span are all allowed
    is_global: torch.Tensor | None  # [Bi, Hg, nb, 1, 1, Kc] keys that are global tokens (stats only)
    band: tuple[int, int, int] | None = None  # (n_prefix, a0, band_len): see _band_form
    block: int = 0  # query rows per block (BLOCK for positional plans, the pattern's for top-k)


@dataclass(eq=False)  # hashed by identity: plans are lru_cache keys
class Plan:
    q_rows: int  # real query rows Q (the padded count is a multiple of BLOCK)
    chunks: list[Chunk]
    heads_folded: bool  # True: Hg = Hkv with the G sharing query heads folded into the rows
    margin: int = 0  # band rows may reach this far outside [0, K) (see _scatter_band)
    maybe_empty: bool = False  # document masking may leave a row no key: out 0, lse -inf (see blocked_docs)


# --- planning: which key rows each query block gathers --------------------------------------------

def _runs(pos: torch.Tensor) -> tuple:
    """Positions as a hashable tuple of (start, length) runs (the plan cache key)."""
    if pos.numel() == 0:
        return ()
    breaks = torch.nonzero(pos[1:] - pos[:-1] != 1).flatten() + 1
    starts = torch.cat([torch.tensor([0]), breaks]).tolist()
    ends = breaks.tolist() + [pos.numel()]
    return tuple((int(pos[s]), e - s) for s, e in zip(starts, ends))


def _rows_for(k_pos: torch.Tensor, ranges) -> torch.Tensor:
    """Key rows (k_pos sorted ascending) whose positions fall in the half-open ranges."""
    bounds = torch.searchsorted(k_pos, torch.tensor(ranges, dtype=torch.long).reshape(-1))
    parts = [torch.arange(int(a), int(b)) for a, b in bounds.reshape(-1, 2).tolist() if b > a]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _pad_rows(rows_list: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    kc = max(1, max(len(r) for r in rows_list))
    idx = torch.zeros(len(rows_list), kc, dtype=torch.long)
    valid = torch.zeros(len(rows_list), kc, dtype=torch.bool)
    for i, r in enumerate(rows_list):
        idx[i, : len(r)], valid[i, : len(r)] = r, True
    return idx, valid


def _group_blocks(key_counts: list[int], bh: int, block: int = BLOCK) -> list[tuple[int, int]]:
    """Greedy consecutive grouping of query blocks into chunks of bounded score size. A block whose
    key count differs by more than 2× from the chunk's starts a new chunk (padding waste)."""
    groups, start, kmax = [], 0, 0
    for i, kc in enumerate(key_counts):
        new_max = max(kmax, kc)
        too_big = (i - start + 1) * new_max * block * bh > CHUNK_ELEMS
        mismatch = i > start and (kc > 2 * kmax or 2 * kc < kmax)
        if i > start and (too_big or mismatch):
            groups.append((start, i))
            start, new_max = i, kc
        kmax = new_max
    groups.append((start, len(key_counts)))
    return groups


def _block_positions(q_pos: torch.Tensor, nqb: int, block: int = BLOCK) -> torch.Tensor:
    """[nqb, BLOCK] query positions; padded rows repeat the last real position (their output is
    discarded, and they see that position's keys, so their softmax is finite)."""
    padded = torch.full((nqb * block,), int(q_pos[-1]), dtype=torch.long)
    padded[: q_pos.numel()] = q_pos
    return padded.reshape(nqb, block)


def _block_docs(doc: torch.Tensor, nqb: int, block: int = BLOCK) -> torch.Tensor:
    """[B, nqb, block] document ids of the query blocks; padded rows repeat the last real query's
    (as ``_block_positions`` repeats its position), so they see its keys."""
    B, Q = doc.shape
    return torch.cat([doc, doc[:, -1:].expand(B, nqb * block - Q)], dim=1).view(B, nqb, block)


def _band_form(rows: list[torch.Tensor], n_prefix_rows: int, b0: int):
    """Window-shaped chunks: every block's rows = the prefix rows [0, n_prefix_rows) (the globals)
    + one contiguous run that slides by BLOCK rows per block. Then the run of block i is taken as
    [a0 + i·BLOCK, a0 + i·BLOCK + band_len) (a superset; extra rows are masked), and backward adds
    the band gradients back with band_len/BLOCK strided adds instead of a scatter. Returns
    (idx [nb, P + band_len], valid, a0, band_len) or None when the chunk has no such shape."""
    runs = []
    for r in rows:
        rest = r[r >= n_prefix_rows]
        if rest.numel() == 0 or int(rest[-1] - rest[0]) + 1 != rest.numel():
            return None
        runs.append((int(rest[0]), int(rest[-1]) + 1))
    shift = [(i + b0) * BLOCK for i in range(len(rows))]
    a0 = min(a - sh for (a, _), sh in zip(runs, shift))
    band_len = math.ceil((max(e - sh for (_, e), sh in zip(runs, shift)) - a0) / BLOCK) * BLOCK
    if band_len > 1.25 * max(e - a for a, e in runs) + BLOCK:
        return None  # too much padding: the generic gather is cheaper
    band = a0 + torch.tensor(shift)[:, None] + torch.arange(band_len)  # [nb, band_len] (may be <0)
    valid_band = torch.zeros_like(band, dtype=torch.bool)
    for i, (a, e) in enumerate(runs):
        valid_band[i] = (band[i] >= a) & (band[i] < e)
    prefix = torch.arange(n_prefix_rows).expand(len(rows), -1)
    valid_prefix = torch.stack([torch.isin(prefix[0], r) for r in rows])
    idx = torch.cat([prefix, band.clamp(min=0)], 1)
    return idx, torch.cat([valid_prefix, valid_band], 1), a0, band_len


def gather_rows(rows: list, b0: int, b1: int, n_prefix_rows: int, n_q: int, n_k: int):
    """(idx [nb, Kc], valid [nb, Kc], band, margin) for the query blocks [b0, b1) of a positional plan:
    the band form (``_band_form``: strided gradient adds instead of a scatter) when the rows are
    window-shaped and there are at least two blocks, else the rows padded to one width. ``margin``:
    how far the band reaches beyond the keys (the overlap-add pads by it); invalid slots point at row 0."""
    band = _band_form(rows[b0:b1], n_prefix_rows, b0) if n_q >= 2 * BLOCK else None
    margin = 0
    if band is not None:
        idx, valid, a0, band_len = band
        band = (n_prefix_rows, a0 + b0 * BLOCK, band_len)
        margin = max(-band[1], band[1] + (b1 - b0) * BLOCK + band_len - n_k)
    else:
        idx, valid = _pad_rows(rows[b0:b1])  # (nb, Kc)
    return torch.where(valid, idx, torch.zeros_like(idx)).clamp(max=n_k - 1), valid, band, margin


@functools.lru_cache(maxsize=32)
def _positional_plan(pattern: Pattern, q_runs: tuple, k_runs: tuple, seq_len: int, bh: int) -> Plan:
    q_pos = torch.cat([torch.arange(s, s + n) for s, n in q_runs])
    k_pos = torch.cat([torch.arange(s, s + n) for s, n in k_runs])
    nqb = math.ceil(q_pos.numel() / BLOCK)
    qb_pos = _block_positions(q_pos, nqb)
    rows = [_rows_for(k_pos, pattern.kv_ranges(int(p.min()), int(p.max()) + 1, seq_len)) for p in qb_pos]
    n_prefix_rows = int(torch.searchsorted(k_pos, torch.tensor(pattern.num_global)))
    chunks, margin = [], 0
    for b0, b1 in _group_blocks([len(r) for r in rows], bh):
        idx, valid, band, reach = gather_rows(rows, b0, b1, n_prefix_rows, q_pos.numel(), k_pos.numel())
        margin = max(margin, reach)
        mask = pattern.allowed(qb_pos[b0:b1, :, None], k_pos[idx][:, None, :], seq_len) & valid[:, None, :]
        real = torch.arange(b0 * BLOCK, b1 * BLOCK).reshape(b1 - b0, BLOCK) < q_pos.numel()
        empty = real & ~mask.any(-1)
        if empty.any():
            raise EmptyRowError(f"query at position {int(qb_pos[b0:b1][empty][0])} has no allowed key among the keys given")
        is_global = (k_pos[idx] < pattern.num_global) & valid
        masked = _mask_spans(~mask[None, None, :, None])
        chunks.append(Chunk(b0 * BLOCK, b1 - b0, idx[None, None], masked, is_global[None, None, :, None, None], band,
                            BLOCK))
    return Plan(q_pos.numel(), chunks, heads_folded=True, margin=margin)


def _content_plan(pattern, q, k, q_pos, k_pos, seq_len, docs=None) -> Plan:
    """Top-k plan: blocks of ``pattern.block_size`` query rows aligned to absolute blocks; each
    (batch, head, query block) gathers its chosen key blocks. Selection carries no gradient; document
    ids (``docs`` = (q_doc [B, Q], k_doc [B, K])) only narrow the mask of the chosen blocks."""
    bs = pattern.block_size
    if q_pos[0] % bs or not torch.equal(q_pos, torch.arange(int(q_pos[0]), int(q_pos[0]) + q_pos.numel())):
        raise ValueError("top-k blocked kernel: query positions must be one contiguous, block-aligned range")
    B, H, Hkv, K = q.shape[0], q.shape[1], k.shape[1], k.shape[2]
    G = H // Hkv
    q_ids, q_inv = torch.unique(q_pos // bs, return_inverse=True)
    k_ids, k_inv = torch.unique(k_pos // bs, return_inverse=True)
    with torch.no_grad():
        kf = k.repeat_interleave(G, dim=1)
        chosen = pattern.select_blocks(pattern.query_summary(q, q_inv, len(q_ids)), block_mean(kf, k_inv, len(k_ids)),
                                       q_ids, k_ids)
    nsel = min(pattern.top_k + 2, len(k_ids))
    order = torch.sort(chosen.to(torch.int8), dim=-1, descending=True, stable=True)
    sel, sel_ok = order.indices[..., :nsel].cpu(), order.values[..., :nsel].bool().cpu()  # [B, H, nQ, nsel]
    starts = torch.searchsorted(k_pos, k_ids * bs)
    ends = torch.searchsorted(k_pos, (k_ids + 1) * bs)
    rows = starts[sel][..., None] + torch.arange(bs)  # [B, H, nQ, nsel, bs]
    valid = (rows < ends[sel][..., None]) & sel_ok[..., None]
    rows = torch.where(valid, rows, torch.zeros_like(rows)).flatten(-2)
    valid = valid.flatten(-2)  # [B, H, nQ, Kc]
    qb_pos = _block_positions(q_pos, len(q_ids), bs)
    mask = pattern.allowed(qb_pos[None, None, :, :, None], k_pos[rows][..., None, :], seq_len) & valid[..., None, :]
    if docs is not None:
        qb_doc = _block_docs(docs[0], len(q_ids), bs)[:, None, :, :, None]  # (B, 1, nQ, bs, 1)
        k_doc = docs[1][torch.arange(B)[:, None, None, None], rows][..., None, :]  # (B, H, nQ, 1, Kc)
        mask = mask & document_rule(pattern, qb_pos[None, None, :, :, None], k_pos[rows][..., None, :], qb_doc, k_doc)
    head_base = (torch.arange(B)[:, None] * Hkv + torch.arange(H)[None, :] // G) * K  # [B, H]
    idx = rows + head_base[:, :, None, None]
    is_global = (k_pos[rows] < pattern.num_global) & valid
    chunks = []
    for b0, b1 in _group_blocks([idx.shape[-1]] * len(q_ids), B * H, bs):
        chunks.append(Chunk(b0 * bs, b1 - b0, idx[:, :, b0:b1], _mask_spans(~mask[:, :, b0:b1, None]),
                            is_global[:, :, b0:b1, None, None], None, bs))
    return Plan(q_pos.numel(), [_to(c, q.device) for c in chunks], heads_folded=False, maybe_empty=docs is not None)


def _mask_spans(masked: torch.Tensor):
    """The key-column spans of ``masked`` [..., Kc] that hold any masked entry, with their slices.

    In a window-shaped chunk only the band's first and last BLOCK columns (and unused prefix
    slots) are ever masked; filling just those spans skips most of a full pass over the scores."""
    cols = masked.reshape(-1, masked.shape[-1]).any(0).tolist()
    spans, start = [], None
    for c, hit in enumerate(cols + [False]):
        if hit and start is None:
            start = c
        elif not hit and start is not None:
            spans.append((start, c, masked[..., start:c].contiguous()))
            start = None
    return tuple(spans) or None


def _to(c: Chunk, device) -> Chunk:
    move = lambda t: None if t is None else t.to(device, non_blocking=True)
    spans = None if c.masked is None else tuple((c0, c1, move(m)) for c0, c1, m in c.masked)
    return Chunk(c.row0, c.nb, move(c.idx), spans, move(c.is_global), c.band, c.block)


@functools.lru_cache(maxsize=32)
def _device_plan(plan: Plan, device: torch.device, B: int, Hkv: int, K: int) -> Plan:
    """Positional plans are built on CPU once; this adds the per-(batch, kv-head) row offsets."""
    base = ((torch.arange(B)[:, None] * Hkv + torch.arange(Hkv)[None, :]) * K)[:, :, None, None]
    chunks = [_to(Chunk(c.row0, c.nb, c.idx + base, c.masked, c.is_global, c.band, c.block), device)
              for c in plan.chunks]
    return Plan(plan.q_rows, chunks, plan.heads_folded, plan.margin, plan.maybe_empty)


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
    """Set the disallowed scores to −inf, span by span (see ``_mask_spans``)."""
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


@functools.cache
def _elementwise(name: str, compiled: bool):
    """The elementwise step ``name``, fused by torch.compile when asked (HALOFORMER_COMPILE=1 or
    ``set_compile(True)``): each step is 3–5 passes over the chunk's scores, which a fused loop
    makes one. Off by default: the first compile costs ~30 s per process."""
    fn = {"fwd": _mask_exp_fwd, "bwd": _mask_exp_bwd, "ds": _ds}[name]
    return torch.compile(fn, dynamic=True) if compiled else fn


COMPILE = os.environ.get("HALOFORMER_COMPILE", "0") == "1"


def set_compile(flag: bool) -> None:
    global COMPILE
    COMPILE = flag


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
        return _elementwise("bwd", COMPILE)(s6, c.masked, lse6).view(s.shape)
    e, denom, mx = _elementwise("fwd", COMPILE)(s6, c.masked)
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
            ds = _elementwise("ds", COMPILE)(ds, _q_chunk(delta[..., None], c, groups), p)
            _put_rows(dq, torch.matmul(ds, kc) * scale, c, groups)
            _scatter(dk, c, torch.matmul(ds.transpose(-1, -2), qc), plan.margin)
        dq = dq[:, :, :Q].to(q.dtype)
        m = plan.margin
        dk, dv = (t.view(B * k.shape[1], -1, D)[:, m : m + k.shape[2]] for t in (dk, dv))
        return dq, dk.reshape(k.shape).to(k.dtype), dv.reshape(v.shape).to(v.dtype), None, None, None


def blocked_attention(q, k, v, pattern: Pattern, q_pos=None, k_pos=None, scale=None, seq_len=None, return_stats=False,
                      q_doc=None, k_doc=None):
    """(out, lse) or (out, lse, AttnStats); the contract of ``kernels.sparse_attention``. With document
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
        from kernels.blocked_docs import doc_plan  # it builds on this module's planning helpers

        plan = doc_plan(pattern, q, k, q_pos, k_pos, q_doc, k_doc, seq_len)
    elif pattern.content_based:
        plan = _content_plan(pattern, q, k, q_pos, k_pos, seq_len)
    else:
        plan = _positional_plan(pattern, _runs(q_pos), _runs(k_pos), seq_len, B * H)
        plan = _device_plan(plan, q.device, B, Hkv, K)
    res = BlockedAttention.apply(q, k.contiguous(), v.contiguous(), plan, scale, return_stats)
    if return_stats:
        out, lse, m, mx, gm = res
        return out, lse, AttnStats(m=m, max_logit=mx, global_mass=gm)
    return res
