"""Communication accounting and the cost model it is held against.

A ``CommCounter`` is passed to whoever communicates (it is not a global): every byte this rank
sends and receives is added under (layer, direction, kind), where direction is ``forward`` or
``backward`` and kind is what travelled (``halo``, ``global``, ``blocks``, ``global_q``,
``global_partial``, ``summary``, ``requests``, ``alltoall``, ``doc_ids``). ``as_dict`` gives flat
keys for metrics. ``counted_all_gather`` is the one all-gather here that counts its own bytes.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from parallel.context import ParallelContext

DIRECTIONS = ("forward", "backward")
DOC_KIND = "doc_ids"  # document ids of received keys, whichever strategy moved them


class CommCounter:
    """Bytes sent/received by this rank, per (layer, direction, kind)."""

    def __init__(self) -> None:
        self._bytes: dict[tuple[str, str, str, str], int] = defaultdict(int)

    def add(self, layer: str | int, direction: str, kind: str, sent: int = 0, recv: int = 0) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction: must be one of {DIRECTIONS}, got {direction!r}")
        if sent:
            self._bytes[(str(layer), direction, kind, "sent")] += int(sent)
        if recv:
            self._bytes[(str(layer), direction, kind, "recv")] += int(recv)

    def total(self, side: str = "recv", direction: str | None = None, kind: str | tuple[str, ...] | None = None,
              layer: str | int | None = None) -> int:
        """Sum over every entry matching the given filters (None matches all)."""
        kinds = (kind,) if isinstance(kind, str) else kind
        return sum(b for (lay, dirn, k, s), b in self._bytes.items()
                   if s == side and (direction is None or dirn == direction)
                   and (kinds is None or k in kinds) and (layer is None or lay == str(layer)))

    def as_dict(self) -> dict[str, int]:
        """``{"comm/<layer>/<direction>/<kind>/<sent|recv>": bytes}`` for metrics."""
        return {"comm/" + "/".join(key): b for key, b in sorted(self._bytes.items())}

    def reset(self) -> None:
        self._bytes.clear()


def counted_all_gather(x: torch.Tensor, ctx: ParallelContext, kind: str, counter: CommCounter | None = None,
                       layer: str | int = 0) -> torch.Tensor:
    """[P, *x.shape]: every SP rank's ``x`` in SP-rank order, carrying no gradient; counted under ``kind``
    (block summaries and need vectors of the top-k path, document ids on the Ulysses path)."""
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(ctx.sp_size)]
    dist.all_gather(parts, x, group=ctx.sp_group, async_op=True).wait(ctx.timeout)
    if counter is not None:  # logically each rank sends its piece to, and receives one from, P−1 peers
        moved = x.numel() * x.element_size() * (ctx.sp_size - 1)
        counter.add(layer, "forward", kind, sent=moved, recv=moved)
    return torch.stack(parts)


# --- cost model (bytes per rank per layer, forward) ------------------------------------------------

def halo_cost(window: int, num_global: int, kv_heads: int, head_dim: int, itemsize: int, batch: int = 1) -> int:
    """Halo + globals received by an interior rank: (w + g) keys of K and V.

    ``window`` is the number of halo keys (left + right reach); independent of n and P.
    """
    return (window + num_global) * batch * kv_heads * head_dim * 2 * itemsize


def ulysses_cost(seq_len: int, sp_size: int, heads: int, head_dim: int, itemsize: int, batch: int = 1,
                 kv_heads: int | None = None) -> int:
    """All-to-all of q, k, v and out: each rank keeps 1/P of every tensor and receives the rest.

    With ``kv_heads`` the K/V tensors count at their own width; the plain model uses ``heads`` for all.
    """
    hkv = heads if kv_heads is None else kv_heads
    local = seq_len // sp_size
    per_token = (2 * heads + 2 * hkv) * head_dim * itemsize * batch
    return local * per_token * (sp_size - 1) // sp_size


def allgather_cost(seq_len: int, sp_size: int, kv_heads: int, head_dim: int, itemsize: int, batch: int = 1) -> int:
    """All-gather (or a full ring pass) of K and V: every rank receives the other P-1 shards."""
    return (sp_size - 1) * (seq_len // sp_size) * batch * kv_heads * head_dim * 2 * itemsize
