"""The range of every numeric setting, declared once and checked in one place (``Bounds.check``).

``ATTENTION`` holds the attention node's numeric keys (``from_config`` checks them before it builds
a pattern); ``trainer/config/ranges.py`` holds the training config's. A test walks both and fails
on a numeric key without a range (tests/test_schema_ranges.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Bounds:
    """lo <= v (lo < v when lo_open), v <= hi (v < hi when hi_open); ``note`` says why, in the message.
    Lists and tuples are checked element by element."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""
    one_of: tuple | None = None  # a few integers: said as "one of ...", the message of a choice

    def contains(self, v) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        return ((self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)) and
                (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)))

    def text(self) -> str:
        if self.hi is None:
            what = f"{'>' if self.lo_open else '>='} {self.lo:g}" if self.lo is not None else "a number"
        elif self.lo is None:
            what = f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        else:
            what = f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        return what + (f" ({self.note})" if self.note else "")

    def check(self, key: str, value, error=ValueError) -> None:
        """``error`` (one line naming ``key``) unless ``value`` (None passes: the type allowed it) is inside."""
        items = value if isinstance(value, (list, tuple)) else [value]
        for v in items:
            if v is not None and not isinstance(v, bool) and isinstance(v, (int, float)) and not self.contains(v):
                if self.one_of is not None:
                    raise error(f"{key}: must be one of {', '.join(map(str, self.one_of))}; got {value!r}")
                each = "each value " if isinstance(value, (list, tuple)) else ""
                shown = list(value) if isinstance(value, tuple) else value  # as the YAML writes it
                raise error(f"{key}: {each}must be {self.text()}, got {shown!r}")


def _num(x) -> str:
    return "2**63" if x == 2**63 else f"{x:g}"


SIZE = Bounds(1)
COUNT = Bounds(0)
SEED = Bounds(0, 2**63, hi_open=True, note="numpy and torch seeds are non-negative")

ATTENTION = {
    "window_left": COUNT, "window_right": COUNT, "num_global": COUNT, "dilation": SIZE, "stride": SIZE,
    "random_blocks": COUNT, "block_size": SIZE, "seed": SEED, "top_k": SIZE,
}
