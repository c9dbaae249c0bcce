"""Plans for the blocked kernel (``kernels.blocked``): which key rows each query block gathers.

A plan cuts the padded queries into blocks of ``BLOCK`` rows (the pattern's own block size for top-k)
and groups neighbouring blocks into chunks whose score tensor stays under ``CHUNK_ELEMS``. Each chunk
records the flat key-row indices it gathers, the spans of key columns holding masked entries, which
keys are global tokens (for the statistics) and, for window-shaped chunks, the band form that lets
backward add the key gradients with strided adds instead of a scatter. Plans hold no tensors of the
data except for top-k, whose blocks are chosen from it.

Positional plans depend only on (pattern, positions, seq_len, B·H), so they are built once on the CPU
and memoised (``positional_plan``, then ``cached_device_plan`` per device and shape).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from kernels.inputs import EmptyRowError
from model.pattern import Pattern, block_mean, union_per_block
from model.pattern.documents import document_rule

BLOCK = 128  # query rows per block of positional plans (measured best of 32/64/128 at 16k on CPU)
CHUNK_ELEMS = 1 << 22  # score elements per chunk (16 MiB fp32): bounds the working set (and was fastest)
# Two padding limits, neither tuned (commits 08add75, d927cef give no measurement). Measured for this
# comment (n = 8192, D = 64, fwd+bwd CPU time, 1 thread, shared machine, min of 5): PAD_RATIO 1.5 was 4–7%
# faster than 2 on a causal window with documents (H = 8), 4 and no limit 0–6% slower. Of the windows
# tried (causal, bidirectional; with and without documents) BAND_SLACK changed only the plans of a
# bidirectional window cut by documents, where 1.0 was 4–5% faster and 2.0 2% slower than 1.25.
# Both are mild guesses, kept as they are so that every plan (and so every output) is unchanged.
PAD_RATIO = 2  # group_blocks: a block joins a chunk only if its key count is within this factor of its widest
BAND_SLACK = 1.25  # _band_form: a band may exceed the longest run by this factor (plus one BLOCK of rounding)


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
    margin: int = 0  # band rows may reach this far outside [0, K) (see kernels.blocked._scatter)
    maybe_empty: bool = False  # document masking may leave a row no key: out 0, lse -inf (see blocked_docs)


def position_runs(pos: torch.Tensor) -> tuple:
    """Positions as a hashable tuple of (start, length) runs of consecutive positions (the plan cache key)."""
    if pos.numel() == 0:
        return ()
    breaks = torch.nonzero(pos[1:] - pos[:-1] != 1).flatten() + 1
    starts = torch.cat([torch.tensor([0]), breaks]).tolist()
    ends = breaks.tolist() + [pos.numel()]
    return tuple((int(pos[s]), e - s) for s, e in zip(starts, ends))


def rows_for(k_pos: torch.Tensor, ranges) -> torch.Tensor:
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


def group_blocks(key_counts: list[int], bh: int, block: int = BLOCK) -> list[tuple[int, int]]:
    """Greedy consecutive grouping of query blocks into chunks of bounded score size.

    Every block of a chunk is padded to the chunk's widest key count (``_pad_rows``); a padded column
    costs a score, an exp and a matmul column like a real one, while each extra chunk costs one more
    trip through the per-chunk loop. A block starts a new chunk when its key count is over
    ``PAD_RATIO`` × the chunk's widest so far (the blocks in it would be padded more than that) or
    under 1/``PAD_RATIO`` of it (it would itself be). Counts that keep growing (a causal dense layer)
    can still pad a chunk's first block further; ``CHUNK_ELEMS`` bounds the chunk either way."""
    groups, start, kmax = [], 0, 0
    for i, kc in enumerate(key_counts):
        new_max = max(kmax, kc)
        too_big = (i - start + 1) * new_max * block * bh > CHUNK_ELEMS
        mismatch = i > start and (kc > PAD_RATIO * kmax or PAD_RATIO * kc < kmax)
        if i > start and (too_big or mismatch):
            groups.append((start, i))
            start, new_max = i, kc
        kmax = new_max
    groups.append((start, len(key_counts)))
    return groups


