"""Sampling and sequence shards: windows of a token stream -> this rank's (inputs, targets, positions).

``LongDocSampler`` cuts the train stream into windows of seq_len + 1 tokens (inputs and next-token
targets), shuffled per epoch from (seed, epoch) alone, so its state is two integers and a resumed run
continues with exactly the same windows. Data-parallel ranks take disjoint windows of each global
batch; a sequence-parallel rank reads only its own slice of each window (``next_shard``). Packed
documents: ``document_positions`` derives document ids and per-document positions from ``DOC_SEP``.
"""

from __future__ import annotations

import numpy as np
import torch

from model.pattern import documents
from parallel.sharding import local_range
from trainer.data.stream import DOC_SEP, IGNORE_INDEX, DataConfigError, ScoredStream


def shard_bounds(seq_len: int, sp_rank: int, sp_size: int) -> tuple[int, int]:
    """(start, length L) of SP rank ``sp_rank``'s positions [r·L, (r+1)·L) in a window of seq_len:
    ``parallel.sharding.local_range``'s rule (the one place it lives), as the data side slices."""
    start, end = local_range(seq_len, sp_rank, sp_size)
    return start, end - start


def document_positions(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(doc ids, positions within the document), each [B, T], of windows ``tokens`` [B, T] (from their
    start), separated by ``DOC_SEP``: ``model.pattern.documents.document_positions``, the one rule."""
    doc_ids, positions, _ = documents.document_positions(tokens, DOC_SEP)
    return doc_ids, positions


def min_windows(n_tokens: int, seq_len: int) -> int:
    """The fewest windows of ``seq_len + 1`` tokens any epoch offset (< seq_len) leaves in ``n_tokens``
    tokens (windows overlap by the one token that is a target of one and an input of the next)."""
    return max((n_tokens - seq_len) // seq_len, 0)


class LongDocSampler:
    """Shuffled windows of ``seq_len + 1`` tokens from one long token stream.

    Epoch e cuts the stream at offset o_e into non-overlapping windows and permutes them, both drawn
    from ``default_rng([seed, e])``. Step s of an epoch is the global batch of windows
    perm[s·B·P : (s+1)·B·P]; DP rank r takes its B windows at r·B. The incomplete last global batch
    of an epoch is skipped. The state is (epoch, step): nothing random is carried.
    """

    def __init__(self, tokens: np.ndarray | ScoredStream, seq_len: int, batch_size: int, seed: int = 0,
                 rank_in_dp: int = 0, dp_size: int = 1, documents: bool = False, reset_positions: bool = False):
        if not 0 <= rank_in_dp < dp_size:
            raise ValueError(f"rank_in_dp: must be in [0, dp_size={dp_size}), got {rank_in_dp}")
        if seq_len < 1 or batch_size < 1:
            raise DataConfigError(f"seq_len and batch_size: must be >= 1, got {seq_len}, {batch_size}")
        worst = min_windows(len(tokens), seq_len)
        if worst < batch_size * dp_size:
            raise DataConfigError(
                f"seq_len: {len(tokens)} tokens give only {worst} windows of {seq_len + 1}, fewer "
                f"than one global batch (batch_size={batch_size} × dp_size={dp_size}); use more data or "
                "a shorter seq_len")
        # A ScoredStream (prompt/completion data) scores only its completions: see _scored_targets.
        self.scored = tokens.scored if isinstance(tokens, ScoredStream) else None
        tokens = tokens.tokens if isinstance(tokens, ScoredStream) else tokens
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.dp_size = seed, rank_in_dp, dp_size
        self.documents, self.reset_positions = documents, reset_positions  # see next_shard
        self.epoch = self.step = 0
        self._plan: tuple[int, int, np.ndarray] | None = None  # (epoch, offset, permutation)

    def _epoch_plan(self) -> tuple[int, np.ndarray]:
        if self._plan is None or self._plan[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            offset = int(rng.integers(self.seq_len))
            n_windows = (len(self.tokens) - offset - 1) // self.seq_len
            self._plan = (self.epoch, offset, rng.permutation(n_windows))
        return self._plan[1], self._plan[2]

    def next_starts(self) -> np.ndarray:
        """Advance one step; this DP rank's window start offsets [B] into the stream."""
        per_step = self.batch_size * self.dp_size
        offset, perm = self._epoch_plan()
        if (self.step + 1) * per_step > len(perm):
            self.epoch, self.step = self.epoch + 1, 0
            offset, perm = self._epoch_plan()
        lo = self.step * per_step + self.rank * self.batch_size
        self.step += 1
        return offset + perm[lo: lo + self.batch_size] * self.seq_len

    def read(self, starts: np.ndarray, lo: int, hi: int) -> torch.Tensor:
        rows = [np.asarray(self.tokens[s + lo: s + hi]) for s in starts]  # memmap: only these pages
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        """The next batch of whole windows, LongTensor [B, seq_len + 1]."""
        return self.read(self.next_starts(), 0, self.seq_len + 1)

    def next_shard(self, sp_rank: int = 0, sp_size: int = 1):
        """This SP rank's part of the next windows, reading only its L + 1 tokens per window.

        With ``reset_positions`` it also returns the shard's rotary positions [B, L] (restarting per
        document), and with ``documents`` then its document ids [B, L] (absolute rotary positions
        unless ``reset_positions``), see ``document_positions``: the rank then reads its windows from
        their start, since both count the separators before its shard (tokens, not communication)."""
        lo, L = shard_bounds(self.seq_len, sp_rank, sp_size)
        starts = self.next_starts()
        if not (self.documents or self.reset_positions):
            chunk = self.read(starts, lo, lo + L + 1)
            return chunk[:, :-1], self._scored_targets(chunk[:, 1:], starts, lo + 1), torch.arange(lo, lo + L)
        window = self.read(starts, 0, lo + L + 1)
        doc_ids, rope = document_positions(window[:, :-1])
        rope = rope if self.reset_positions else torch.arange(lo + L).expand_as(rope)
        extra = (rope[:, lo:],) + ((doc_ids[:, lo:],) if self.documents else ())
        targets = self._scored_targets(window[:, lo + 1:], starts, lo + 1)
        return (window[:, lo:-1], targets, torch.arange(lo, lo + L), *extra)

    def _scored_targets(self, targets: torch.Tensor, starts: np.ndarray, first: int) -> torch.Tensor:
        """``targets`` [B, L] (tokens first.. of each window), IGNORE_INDEX where the stream's scored
        flag of that token is 0; unchanged for a plain stream. A shard may hold no scored target: the
        loss of the model is then 0 with 0 targets, and the G/N rule (trainer/loop.py) adds nothing."""
        if self.scored is None:
            return targets
        flags = np.stack([np.asarray(self.scored[s + first: s + first + targets.shape[1]]) for s in starts])
        return torch.where(torch.from_numpy(flags.astype(bool)), targets, IGNORE_INDEX)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "dp_size": self.dp_size, "n_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "batch_size", "dp_size", "n_tokens"):
            if state[key] != self.state_dict()[key]:
                raise DataConfigError(f"data: the sampler state was saved with {key}={state[key]}, this run has "
                                      f"{key}={self.state_dict()[key]}; resume needs the same value")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
