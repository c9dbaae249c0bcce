"""The kernels' process-wide memo caches: small, named and clearable.

Plans (``kernels.blocked_docs``) and FlexAttention block masks (``kernels.flex``) depend only on the
pattern, the positions, the document ids, the shapes and the device, and building one is Python-level
work repeated by every layer of a step; so each backend keeps the last few. They are memoisation
only: clearing one changes no result, just the time of the next call. ``kernels.blocked.clear_caches``
and ``kernels.flex.clear_caches`` empty them (a test that patches a planning constant must).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class LRUCache:
    """The ``maxsize`` most recently used (key -> value) entries, shared by the whole process."""

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._entries: OrderedDict = OrderedDict()

    def get_or_build(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The value stored under key, or ``build()`` stored there (evicting the least recently used).
        Nothing is stored when ``build`` raises."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        value = self._entries[key] = build()
        if len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
