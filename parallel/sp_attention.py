"""Sequence-parallel sparse attention: this rank's shard of q, k, v in, this rank's result out.

    sp_attention(q, k, v, pattern, ctx, call=AttnCall(), strategy="auto", backend="auto", counter=None)
        -> AttnResult(out [B, H, L, D], lse [B, H, L], stats | None)

q [B, H, L, D] and k, v [B, Hkv, L, D] hold positions [r·L, (r+1)·L) of a sequence of n = L·P
(``call.seq_len``; None: L·P); the call's positions are those, whatever it says. lse and stats are
exact: merged over every rank's keys (and the sink), and differentiable on the halo and top-k paths
(a caller may merge another partial into the result). Ulysses without statistics returns lse None (it
stays on the ranks that own the heads), and with them an lse without gradient. ``call.sinks`` [H]: learned sink logits, joined once per query after every partial is merged; the
gradient each rank returns for them is its own queries' share (Ulysses: its heads' slice), so the
sum over the SP group — what the trainer's gradient all-reduce computes — is the single-device one.
``call.q_doc`` [B, L]: this shard's document ids (``model.pattern.documents.document_rule``); the ids of
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
  the heads split over P and the pattern is unbounded (strided, dense) with a plan that needs more
  bytes than Ulysses would (one approaching an all-gather) or that leaves the busiest rank more than
  ``MAX_HALO_IMBALANCE`` times the mean work (causal dense: the last rank's queries see every key);
  then ulysses, whose ranks do equal work.

``call.q_global`` (model.global_rope=fixed): the keys a query sees only because they are global are
scored with it (``parallel.global_part``): the global keys travel to every rank, the pattern's local
part runs on the strategy above (halo or top-k; Ulysses is refused), and the two merge by LSE.

``backend`` picks the local kernel (``kernels.attend``'s backend names) or is a callable with
``kernels.attend``'s signature, (q, k, v, pattern, call) -> AttnResult (the startup guard's tests pass a
deliberately broken one).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

import parallel.global_queries as global_queries
from kernels import attend, check_sinks
from kernels.contract import AttnCall, AttnResult
from kernels.global_part import local_part, scores_apart
from model.pattern import Pattern
from parallel.comm import DOC_KIND, CommCounter
from parallel.context import ParallelConfigError, ParallelContext
from parallel.global_part import sharded_apart
from parallel.halo import P2PExchange, Tag, kv_routes
from parallel.halo_attention import HaloSpec, halo_attention
from parallel.plan import bidirectional_globals, build_plan, regular_queries, remote_rows
from parallel.sharding import check_divisible
from parallel.topk import TopKSpec, check_blocks, topk_attention
from parallel.ulysses import check_heads, ulysses_attention

STRATEGIES = ("auto", "halo", "topk", "ulysses")


def resolve_kernel(backend: str | Callable) -> Callable:
    return backend if callable(backend) else functools.partial(attend, backend=backend)


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
    # unbounded positional pattern (strided, dense): its plan may approach an all-gather, and under a
    # causal mask the last rank's queries see P times the keys of the first one's (3x the first's work
    # at P=2 for dense); Ulysses gives every rank all n positions of H/P heads, so equal work
    halo_rows = build_plan(pattern, seq_len, P).max_recv_keys() * 2 * kv_heads
    ulysses_rows = seq_len // P * (2 * heads + 2 * kv_heads) * (P - 1) / P
    if halo_rows > ulysses_rows or halo_imbalance(pattern, seq_len, P) > MAX_HALO_IMBALANCE:
        return "ulysses"
    return "halo"


def check_strategy(patterns: Sequence[Pattern], sp_size: int, seq_len: int, heads: int, kv_heads: int,
                   strategy: str = "auto") -> None:
    """ParallelConfigError naming the setting when a layer's local part would run on Ulysses."""
    for i, p in enumerate(patterns):
        if scores_apart(p) and pick_strategy(local_part(p), sp_size, seq_len, heads, kv_heads, strategy) == "ulysses":
            raise ParallelConfigError(f"model.global_rope=fixed: layer {i}'s local part would run on "
                                      f"parallel.strategy=ulysses (asked: {strategy}), whose lse comes back without a "
                                      "gradient; use parallel.strategy=halo, or model.global_rope=position")


MAX_HALO_IMBALANCE = 1.25  # busiest rank's (query, key) pairs / the mean that Ulysses gives every rank


