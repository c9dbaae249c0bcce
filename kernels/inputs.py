"""The input checks every kernel backend starts with (shapes and positions; document ids)."""

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


class EmptyRowError(ValueError):
    """A query has no key it may attend to (its softmax would be 0/0)."""


def check_docs(q_doc, k_doc, B: int, Q: int, K: int):
    """(q_doc, k_doc) as [B, Q] / [B, K] LongTensors on the CPU, or (None, None); one error line if wrong."""
    if q_doc is None and k_doc is None:
        return None, None
    if q_doc is None or k_doc is None:
        raise ValueError("q_doc, k_doc: document ids must be given for both queries and keys, or neither")
    if tuple(q_doc.shape) != (B, Q) or tuple(k_doc.shape) != (B, K):
        raise ValueError(f"q_doc, k_doc: must be [B, Q] = [{B}, {Q}] and [B, K] = [{B}, {K}]; got "
                         f"{list(q_doc.shape)} and {list(k_doc.shape)}")
    if q_doc.is_floating_point() or k_doc.is_floating_point():
        raise ValueError("q_doc, k_doc: document ids must be integer tensors")
    return q_doc.detach().cpu().long(), k_doc.detach().cpu().long()
