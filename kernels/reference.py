"""Dense reference attention: the oracle every fast path and every sharded run is tested against.

Plain torch, O(Q·K) memory, softmax in fp32 (fp64 for fp64 inputs), differentiable by autograd. Slow on purpose: it builds the
full boolean mask from the pattern and nothing about it is clever.

Learned sinks are computed the direct way here — one more softmax column of score ``sinks[h]`` whose
probability is dropped — so that the closed form every fast path uses (``kernels.stats.apply_sinks``)
is checked against an independent computation. Documents mask by ``model.pattern.documents``'s rule,
as every backend does; the dense construction of the mask is this file's own.
"""

from __future__ import annotations

import math

import torch

from kernels.contract import AttnResult
from kernels.inputs import EmptyRowError, check_docs, check_inputs
from kernels.stats import stats_from_probs
from model.pattern import Pattern
from model.pattern.documents import document_rule


def pattern_mask(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                 seq_len: int | None = None) -> torch.Tensor:
    """Boolean mask, [Q, K] for positional patterns or [B, H, Q, K] for content-based ones."""
    if pattern.content_based:
        return pattern.content_mask(q.detach(), k.detach(), q_pos, k_pos)
    return pattern.mask(q_pos, k_pos, seq_len)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern,
                        q_pos: torch.Tensor | None = None, k_pos: torch.Tensor | None = None,
                        scale: float | None = None, seq_len: int | None = None, return_stats: bool = False,
                        q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None,
                        sinks: torch.Tensor | None = None):
    """``AttnResult``: out [B, H, Q, D], lse [B, H, Q] fp32 (fp64 for fp64 q) of softmax(scale · q kᵀ + mask) v,
    and with ``return_stats`` the per-query statistics partials (``kernels.stats.AttnStats``), else None.
    ``q_doc`` [B, Q], ``k_doc`` [B, K]: document ids (``document_rule``); a query left with no key by
    the documents alone (a shard's partial over remote keys) gets out = 0, lse = −inf, while a query
    the pattern itself leaves empty is an error. ``sinks`` [H]: learned sink logits (softmax over keys
    plus the sink; ``lse`` and the stats include it).

    q [B, H, Q, D]; k, v [B, Hkv, K, D] with H % Hkv == 0 (grouped-query attention). Positions
    default to arange; ``lse`` is the log-sum-exp of the scaled allowed scores of each query.
    """
    B, H, Q, D, Hkv, K = check_inputs(q, k, v, q_pos, k_pos)
    q_pos = torch.arange(Q) if q_pos is None else q_pos.cpu().long()
    k_pos = torch.arange(K) if k_pos is None else k_pos.cpu().long()
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q_doc, k_doc = check_docs(q_doc, k_doc, B, Q, K)
    mask = pattern_mask(pattern, q, k, q_pos, k_pos, seq_len).to(q.device)
    empty = ~mask.any(-1)
    if empty.any():
        first = int(q_pos[empty.reshape(-1, Q).any(0)][0])
        raise EmptyRowError(f"query at position {first} has no allowed key among the {K} keys given")
    if q_doc is not None:
        docs = document_rule(pattern, q_pos[:, None], k_pos[None, :], q_doc[:, :, None], k_doc[:, None, :])
        mask = mask & docs[:, None].to(q.device)  # (B, 1 or H, Q, K)
    k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, K, D): the oracle may materialise GQA
    v = v.repeat_interleave(H // Hkv, dim=1)
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 softmax; fp64 stays fp64 for gradchecks
    s = torch.einsum("bhqd,bhkd->bhqk", q.to(acc), k.to(acc)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    is_global = k_pos.to(q.device) < pattern.num_global
    if sinks is not None:  # the sink is one more column, with no value and never masked
        s = torch.cat([s, sinks.to(acc)[None, :, None, None].expand(B, H, Q, 1)], dim=-1)  # (B, H, Q, K + 1)
        is_global = torch.cat([is_global, is_global.new_zeros(1)])
    empty = torch.isneginf(s).all(-1)  # only possible through documents, and only without sinks
    lse = torch.logsumexp(s.masked_fill(empty[..., None], 0.0), dim=-1)  # (B, H, Q); finite grads
    p = torch.exp(s - lse[..., None])  # exactly 0 on an empty row (every s is -inf)
    lse = lse.masked_fill(empty, float("-inf"))
    out = torch.einsum("bhqk,bhkd->bhqd", p[..., :K], v.to(acc)).to(q.dtype)
    if return_stats:
        with torch.no_grad():
            st = stats_from_probs(s, p, is_global)
            if sinks is not None:
                st.sink_mass = p[..., K]
            return AttnResult(out, lse, st)
    return AttnResult(out, lse, None)
