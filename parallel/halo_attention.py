"""Halo strategy: one autograd Function per attention layer, forward and backward exact.

Forward on rank r (queries = its shard, true positions throughout):

    post K/V exchange (halo + globals + random blocks, async)   ┐ in flight while
    post global-query all-gather (bidirectional globals only)   │ the local part runs
    local  = attend(regular queries, local keys)                ┘
    partial = attend(global queries, local keys) → to owners    (bidirectional globals only)
    remote = attend(regular queries with remote keys, received keys)
    out    = merge_two(local, remote);  owners: out[global rows] = LSE-fold of all partials

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

from kernels.stats import AttnStats, merge_stats, merge_two
from model.pattern import Pattern
from parallel import globals as glob
from parallel.halo import P2PExchange
from parallel.layer_fn import forward_with_inner_graph, run_layer


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


def halo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: HaloSpec):
    """(out [B, H, L, D], lse [B, H, L], stats AttnStats | None) for this rank's shard."""
    return run_layer(_HaloAttention, _forward, q, k, v, spec, spec.return_stats)


class _HaloAttention(torch.autograd.Function):
    @staticmethod
    def forward(fctx, q, k, v, spec):
        return forward_with_inner_graph(fctx, _forward, q, k, v, spec)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(fctx, g_out, _g_lse, _g_stats):
        gq, gk, gv = _backward(fctx.spec, fctx.state, g_out)
        fctx.state = None
        return gq, gk, gv, None


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().requires_grad_()


def _attend(spec: HaloSpec, q, k, v, q_pos, k_pos):
    res = spec.kernel(q, k, v, spec.pattern, q_pos=q_pos, k_pos=k_pos, return_stats=spec.return_stats,
                      scale=spec.scale, seq_len=spec.seq_len)
    return res if spec.return_stats else (*res, None)


def _forward(q, k, v, spec: HaloSpec) -> dict:
    s = {"q": _leaf(q), "k": _leaf(k), "v": _leaf(v)}
    s["kv"] = torch.stack([s["k"], s["v"]])  # (2, B, Hkv, L, D): one message per peer for K and V
    pend_kv = spec.kv_exchange.start(s["kv"].detach())
    g = spec.num_global_queries
    pend_q = spec.q_exchange.start(s["q"].detach()) if g else None

    r0, pos = spec.reg_start, spec.local_pos
    q_reg = s["q"][:, :, r0:]
    if q_reg.shape[2]:
        local = _attend(spec, q_reg, s["k"], s["v"], pos[r0:], pos)
    pend_p = None
    if g:  # partial of every global query over this rank's keys; goes to the owners
        s["recv_q"] = _leaf(pend_q.wait())
        q_glob = glob.assemble_queries(s["recv_q"], s["q"], g, len(pos), spec.sp_size, spec.sp_rank)
        g_pos = torch.arange(g, device=pos.device)
        s["partial"] = glob.pack(*_attend(spec, q_glob, s["k"], s["v"], g_pos, pos))
        s["partial_cut"] = _leaf(s["partial"])  # backward stage A ends here, stage B resumes
        pend_p = spec.partial_exchange.start(s["partial_cut"].detach())

    s["recv_kv"] = _leaf(pend_kv.wait())  # (2, B, Hkv, R, D)
    outs = []
    if q_reg.shape[2]:
        s["out_reg"], lse_reg, st_reg = _merge_remote(spec, local, q_reg, s["recv_kv"])
        outs.append((s["out_reg"], lse_reg, st_reg))
    n_own = glob.owned_count(g, len(pos), spec.sp_rank)
    if n_own:
        s["recv_p"] = _leaf(pend_p.wait())
        o, lse_g, st_g = glob.merge_owned(s["partial_cut"], s["recv_p"], q.shape[-1], g, len(pos),
                                          spec.sp_size, spec.sp_rank)
        s["out_glob"] = o.to(q.dtype)
        outs.insert(0, (s["out_glob"], lse_g, st_g))
    elif pend_p is not None:
        pend_p.wait()
    s["out"] = torch.cat([o for o, _, _ in outs], dim=2)
    s["lse"] = torch.cat([lse for _, lse, _ in outs], dim=2)
    s["stats"] = None if not spec.return_stats else AttnStats(
        *(torch.cat(f, dim=2) for f in zip(*(st.fields() for _, _, st in outs), strict=True)))
    return s


def _merge_remote(spec: HaloSpec, local, q_reg, recv_kv):
    """Merge the remote partial of the regular queries into their local partial (exact LSE merge)."""
    out_l, lse_l, st_l = local
    rows = spec.remote_rows
    if recv_kv.shape[3] == 0 or (rows is not None and len(rows) == 0):
        return out_l, lse_l, st_l
    q_pos = spec.local_pos[spec.reg_start:]
    q_sub = q_reg if rows is None else q_reg[:, :, rows]
    p_sub = q_pos if rows is None else q_pos[rows]
    out_r, lse_r, st_r = _attend(spec, q_sub, recv_kv[0], recv_kv[1], p_sub, spec.remote_pos)
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
    g = spec.num_global_queries
    n_own = glob.owned_count(g, len(spec.local_pos), spec.sp_rank)
    g_partial = None
    if g:  # stage A: owners turn the gradient of their global rows into gradients of every partial
        if n_own:
            g_recv_p, g_own = _grads([s["out_glob"]], [g_out[:, :, :n_own]], [s["recv_p"], s["partial_cut"]])
        else:  # nothing arrived here: no gradient to return, only the owners' to receive
            g_recv_p, g_own = s["partial_cut"].detach()[:, :, :0], 0
        g_partial = spec.partial_exchange.start_reverse(g_recv_p, like=s["partial_cut"]).wait() + g_own

    # stage B: local backward, then the received rows' gradients go home
    inputs = [s["q"], s["k"], s["v"], s["recv_kv"]] + ([s["recv_q"]] if g else [])
    gq, gk, gv, g_recv_kv, *g_recv_q = _grads(
        [s.get("out_reg"), s.get("partial")], [g_out[:, :, n_own:], g_partial], inputs)
    pend_kv = spec.kv_exchange.start_reverse(g_recv_kv, like=s["kv"])
    pend_q = spec.q_exchange.start_reverse(g_recv_q[0], like=s["q"]) if g else None
    g_kv = pend_kv.wait()
    if pend_q is not None:
        gq = gq + pend_q.wait()
    return gq, gk + g_kv[0], gv + g_kv[1]
