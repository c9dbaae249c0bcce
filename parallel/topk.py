"""Top-k strategy: content-based block selection under sequence parallelism via gathered block summaries.

On rank r (queries = its shard [r·L, (r+1)·L), L a multiple of ``block_size``):

    summaries = all-gather(mean of every local key block)         [B, Hkv, n/bs, D] fp32, "summary"
    chosen    = block_choice(local queries, summaries)             the single-device choice, no grad
                (select=block: per query block; select=query: each query's, united per query block)
    need      = ∪ over (batch, head, local query block) of chosen remote blocks   [n/bs] bool
    needs     = all-gather(need)                                   who wants which of my blocks, "requests"
    fetched   = point-to-point K/V rows of the needed blocks from their owners (async), "blocks"
    out       = kernel(local queries, keys = fetched ∪ local in position order, true positions)
    out, lse  = apply_sinks(out, lse, sinks)                       learned sinks, once per query

Document ids of the fetched rows travel beside them on the same routes (one int64 column, ``doc_ids``).

Why the kernel's own re-selection reproduces the global choice: every backend recomputes the top-k
from the q and k it is given (block means grouped by absolute block id). The block means of the
fetched rows are the same numbers as the summaries (same rows, same fp32 summation order), the
forced blocks (own block, block 0) are present (block 0 is forced for every query block, so it is
always in ``need``), and for each (batch, head, query block) — with select=query, each query — the
candidate set is a superset of its globally chosen blocks; those were the ``top_k`` best of *all*
blocks, hence the best of any superset containing them. Two caveats, both at exact ties only: (1) ``torch.topk`` may break a tie between
two candidates differently on a smaller candidate set; (2) the score matmul runs on differently
shaped operands than on one device, which can change the last bit of a score and so flip a choice
whose scores agree to ~1 ulp. Random or trained activations essentially never tie; on CUDA the block
means come from ``index_add_`` (atomics), so even one device does not reproduce such ties run to run.

Cost per rank: summaries (P−1)·B·Hkv·(L/bs)·D·4 bytes (1/bs of a K all-gather), the need vectors
(P−1)·n/bs bytes, and the fetched blocks. Far below Ulysses when the choices concentrate on few
blocks (sinks, heavy hitters); in the worst case (every head and query block choosing different
blocks) the union approaches an all-gather of K/V, which for small ``top_k`` is still one 1/bs
summary plus at most B·H·(L/bs)·top_k fetched blocks.

The fetch is not overlapped with compute: the kernel's re-selection needs every candidate block in
one call (a local/remote split merged by LSE would select top-k within each part separately).

Backward is one autograd Function per layer, as on the halo path (``parallel.halo_attention``): the
local kernel's backward, then the fetched rows' gradients go back to their owners (the exact reverse
routes) and are summed there; the selection and the all-gathers carry no gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.contract import AttnCall
from kernels.stats import apply_sinks
from model.pattern import Pattern, block_mean
from parallel.comm import DOC_KIND, CommCounter, counted_all_gather
from parallel.context import ParallelConfigError, ParallelContext
from parallel.halo import P2PExchange, Route, Tag
from parallel.inner_graph import Leaves, Output, attend, grads_or_zeros, leaf, run_layer

SUMMARY, REQUESTS, BLOCKS = "summary", "requests", "blocks"


def check_blocks(local_len: int, block_size: int, sp_size: int) -> int:
    """Blocks per rank; a clear error when a rank's chunk is not whole blocks."""
    if local_len % block_size:
        raise ParallelConfigError(
            f"parallel.strategy=topk needs the local length seq_len / parallel.sequence_parallel_size="
            f"{sp_size} = {local_len} to be a multiple of attention.block_size={block_size} (each rank "
            f"must hold whole blocks); change attention.block_size or sequence_parallel_size, or use "
            f"strategy=ulysses")
    return local_len // block_size


