"""Point-to-point exchange of sequence rows (K/V halos, global keys, random blocks, global queries).

``P2PExchange`` is the only place that talks to peers on the halo path: one message per peer and
direction, posted together with ``dist.batch_isend_irecv`` (asynchronous, so the caller computes
while it is in flight), and the exact reverse for gradients: what arrived from a peer goes back to
it as a gradient, and what was sent comes back and is summed into the sender's rows. Rows are the
second-to-last dimension of ``[..., T, C]`` tensors (``[2, B, Hkv, L, D]`` for stacked K/V).

``kv_routes`` turns the static plan (``parallel.plan``) into this rank's routes. The global keys
travel here too, from their owners, as point-to-point messages rather than an ``all_gather``: gloo's
all-gather needs equal sizes on every rank, while only the owners hold globals (several owners when
g > L), and one batch lets halo and globals overlap the local compute together.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, unique

import torch
import torch.distributed as dist

from parallel.comm import CommCounter
from parallel.context import ParallelContext
from parallel.plan import HaloPlan

Rows = tuple[tuple[int, int, str], ...]  # (lo, hi, kind) row ranges


@unique
class Tag(IntEnum):
    """Message tags of every point-to-point exchange, in this one place. Exchanges that can be in
    flight together need distinct tags (a receive matches a send by peer and tag), and the gradient
    of an exchange travels back on its tag + 1 (``start_reverse``): hence steps of 10."""

    KV = 10  # halo path: K/V rows (halo, global keys, random blocks)
    GLOBAL_Q = 20  # halo path: bidirectional global queries, owners to every rank
    GLOBAL_PARTIAL = 30  # halo path: the global queries' partials, every rank to their owners
    TOPK_BLOCKS = 40  # top-k path: the fetched key blocks
    KV_DOCS = 50  # halo path: document ids of the K/V rows, on the K/V routes
    TOPK_DOCS = 60  # top-k path: document ids of the fetched blocks, on the block routes
    GLOBAL_KV = 70  # model.global_rope=fixed: the global keys, owners to every rank (parallel.global_part)
    GLOBAL_KV_DOCS = 80  # ... and their document ids


@dataclass(frozen=True)
class Route:
    """Rows exchanged with one peer (an SP rank). For a send, ``rows`` index the source tensor; for
    a receive they only say how many rows of which kind arrive (concatenated in order)."""

    peer: int
    rows: Rows

    @property
    def count(self) -> int:
        return sum(hi - lo for lo, hi, _ in self.rows)


class Pending:
    """Posted point-to-point work; ``wait`` blocks (up to the context's timeout) and returns the result.

    It holds the send and receive buffers: isend/irecv read and write them asynchronously."""

    def __init__(self, works, buffers, timeout, finish):
        self._works, self._buffers, self._timeout, self._finish = works, buffers, timeout, finish

    def wait(self) -> torch.Tensor:
        for work in self._works:
            work.wait(self._timeout)
        return self._finish()


class P2PExchange:
    """Send ``sends`` rows of a tensor to peers and receive ``recvs`` rows from peers, and back."""

    def __init__(self, ctx: ParallelContext, sends: list[Route], recvs: list[Route], tag: Tag,
                 counter: CommCounter | None = None, layer: str | int = 0, kind: str | None = None):
        self.ctx, self.sends, self.recvs, self.tag = ctx, sends, recvs, int(tag)
        self.counter, self.layer = counter, layer
        self.kind = kind  # counted under this kind instead of the routes' (e.g. document ids along K/V routes)

    @property
    def recv_count(self) -> int:
        return sum(r.count for r in self.recvs)

    def start(self, x: torch.Tensor) -> Pending:
        """Post the forward exchange of ``x`` [..., T, C]; ``wait()`` gives [..., R, C] (recvs in order)."""
        out = [(r.peer, _gather_rows(x, r.rows)) for r in self.sends]
        shapes = [(r.peer, r.count) for r in self.recvs]
        self._count("forward", x, out_routes=self.sends, in_routes=self.recvs)
        works, bufs, keep = self._post(out, shapes, x, self.tag)
        empty = x.new_zeros(x.shape[:-2] + (0, x.shape[-1]))
        return Pending(works, keep, self.ctx.timeout, lambda: torch.cat(bufs, dim=-2) if bufs else empty)

    def start_reverse(self, grad_recv: torch.Tensor, like: torch.Tensor) -> Pending:
        """Post the backward exchange: ``grad_recv`` [..., R, C] (grads of what arrived) goes back to its
        senders; ``wait()`` gives the gradient for the source tensor ``like``, sent rows summed in."""
        pieces = torch.split(grad_recv, [r.count for r in self.recvs], dim=-2) if self.recvs else []
        out = [(r.peer, p) for r, p in zip(self.recvs, pieces, strict=True)]
        shapes = [(r.peer, r.count) for r in self.sends]
        self._count("backward", grad_recv, out_routes=self.recvs, in_routes=self.sends)
        works, bufs, keep = self._post(out, shapes, like, self.tag + 1)

        def finish():
            grad = torch.zeros_like(like)
            for route, buf in zip(self.sends, bufs, strict=True):
                _add_rows(grad, route.rows, buf)
            return grad

        return Pending(works, keep, self.ctx.timeout, finish)

    def _post(self, out, shapes, like, tag):
        ops, bufs = [], []
        group = self.ctx.sp_group
        for peer, buf in out:
            if buf.shape[-2]:
                ops.append(dist.P2POp(dist.isend, buf.contiguous(), self.ctx.sp_global_rank(peer), group, tag))
        for peer, n in shapes:
            bufs.append(like.new_empty(like.shape[:-2] + (n, like.shape[-1])))
            if n:
                ops.append(dist.P2POp(dist.irecv, bufs[-1], self.ctx.sp_global_rank(peer), group, tag))
        works = dist.batch_isend_irecv(ops) if ops else []
        return works, bufs, [op.tensor for op in ops]

    def _count(self, direction, x, out_routes, in_routes):
        if self.counter is None:
            return
        row_bytes = x.shape[:-2].numel() * x.shape[-1] * x.element_size()
        for routes, side in ((out_routes, "sent"), (in_routes, "recv")):
            for route in routes:
                for lo, hi, kind in route.rows:
                    self.counter.add(self.layer, direction, self.kind or kind, **{side: (hi - lo) * row_bytes})


def _gather_rows(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    return torch.cat([x[..., lo:hi, :] for lo, hi, _ in rows], dim=-2)


def _add_rows(grad: torch.Tensor, rows: Rows, buf: torch.Tensor) -> None:
    offset = 0
    for lo, hi, _ in rows:
        grad[..., lo:hi, :] += buf[..., offset:offset + hi - lo, :]
        offset += hi - lo


def kv_routes(plan: HaloPlan, rank: int) -> tuple[list[Route], list[Route]]:
    """(sends, recvs) of ``rank`` for the K/V exchange: send rows are local indices (pos − start)."""
    start = rank * plan.local_len
    sends, recvs = {}, {}
    for t in plan.sends(rank):
        sends.setdefault(t.dst, []).append((t.start - start, t.end - start, t.kind))
    for t in plan.recvs(rank):
        recvs.setdefault(t.src, []).append((t.start, t.end, t.kind))
    return ([Route(p, tuple(r)) for p, r in sorted(sends.items())],
            [Route(p, tuple(r)) for p, r in sorted(recvs.items())])
