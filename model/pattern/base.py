"""The base of every pattern: global tokens, causality, and everything derived from a pattern's own
rule (mask, key ranges, block layout, counts, reach). ``model.pattern`` re-exports it; the patterns
themselves live beside it (``__init__``: positional ones, ``topk``: the content-based one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

Range = tuple[int, int]


class PatternError(ValueError):
    """An invalid pattern setting; the message names the config key and the allowed values."""


def merge_ranges(ranges: list[Range]) -> list[Range]:
    """Sort half-open ranges and fuse the overlapping or touching ones; drop empty ones."""
    out: list[list[int]] = []
    for s, e in sorted(r for r in ranges if r[1] > r[0]):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _clip(ranges: list[Range], lo: int, hi: int) -> list[Range]:
    return merge_ranges([(max(s, lo), min(e, hi)) for s, e in ranges])


@dataclass(frozen=True)
class Pattern:
    """Base pattern: global tokens and causality; subclasses add their own local rule ``_rule``."""

    causal: bool = True
    num_global: int = 0

    # --- what a subclass provides -------------------------------------------------------------
    def _rule(self, qi: torch.Tensor, kj: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Pattern-specific part of the mask for broadcastable position tensors qi and kj."""
        raise NotImplementedError

    def _rule_ranges(self, q_start: int, q_end: int, seq_len: int) -> list[Range]:
        """Key ranges (a superset, possibly unsorted) that ``_rule`` allows for queries [q_start, q_end)."""
        raise NotImplementedError

    bounded: bool = field(default=True, init=False, repr=False, compare=False)
    content_based: bool = field(default=False, init=False, repr=False, compare=False)

    # --- derived, shared by every pattern -------------------------------------------------------
    def mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
        """BoolTensor[Q, K]: may the query at ``q_pos[a]`` attend to the key at ``k_pos[b]``.

        ``seq_len`` matters only to patterns whose choice depends on the sequence length
        (bidirectional BigBird); it defaults to one past the largest position given.
        """
        q_pos, k_pos = torch.as_tensor(q_pos).long(), torch.as_tensor(k_pos).long()
        n = seq_len if seq_len is not None else int(max(q_pos.max(), k_pos.max())) + 1
        return self.allowed(q_pos[:, None], k_pos[None, :], n)

    def allowed(self, qi: torch.Tensor, kj: torch.Tensor, seq_len: int) -> torch.Tensor:
        """The mask for broadcastable LongTensors of query and key positions (any shapes)."""
        m = self._rule(qi, kj, seq_len)
        if self.num_global:
            m = m | (kj < self.num_global)
            if not self.causal:
                m = m | (qi < self.num_global)
        if self.causal:
            m = m & (kj <= qi)
        return m

    def kv_ranges(self, q_start: int, q_end: int, seq_len: int) -> list[Range]:
        """Sorted, disjoint half-open key ranges that the queries [q_start, q_end) may attend to."""
        if not 0 <= q_start < q_end <= seq_len:
            raise PatternError(f"kv_ranges: need 0 <= q_start < q_end <= seq_len, got {q_start}, {q_end}, {seq_len}")
        ranges = list(self._rule_ranges(q_start, q_end, seq_len))
        if self.num_global:
            ranges.append((0, self.num_global))
            if not self.causal and q_start < self.num_global:
                ranges.append((0, seq_len))
        return _clip(ranges, 0, q_end if self.causal else seq_len)

    def block_layout(self, seq_len: int, block: int) -> torch.Tensor:
        """BoolTensor[nQB, nKB]: key blocks each query block of ``block`` positions touches (⊇ mask)."""
        nb = math.ceil(seq_len / block)
        layout = torch.zeros(nb, nb, dtype=torch.bool)
        for qb in range(nb):
            for s, e in self.kv_ranges(qb * block, min((qb + 1) * block, seq_len), seq_len):
                layout[qb, s // block : (e - 1) // block + 1] = True
        return layout

    def key_counts(self, seq_len: int, chunk: int = 256) -> torch.Tensor:
        """LongTensor[seq_len]: number of keys each query attends to (evaluated only inside kv_ranges)."""
        counts = torch.zeros(seq_len, dtype=torch.long)
        for qs in range(0, seq_len, chunk):
            qe = min(qs + chunk, seq_len)
            k_pos = _positions(self.kv_ranges(qs, qe, seq_len))
            counts[qs:qe] = self.mask(torch.arange(qs, qe), k_pos, seq_len).sum(1)
        return counts

    def num_keys(self, query: int, seq_len: int) -> int:
        """How many key/value pairs the query at 0-indexed position ``query`` attends to."""
        return len(self.keys_of(query, seq_len))

    def keys_of(self, query: int, seq_len: int) -> list[int]:
        """The 0-indexed key positions that ``query`` attends to."""
        if not 0 <= query < seq_len:
            raise PatternError(f"query: must be in [0, seq_len={seq_len}), got {query}")
        k_pos = _positions(self.kv_ranges(query, query + 1, seq_len))
        keep = self.mask(torch.tensor([query]), k_pos, seq_len)[0]
        return k_pos[keep].tolist()

    def density(self, seq_len: int) -> float:
        """Fraction of all seq_len² (query, key) pairs that are attended."""
        return float(self.key_counts(seq_len).sum()) / float(seq_len) ** 2

    def local_reach(self) -> tuple[int, int]:
        """(left, right): how far before and after a query its local (window-like) keys reach. Under
        sequence parallelism keys within it travel as the ``halo``; anything else the pattern allows
        beyond it (globals aside) is fetched as ``blocks``."""
        return 0, 0

    def sees_future(self) -> bool:
        """Whether some query may attend to a key after its own position. Under a next-token
        objective that key is the query's target (or a later one), so such a pattern cannot train a
        causal LM. A bidirectional pattern with globals always does: a global query sees every key."""
        if self.causal:
            return False
        return self.num_global > 0 or self._rule_sees_future()

    def _rule_sees_future(self) -> bool:
        """Whether ``_rule`` alone allows some j > i (bidirectional only). The default says yes: a
        pattern that does not know must not pass for causal."""
        return True

    def validate(self, seq_len: int | None = None) -> Pattern:
        """Raise a PatternError naming the setting if this pattern cannot be used at ``seq_len``."""
        if self.num_global < 0:
            raise PatternError(f"attention.num_global: must be >= 0, got {self.num_global}")
        if seq_len is not None and self.num_global >= seq_len:
            raise PatternError(f"attention.num_global: must be < seq_len={seq_len}, got {self.num_global}")
        return self


def _positions(ranges: list[Range]) -> torch.Tensor:
    if not ranges:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(s, e) for s, e in ranges])
