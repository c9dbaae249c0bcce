"""Dense reference attention: the oracle every fast path and every sharded run is tested against.

Plain torch, O(Q·K) memory, softmax in fp32 (fp64 for fp64 inputs), differentiable by autograd. Slow on purpose: it builds the
full boolean mask from the pattern and nothing about it is clever.
"""

from __future__ import annotations

import math

import torch

from kernels.stats import stats_from_probs
from model.pattern import Pattern


class EmptyRowError(ValueError):
    """A query has no key it may attend to (its softmax would be 0/0)."""


def pattern_mask(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                 seq_len: int | None = None) -> torch.Tensor:
    """Boolean mask, [Q, K] for positional patterns or [B, H, Q, K] for content-based ones."""
    if pattern.content_based:
        return pattern.content_mask(q.detach(), k.detach(), q_pos, k_pos)
    return pattern.mask(q_pos, k_pos, seq_len)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern,
                        q_pos: torch.Tensor | None = None, k_pos: torch.Tensor | None = None,
                        scale: float | None = None, seq_len: int | None = None, return_stats: bool = False):
    """(out [B, H, Q, D], lse [B, H, Q] fp32, fp64 for fp64 q) of softmax(scale · q kᵀ + mask) v.

    With ``return_stats`` also the per-query statistics partials (``kernels.stats.AttnStats``).

    q [B, H, Q, D]; k, v [B, Hkv, K, D] with H % Hkv == 0 (grouped-query attention). Positions
    default to arange; ``lse`` is the log-sum-exp of the scaled allowed scores of each query.
    """
    B, H, Q, D = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    q_pos = torch.arange(Q) if q_pos is None else q_pos.cpu().long()
    k_pos = torch.arange(K) if k_pos is None else k_pos.cpu().long()
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mask = pattern_mask(pattern, q, k, q_pos, k_pos, seq_len).to(q.device)
    empty = ~mask.any(-1)
    if empty.any():
        first = int(q_pos[empty.reshape(-1, Q).any(0)][0])
        raise EmptyRowError(f"query at position {first} has no allowed key among the {K} keys given")
    k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, K, D): the oracle may materialise GQA
    v = v.repeat_interleave(H // Hkv, dim=1)
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 softmax; fp64 stays fp64 for gradchecks
    s = torch.einsum("bhqd,bhkd->bhqk", q.to(acc), k.to(acc)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Q)
    p = torch.exp(s - lse[..., None])
    out = torch.einsum("bhqk,bhkd->bhqd", p, v.to(acc)).to(q.dtype)
    if return_stats:
        with torch.no_grad():
            return out, lse, stats_from_probs(s, p, k_pos.to(q.device) < pattern.num_global)
    return out, lse
