"""Halo strategy: one autograd Function per attention layer, forward and backward exact.

Forward on rank r (queries = its shard, true positions throughout):

    post K/V exchange (halo + globals + random blocks, async)   ┐ in flight while
    post global-query all-gather (bidirectional globals only)   │ the local part runs
    local  = attend(regular queries, local keys)                ┘
    partial = attend(global queries, local keys) → to owners    (bidirectional globals only)
    remote = attend(regular queries with remote keys, received keys)
    out    = merge_two(local, remote);  owners: out[global rows] = LSE-fold of all partials
    out, lse = apply_sinks(out, lse, sinks)                      (learned sinks: once, after merging)

Document ids (packed documents) of the received keys travel with them: a second, integer message on
the very same routes (8 bytes per key row and batch element, counted as ``doc_ids``), posted beside
the K/V exchange. Global queries of a bidirectional pattern see every key, so their partials need
no document ids at all.

Local and remote key sets are disjoint by construction (the plan subtracts the local range and
cuts each range at shard edges), so together they are the assembled key set [globals | halo-left |
local | halo-right] without duplicates, and the LSE merge is exact.

Why one Function rather than a differentiable exchange op: a backward exchange blocks until its
peers run theirs. With several exchange nodes per layer the autograd engine may order them
differently on different ranks (their graphs differ: rank 0 receives no left halo) and deadlock.
Here backward runs the same two stages on every rank: (A) owners return partial gradients,
(B) local backward, then halo/global-key and global-query gradients go back to their owners.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import parallel.global_queries as global_queries
from kernels.contract import AttnCall, AttnResult
from kernels.stats import AttnStats, apply_sinks, merge_partials
from model.pattern import Pattern
from parallel.halo import P2PExchange, Pending
from parallel.inner_graph import Leaves, Output, attend, grads_or_zeros, leaf, run_layer


@dataclass
class HaloSpec:
    """Everything static about one call on this rank (built by ``parallel.sp_attention``)."""

    pattern: Pattern
    call: AttnCall  # the layer's call over keys: seq_len, scale, return_stats, this shard's q_doc, layer
    local_pos: torch.Tensor  # [L] absolute positions of this shard
    reg_start: int  # first local row served by the halo path (global queries come before it)
    remote_pos: torch.Tensor  # [R] positions of the received keys, buffer order
    remote_rows: torch.Tensor | None  # rows of the regular queries that have remote keys (None: all)
    kernel: Callable  # (q, k, v, pattern, call) -> AttnResult
    kv_exchange: P2PExchange
    num_global_queries: int  # bidirectional global queries (0: none)
    q_exchange: P2PExchange | None = None
    partial_exchange: P2PExchange | None = None
    sp_size: int = 1
    sp_rank: int = 0
    doc_exchange: P2PExchange | None = None  # the K/V routes, for the document ids of the received keys


@dataclass
class GlobalQueryState:
    """Stage 2 of the forward (bidirectional global queries only): what backward stages A and B need."""

    recv_q: torch.Tensor  # leaf: the global queries received from their owners (B, H, Gr, D)
    partial: torch.Tensor  # packed partial of every global query over this rank's keys (B, H, n_gq, D+1(+3))
    partial_cut: torch.Tensor  # leaf copy of ``partial``: backward stage A ends here, stage B resumes
    recv_partials: torch.Tensor | None = None  # owners: leaf, the other ranks' partials of the owned rows
    out_owned: torch.Tensor | None = None  # owners: output of the owned global rows, after sinks
    lse_owned: torch.Tensor | None = None  # owners: their lse, after sinks


@dataclass
class HaloState:
    """What one layer's forward keeps for its backward, stage by stage."""

    leaves: Leaves  # stage 1: the inputs; K/V exchange posted
    global_q: GlobalQueryState | None  # stage 2: global-query partials (None: no such queries)
    recv_kv: torch.Tensor  # stage 3: leaf, the received halo/global/block keys (2, B, Hkv, R, D)
    out_reg: torch.Tensor | None  # stage 4: regular rows, local and remote merged, after sinks (None: none)
    lse_reg: torch.Tensor | None  # stage 4: their lse, after sinks (None: none)
    output: Output  # stage 5: [owned global rows | regular rows]