def block_routes(needs: torch.Tensor, rank: int, blocks_per_rank: int, block_size: int
                 ) -> tuple[list[Route], list[Route]]:
    """(sends, recvs) of ``rank`` from every rank's need vector ``needs`` [P, nKB] (bool).

    A rank requests only blocks it does not own; runs of consecutive blocks travel as one row range.
    Send rows are local indices (pos − start), receive rows absolute positions, ascending per peer.
    """
    P = needs.shape[0]
    owner = torch.arange(needs.shape[1]) // blocks_per_rank
    start = rank * blocks_per_rank * block_size
    sends, recvs = [], []
    for peer in range(P):
        if peer == rank:
            continue
        mine = torch.nonzero(needs[peer].cpu() & (owner == rank)).flatten().tolist()  # peer wants from me
        theirs = torch.nonzero(needs[rank].cpu() & (owner == peer)).flatten().tolist()  # I want from peer
        if mine:
            ranges = _block_ranges(mine, block_size)
            sends.append(Route(peer, tuple((lo - start, hi - start, BLOCKS) for lo, hi in ranges)))
        if theirs:
            recvs.append(Route(peer, tuple((lo, hi, BLOCKS) for lo, hi in _block_ranges(theirs, block_size))))
    return sends, recvs


def _block_ranges(blocks: list[int], bs: int) -> list[tuple[int, int]]:
    """Sorted block ids → merged [lo, hi) position ranges."""
    out: list[list[int]] = []
    for b in blocks:
        if out and out[-1][1] == b * bs:
            out[-1][1] = (b + 1) * bs
        else:
            out.append([b * bs, (b + 1) * bs])
    return [(lo, hi) for lo, hi in out]


@dataclass
class TopKSpec:
    """Everything static about one call on this rank (built by ``parallel.sp_attention``)."""

    pattern: Pattern
    call: AttnCall  # the layer's call over keys: seq_len, scale, return_stats, this shard's q_doc, layer
    ctx: ParallelContext
    kernel: Callable  # (q, k, v, pattern, call) -> AttnResult
    counter: CommCounter | None = None

    @property
    def layer(self) -> int:
        return self.call.layer


@dataclass
class TopKState:
    """What one layer's forward keeps for its backward."""

    leaves: Leaves  # the inputs, K/V stacked for the fetch
    exchange: P2PExchange  # this call's block routes (data-dependent); gradients go back on them
    recv_kv: torch.Tensor  # leaf: the fetched key blocks (2, B, Hkv, R, D)
    output: Output


def topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: TopKSpec,
                   sinks: torch.Tensor | None = None):
    """(out [B, H, L, D], lse [B, H, L], stats AttnStats | None) for this rank's shard."""
    check_blocks(q.shape[2], spec.pattern.block_size, spec.ctx.sp_size)
    return run_layer(_forward, _backward, q, k, v, sinks, spec, spec.call.return_stats)


