"""The static exchange plan: which key ranges each SP rank receives from which rank.

Derived from ``pattern.kv_ranges`` alone, so every rank computes the same plan for every rank
without talking to anyone (and knows what to send as well as what to receive). For rank r:

    needed(r) = kv_ranges(regular queries of r) − [r·L, (r+1)·L)

cut at shard boundaries (one transfer per owner) and labelled for accounting: ``global`` (inside
[0, g)), ``halo`` (inside the pattern's window reach around the shard) or ``blocks`` (anything
else: BigBird random blocks, strided columns). The global keys therefore travel with the halo, from
their owners, exactly once per rank that needs them, and never duplicate a local or halo key.

"Regular" queries are all local queries except, in a bidirectional pattern, the global queries:
those see every key and are computed by the LSE merge in ``parallel.global_queries`` instead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from model.pattern import Pattern
from parallel.sharding import check_divisible


@dataclass(frozen=True)
class Transfer:
    """Keys at absolute positions [start, end) travel from SP rank ``src`` to ``dst``."""

    src: int
    dst: int
    start: int
    end: int
    kind: str

    @property
    def count(self) -> int:
        return self.end - self.start


def bidirectional_globals(pattern: Pattern) -> int:
    """Number of global *queries* that see every key (0 for causal patterns)."""
    return 0 if pattern.causal else pattern.num_global


def regular_queries(pattern: Pattern, start: int, end: int) -> tuple[int, int]:
    """[qs, end): the local queries served by the halo path (qs == end when there are none)."""
    return min(max(start, bidirectional_globals(pattern)), end), end


def _subtract(ranges: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    out = []
    for s, e in ranges:
        out += [(s, min(e, lo)), (max(s, hi), e)]
    return [(s, e) for s, e in out if e > s]


def _cut(s: int, e: int, points: list[int]) -> list[tuple[int, int]]:
    inner = sorted({p for p in points if s < p < e})
    bounds = [s, *inner, e]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _needed(pattern: Pattern, seq_len: int, rank: int, local_len: int) -> list[Transfer]:
    start, end = rank * local_len, (rank + 1) * local_len
    qs, qe = regular_queries(pattern, start, end)
    if qs >= qe:
        return []
    remote = _subtract(pattern.kv_ranges(qs, qe, seq_len), start, end)
    left, right = pattern.local_reach()  # within it remote keys are ``halo``, beyond it ``blocks``
    g = pattern.num_global
    shard_edges = list(range(0, seq_len + 1, local_len))
    out = []
    for s, e in remote:
        for a, b in _cut(s, e, [g, start - left, end + right, *shard_edges]):
            if b <= g:
                kind = "global"
            elif a >= start - left and b <= end + right:
                kind = "halo"
            else:
                kind = "blocks"
            out.append(Transfer(src=a // local_len, dst=rank, start=a, end=b, kind=kind))
    return out


@dataclass(frozen=True)
class HaloPlan:
    """Every rank's receives for one (pattern, seq_len, sp_size); rank-local views by method."""

    seq_len: int
    sp_size: int
    local_len: int
    transfers: tuple[Transfer, ...]

    def recvs(self, rank: int) -> list[Transfer]:
        """What ``rank`` receives, in ascending position (= ascending source rank) order."""
        return sorted((t for t in self.transfers if t.dst == rank), key=lambda t: t.start)

    def sends(self, rank: int) -> list[Transfer]:
        """What ``rank`` sends, grouped by destination, ascending position within each."""
        return sorted((t for t in self.transfers if t.src == rank), key=lambda t: (t.dst, t.start))

    def remote_positions(self, rank: int) -> torch.Tensor:
        """LongTensor[R]: absolute positions of the keys ``rank`` receives, in buffer order."""
        parts = [torch.arange(t.start, t.end) for t in self.recvs(rank)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def max_recv_keys(self) -> int:
        return max((sum(t.count for t in self.recvs(r)) for r in range(self.sp_size)), default=0)


@functools.lru_cache(maxsize=64)
def build_plan(pattern: Pattern, seq_len: int, sp_size: int) -> HaloPlan:
    """The plan for all ranks (cached: the pattern is a frozen, hashable value)."""
    if pattern.content_based:
        raise ValueError(f"{pattern!r} is content-based: its keys depend on the data, no static plan exists; "
                         "use strategy='ulysses'")
    L = check_divisible(seq_len, sp_size)
    transfers = [t for r in range(sp_size) for t in _needed(pattern, seq_len, r, L)]
    return HaloPlan(seq_len=seq_len, sp_size=sp_size, local_len=L, transfers=tuple(transfers))


@functools.lru_cache(maxsize=64)
def remote_rows(pattern: Pattern, seq_len: int, sp_size: int, rank: int, chunk: int = 4096) -> torch.Tensor:
    """LongTensor: indices (within the regular queries) of the queries with >= 1 allowed remote key.

    The remote partial is computed only for these rows: a row with no key would be an empty softmax.
    """
    plan = build_plan(pattern, seq_len, sp_size)
    start, end = rank * plan.local_len, (rank + 1) * plan.local_len
    qs, qe = regular_queries(pattern, start, end)
    k_pos = plan.remote_positions(rank)
    if qs >= qe or len(k_pos) == 0:
        return torch.zeros(0, dtype=torch.long)
    rows = []
    for a in range(qs, qe, chunk):  # chunked: the [Q, R] mask of a long shard would be large
        q_pos = torch.arange(a, min(a + chunk, qe))
        rows.append(pattern.mask(q_pos, k_pos, seq_len).any(1))
    return torch.nonzero(torch.cat(rows)).flatten()