def block_positions(q_pos: torch.Tensor, nqb: int, block: int = BLOCK) -> torch.Tensor:
    """[nqb, BLOCK] query positions; padded rows repeat the last real position (their output is
    discarded, and they see that position's keys, so their softmax is finite)."""
    padded = torch.full((nqb * block,), int(q_pos[-1]), dtype=torch.long)
    padded[: q_pos.numel()] = q_pos
    return padded.reshape(nqb, block)


def block_docs(doc: torch.Tensor, nqb: int, block: int = BLOCK) -> torch.Tensor:
    """[B, nqb, block] document ids of the query blocks; padded rows repeat the last real query's
    (as ``block_positions`` repeats its position), so they see its keys."""
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
    # An evenly sliding run (a plain window) gives a band of the run rounded up to whole BLOCKs, under
    # one BLOCK more (the ``+ BLOCK``). Runs that do not slide evenly (a bidirectional window cut by
    # documents) widen the band with masked columns; past BAND_SLACK × the longest run the chunk takes
    # the generic padded gather and index_add_ scatter instead.
    if band_len > BAND_SLACK * max(e - a for a, e in runs) + BLOCK:
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
def positional_plan(pattern: Pattern, q_runs: tuple, k_runs: tuple, seq_len: int, bh: int) -> Plan:
    """The CPU plan of a positional pattern for positions given as ``position_runs`` (memoised)."""
    q_pos = torch.cat([torch.arange(s, s + n) for s, n in q_runs])
    k_pos = torch.cat([torch.arange(s, s + n) for s, n in k_runs])
    nqb = math.ceil(q_pos.numel() / BLOCK)
    qb_pos = block_positions(q_pos, nqb)
    rows = [rows_for(k_pos, pattern.kv_ranges(int(p.min()), int(p.max()) + 1, seq_len)) for p in qb_pos]
    n_prefix_rows = int(torch.searchsorted(k_pos, torch.tensor(pattern.num_global)))
    chunks, margin = [], 0
    for b0, b1 in group_blocks([len(r) for r in rows], bh):
        idx, valid, band, reach = gather_rows(rows, b0, b1, n_prefix_rows, q_pos.numel(), k_pos.numel())
        margin = max(margin, reach)
        mask = pattern.allowed(qb_pos[b0:b1, :, None], k_pos[idx][:, None, :], seq_len) & valid[:, None, :]
        real = torch.arange(b0 * BLOCK, b1 * BLOCK).reshape(b1 - b0, BLOCK) < q_pos.numel()
        empty = real & ~mask.any(-1)
        if empty.any():
            raise EmptyRowError(f"query at position {int(qb_pos[b0:b1][empty][0])} has no allowed key among the keys given")
        is_global = (k_pos[idx] < pattern.num_global) & valid
        masked = mask_spans(~mask[None, None, :, None])
        chunks.append(Chunk(b0 * BLOCK, b1 - b0, idx[None, None], masked, is_global[None, None, :, None, None], band,
                            BLOCK))
    return Plan(q_pos.numel(), chunks, heads_folded=True, margin=margin)


