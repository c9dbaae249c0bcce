"""Sequence-parallel sparse attention: this rank's shard of q, k, v in, this rank's output out.

    sp_attention(q, k, v, pattern, ctx, return_stats=False, strategy="auto", backend="auto",
                 sinks=None, doc_ids=None)

q [B, H, L, D] and k, v [B, Hkv, L, D] hold positions [r·L, (r+1)·L) of a sequence of n = L·P.
``sinks`` [H]: learned sink logits, joined once per query after every partial is merged; the
gradient each rank returns for them is its own queries' share (Ulysses: its heads' slice), so the
sum over the SP group — what the trainer's gradient all-reduce computes — is the single-device one.
``doc_ids`` [B, L]: this shard's document ids (``kernels.reference.document_rule``); the ids of
received keys travel with them (halo, top-k) or are all-gathered once per call (Ulysses, which moves
O(n) anyway); counted as ``doc_ids``.
Strategies:

- ``halo`` (``parallel.halo_attention``): receive only the keys the pattern needs (window halo,
  globals, random/strided blocks) following the static plan; O((w + g)·d) bytes, independent of n.
- ``topk`` (``parallel.topk``): content-based patterns; all-gather the key-block means, select
  locally (the single-device choice), fetch only the chosen remote blocks point-to-point.
- ``ulysses`` (``parallel.ulysses``): DeepSpeed all-to-all over heads; any pattern; O(n·d/P) bytes.
- ``auto``: topk for content-based patterns (their keys depend on the data: no static plan), or
  ulysses when a rank's chunk is not whole blocks and the heads split over P; otherwise halo, unless
  the plan needs more bytes than Ulysses would (e.g. strided or dense patterns whose plan approaches
  an all-gather) and the heads split over P.

``backend`` picks the local kernel (``kernels.sparse_attention``'s backend names) or is a callable
with ``sparse_attention``'s signature (the startup guard's tests pass a deliberately broken one).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

import parallel.global_queries as global_queries
from kernels import sparse_attention
from kernels.stats import AttnStats, head_sums
from model.pattern import Pattern
from parallel.comm import DOC_KIND, CommCounter
from parallel.context import ParallelConfigError, ParallelContext
from parallel.halo import P2PExchange, Tag, kv_routes
from parallel.halo_attention import HaloSpec, halo_attention
from parallel.plan import bidirectional_globals, build_plan, regular_queries, remote_rows
from parallel.sharding import check_divisible
from parallel.topk import TopKSpec, check_blocks, topk_attention
from parallel.ulysses import check_heads, ulysses_attention

STRATEGIES = ("auto", "halo", "topk", "ulysses")


@dataclass
class ShardStats:
    """Exact per-query statistics of this rank's queries, merged over every rank's keys."""

    lse: torch.Tensor  # [B, H, L]
    stats: AttnStats

    def head_sums(self, ctx: ParallelContext) -> dict[str, torch.Tensor]:
        """``kernels.stats.head_sums`` summed (max for max_logit) over the SP group: equal to the
        single-device sums of the whole sequence."""
        return reduce_head_sums(head_sums(self.lse, self.stats), ctx)


def reduce_head_sums(sums: dict[str, torch.Tensor], ctx: ParallelContext) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sums.items():
        value = value.clone()
        op = dist.ReduceOp.MAX if key == "max_logit" else dist.ReduceOp.SUM
        dist.all_reduce(value, op=op, group=ctx.sp_group)
        out[key] = value
    return out


def resolve_kernel(backend: str | Callable) -> Callable:
    return backend if callable(backend) else functools.partial(sparse_attention, backend=backend)


def pick_strategy(pattern: Pattern, sp_size: int, seq_len: int, heads: int, kv_heads: int,
                  strategy: str = "auto") -> str:
    """``halo``, ``topk`` or ``ulysses`` for this call; errors name the setting. Needs no process
    group, so the trainer validates a config with it before any group starts."""
    if strategy not in STRATEGIES:
        raise ParallelConfigError(f"parallel.strategy: must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if strategy == "halo" and pattern.content_based:
        raise ParallelConfigError(f"parallel.strategy=halo: {type(pattern).__name__} is content-based (no static "
                                  "exchange plan); use strategy=topk, ulysses or auto")
    if strategy == "topk" and not pattern.content_based:
        raise ParallelConfigError(f"parallel.strategy=topk: serves content-based patterns only, got "
                                  f"{type(pattern).__name__}; use strategy=halo or auto")
    chosen = strategy if strategy != "auto" else _auto_strategy(pattern, sp_size, seq_len, heads, kv_heads)
    if chosen == "ulysses":
        check_heads(heads, sp_size)
    if chosen == "topk":
        check_blocks(seq_len // sp_size, pattern.block_size, sp_size)
    return chosen


def _auto_strategy(pattern: Pattern, P: int, seq_len: int, heads: int, kv_heads: int) -> str:
    if pattern.content_based:  # its keys depend on the data: no static plan; topk needs whole blocks
        whole_blocks = (seq_len // P) % pattern.block_size == 0
        return "topk" if whole_blocks or heads % P else "ulysses"  # neither: topk names the fix
    if P == 1:
        return "halo"
    if pattern.bounded or heads % P:
        return "halo"
    # unbounded positional pattern (strided, dense): its plan may approach an all-gather
    halo_rows = build_plan(pattern, seq_len, P).max_recv_keys() * 2 * kv_heads
    ulysses_rows = seq_len // P * (2 * heads + 2 * kv_heads) * (P - 1) / P
    return "halo" if halo_rows <= ulysses_rows else "ulysses"


def sp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, ctx: ParallelContext,
                 return_stats: bool = False, strategy: str = "auto", backend: str | Callable = "auto",
                 seq_len: int | None = None, counter: CommCounter | None = None, layer: str | int = 0,
                 scale: float | None = None, sinks: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None):
    """Attention of this rank's queries; ``out`` or ``(out, ShardStats)``. See the module docstring."""
    H, L = q.shape[1], q.shape[2]
    if k.shape[2] != L or v.shape != k.shape:
        raise ValueError(f"k and v must be this rank's shard like q: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if sinks is not None and tuple(sinks.shape) != (H,):
        raise ValueError(f"sinks: must be [H] = [{H}] (one logit per query head), got {list(sinks.shape)}")
    if doc_ids is not None and (tuple(doc_ids.shape) != (q.shape[0], L) or doc_ids.is_floating_point()):
        raise ValueError(f"doc_ids: must be this shard's integer document ids [B, L] = [{q.shape[0]}, {L}], "
                         f"got {doc_ids.dtype} {list(doc_ids.shape)}")
    doc_ids = None if doc_ids is None else doc_ids.long()
    n = L * ctx.sp_size if seq_len is None else seq_len
    if check_divisible(n, ctx.sp_size) != L:
        raise ParallelConfigError(f"seq_len={n} / parallel.sequence_parallel_size={ctx.sp_size} must equal the "
                                  f"local length {L} of q")
    kernel = resolve_kernel(backend)
    chosen = pick_strategy(pattern, ctx.sp_size, n, H, k.shape[1], strategy)
    if chosen == "ulysses":
        out, lse, stats = ulysses_attention(q, k, v, pattern, ctx, kernel, n, scale, return_stats, counter, layer,
                                            sinks, doc_ids)
    elif chosen == "topk":
        spec = TopKSpec(pattern, n, ctx, kernel, scale, return_stats, counter, layer, doc_ids)
        out, lse, stats = topk_attention(q, k, v, spec, sinks)
    else:
        spec = halo_spec(pattern, ctx, n, q.device, kernel, scale, return_stats, counter, layer, doc_ids)
        out, lse, stats = halo_attention(q, k, v, spec, sinks)
    return (out, ShardStats(lse, stats)) if return_stats else out


def halo_spec(pattern: Pattern, ctx: ParallelContext, seq_len: int, device: torch.device, kernel: Callable,
              scale: float | None, return_stats: bool, counter: CommCounter | None, layer: str | int,
              doc_ids: torch.Tensor | None = None) -> HaloSpec:
    """The static description of one halo call on this rank (plan, rows, exchanges)."""
    P, r = ctx.sp_size, ctx.sp_rank
    plan = build_plan(pattern, seq_len, P)
    L = plan.local_len
    start = r * L
    qs, _ = regular_queries(pattern, start, start + L)
    rows = remote_rows(pattern, seq_len, P, r)
    sends, recvs = kv_routes(plan, r)
    n_gq = bidirectional_globals(pattern)
    spec = HaloSpec(
        pattern=pattern, seq_len=seq_len, local_pos=torch.arange(start, start + L, device=device),
        reg_start=qs - start, remote_pos=plan.remote_positions(r).to(device),
        remote_rows=None if len(rows) == start + L - qs else rows.to(device),
        kernel=kernel, scale=scale, return_stats=return_stats,
        kv_exchange=P2PExchange(ctx, sends, recvs, Tag.KV, counter, layer),
        num_global_queries=n_gq, sp_size=P, sp_rank=r, doc_ids=doc_ids,
    )
    if doc_ids is not None:  # the received keys' document ids: the same routes, one int64 column
        spec.doc_exchange = P2PExchange(ctx, sends, recvs, Tag.KV_DOCS, counter, layer, kind=DOC_KIND)
    if n_gq:
        q_routes = global_queries.query_routes(n_gq, L, P, r)
        partial_routes = global_queries.partial_routes(n_gq, L, P, r)
        spec.q_exchange = P2PExchange(ctx, *q_routes, Tag.GLOBAL_Q, counter, layer)
        spec.partial_exchange = P2PExchange(ctx, *partial_routes, Tag.GLOBAL_PARTIAL, counter, layer)
    return spec
