"""The one input check every kernel backend starts with (``kernels.sparse_attention``'s contract)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Shapes(NamedTuple):
    B: int
    H: int
    Q: int
    D: int
    Hkv: int
    K: int


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor | None = None,
                 k_pos: torch.Tensor | None = None) -> Shapes:
    """q [B, H, Q, D]; k, v [B, Hkv, K, D] with H a multiple of Hkv (GQA); positions [Q] and [K]."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q, k, v: must be [B, H, Q, D], [B, Hkv, K, D] and the same as k; got {list(q.shape)}, "
                         f"{list(k.shape)}, {list(v.shape)}")
    B, H, Q, D = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k: batch and head dim must match q's ({B}, {D}); got {list(k.shape)}")
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    for name, pos, n in (("q_pos", q_pos, Q), ("k_pos", k_pos, K)):
        if pos is not None and tuple(pos.shape) != (n,):
            raise ValueError(f"{name}: must be [{n}] (one absolute position per row), got {list(pos.shape)}")
    return Shapes(B, H, Q, D, Hkv, K)
