"""Global tokens across sequence shards.

Global *keys* (positions 0..g−1) are part of every rank's static plan and arrive from their owners
with the halo (``parallel.plan`` labels them ``global``; ``parallel.halo`` moves them), so here are
only the global *queries* of a bidirectional pattern, which see every key of the sequence:

1. all-gather: the owners of the global queries (several ranks when g > L) send them to every rank;
2. every rank computes their partial attention (out, lse[, stats]) over its own local keys;
3. each owner receives the partials of its global queries from every rank and folds them with the
   exact LSE merge (``kernels.stats.merge_two``, in rank order), which it keeps as their output.

Backward is the reverse of each step (``P2PExchange.start_reverse``), run by ``parallel.halo_attention``.
Partials travel packed as one fp32 tensor ``[B, H, g, D + 1 (+3)]``: out | lse | (m, max_logit, global_mass).
"""

from __future__ import annotations

import torch

from kernels.stats import AttnStats, merge_partials
from parallel.halo import Route

Q_KIND, PARTIAL_KIND = "global_q", "global_partial"


def global_owners(num_global: int, local_len: int, sp_size: int) -> list[tuple[int, int, int]]:
    """(owner, lo, hi): the global query positions [lo, hi) that each owner holds."""
    return [(o, o * local_len, min(num_global, (o + 1) * local_len))
            for o in range(sp_size) if o * local_len < num_global]


def owned_count(num_global: int, local_len: int, rank: int) -> int:
    """How many of this rank's queries are global (its first rows)."""
    return max(0, min(num_global, (rank + 1) * local_len) - rank * local_len)


def query_routes(num_global: int, local_len: int, sp_size: int, rank: int) -> tuple[list[Route], list[Route]]:
    """All-gather of the global queries: owners send their first rows to every other rank."""
    owners = global_owners(num_global, local_len, sp_size)
    sends = [Route(peer, ((0, hi - lo, Q_KIND),)) for o, lo, hi in owners if o == rank
             for peer in range(sp_size) if peer != rank]
    recvs = [Route(o, ((lo, hi, Q_KIND),)) for o, lo, hi in owners if o != rank]
    return sends, recvs


def partial_routes(num_global: int, local_len: int, sp_size: int, rank: int) -> tuple[list[Route], list[Route]]:
    """Partials of the global queries go to their owners; an owner receives from every other rank."""
    owners = global_owners(num_global, local_len, sp_size)
    sends = [Route(o, ((lo, hi, PARTIAL_KIND),)) for o, lo, hi in owners if o != rank]
    mine = [(lo, hi) for o, lo, hi in owners if o == rank]
    recvs = [Route(peer, ((0, hi - lo, PARTIAL_KIND),)) for lo, hi in mine for peer in range(sp_size) if peer != rank]
    return sends, recvs


def assemble_queries(recv_q: torch.Tensor, local_q: torch.Tensor, num_global: int, local_len: int,
                     sp_size: int, rank: int) -> torch.Tensor:
    """[B, H, g, D] global queries in position order from the received rows and this rank's own."""
    pieces, offset = [], 0
    for o, lo, hi in global_owners(num_global, local_len, sp_size):
        if o == rank:
            pieces.append(local_q[:, :, : hi - lo])
        else:
            pieces.append(recv_q[:, :, offset:offset + hi - lo])
            offset += hi - lo
    return torch.cat(pieces, dim=2)


def pack(out: torch.Tensor, lse: torch.Tensor, stats: AttnStats | None) -> torch.Tensor:
    cols = [out.float(), lse[..., None]]
    if stats is not None:
        cols += [f.detach()[..., None].float() for f in stats.fields()]
    return torch.cat(cols, dim=-1)


def unpack(packed: torch.Tensor, head_dim: int):
    out, lse = packed[..., :head_dim], packed[..., head_dim]
    if packed.shape[-1] == head_dim + 1:
        return out, lse, None
    m, mx, gm = (packed[..., head_dim + 1 + i].detach() for i in range(3))
    return out, lse, AttnStats(m=m, max_logit=mx, global_mass=gm)


def merge_owned(own_partial: torch.Tensor, recv_partials: torch.Tensor, head_dim: int, num_global: int,
                local_len: int, sp_size: int, rank: int):
    """Fold every rank's partial of this rank's global queries (rank order) → (out, lse, stats|None)."""
    lo = rank * local_len
    n = owned_count(num_global, local_len, rank)
    others = iter(torch.split(recv_partials, n, dim=2)) if n else iter(())
    acc = None
    for r in range(sp_size):
        part = unpack(own_partial[:, :, lo:lo + n] if r == rank else next(others), head_dim)
        acc = part if acc is None else merge_partials(acc, part)
    return acc
