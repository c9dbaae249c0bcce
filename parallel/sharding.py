"""Sequence sharding: rank r of the SP group holds the contiguous positions [r·L, (r+1)·L), L = n / P."""

from __future__ import annotations

import torch

from parallel.context import ParallelConfigError, ParallelContext


def check_divisible(seq_len: int, sp_size: int) -> int:
    """The local length L = seq_len / sp_size; a clear error when it is not an integer."""
    if seq_len % sp_size:
        raise ParallelConfigError(
            f"seq_len={seq_len} must be a multiple of parallel.sequence_parallel_size={sp_size} "
            f"(each rank holds an equal contiguous chunk); nearest allowed seq_len values: "
            f"{seq_len - seq_len % sp_size}, {seq_len + sp_size - seq_len % sp_size}")
    return seq_len // sp_size


def local_range(seq_len: int, sp_rank: int, sp_size: int) -> tuple[int, int]:
    """[start, end) of the positions held by ``sp_rank``: the sharding rule, in this one place."""
    if sp_size < 1:
        raise ParallelConfigError(f"parallel.sequence_parallel_size: must be >= 1, got {sp_size}")
    if not 0 <= sp_rank < sp_size:
        raise ValueError(f"sp_rank: must be in [0, {sp_size}), got {sp_rank}")
    L = check_divisible(seq_len, sp_size)
    return sp_rank * L, (sp_rank + 1) * L


def positions(seq_len: int, ctx: ParallelContext, device: torch.device | str = "cpu") -> torch.Tensor:
    """LongTensor[L]: the absolute positions of this rank's shard."""
    start, end = local_range(seq_len, ctx.sp_rank, ctx.sp_size)
    return torch.arange(start, end, device=device)


def shard(x: torch.Tensor, ctx: ParallelContext, dim: int) -> torch.Tensor:
    """This rank's chunk of the full-sequence tensor ``x`` along ``dim`` (a view)."""
    start, end = local_range(x.shape[dim], ctx.sp_rank, ctx.sp_size)
    return x.narrow(dim, start, end - start)
