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
from kernels.stats import AttnStats, apply_sinks, merge_stats, merge_two
from model.pattern import Pattern
from parallel.halo import P2PExchange
from parallel.inner_graph import forward_with_inner_graph, run_layer, sink_leaf


@dataclass
class HaloSpec:
    """Everything static about one call on this rank (built by ``parallel.sp_attention``)."""

    pattern: Pattern
    seq_len: int
    local_pos: torch.Tensor  # [L] absolute positions of this shard
    reg_start: int  # first local row served by the halo path (global queries come before it)
    remote_pos: torch.Tensor  # [R] positions of the received keys, buffer order
    remote_rows: torch.Tensor | None  # rows of the regular queries that have remote keys (None: all)
    kernel: Callable  # sparse_attention-like
    scale: float | None
    return_stats: bool
    kv_exchange: P2PExchange
    num_global_queries: int  # bidirectional global queries (0: none)
    q_exchange: P2PExchange | None = None
    partial_exchange: P2PExchange | None = None
    sp_size: int = 1
    sp_rank: int = 0
    doc_ids: torch.Tensor | None = None  # [B, L] this shard's document ids (None: no document masking)
    doc_exchange: P2PExchange | None = None  # the K/V routes, for the document ids of the received keys


def halo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: HaloSpec,
                   sinks: torch.Tensor | None = None):
    """(out [B, H, L, D], lse [B, H, L], stats AttnStats | None) for this rank's shard."""
    return run_layer(_HaloAttention, _forward, q, k, v, sinks, spec, spec.return_stats)


class _HaloAttention(torch.autograd.Function):
    @staticmethod
    def forward(fctx, q, k, v, sinks, spec):
        return forward_with_inner_graph(fctx, _forward, q, k, v, sinks, spec)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(fctx, g_out, _g_lse, _g_stats):
        gq, gk, gv, g_sinks = _backward(fctx.spec, fctx.state, g_out)
        fctx.state = None
        return gq, gk, gv, g_sinks, None


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_()


def _attend(spec: HaloSpec, q, k, v, q_pos, k_pos, q_doc=None, k_doc=None):
    docs = {} if q_doc is None else {"q_doc": q_doc, "k_doc": k_doc}  # custom kernels need not know them
    res = spec.kernel(q, k, v, spec.pattern, q_pos=q_pos, k_pos=k_pos, return_stats=spec.return_stats,
                      scale=spec.scale, seq_len=spec.seq_len, **docs)
    return res if spec.return_stats else (*res, None)


