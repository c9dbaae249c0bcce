"""The sparse attention pattern: the one truth about which query attends to which key.

Positions are 0-indexed absolute positions in the full sequence. A pattern answers, for query
position i and key position j, whether i may attend to j. The same object yields

- ``mask(q_pos, k_pos)``: the dense boolean mask the reference attention uses,
- ``kv_ranges(q_start, q_end, seq_len)``: the sorted, disjoint key ranges a block of queries needs
  (what a sequence shard must receive from other ranks),
- ``block_layout(seq_len, block)``: which key blocks each query block touches (a superset of the
  mask; what a blocked kernel iterates over),
- ``num_keys``, ``key_counts``, ``density``: counts for people and cost models.

Window convention: FlashAttention's ``(left, right)`` with the query itself counted separately:
i sees j when ``i - left <= j <= i + right`` (``right == 0`` when causal). Global tokens are the
positions ``0..num_global-1``: every query sees them (subject to causality); in a bidirectional
pattern a global query also sees every key.

Run ``python -m model.pattern attention=sink attention.window_left=2 attention.num_global=1
seq_len=1024 query=499`` to look at a pattern (see ``model/pattern_cli.py``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from model.pattern.base import Pattern, PatternError, Range, _positions, merge_ranges  # noqa: F401
from model.pattern.ranges import ATTENTION
from model.pattern.topk import TopKBlocks, block_mean, union_per_block  # noqa: F401


@dataclass(frozen=True)
class Dense(Pattern):
    """Every key (causal: every earlier key and self)."""

    def _rule(self, qi, kj, seq_len):
        return torch.ones(torch.broadcast_shapes(qi.shape, kj.shape), dtype=torch.bool, device=qi.device)

    def _rule_ranges(self, q_start, q_end, seq_len):
        return [(0, seq_len)]

    bounded: bool = field(default=False, init=False, repr=False, compare=False)


@dataclass(frozen=True)
class Window(Pattern):
    """Sliding window ``i - left <= j <= i + right``; with ``dilation`` d only every d-th key,
    counting from the query itself (``(i - j) % d == 0``). Sink/Longformer are this plus globals."""

    window_left: int = 0
    window_right: int = 0
    dilation: int = 1

    def _rule(self, qi, kj, seq_len):
        d = kj - qi
        m = (d >= -self.window_left) & (d <= self.window_right)
        return m & ((d % self.dilation) == 0) if self.dilation > 1 else m

    def local_reach(self):  # also BigBird's: its window is the halo, its random blocks are blocks
        return self.window_left, self.window_right

    def _rule_sees_future(self):
        # The allowed offsets are the multiples of the dilation in [-left, right]: the first future
        # one is +dilation.
        return self.window_right >= self.dilation

    def _rule_ranges(self, q_start, q_end, seq_len):
        d = self.dilation
        if d > 1 and q_end - q_start < d:
            # Fewer queries than the dilation: only some residues are needed; list them exactly.
            return [(q_start + t, q_end + t) for t in range(-(self.window_left // d) * d, self.window_right + 1, d)]
        # The farthest reachable offsets are the multiples of d inside the window, not its edges.
        return [(q_start - self.window_left // d * d, q_end + self.window_right // d * d)]

    def block_layout(self, seq_len, block):
        # Vectorised band (+ globals) so that layouts at 1M tokens cost nothing.
        nb = math.ceil(seq_len / block)
        qb, kb = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
        q_lo, q_hi = qb * block, torch.clamp((qb + 1) * block, max=seq_len) - 1
        k_lo, k_hi = kb * block, torch.clamp((kb + 1) * block, max=seq_len) - 1
        layout = (k_hi >= q_lo - self.window_left) & (k_lo <= q_hi + self.window_right)
        if self.num_global:
            layout |= k_lo < self.num_global
            if not self.causal:
                layout |= q_lo < self.num_global
        if self.causal:
            layout &= k_lo <= q_hi
        return layout

    def validate(self, seq_len=None):
        super().validate(seq_len)
        if self.window_left < 0:
            raise PatternError(f"attention.window_left: must be >= 0, got {self.window_left}")
        if self.window_right < 0:
            raise PatternError(f"attention.window_right: must be >= 0, got {self.window_right}")
        if self.causal and self.window_right > 0:
            raise PatternError(f"attention.window_right: must be 0 when attention.causal=true, got {self.window_right}")
        if self.dilation < 1:
            raise PatternError(f"attention.dilation: must be >= 1, got {self.dilation}")
        return self


@dataclass(frozen=True)
class Strided(Pattern):
    """Sparse Transformer (Child et al., 2019). ``strided``: the previous ``stride`` positions plus
    every ``stride``-th key before them (``(i - j) % stride == 0``). ``fixed``: the query's own
    stride-aligned block plus the last ``summary`` positions of every block (the "summary" columns)."""

    stride: int = 128
    variant: str = "strided"
    summary: int = 1

    bounded: bool = field(default=False, init=False, repr=False, compare=False)

    def local_reach(self):
        return self.stride - 1, 0 if self.causal else self.stride - 1

    def _rule(self, qi, kj, seq_len):
        s = self.stride
        if self.variant == "strided":
            d = qi - kj
            return (d.abs() < s) | (d % s == 0)
        return (qi // s == kj // s) | (kj % s >= s - self.summary)

    def _rule_ranges(self, q_start, q_end, seq_len):
        s = self.stride
        if self.variant == "strided":
            if q_end - q_start >= s:  # every residue appears among the queries
                return [(0, seq_len)]
            out = [(q_start - s + 1, q_end + s - 1)]
            out += [(q_start + m * s, q_end + m * s) for m in range(-(q_end // s) - 1, (seq_len - q_start) // s + 2)]
            return out
        out = [((q_start // s) * s, (q_end - 1) // s * s + s)]
        out += [(b * s + s - self.summary, b * s + s) for b in range(math.ceil(seq_len / s))]
        return out

    def validate(self, seq_len=None):
        super().validate(seq_len)
        if self.stride < 1:
            raise PatternError(f"attention.stride: must be >= 1, got {self.stride}")
        if self.variant not in ("strided", "fixed"):
            raise PatternError(f"attention.variant: must be one of strided, fixed; got {self.variant!r}")
        if not 1 <= self.summary <= self.stride:
            raise PatternError(f"attention.summary: must be in [1, stride={self.stride}], got {self.summary}")
        return self


@dataclass(frozen=True)
class BigBird(Window):
    """BigBird (Zaheer et al., 2020): window + globals + ``random_blocks`` random key blocks per
    query block of ``block_size``. The draw is seeded by (seed, query block) so every rank and every
    call agrees; causal draws among earlier blocks, bidirectional among all blocks of ``seq_len``."""

    random_blocks: int = 0
    block_size: int = 64
    seed: int = 0

    def random_key_blocks(self, q_block: int, seq_len: int) -> np.ndarray:
        n_cand = q_block + 1 if self.causal else math.ceil(seq_len / self.block_size)
        rng = np.random.default_rng([self.seed, q_block])
        return np.sort(rng.choice(n_cand, size=min(self.random_blocks, n_cand), replace=False))

    def _random_table(self, seq_len: int) -> torch.Tensor:
        return _random_table(self, seq_len)

    def _rule(self, qi, kj, seq_len):
        m = super()._rule(qi, kj, seq_len)
        if not self.random_blocks:
            return m
        table = self._random_table(seq_len).to(qi.device)
        bs = self.block_size
        return m | table[(qi // bs).clamp(max=table.shape[0] - 1), (kj // bs).clamp(max=table.shape[1] - 1)]

    def _rule_ranges(self, q_start, q_end, seq_len):
        out = super()._rule_ranges(q_start, q_end, seq_len)
        bs = self.block_size
        for qb in range(q_start // bs, (q_end - 1) // bs + 1):
            out += [(int(b) * bs, int(b) * bs + bs) for b in self.random_key_blocks(qb, seq_len)]
        return out

    block_layout = Pattern.block_layout  # the random blocks break the vectorised band

    def _rule_sees_future(self):
        # Bidirectional random blocks are drawn among all blocks of the sequence, later ones included.
        return super()._rule_sees_future() or self.random_blocks > 0

    def validate(self, seq_len=None):
        super().validate(seq_len)
        if self.block_size < 1:
            raise PatternError(f"attention.block_size: must be >= 1, got {self.block_size}")
        if self.random_blocks < 0:
            raise PatternError(f"attention.random_blocks: must be >= 0, got {self.random_blocks}")
        return self


@dataclass(frozen=True)
class PatternUnion(Pattern):
    """The union of patterns: i sees j if any part allows it. Parts share ``causal``; globals are the
    largest of the parts'."""

    parts: tuple[Pattern, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "bounded", all(p.bounded for p in self.parts))
        # The union's globals are the largest of its parts' (and its own): kv_ranges of a part
        # includes that part's globals, so the union must count them too.
        object.__setattr__(self, "num_global", max([self.num_global, *(p.num_global for p in self.parts)]))

    def _rule(self, qi, kj, seq_len):
        m = torch.zeros(torch.broadcast_shapes(qi.shape, kj.shape), dtype=torch.bool, device=qi.device)
        for p in self.parts:
            m = m | p._rule(qi, kj, seq_len)  # not in place: FlexAttention traces this
        return m

    def _rule_ranges(self, q_start, q_end, seq_len):
        return [r for p in self.parts for r in p.kv_ranges(q_start, q_end, seq_len)]

    def _rule_sees_future(self):
        return any(p.sees_future() for p in self.parts)

    def local_reach(self):
        reaches = [p.local_reach() for p in self.parts] or [(0, 0)]
        return max(r[0] for r in reaches), max(r[1] for r in reaches)

    def validate(self, seq_len=None):
        super().validate(seq_len)
        if not self.parts:
            raise PatternError("attention.parts: a union needs at least one part")
        for p in self.parts:
            p.validate(seq_len)
            if p.content_based:
                raise PatternError("attention.parts: a content-based pattern (topk) cannot be part of a union")
            if p.causal != self.causal:
                raise PatternError("attention.parts: every part must have the union's attention.causal")
        return self