def halo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: HaloSpec,
                   sinks: torch.Tensor | None = None) -> AttnResult:
    """``AttnResult`` (out [B, H, L, D], lse [B, H, L], stats | None) for this rank's shard."""
    return run_layer(_forward, _backward, q, k, v, sinks, spec, spec.call.return_stats)


def _forward(q, k, v, sinks, spec: HaloSpec) -> HaloState:
    lv = Leaves.of(q, k, v, sinks)
    pend_kv = spec.kv_exchange.start(lv.kv.detach())
    docs = spec.call.q_doc  # [B, L] this shard's document ids, or None
    pend_doc = spec.doc_exchange.start(docs[..., None]) if docs is not None else None  # (B, L, 1) rows
    n_gq = spec.num_global_queries
    pend_q = spec.q_exchange.start(lv.q.detach()) if n_gq else None

    r0, pos = spec.reg_start, spec.local_pos
    q_reg = lv.q[:, :, r0:]
    doc_reg = None if docs is None else docs[:, r0:]
    if q_reg.shape[2]:
        local = attend(spec, q_reg, lv.k, lv.v, pos[r0:], pos, doc_reg, docs)
    global_q, pend_p = _global_partial(spec, lv, pend_q) if n_gq else (None, None)

    recv_kv = leaf(pend_kv.wait())  # (2, B, Hkv, R, D)
    recv_doc = None if pend_doc is None else pend_doc.wait()[..., 0]  # (B, R)
    outs, out_reg, lse_reg = [], None, None
    if q_reg.shape[2]:
        merged = _merge_remote(spec, local, q_reg, recv_kv, doc_reg, recv_doc)
        out_reg, lse_reg, st_reg = apply_sinks(*merged[:2], lv.sinks, merged[2])
        outs.append((out_reg, lse_reg, st_reg))
    if global_queries.owned_count(n_gq, len(pos), spec.sp_rank):
        outs.insert(0, _owned_rows(spec, lv, global_q, pend_p, q.dtype))
    elif pend_p is not None:
        pend_p.wait()
    output = Output(out=torch.cat([o for o, _, _ in outs], dim=2),
                    lse=torch.cat([lse for _, lse, _ in outs], dim=2),
                    stats=None if not spec.call.return_stats else _cat_stats([st for _, _, st in outs]))
    return HaloState(leaves=lv, global_q=global_q, recv_kv=recv_kv, out_reg=out_reg, lse_reg=lse_reg, output=output)


def _global_partial(spec: HaloSpec, lv: Leaves, pend_q) -> tuple[GlobalQueryState, Pending]:
    """Partial of every global query over this rank's keys; posted to the owners."""
    n_gq, pos = spec.num_global_queries, spec.local_pos
    recv_q = leaf(pend_q.wait())
    q_glob = global_queries.assemble_queries(recv_q, lv.q, n_gq, len(pos), spec.sp_size, spec.sp_rank)
    gq_pos = torch.arange(n_gq, device=pos.device)
    partial = global_queries.pack(*attend(spec, q_glob, lv.k, lv.v, gq_pos, pos))
    global_q = GlobalQueryState(recv_q=recv_q, partial=partial, partial_cut=leaf(partial))
    return global_q, spec.partial_exchange.start(global_q.partial_cut.detach())


def _owned_rows(spec: HaloSpec, lv: Leaves, global_q: GlobalQueryState, pend_p, dtype) -> tuple:
    """(out, lse, stats) of the global rows this rank owns: every rank's partial folded, then sinks."""
    global_q.recv_partials = leaf(pend_p.wait())
    o, lse_gq, st_gq = global_queries.merge_owned(global_q.partial_cut, global_q.recv_partials, lv.q.shape[-1],
                                                  spec.num_global_queries, len(spec.local_pos), spec.sp_size,
                                                  spec.sp_rank)
    global_q.out_owned, global_q.lse_owned, st_gq = apply_sinks(o.to(dtype), lse_gq, lv.sinks, st_gq)
    return global_q.out_owned, global_q.lse_owned, st_gq