def _forward(q, k, v, sinks, spec: HaloSpec) -> dict:
    s = {"q": _leaf(q), "k": _leaf(k), "v": _leaf(v), "sinks": sink_leaf(sinks)}
    s["kv"] = torch.stack([s["k"], s["v"]])  # (2, B, Hkv, L, D): one message per peer for K and V
    pend_kv = spec.kv_exchange.start(s["kv"].detach())
    docs = spec.doc_ids
    pend_doc = spec.doc_exchange.start(docs[..., None]) if docs is not None else None  # (B, L, 1) rows
    n_gq = spec.num_global_queries
    pend_q = spec.q_exchange.start(s["q"].detach()) if n_gq else None

    r0, pos = spec.reg_start, spec.local_pos
    q_reg = s["q"][:, :, r0:]
    doc_reg = None if docs is None else docs[:, r0:]
    if q_reg.shape[2]:
        local = _attend(spec, q_reg, s["k"], s["v"], pos[r0:], pos, doc_reg, docs)
    pend_p = None
    if n_gq:  # partial of every global query over this rank's keys; goes to the owners
        s["recv_q"] = _leaf(pend_q.wait())
        q_glob = global_queries.assemble_queries(s["recv_q"], s["q"], n_gq, len(pos), spec.sp_size,
                                                 spec.sp_rank)
        gq_pos = torch.arange(n_gq, device=pos.device)
        s["partial"] = global_queries.pack(*_attend(spec, q_glob, s["k"], s["v"], gq_pos, pos))
        s["partial_cut"] = _leaf(s["partial"])  # backward stage A ends here, stage B resumes
        pend_p = spec.partial_exchange.start(s["partial_cut"].detach())

    s["recv_kv"] = _leaf(pend_kv.wait())  # (2, B, Hkv, R, D)
    recv_doc = None if pend_doc is None else pend_doc.wait()[..., 0]  # (B, R)
    outs = []
    if q_reg.shape[2]:
        merged = _merge_remote(spec, local, q_reg, s["recv_kv"], doc_reg, recv_doc)
        s["out_reg"], lse_reg, st_reg = apply_sinks(*merged[:2], s["sinks"], merged[2])
        outs.append((s["out_reg"], lse_reg, st_reg))
    n_own = global_queries.owned_count(n_gq, len(pos), spec.sp_rank)
    if n_own:
        s["recv_p"] = _leaf(pend_p.wait())
        o, lse_gq, st_gq = global_queries.merge_owned(s["partial_cut"], s["recv_p"], q.shape[-1], n_gq,
                                                      len(pos), spec.sp_size, spec.sp_rank)
        s["out_glob"], lse_gq, st_gq = apply_sinks(o.to(q.dtype), lse_gq, s["sinks"], st_gq)
        outs.insert(0, (s["out_glob"], lse_gq, st_gq))
    elif pend_p is not None:
        pend_p.wait()
    s["out"] = torch.cat([o for o, _, _ in outs], dim=2)
    s["lse"] = torch.cat([lse for _, lse, _ in outs], dim=2)
    s["stats"] = None if not spec.return_stats else _cat_stats([st for _, _, st in outs])
    return s


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
    out_r, lse_r, st_r = _attend(spec, q_sub, recv_kv[0], recv_kv[1], p_sub, spec.remote_pos, d_sub, recv_doc)
    if rows is not None:  # rows without remote keys: an empty partial (lse = -inf) merges as nothing
        out_r = out_l.new_zeros(out_l.shape).index_copy(2, rows, out_r)
        lse_r = torch.full_like(lse_l, float("-inf")).index_copy(2, rows, lse_r)
        if st_r is not None:
            st_r = AttnStats(*(torch.full_like(lse_l, fill).index_copy(2, rows, f)
                               for fill, f in zip((0.0, float("-inf"), 0.0), st_r.fields(), strict=True)))
    out, lse, (w_l, w_r) = merge_two(out_l, lse_l, out_r, lse_r)
    stats = None if st_l is None else merge_stats(st_l, st_r, w_l.detach(), w_r.detach())
    return out, lse, stats


def _grads(outputs, grad_outputs, inputs):
    """torch.autograd.grad over the pairs that exist; zeros for inputs the outputs do not reach."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o is not None and o.requires_grad]
    if not pairs:
        return [torch.zeros_like(x) for x in inputs]
    got = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, got, strict=True)]


def _backward(spec: HaloSpec, s: dict, g_out: torch.Tensor):
    n_gq = spec.num_global_queries
    n_own = global_queries.owned_count(n_gq, len(spec.local_pos), spec.sp_rank)
    sinks = [s["sinks"]] if s["sinks"] is not None else []  # its gradient: this rank's queries' share
    g_partial, g_sinks = None, 0
    if n_gq:  # stage A: owners turn the gradient of their global rows into gradients of every partial
        if n_own:
            g_recv_p, g_own, *g_s = _grads([s["out_glob"]], [g_out[:, :, :n_own]],
                                           [s["recv_p"], s["partial_cut"]] + sinks)
            g_sinks = g_s[0] if sinks else 0
        else:  # nothing arrived here: no gradient to return, only the owners' to receive
            g_recv_p, g_own = s["partial_cut"].detach()[:, :, :0], 0
        g_partial = spec.partial_exchange.start_reverse(g_recv_p, like=s["partial_cut"]).wait() + g_own

    # stage B: local backward, then the received rows' gradients go home
    inputs = [s["q"], s["k"], s["v"], s["recv_kv"]] + ([s["recv_q"]] if n_gq else []) + sinks
    gq, gk, gv, g_recv_kv, *rest = _grads(
        [s.get("out_reg"), s.get("partial")], [g_out[:, :, n_own:], g_partial], inputs)
    g_recv_q = rest[0] if n_gq else None
    g_sinks = g_sinks + rest[-1] if sinks else None
    pend_kv = spec.kv_exchange.start_reverse(g_recv_kv, like=s["kv"])
    pend_q = spec.q_exchange.start_reverse(g_recv_q, like=s["q"]) if n_gq else None
    g_kv = pend_kv.wait()
    if pend_q is not None:
        gq = gq + pend_q.wait()
    return gq, gk + g_kv[0], gv + g_kv[1], g_sinks
