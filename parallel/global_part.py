"""The global keys scored apart under sequence parallelism (model.global_rope=fixed; ``kernels.global_part``).

    kv_g  = the g global keys and values, from their owners to every rank     counted as ``global``
    (a)   = sp_attention(q, k, v, local part of the pattern)                  num_global 0: its plan
                                                                              fetches no global key
    (b)   = global_partial(q_global, kv_g), this rank's queries                local, dense [L, g]
    out, lse = merge_two(a, b), then the sinks                                 exact, as one device

The global keys travel once per layer and rank, point-to-point from their owners (several ranks
when g > L), ``B · Hkv · g · 2D`` values to every other rank — the bytes the halo plan would have
spent on them with the globals in the pattern; their gradients go back the same way and are summed
at the owners. Document ids of the global keys travel beside them (``doc_ids``).

Order of the backward exchanges: partial (a) is one autograd node per layer that exchanges in its
backward (``parallel.inner_graph``), and so is the gather of the global keys. Two such nodes must
run their backward in the same order on every rank, or their point-to-point messages wait on each
other. ``_After`` makes it so: (a)'s queries depend on the gathered keys through it, so the gather's
backward can only start once (a)'s has returned the gradient of those queries, on every rank.

Ulysses is refused for the local part (``parallel.sp_attention.check_strategy``): its lse comes back
without a gradient (and only with statistics), and the merge needs both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels.contract import AttnCall, AttnResult
from kernels.global_part import (
    apart_mask,
    check_patterns,
    global_partial,
    keys_call,
    local_part,
    merged,
)
from model.pattern import Pattern
from parallel.comm import DOC_KIND, CommCounter
from parallel.context import ParallelContext
from parallel.global_queries import assemble_queries, global_owners, query_routes
from parallel.halo import P2PExchange, Tag

GLOBAL_KIND = "global"  # the same kind the halo plan gives global keys


class _GatherGlobals(torch.autograd.Function):
    """[B, Hkv, g, C] rows 0..g-1 of the sequence from this rank's [B, Hkv, L, C]; backward sends
    the received rows' gradients to their owners and sums what comes back into the owned rows."""

    @staticmethod
    def forward(fctx, x, exchange: P2PExchange, geometry: tuple[int, int, int, int]):
        recv = exchange.start(x.detach()).wait()
        fctx.exchange, fctx.geometry, fctx.like = exchange, geometry, (x.shape, x.dtype, x.device)
        return assemble_queries(recv, x.detach(), *geometry)

    @staticmethod
    def backward(fctx, grad):
        g, L, P, r = fctx.geometry
        shape, dtype, device = fctx.like
        pieces = {o: grad[:, :, lo:hi] for o, lo, hi in global_owners(g, L, P)}  # owners ascending: recv order
        own = pieces.pop(r, None)
        g_recv = torch.cat(list(pieces.values()), dim=2) if pieces else grad[:, :, :0]
        g_x = fctx.exchange.start_reverse(g_recv.contiguous(), like=torch.empty(shape, dtype=dtype, device=device))
        g_x = g_x.wait()
        if own is not None:
            g_x[:, :, : own.shape[2]] += own
        return g_x, None, None


class _After(torch.autograd.Function):
    """``x`` itself, with an edge to ``dep``: dep's producer runs its backward after x's consumers."""

    @staticmethod
    def forward(fctx, x, dep):
        fctx.dep = (dep.shape, dep.dtype, dep.device)
        return x.view_as(x)

    @staticmethod
    def backward(fctx, grad):
        shape, dtype, device = fctx.dep
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def gather_globals(k: torch.Tensor, v: torch.Tensor, doc: torch.Tensor | None, num_global: int,
                   ctx: ParallelContext, counter: CommCounter | None, layer: int):
    """(kv_g [B, Hkv, g, 2D]: K | V of the global keys, differentiable; their document ids [B, g] or None)."""
    L, P, r = k.shape[2], ctx.sp_size, ctx.sp_rank
    geometry = (num_global, L, P, r)
    sends, recvs = query_routes(num_global, L, P, r)  # owners' first rows to every other rank
    exchange = P2PExchange(ctx, sends, recvs, Tag.GLOBAL_KV, counter, layer, kind=GLOBAL_KIND)
    kv_g = _GatherGlobals.apply(torch.cat([k, v], dim=-1), exchange, geometry)  # one message per peer
    g_doc = None
    if doc is not None:
        rows = doc[:, None, :, None]  # (B, 1, L, 1): rows like K/V's
        doc_ex = P2PExchange(ctx, sends, recvs, Tag.GLOBAL_KV_DOCS, counter, layer, kind=DOC_KIND)
        g_doc = assemble_queries(doc_ex.start(rows).wait(), rows, *geometry)[:, 0, :, 0]
    return kv_g, g_doc


def sharded_apart(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, ctx: ParallelContext,
                  call: AttnCall, counter: CommCounter | None, attend_local: Callable) -> AttnResult:
    """This rank's queries, the global keys scored apart; ``attend_local``: sp_attention of (a)."""
    check_patterns([pattern])
    if tuple(call.q_global.shape) != tuple(q.shape):
        raise ValueError(f"q_global: must have q's shape {list(q.shape)}, got {list(call.q_global.shape)}")
    g, L, D = pattern.num_global, q.shape[2], k.shape[-1]
    kv_g, g_doc = gather_globals(k, v, call.q_doc, g, ctx, counter, call.layer)
    local = attend_local(_After.apply(q, kv_g), k, v, local_part(pattern), keys_call(call))
    q_pos = torch.arange(ctx.sp_rank * L, (ctx.sp_rank + 1) * L, device=q.device)
    apart = apart_mask(pattern, q_pos, torch.arange(g, device=q.device), call.seq_len, call.q_doc, g_doc)
    glob = global_partial(call.q_global, kv_g[..., :D], kv_g[..., D:], apart, call.scale, call.return_stats)
    return merged(local, glob, call)