@functools.lru_cache(maxsize=8)
def _random_table(p: BigBird, seq_len: int) -> torch.Tensor:
    """BoolTensor[nQB, nKB] of BigBird's random blocks (cached: masks are built chunk by chunk)."""
    nb = math.ceil(seq_len / p.block_size)
    table = torch.zeros(nb, nb, dtype=torch.bool)
    for qb in range(nb):
        table[qb, torch.from_numpy(p.random_key_blocks(qb, seq_len))] = True
    return table


# --- configuration ------------------------------------------------------------------------------

NAMES = ("dense", "window", "longformer", "sink", "dilated", "strided", "bigbird", "topk", "union")
_KEYS = {"name", "causal", "window_left", "window_right", "num_global", "dilation", "stride", "variant",
         "summary", "random_blocks", "block_size", "seed", "top_k", "select", "parts"}
_CLASS = {"dense": Dense, "window": Window, "longformer": Window, "sink": Window, "dilated": Window,
          "strided": Strided, "bigbird": BigBird, "topk": TopKBlocks, "union": PatternUnion}


def from_config(cfg: Mapping, seq_len: int | None = None) -> Pattern:
    """Build and validate a Pattern from the ``attention`` node of the config (any mapping).

    Keys a pattern does not use are ignored, so one YAML can switch ``name``; unknown keys and
    invalid values raise PatternError naming the key. ``seq_len``, when given, is checked too.
    """
    cfg = dict(cfg)
    name = cfg.get("name")
    if name not in _CLASS:
        raise PatternError(f"attention.name: unknown pattern {name!r}; allowed: {', '.join(NAMES)}")
    unknown = sorted(set(cfg) - _KEYS)
    if unknown:
        raise PatternError(f"attention.{unknown[0]}: unknown key; allowed keys: {', '.join(sorted(_KEYS))}")
    cls = _CLASS[name]
    kwargs = {f.name: cfg[f.name] for f in fields(cls) if f.init and f.name in cfg and cfg[f.name] is not None}
    for key, value in kwargs.items():  # before the union's max() of globals, which needs integers
        if key in ("causal",) and not isinstance(value, bool):
            raise PatternError(f"attention.{key}: must be true or false, got {value!r}")
        if key not in ("causal", "variant", "select", "parts") and (isinstance(value, bool) or not isinstance(value, int)):
            raise PatternError(f"attention.{key}: must be an integer, got {value!r}")
    for key, rng in ATTENTION.items():  # every key given, used by this pattern or not
        rng.check(f"attention.{key}", cfg.get(key), PatternError)
    if cls is PatternUnion:
        parts = cfg.get("parts") or []
        kwargs["parts"] = tuple(from_config({"causal": cfg.get("causal", True), **dict(p)}) for p in parts)
    return cls(**kwargs).validate(seq_len)
