"""Ulysses strategy: DeepSpeed's ``DistributedAttention`` (all-to-all over heads) around the local kernel.

After the all-to-all each rank holds the full sequence for H/P heads, so it calls the kernel with
full positions: exact for any pattern, including content-based top-k (whose block choice is per
head). Cost per rank per layer ≈ 4·(n/P)·H·D·bytes·(P−1)/P (q, k, v, out), growing with n.

Heads: H must be a multiple of P. When the KV heads are not (GQA with Hkv % P != 0), K and V are
repeated to H heads first (more bytes, same result) rather than using DeepSpeed's uneven-head path,
which needs DeepSpeed's own sequence-parallel group registry.

Learned sinks: rank r holds heads [r·H/P, (r+1)·H/P) after the all-to-all, so its kernel gets that
slice of ``sinks`` and its gradient lands in that slice only. Document ids: the kernel sees the whole
sequence, so every rank's ids are all-gathered (8 bytes per token and batch element, ``doc_ids``) —
small beside the O(n·H·D) the all-to-all already moves.

DeepSpeed's collectives go through ``deepspeed.comm``; if the DeepSpeed engine has not initialised
it yet, ``ensure_deepspeed_comm`` wraps the existing torch.distributed group (on CPU DeepSpeed builds
its shared-memory op once, ~1–2 min, cached under ``TORCH_EXTENSIONS_DIR``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from kernels.contract import AttnCall, AttnResult
from kernels.stats import AttnStats
from model.pattern import Pattern
from parallel.comm import DOC_KIND, CommCounter, counted_all_gather
from parallel.context import ParallelConfigError, ParallelContext

KIND = "alltoall"


def ensure_deepspeed_comm(ctx: ParallelContext) -> None:
    import deepspeed.comm as ds_comm

    if not ds_comm.is_initialized():
        ds_comm.init_distributed(dist_backend=ctx.backend, dist_init_required=False, timeout=ctx.timeout,
                                 verbose=False)


def check_heads(heads: int, sp_size: int) -> None:
    if heads % sp_size:
        raise ParallelConfigError(
            f"parallel.strategy=ulysses needs model.heads ({heads}) to be a multiple of "
            f"parallel.sequence_parallel_size ({sp_size}); use strategy=halo or change the sizes")


class _CountBackward(torch.autograd.Function):
    """Identity whose backward adds the all-to-all bytes of the gradient passing through it."""

    @staticmethod
    def forward(fctx, x, counter, layer, sp_size):
        fctx.meta = (counter, layer, sp_size)
        return x.view_as(x)

    @staticmethod
    def backward(fctx, g):
        counter, layer, sp_size = fctx.meta
        _count(counter, layer, "backward", g, sp_size)
        return g, None, None, None


def _count(counter, layer, direction, x, sp_size):
    if counter is not None:
        moved = x.numel() * x.element_size() * (sp_size - 1) // sp_size
        counter.add(layer, direction, KIND, sent=moved, recv=moved)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, ctx: ParallelContext,
                      kernel, call: AttnCall, counter: CommCounter | None = None) -> AttnResult:
    """``AttnResult`` (out [B, H, L, D], lse [B, H, L], stats | None) for this rank's shard via head
    all-to-all; ``call``: the layer's (seq_len, this shard's q_doc, sinks for every head, layer)."""
    from deepspeed.sequence.layer import DistributedAttention, single_all_to_all

    P, H, Hkv = ctx.sp_size, q.shape[1], k.shape[1]
    check_heads(H, P)
    if Hkv % P:
        k, v = (x.repeat_interleave(H // Hkv, dim=1) for x in (k, v))
    ensure_deepspeed_comm(ctx)
    side = {}
    seq_len, layer, return_stats = call.seq_len, call.layer, call.return_stats
    pos = torch.arange(seq_len, device=q.device)
    full = None
    if call.q_doc is not None:
        full = torch.cat(counted_all_gather(call.q_doc, ctx, DOC_KIND, counter, layer).unbind(0), dim=1)  # (B, n)
    h = H // P
    sinks = None if call.sinks is None else call.sinks[ctx.sp_rank * h:(ctx.sp_rank + 1) * h]  # heads after all-to-all
    local_call = replace(call.at(pos, pos, full, full), sinks=sinks)

    def local_attention(q_bnhd, k_bnhd, v_bnhd, *_args, **_kwargs):
        qt, kt, vt = (x.transpose(1, 2) for x in (q_bnhd, k_bnhd, v_bnhd))  # (B, h, n, D)
        res = kernel(qt, kt, vt, pattern, local_call)
        side["lse"], side["stats"] = res.lse, res.stats
        return res.out.transpose(1, 2).contiguous()  # (B, n, h, D)

    ins = []
    for x in (q, k, v):
        _count(counter, layer, "forward", x, P)
        ins.append(_CountBackward.apply(x, counter, layer, P).transpose(1, 2).contiguous())  # (B, L, H, D)
    attn = DistributedAttention(local_attention, ctx.sp_group, scatter_idx=2, gather_idx=1)
    out = attn(*ins, 0)  # (B, L, H, D)
    _count(counter, layer, "forward", out, P)
    out = _CountBackward.apply(out, counter, layer, P).transpose(1, 2)  # (B, H, L, D)
    if not return_stats:
        return AttnResult(out, None, None)  # the lse of these queries stays with the heads' ranks: not sent
    st = side["stats"]
    cols = [side["lse"], *st.fields()] + ([st.sink_mass] if st.sink_mass is not None else [])
    local = torch.stack([c.detach().float() for c in cols], dim=-1).transpose(1, 2).contiguous()  # (B, n, h, 4|5)
    _count(counter, layer, "forward", local, P)
    back = single_all_to_all(local, 1, 2, 0, ctx.sp_group).transpose(1, 2)  # (B, H, L, 4|5)
    lse, m, mx, gm, *sink = back.unbind(-1)
    return AttnResult(out, lse, AttnStats(m=m, max_logit=mx, global_mass=gm, sink_mass=sink[0] if sink else None))