@functools.lru_cache(maxsize=64)
def halo_imbalance(pattern: Pattern, seq_len: int, P: int, samples: int = 16) -> float:
    """The busiest rank's share of the pattern's (query, key) pairs over the mean, as the halo strategy
    splits them (each rank its own queries). Each rank's pairs are estimated from the exact key counts
    of ``samples`` evenly spaced queries (midpoints of equal slices: exact when the count is linear in
    the position, as under causal dense), so the cost is O(P·samples·n), not O(n²)."""
    L = seq_len // P
    work = [sum(pattern.num_keys(r * L + (2 * i + 1) * L // (2 * samples), seq_len) for i in range(samples))
            for r in range(P)]
    return max(work) * P / max(sum(work), 1)


def sp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, ctx: ParallelContext,
                 call: AttnCall | None = None, strategy: str = "auto", backend: str | Callable = "auto",
                 counter: CommCounter | None = None) -> AttnResult:
    """Attention of this rank's queries; see the module docstring."""
    call = AttnCall() if call is None else call
    H, L = q.shape[1], q.shape[2]
    if k.shape[2] != L or v.shape != k.shape:
        raise ValueError(f"k and v must be this rank's shard like q: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    check_sinks(call.sinks, H)
    doc = call.q_doc
    if doc is not None and (tuple(doc.shape) != (q.shape[0], L) or doc.is_floating_point()):
        raise ValueError(f"q_doc: must be this shard's integer document ids [B, L] = [{q.shape[0]}, {L}], "
                         f"got {doc.dtype} {list(doc.shape)}")
    n = L * ctx.sp_size if call.seq_len is None else call.seq_len
    if check_divisible(n, ctx.sp_size) != L:
        raise ParallelConfigError(f"seq_len={n} / parallel.sequence_parallel_size={ctx.sp_size} must equal the "
                                  f"local length {L} of q")
    doc = None if doc is None else doc.long()
    call = replace(call, seq_len=n, q_doc=doc, k_doc=doc)
    if call.global_part:  # model.global_rope=fixed: the global keys scored apart (parallel.global_part)
        if scores_apart(pattern):
            check_strategy([pattern], ctx.sp_size, n, H, k.shape[1], strategy)

            def local(q_, k_, v_, part, part_call):  # partial (a): the local part, on this very path
                return sp_attention(q_, k_, v_, part, ctx, part_call, strategy, backend, counter)

            return sharded_apart(q, k, v, pattern, ctx, call, counter, local)
        call = replace(call, q_global=None)
    kernel = resolve_kernel(backend)
    chosen = pick_strategy(pattern, ctx.sp_size, n, H, k.shape[1], strategy)
    if chosen == "ulysses":
        return ulysses_attention(q, k, v, pattern, ctx, kernel, call, counter)
    keys_call = call.without_sinks()  # the strategies join the sinks once, after every partial is merged
    if chosen == "topk":
        return topk_attention(q, k, v, TopKSpec(pattern, keys_call, ctx, kernel, counter), call.sinks)
    return halo_attention(q, k, v, halo_spec(pattern, ctx, keys_call, q.device, kernel, counter), call.sinks)


def halo_spec(pattern: Pattern, ctx: ParallelContext, call: AttnCall, device: torch.device, kernel: Callable,
              counter: CommCounter | None) -> HaloSpec:
    """The static description of one halo call on this rank (plan, rows, exchanges)."""
    P, r, seq_len, layer = ctx.sp_size, ctx.sp_rank, call.seq_len, call.layer
    plan = build_plan(pattern, seq_len, P)
    L = plan.local_len
    start = r * L
    qs, _ = regular_queries(pattern, start, start + L)
    rows = remote_rows(pattern, seq_len, P, r)
    sends, recvs = kv_routes(plan, r)
    n_gq = bidirectional_globals(pattern)
    spec = HaloSpec(
        pattern=pattern, call=call, local_pos=torch.arange(start, start + L, device=device),
        reg_start=qs - start, remote_pos=plan.remote_positions(r).to(device),
        remote_rows=None if len(rows) == start + L - qs else rows.to(device),
        kernel=kernel,
        kv_exchange=P2PExchange(ctx, sends, recvs, Tag.KV, counter, layer),
        num_global_queries=n_gq, sp_size=P, sp_rank=r,
    )
    if call.q_doc is not None:  # the received keys' document ids: the same routes, one int64 column
        spec.doc_exchange = P2PExchange(ctx, sends, recvs, Tag.KV_DOCS, counter, layer, kind=DOC_KIND)
    if n_gq:
        q_routes = global_queries.query_routes(n_gq, L, P, r)
        partial_routes = global_queries.partial_routes(n_gq, L, P, r)
        spec.q_exchange = P2PExchange(ctx, *q_routes, Tag.GLOBAL_Q, counter, layer)
        spec.partial_exchange = P2PExchange(ctx, *partial_routes, Tag.GLOBAL_PARTIAL, counter, layer)
    return spec