def _cat_stats(parts: list[AttnStats]) -> AttnStats:
    """Row-wise concatenation of per-query stats (the global rows, then the regular ones)."""
    cat = lambda *fs: torch.cat(fs, dim=2)  # noqa: E731
    sink = None if parts[0].sink_mass is None else cat(*(p.sink_mass for p in parts))
    return AttnStats(*(cat(*f) for f in zip(*(p.fields() for p in parts), strict=True)), sink_mass=sink)


def _merge_remote(spec: HaloSpec, local, q_reg, recv_kv, doc_reg=None, recv_doc=None):
    """Merge the remote partial of the regular queries into their local partial (exact LSE merge).
    With documents a remote partial may have rows with no key (lse = −inf): they merge as nothing."""
    out_l, lse_l, st_l = local
    rows = spec.remote_rows
    if recv_kv.shape[3] == 0 or (rows is not None and len(rows) == 0):
        return out_l, lse_l, st_l
    q_pos = spec.local_pos[spec.reg_start:]
    q_sub = q_reg if rows is None else q_reg[:, :, rows]
    p_sub = q_pos if rows is None else q_pos[rows]
    d_sub = doc_reg if doc_reg is None or rows is None else doc_reg[:, rows.to(doc_reg.device)]
    out_r, lse_r, st_r = attend(spec, q_sub, recv_kv[0], recv_kv[1], p_sub, spec.remote_pos, d_sub, recv_doc)
    if rows is not None:  # rows without remote keys: an empty partial (lse = -inf) merges as nothing
        out_r = out_l.new_zeros(out_l.shape).index_copy(2, rows, out_r)
        lse_r = torch.full_like(lse_l, float("-inf")).index_copy(2, rows, lse_r)
        if st_r is not None:
            st_r = AttnStats(*(torch.full_like(lse_l, fill).index_copy(2, rows, f)
                               for fill, f in zip((0.0, float("-inf"), 0.0), st_r.fields(), strict=True)))
    return merge_partials((out_l, lse_l, st_l), (out_r, lse_r, st_r))


def _backward(spec: HaloSpec, s: HaloState, g_out: torch.Tensor, g_lse: torch.Tensor | None = None):
    lv, global_q = s.leaves, s.global_q
    n_own = global_queries.owned_count(spec.num_global_queries, len(spec.local_pos), spec.sp_rank)
    g_lse_own, g_lse_reg = (None, None) if g_lse is None else (g_lse[:, :, :n_own], g_lse[:, :, n_own:])
    sinks = [lv.sinks] if lv.sinks is not None else []  # its gradient: this rank's queries' share
    g_partial, g_sinks = None, 0
    # stage A: owners turn the gradient of their global rows into gradients of every partial
    if global_q is not None:
        if n_own:
            g_recv_p, g_own, *g_s = grads_or_zeros([global_q.out_owned, global_q.lse_owned],
                                                   [g_out[:, :, :n_own], g_lse_own],
                                                   [global_q.recv_partials, global_q.partial_cut] + sinks)
            g_sinks = g_s[0] if sinks else 0
        else:  # nothing arrived here: no gradient to return, only the owners' to receive
            g_recv_p, g_own = global_q.partial_cut.detach()[:, :, :0], 0
        g_partial = spec.partial_exchange.start_reverse(g_recv_p, like=global_q.partial_cut).wait() + g_own

    # stage B: local backward, then the received rows' gradients go home
    inputs = [lv.q, lv.k, lv.v, s.recv_kv] + ([global_q.recv_q] if global_q is not None else []) + sinks
    partial = None if global_q is None else global_q.partial
    g_q, g_k, g_v, g_recv_kv, *rest = grads_or_zeros([s.out_reg, s.lse_reg, partial],
                                                     [g_out[:, :, n_own:], g_lse_reg, g_partial], inputs)
    g_recv_q = rest[0] if global_q is not None else None
    g_sinks = g_sinks + rest[-1] if sinks else None
    pend_kv = spec.kv_exchange.start_reverse(g_recv_kv, like=lv.kv)
    pend_q = spec.q_exchange.start_reverse(g_recv_q, like=lv.q) if global_q is not None else None
    g_kv = pend_kv.wait()
    if pend_q is not None:
        g_q = g_q + pend_q.wait()
    return g_q, g_k + g_kv[0], g_v + g_kv[1], g_sinks