def select_local(pattern: Pattern, q: torch.Tensor, summaries: torch.Tensor, rank: int) -> torch.Tensor:
    """Bool[B, H, nLB, nKB]: the key blocks chosen for this rank's query blocks (select=query: the union
    of their queries' choices) — the single-device choice, since ``summaries`` [B, Hkv, nKB, D] hold
    every key block's mean (GQA expanded as in ``TopKBlocks.content_mask``)."""
    bs, L = pattern.block_size, q.shape[2]
    nlb, nkb = L // bs, summaries.shape[2]
    with torch.no_grad():
        k_means = summaries.repeat_interleave(q.shape[1] // summaries.shape[1], dim=1)  # (B, H, nKB, D)
        inv = torch.arange(L) // bs
        return pattern.block_choice(q, inv, torch.arange(rank * nlb, (rank + 1) * nlb), k_means, torch.arange(nkb))


def _forward(q, k, v, sinks, spec: TopKSpec) -> TopKState:
    ctx, pattern = spec.ctx, spec.pattern
    r, L, bs = ctx.sp_rank, q.shape[2], pattern.block_size
    nlb = L // bs
    local_means = block_mean(k.detach(), torch.arange(L, device=k.device) // bs, nlb)  # (B, Hkv, nLB, D)
    gathered = counted_all_gather(local_means, ctx, SUMMARY, spec.counter, spec.layer)  # (P, B, Hkv, nLB, D)
    summaries = torch.cat(gathered.unbind(0), dim=2)  # (B, Hkv, nKB, D)

    need = select_local(pattern, q.detach(), summaries, r).flatten(0, 2).any(0)  # (nKB,) over B, H, query blocks
    need[0] = True  # forced for every query block; already set, stated for the exactness argument
    need[r * nlb:(r + 1) * nlb] = False  # own blocks are local
    needs = counted_all_gather(need.to(torch.uint8), ctx, REQUESTS, spec.counter, spec.layer).bool()  # (P, nKB)
    sends, recvs = block_routes(needs, r, nlb, bs)

    lv = Leaves.of(q, k, v, sinks)
    exchange = P2PExchange(ctx, sends, recvs, Tag.TOPK_BLOCKS, spec.counter, spec.layer)
    docs = spec.call.q_doc  # [B, L] this shard's document ids, or None
    if docs is not None:  # the fetched rows' document ids, same routes: (B, L, 1) -> (B, R, 1)
        doc_exchange = P2PExchange(ctx, sends, recvs, Tag.TOPK_DOCS, spec.counter, spec.layer, kind=DOC_KIND)
        pend_doc = doc_exchange.start(docs[..., None])
    recv_kv = leaf(exchange.start(lv.kv.detach()).wait())  # (2, B, Hkv, R, D)

    # keys in position order: [fetched from lower ranks | local | fetched from higher ranks]
    remote_pos = [torch.arange(lo, hi) for route in recvs for lo, hi, _ in route.rows]
    remote_pos = torch.cat(remote_pos) if remote_pos else torch.zeros(0, dtype=torch.long)
    n_low = int((remote_pos < r * L).sum())
    low, high = recv_kv[:, :, :, :n_low], recv_kv[:, :, :, n_low:]
    keys = torch.cat([low, lv.kv, high], dim=3)  # (2, B, Hkv, R + L, D)
    local_pos = torch.arange(r * L, (r + 1) * L)
    k_pos = torch.cat([remote_pos[:n_low], local_pos, remote_pos[n_low:]]).to(q.device)

    k_doc = None
    if docs is not None:
        recv_doc = pend_doc.wait()[..., 0]  # (B, R)
        k_doc = torch.cat([recv_doc[:, :n_low], docs, recv_doc[:, n_low:]], dim=1)  # (B, R + L)
    out, lse, stats = attend(spec, lv.q, keys[0], keys[1], local_pos.to(q.device), k_pos, docs, k_doc)
    output = Output(*apply_sinks(out, lse, lv.sinks, stats))
    return TopKState(leaves=lv, exchange=exchange, recv_kv=recv_kv, output=output)


def _backward(spec: TopKSpec, s: TopKState, g_out: torch.Tensor, g_lse: torch.Tensor | None = None):
    """The local kernel's backward, then the fetched rows' gradients go home and are summed there."""
    lv = s.leaves
    sinks = [lv.sinks] if lv.sinks is not None else []  # its gradient: this rank's queries' share
    g_q, g_k, g_v, g_recv_kv, *g_sinks = grads_or_zeros([s.output.out, s.output.lse], [g_out, g_lse],
                                                        [lv.q, lv.k, lv.v, s.recv_kv] + sinks)
    g_kv = s.exchange.start_reverse(g_recv_kv, like=lv.kv).wait()
    return g_q, g_k + g_kv[0], g_v + g_kv[1], (g_sinks[0] if g_sinks else None)