def content_plan(pattern, q, k, q_pos, k_pos, seq_len, docs=None) -> Plan:
    """Top-k plan: blocks of ``pattern.block_size`` query rows aligned to absolute blocks; each
    (batch, head, query block) gathers its chosen key blocks (select=query: the union of its queries'
    choices, and each row masks the blocks it did not choose). Selection carries no gradient; document
    ids (``docs`` = (q_doc [B, Q], k_doc [B, K])) only narrow the mask of the chosen blocks."""
    bs = pattern.block_size
    if q_pos[0] % bs or not torch.equal(q_pos, torch.arange(int(q_pos[0]), int(q_pos[0]) + q_pos.numel())):
        raise ValueError("top-k blocked kernel: query positions must be one contiguous, block-aligned range")
    B, H, Hkv, K = q.shape[0], q.shape[1], k.shape[1], k.shape[2]
    G = H // Hkv
    q_ids, q_inv = torch.unique(q_pos // bs, return_inverse=True)
    k_ids, k_inv = torch.unique(k_pos // bs, return_inverse=True)
    row_choice = None
    with torch.no_grad():
        k_means = block_mean(k.repeat_interleave(G, dim=1), k_inv, len(k_ids))
        if pattern.per_query:
            row_choice = pattern.query_choice(q, q_ids[q_inv], k_means, k_ids)  # (B, H, Q, S)
            chosen = union_per_block(row_choice, q_inv, len(q_ids), len(k_ids))
        else:
            chosen = pattern.block_choice(q, q_inv, q_ids, k_means, k_ids)
    # select=query: a tile holds the most blocks any (batch, head, query block) needs (a CPU sync)
    nsel = int(chosen.sum(-1).max()) if pattern.per_query else min(pattern.top_k + 2, len(k_ids))
    order = torch.sort(chosen.to(torch.int8), dim=-1, descending=True, stable=True)
    sel, sel_ok = order.indices[..., :nsel].cpu(), order.values[..., :nsel].bool().cpu()  # [B, H, nQ, nsel]
    starts = torch.searchsorted(k_pos, k_ids * bs)
    ends = torch.searchsorted(k_pos, (k_ids + 1) * bs)
    rows = starts[sel][..., None] + torch.arange(bs)  # [B, H, nQ, nsel, bs]
    valid = (rows < ends[sel][..., None]) & sel_ok[..., None]
    rows = torch.where(valid, rows, torch.zeros_like(rows)).flatten(-2)
    valid = valid.flatten(-2)  # [B, H, nQ, Kc]
    qb_pos = block_positions(q_pos, len(q_ids), bs)
    mask = pattern.allowed(qb_pos[None, None, :, :, None], k_pos[rows][..., None, :], seq_len) & valid[..., None, :]
    if row_choice is not None:
        mask &= _rows_chose(row_choice.cpu(), sel, len(q_ids), bs)
    if docs is not None:
        qb_doc = block_docs(docs[0], len(q_ids), bs)[:, None, :, :, None]  # (B, 1, nQ, bs, 1)
        k_doc = docs[1][torch.arange(B)[:, None, None, None], rows][..., None, :]  # (B, H, nQ, 1, Kc)
        mask = mask & document_rule(pattern, qb_pos[None, None, :, :, None], k_pos[rows][..., None, :], qb_doc, k_doc)
    head_base = (torch.arange(B)[:, None] * Hkv + torch.arange(H)[None, :] // G) * K  # [B, H]
    idx = rows + head_base[:, :, None, None]
    is_global = (k_pos[rows] < pattern.num_global) & valid
    chunks = []
    for b0, b1 in group_blocks([idx.shape[-1]] * len(q_ids), B * H, bs):
        chunks.append(Chunk(b0 * bs, b1 - b0, idx[:, :, b0:b1], mask_spans(~mask[:, :, b0:b1, None]),
                            is_global[:, :, b0:b1, None, None], None, bs))
    return Plan(q_pos.numel(), [_to(c, q.device) for c in chunks], heads_folded=False, maybe_empty=docs is not None)


def _rows_chose(row_choice: torch.Tensor, sel: torch.Tensor, nqb: int, bs: int) -> torch.Tensor:
    """[B, H, nQ, bs, nsel·bs]: whether each query row chose the tile's key block of each column
    (``sel`` [B, H, nQ, nsel]: the tile's blocks; ``row_choice`` [B, H, Q, S]: each query's, −1 none).
    Padded rows repeat the last real query's choice, as ``block_positions`` repeats its position."""
    B, H, Q, S = row_choice.shape
    rc = torch.cat([row_choice, row_choice[:, :, -1:].expand(B, H, nqb * bs - Q, S)], dim=2).view(B, H, nqb, bs, S)
    hit = (rc[..., :, None] == sel[:, :, :, None, None, :]).any(-2)  # (B, H, nQ, bs, nsel)
    return hit.repeat_interleave(bs, dim=-1)


def mask_spans(masked: torch.Tensor):
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


def device_plan(plan: Plan, device: torch.device, B: int, Hkv: int, K: int) -> Plan:
    """Positional plans are built on CPU once; this adds the per-(batch, kv-head) row offsets."""
    base = ((torch.arange(B)[:, None] * Hkv + torch.arange(Hkv)[None, :]) * K)[:, :, None, None]
    chunks = [_to(Chunk(c.row0, c.nb, c.idx + base, c.masked, c.is_global, c.band, c.block), device)
              for c in plan.chunks]
    return Plan(plan.q_rows, chunks, plan.heads_folded, plan.margin, plan.maybe_empty)


cached_device_plan = functools.lru_cache(maxsize=32)(device_plan)  # per (CPU plan, device, shape)
