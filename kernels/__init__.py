"""Sparse attention kernels. One contract for every backend:

    sparse_attention(q, k, v, pattern, q_pos=None, k_pos=None, backend="auto", return_stats=False)
        -> (out, lse) or (out, lse, stats)

q [B, H, Q, D]; k, v [B, Hkv, K, D] (GQA when Hkv < H); q_pos [Q], k_pos [K] absolute positions
(default arange), so a sequence shard — queries a sub-range, keys ``[globals | range]`` — is computed
exactly. ``lse`` [B, H, Q] fp32 lets partial results be merged (kernels.stats.merge_two); ``stats``
are the per-query partials of entropy, max logit and global mass (kernels.stats.AttnStats).
"""

from __future__ import annotations

import torch

from kernels.reference import EmptyRowError, reference_attention
from model.pattern import Pattern

BACKENDS = ("auto", "reference", "blocked", "flex")


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern,
                     q_pos: torch.Tensor | None = None, k_pos: torch.Tensor | None = None,
                     backend: str = "auto", return_stats: bool = False, scale: float | None = None,
                     seq_len: int | None = None):
    """Sparse attention with the pattern; see the module docstring for the contract."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        backend = pick_backend(q, pattern, return_stats)
    if backend == "reference":
        return reference_attention(q, k, v, pattern, q_pos, k_pos, scale, seq_len, return_stats)
    if backend == "blocked":
        from kernels.blocked import blocked_attention

        return blocked_attention(q, k, v, pattern, q_pos, k_pos, scale, seq_len, return_stats)
    from kernels.flex import flex_attention_backend

    return flex_attention_backend(q, k, v, pattern, q_pos, k_pos, scale, seq_len, return_stats)


def pick_backend(q: torch.Tensor, pattern: Pattern, return_stats: bool) -> str:
    """``flex`` only where it runs forward and backward (CUDA, positional pattern, no stats);
    ``blocked`` everywhere else. FlexAttention has no CPU backward, so ``auto`` never picks it on CPU."""
    if q.is_cuda and not pattern.content_based and not return_stats:
        from kernels.flex import flex_available

        if flex_available():
            return "flex"
    return "blocked"


__all__ = ["sparse_attention", "reference_attention", "EmptyRowError", "BACKENDS", "pick_backend"]
