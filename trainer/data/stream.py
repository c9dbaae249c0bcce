"""The token stream's conventions, shared by the corpus, its formats and the samplers: the document
separator, the ignored target, the error type of bad data, and a stream with scored flags."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DOC_SEP = 0  # ends every document in the stream
IGNORE_INDEX = -100  # targets with this value carry no loss (F.cross_entropy's ignore_index)


class DataConfigError(ValueError):
    """A bad data setting or data file; the message names the setting (or the file and line) and what is allowed."""


@dataclass(frozen=True)
class ScoredStream:
    """A token stream whose next-token targets are scored only where ``scored`` is 1: target t is
    token t + 1, scored when ``scored[t + 1]`` (prompt/completion data: the completion tokens and the
    separator after them). Slices like the stream it wraps; ``len`` is its length."""

    tokens: np.ndarray  # [N] memmap
    scored: np.ndarray  # [N] uint8 memmap

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, s: slice) -> ScoredStream:
        return ScoredStream(self.tokens[s], self.scored[s])
