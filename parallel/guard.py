"""Startup guard: run sp_attention on a small random probe and compare with the single-device oracle.

Every rank builds the same full probe from a shared seed (equivalent to all-gathering the shards,
without the traffic) and checks three things against ``reference_attention`` on the full probe:

1. its local kernel alone (its queries against all keys) — pinpoints a broken kernel on one rank;
2. its ``sp_attention`` output;
3. the gradients of its q, k, v (these mix ranks: a halo key's gradient comes from its neighbour).

The per-rank verdicts are all-reduced, so every rank raises the same error, naming the pattern
and the rank(s) where each check failed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.contract import AttnCall
from kernels.reference import reference_attention
from model.pattern import Pattern
from parallel.context import ParallelContext
from parallel.sharding import positions, shard
from parallel.sp_attention import pick_strategy, resolve_kernel, sp_attention

CHECKS = ("local kernel", "output", "gradients")


class ShardMismatchError(RuntimeError):
    """Sequence-parallel attention disagrees with the single-device reference."""


def _probe(seed: int, H: int, Hkv: int, n: int, D: int, device):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, w = (torch.randn(1, h, n, D, generator=gen) for h in (H, Hkv, Hkv, H))
    return [x.to(device).requires_grad_(i < 3) for i, x in enumerate((q, k, v, w))]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())


def _errors(pattern, ctx, strategy, backend, n, H, Hkv, head_dim, seed) -> list[float]:
    """[local kernel, output, gradients] max errors of this rank (inf where the step raised)."""
    q, k, v, w = _probe(seed, H, Hkv, n, head_dim, ctx.device)
    ref = reference_attention(q, k, v, pattern, seq_len=n).out
    (ref * w).sum().backward()
    errs = [float("inf")] * 3
    kernel = resolve_kernel(backend)
    pos, all_pos = positions(n, ctx, ctx.device), torch.arange(n, device=ctx.device)
    with torch.no_grad():
        # content-based patterns choose blocks from the queries' block means: give them every query
        q_in, q_pos = (q, all_pos) if pattern.content_based else (shard(q, ctx, 2), pos)
        out_k = kernel(q_in, k, v, pattern, AttnCall(q_pos=q_pos, k_pos=all_pos, seq_len=n)).out
        out_k = shard(out_k, ctx, 2) if pattern.content_based else out_k
    errs[0] = _max_err(out_k, shard(ref, ctx, 2))
    mine = [shard(x.detach(), ctx, 2).clone().requires_grad_() for x in (q, k, v)]
    out = sp_attention(*mine, pattern, ctx, AttnCall(seq_len=n), strategy=strategy, backend=backend).out
    errs[1] = _max_err(out, shard(ref, ctx, 2))
    (out * shard(w, ctx, 2)).sum().backward()
    errs[2] = max(_max_err(x.grad, shard(full.grad, ctx, 2)) for x, full in zip(mine, (q, k, v), strict=True))
    return errs


PROBE_MAX_TOKENS = 2048  # the reference runs on the whole probe: O(n²) time and memory


def probe_local_len(pattern: Pattern, sp_size: int, seq_len: int) -> int:
    """Positions per rank of the probe for a run of ``seq_len`` tokens over ``sp_size`` ranks.

    Up to PROBE_MAX_TOKENS in all: the run's own L, so the probe has the run's geometry exactly
    (halo hops, which ranks own globals, block alignment). Longer: the smallest length >= 32 that
    still holds every global token on rank 0 (when the run does) plus regular queries, in whole
    blocks of the pattern (content-based and BigBird blocks); a run whose globals span ranks keeps L.
    """
    L = seq_len // sp_size
    if seq_len <= PROBE_MAX_TOKENS:
        return L
    block, g = getattr(pattern, "block_size", 1), pattern.num_global
    want = max(32, g + 1) if g < L else L
    return min(-(-want // block) * block, L)


def check_sp_attention(pattern: Pattern, ctx: ParallelContext, strategy: str = "auto", backend="auto",
                       local_len: int | None = None, head_dim: int = 16, seed: int = 0, atol: float = 1e-4,
                       seq_len: int | None = None, heads: tuple[int, int] | None = None) -> float:
    """Raise ShardMismatchError if sharded attention differs from the reference; return the max error.

    ``seq_len`` and ``heads`` (query, key/value heads) describe the real run: the probe then takes
    its geometry (``probe_local_len``) and the strategy the run will use (``auto`` decides by the
    sequence length and heads). Without them: ``local_len`` (default 32) positions per rank.
    The probe has 2·P query heads over P KV heads (GQA, and divisible for Ulysses). ``atol``: fp32 on
    O(1) random data; sharding only reorders the softmax sums (LSE merges), a few ulps, far below
    1e-4, while a wrong key set moves results by O(0.1).
    """
    P = ctx.sp_size
    if seq_len is not None:
        strategy = pick_strategy(pattern, P, seq_len, *(heads or (2 * P, P)), strategy)
        local_len = local_len or probe_local_len(pattern, P, seq_len)
    n = P * (local_len or 32)
    pattern.validate(n)
    H, Hkv = 2 * P, P
    failure = None
    try:
        errs = _errors(pattern, ctx, strategy, backend, n, H, Hkv, head_dim, seed)
    except Exception as exc:  # must still reach the all-reduce below, or the peers would hang in it
        failure, errs = exc, [float("inf")] * 3
    bad = torch.zeros(len(CHECKS), P, device=ctx.device)
    bad[:, ctx.sp_rank] = torch.tensor([float(not e <= atol) for e in errs])
    dist.all_reduce(bad, group=ctx.sp_group)
    if not bad.any():
        return max(errs)
    chosen = pick_strategy(pattern, ctx.sp_size, n, H, Hkv, strategy)
    where = "; ".join(f"{name} differs on SP rank(s) {[int(r) for r in torch.nonzero(row).flatten()]}"
                      for name, row in zip(CHECKS, bad, strict=True) if row.any())
    msg = (f"sp_attention check failed for {pattern!r} (strategy={chosen}, {P} SP ranks): {where}; "
           f"max errors on rank {ctx.sp_rank}: " + ", ".join(f"{e:.3g}" for e in errs) + f" (atol {atol:g})")
    raise ShardMismatchError(msg + (f"; raised here: {failure!r}" if failure is not None else "")) from failure
