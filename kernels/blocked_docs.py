"""Document masking for the blocked kernel: plans that gather only the keys a query block may see.

Packed documents make the key set of a query block data-dependent: of the rows the pattern allows
(``Pattern.kv_ranges``), a block needs only the global keys and the keys whose document is one of
its queries' documents (all of them for a bidirectional global query). The plan keeps exactly those
rows per query block — the union over the batch — so a dense causal layer over 1k-token documents
gathers ~1k keys per block instead of the whole prefix: short documents get cheaper, not only
correct. Inside a block the element mask is the pattern's rule AND ``document_rule`` per batch
element, so chunk masks carry a batch axis.

A row can be left with no key only by the documents (a shard's partial over its remote keys): such a
row gets out 0 and lse −inf (``Plan.maybe_empty``), which the LSE merge treats as "no keys here". A
row the pattern alone leaves empty is still an ``EmptyRowError``.

Plans depend on the document ids, which change every batch but not between the layers of one step,
so the last few are cached by a digest of the ids (as FlexAttention's block masks are by positions).
"""

from __future__ import annotations

import hashlib
import math

import torch

from kernels.blocked_plan import (
    BLOCK,
    Chunk,
    Plan,
    block_docs,
    block_positions,
    content_plan,
    device_plan,
    gather_rows,
    group_blocks,
    mask_spans,
    position_runs,
    positional_plan,
    rows_for,
)
from kernels.caches import LRUCache
from model.pattern import Pattern
from model.pattern.documents import document_rule

# Process-wide: (pattern, positions, shapes, ids digest, device) -> device plan, the last 4 (one step's
# layers share one; cleared by kernels.blocked.clear_caches).
DOC_PLANS = LRUCache(maxsize=4)


def doc_plan(pattern: Pattern, q, k, q_pos, k_pos, q_doc, k_doc, seq_len: int) -> Plan:
    """The device plan for these positions and document ids (q_doc [B, Q], k_doc [B, K] on the CPU)."""
    if pattern.content_based:  # its blocks come from the data anyway: documents narrow the mask only
        return content_plan(pattern, q, k, q_pos, k_pos, seq_len, docs=(q_doc, k_doc))
    B, H, Hkv, K = q.shape[0], q.shape[1], k.shape[1], k.shape[2]
    digest = hashlib.sha1(q_doc.numpy().tobytes() + b"|" + k_doc.numpy().tobytes()).hexdigest()
    key = (pattern, position_runs(q_pos), position_runs(k_pos), seq_len, B, H, Hkv, K, digest, str(q.device))

    def build() -> Plan:
        # The document-free plan (cached by positions) raises EmptyRowError for a row the pattern leaves
        # empty; rows emptied by the documents alone are allowed (see the module docstring).
        positional_plan(pattern, position_runs(q_pos), position_runs(k_pos), seq_len, B * H)
        plan = _positional_doc_plan(pattern, q_pos, k_pos, q_doc, k_doc, seq_len, B * H)
        return device_plan(plan, q.device, B, Hkv, K)  # uncached: DOC_PLANS is this plan's cache

    return DOC_PLANS.get_or_build(key, build)


def _visible_rows(pattern: Pattern, rows: torch.Tensor, k_pos, k_doc, block_pos, block_doc) -> torch.Tensor:
    """The positional ``rows`` that some query of the block may see in some batch element."""
    if not pattern.causal and int(block_pos.min()) < pattern.num_global:
        return rows  # a bidirectional global query sees every key
    keep = k_pos[rows] < pattern.num_global
    for b in range(k_doc.shape[0]):
        keep |= torch.isin(k_doc[b, rows], block_doc[b].unique())
    return rows[keep]


def _one_document(pattern: Pattern, rows: torch.Tensor, k_pos, k_doc, block_doc) -> bool:
    """Whether the block's queries and the keys it gathers are all in one document (globals aside),
    in every batch element: then the documents mask nothing in it."""
    first = block_doc[:, :1]  # (B, 1)
    return bool((block_doc == first).all() and ((k_doc[:, rows] == first) | (k_pos[rows] < pattern.num_global)).all())


def _groups(single: list[bool], key_counts: list[int], bh: int) -> list[tuple[int, int]]:
    """Chunks as ``group_blocks`` makes them, never mixing blocks with and without a document
    boundary: a chunk's mask spans are the union over its blocks, so one boundary would otherwise
    make a whole chunk of single-document blocks pay a masking pass over all its columns."""
    out, start = [], 0
    for i in range(1, len(single) + 1):
        if i == len(single) or single[i] != single[start]:
            out += [(start + a, start + b) for a, b in group_blocks(key_counts[start:i], bh)]
            start = i
    return out


def _positional_doc_plan(pattern, q_pos, k_pos, q_doc, k_doc, seq_len: int, bh: int) -> Plan:
    """Like ``blocked_plan.positional_plan`` with the rows narrowed by documents; chunk masks [B, 1, nb, 1, BLOCK, Kc]."""
    nqb = math.ceil(q_pos.numel() / BLOCK)
    qb_pos, qb_doc = block_positions(q_pos, nqb), block_docs(q_doc, nqb)  # (nqb, BLOCK), (B, nqb, BLOCK)
    rows = [_visible_rows(pattern, rows_for(k_pos, pattern.kv_ranges(int(p.min()), int(p.max()) + 1, seq_len)),
                          k_pos, k_doc, p, qb_doc[:, i]) for i, p in enumerate(qb_pos)]
    n_prefix_rows = int(torch.searchsorted(k_pos, torch.tensor(pattern.num_global)))
    single = [_one_document(pattern, r, k_pos, k_doc, qb_doc[:, i]) for i, r in enumerate(rows)]
    chunks, margin = [], 0
    for b0, b1 in _groups(single, [len(r) for r in rows], bh):
        # Window-shaped rows stay window-shaped when documents cut them: the band form is kept; extra
        # band rows are masked like the window's edges.
        idx, valid, band, reach = gather_rows(rows, b0, b1, n_prefix_rows, q_pos.numel(), k_pos.numel())
        margin = max(margin, reach)
        kp = k_pos[idx]
        allowed = pattern.allowed(qb_pos[b0:b1, :, None], kp[:, None, :], seq_len) & valid[:, None, :]
        if single[b0]:  # the documents mask nothing here: the pattern's mask, shared by the batch
            masked = mask_spans(~allowed[None, None, :, None])  # (1, 1, nb, 1, BLOCK, Kc)
        else:
            docs = document_rule(pattern, qb_pos[b0:b1, :, None], kp[:, None, :], qb_doc[:, b0:b1, :, None],
                                 k_doc[:, idx][:, :, None, :])  # (B, nb, BLOCK, Kc)
            masked = mask_spans(~(allowed & docs)[:, None, :, None])  # (B, 1, nb, 1, BLOCK, Kc)
        is_global = (kp < pattern.num_global) & valid
        chunks.append(Chunk(b0 * BLOCK, b1 - b0, idx[None, None], masked, is_global[None, None, :, None, None], band,
                            BLOCK))
    return Plan(q_pos.numel(), chunks, heads_folded=True, margin=margin, maybe_empty=True)
