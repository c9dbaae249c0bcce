"""Synthetic long-range tasks as training data: ``data.task = text | passkey | recall | mix``.

Every sequence is a pure function of (seed, stream, step, row): a sampler's state is one integer,
so a resumed run continues with exactly the same batches, and every sequence-parallel rank builds
the same full sequence and keeps its own slice (SP=2 trains on what SP=1 trains on). Data-parallel
rank r takes rows [r·B, (r+1)·B) of the global batch. Tokens are bytes (``data.tokenizer=bytes``).

Layouts (``full`` has seq_len + 1 tokens; inputs = full[:-1], targets = full[1:]; the targets are
IGNORE_INDEX except at the answers, so the loss is taken on the answer tokens only):

- ``passkey``: random lowercase filler; the needle ``# k1 … kK`` (K = ``key_len`` distinct digits)
  starts at a position drawn from the ``depth`` range (fractions of the positions where it fits), or
  lies wholly inside the first ``first_positions`` positions when that is > 0 (set it to
  attention.num_global to put the key in the global tokens); the sequence ends with the question
  ``# k1 … kK``, whose K key digits are the answers. ``#`` and digits occur nowhere else, so the
  task is copying the token that followed the earlier ``#`` (an induction head), from far away.
- ``recall``: filler, ``pairs`` key/value pairs ``K1 V1 … Kn Vn`` (keys distinct uppercase letters,
  values digits), then ``distance`` filler tokens (a [lo, hi] range; null: the pairs start at
  position 0), then ``queries`` distinct keys each followed by its value; the values are the answers.
- ``mix``: each row of the global batch is, with probability ``text_fraction`` (drawn from
  (seed, step, row)), a window of the text corpus with every next-token target scored, else a
  ``mix_task`` sequence (answers only). The loss is the mean over all scored targets, so text rows
  weigh seq_len targets each and task rows ``key_len`` (or ``queries``).

Positions below ``reserved`` (model.n_learned_global: learned slots replace their tokens) hold filler.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from trainer.data.corpus import ByteTokenizer
from trainer.data.sampling import LongDocSampler, shard_bounds
from trainer.data.stream import IGNORE_INDEX, DataConfigError

TASKS = ("text", "passkey", "recall", "mix")
MIX_TASKS = ("passkey", "recall")
MARK = ord("#")
DIGITS = np.arange(ord("0"), ord("9") + 1)
UPPER = np.arange(ord("A"), ord("Z") + 1)
FILLER = np.arange(ord("a"), ord("z") + 1)
TRAIN_STREAM, EVAL_STREAM = 0x7A5C, 0xE7A1  # distinct generator streams: eval never repeats training
DEPTH_BINS = 5  # eval accuracy is also reported per fifth of the depth range


@dataclass
class PasskeyParams:
    key_len: int = 4
    depth: tuple[float, float] = (0.0, 1.0)
    first_positions: int = 0


@dataclass
class RecallParams:
    pairs: int = 8
    queries: int = 4
    distance: list[int] | None = None


@dataclass
class MixParams:
    task: str = "passkey"
    text_fraction: float = 0.5


@dataclass
class TaskParams:
    """The task part of the ``data`` section (trainer/config/schema.py nests these under ``data``)."""

    task: str = "text"
    passkey: PasskeyParams = field(default_factory=PasskeyParams)
    recall: RecallParams = field(default_factory=RecallParams)
    mix: MixParams = field(default_factory=MixParams)


def check(params: TaskParams, seq_len: int, reserved: int = 0, tokenizer: str = "bytes") -> None:
    """Raise DataConfigError (one line, naming the setting) if the task cannot be generated."""
    if params.task not in TASKS:
        raise DataConfigError(f"data.task: must be one of {', '.join(TASKS)}; got {params.task!r}")
    if params.task == "text":
        return
    if tokenizer != "bytes":
        raise DataConfigError(f"data.tokenizer: task {params.task!r} is written in byte tokens; it needs "
                              f"data.tokenizer=bytes, got {tokenizer!r}")
    inner = params.task
    if inner == "mix":
        if params.mix.task not in MIX_TASKS:
            raise DataConfigError(f"data.mix.task: must be one of {', '.join(MIX_TASKS)}; got {params.mix.task!r}")
        if not 0.0 <= params.mix.text_fraction <= 1.0:
            raise DataConfigError(f"data.mix.text_fraction: must be in [0, 1], got {params.mix.text_fraction}")
        inner = params.mix.task
    (_check_passkey if inner == "passkey" else _check_recall)(params, seq_len, reserved)


def _check_passkey(params: TaskParams, seq_len: int, reserved: int) -> None:
    p = params.passkey
    if not 1 <= p.key_len <= len(DIGITS):
        raise DataConfigError(f"data.passkey.key_len: must be in [1, {len(DIGITS)}] (distinct digits), got {p.key_len}")
    lo, hi = p.depth
    if not 0.0 <= lo <= hi <= 1.0:
        raise DataConfigError(f"data.passkey.depth: must be [lo, hi] with 0 <= lo <= hi <= 1, got {list(p.depth)}")
    need = reserved + 2 * (p.key_len + 1)
    if seq_len + 1 < need:
        raise DataConfigError(f"seq_len: passkey with key_len={p.key_len} needs seq_len >= {need - 1}, got {seq_len}")
    if p.first_positions and not reserved + p.key_len + 1 <= p.first_positions <= seq_len - p.key_len - 1:
        raise DataConfigError(f"data.passkey.first_positions: must be 0 or in [{reserved + p.key_len + 1}, "
                              f"{seq_len - p.key_len - 1}] (the needle of {p.key_len + 1} tokens after "
                              f"{reserved} learned slots, before the question), got {p.first_positions}")


def _check_recall(params: TaskParams, seq_len: int, reserved: int) -> None:
    r = params.recall
    if not 1 <= r.pairs <= len(UPPER):
        raise DataConfigError(f"data.recall.pairs: must be in [1, {len(UPPER)}] (distinct letters), got {r.pairs}")
    if not 1 <= r.queries <= r.pairs:
        raise DataConfigError(f"data.recall.queries: must be in [1, data.recall.pairs={r.pairs}], got {r.queries}")
    room = seq_len + 1 - reserved - 2 * r.pairs - 2 * r.queries
    if room < 0:
        raise DataConfigError(f"seq_len: recall with {r.pairs} pairs and {r.queries} queries needs seq_len >= "
                              f"{seq_len - room}, got {seq_len}")
    if r.distance is not None and not (len(r.distance) == 2 and 0 <= r.distance[0] <= r.distance[1] <= room):
        raise DataConfigError(f"data.recall.distance: must be null or [lo, hi] with 0 <= lo <= hi <= {room} "
                              f"(what seq_len leaves), got {r.distance}")


# --- generators: one full sequence from a generator -----------------------------------------------

def passkey_sequence(rng: np.random.Generator, seq_len: int, p: PasskeyParams, reserved: int = 0):
    """(full [seq_len + 1] int64, answer mask [seq_len] over targets, needle start position)."""
    K = p.key_len
    full = rng.choice(FILLER, size=seq_len + 1)
    if p.first_positions:
        start = int(rng.integers(reserved, p.first_positions - K))  # needle [start, start+K] < first_positions
    else:
        last = seq_len + 1 - 2 * (K + 1)  # the last start that leaves room for the question
        lo, hi = (reserved + round(d * (last - reserved)) for d in p.depth)
        start = int(rng.integers(lo, hi + 1))
    key = rng.choice(DIGITS, size=K, replace=False)
    needle = np.concatenate([[MARK], key])
    full[start: start + K + 1] = needle
    full[seq_len - K:] = needle  # the question: '#' then the key digits
    answers = np.zeros(seq_len, dtype=bool)
    answers[seq_len - K:] = True  # targets[t] = full[t + 1]: the K key digits after the question's '#'
    return full, answers, start


def recall_sequence(rng: np.random.Generator, seq_len: int, r: RecallParams, reserved: int = 0):
    """(full [seq_len + 1], answer mask [seq_len], start of the pairs)."""
    n, m = r.pairs, r.queries
    full = rng.choice(FILLER, size=seq_len + 1)
    room = seq_len + 1 - reserved - 2 * n - 2 * m
    gap = room if r.distance is None else int(rng.integers(r.distance[0], r.distance[1] + 1))
    start = seq_len + 1 - 2 * m - gap - 2 * n
    keys, values = rng.choice(UPPER, size=n, replace=False), rng.choice(DIGITS, size=n)
    full[start: start + 2 * n: 2], full[start + 1: start + 2 * n: 2] = keys, values
    asked = rng.choice(n, size=m, replace=False)
    q0 = seq_len + 1 - 2 * m
    full[q0::2], full[q0 + 1::2] = keys[asked], values[asked]
    answers = np.zeros(seq_len, dtype=bool)
    answers[q0::2] = True  # target at a queried key's position: its value
    return full, answers, start


class TaskSampler:
    """Sequences of ``params.task`` with LongDocSampler's interface (``next_shard``, state dicts).

    ``text_tokens`` (the training stream) is needed for ``mix`` only. Row b of step s is generated
    from ``default_rng([seed, stream, s, b])``, b over the global batch (all DP ranks)."""

    def __init__(self, params: TaskParams, seq_len: int, batch_size: int, seed: int = 0, rank_in_dp: int = 0,
                 dp_size: int = 1, reserved: int = 0, text_tokens: np.ndarray | None = None,
                 stream: int = TRAIN_STREAM):
        check(params, seq_len, reserved)
        if params.task == "text":
            raise DataConfigError("data.task: text is LongDocSampler's; TaskSampler makes passkey, recall, mix")
        if params.task == "mix" and text_tokens is None:
            raise DataConfigError("data.task: mix needs the text corpus")
        self.params, self.seq_len, self.batch_size, self.seed = params, seq_len, batch_size, seed
        self.rank, self.dp_size, self.reserved, self.stream = rank_in_dp, dp_size, reserved, stream
        self.text = None
        if params.task == "mix":  # one global batch of windows per step, whether used or not
            self.text = LongDocSampler(text_tokens, seq_len, batch_size * dp_size, seed)
        self.step = 0

    def _row(self, step: int, b: int, text_row: np.ndarray | None):
        rng = np.random.default_rng([self.seed, self.stream, step, b])
        task = self.params.task
        if task == "mix":
            if rng.random() < self.params.mix.text_fraction:
                return text_row, np.ones(self.seq_len, dtype=bool), -1
            task = self.params.mix.task
        if task == "passkey":
            return passkey_sequence(rng, self.seq_len, self.params.passkey, self.reserved)
        return recall_sequence(rng, self.seq_len, self.params.recall, self.reserved)

    def batch(self, step: int, text_rows: np.ndarray | None = None):
        """This DP rank's rows of global step ``step``: (full [B, seq_len+1] int64, answers [B, seq_len]
        bool, needle/pairs start [B], -1 for text rows)."""
        rows = range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        out = [self._row(step, b, None if text_rows is None else text_rows[b]) for b in rows]
        full = np.stack([np.asarray(o[0], dtype=np.int64) for o in out])
        return full, np.stack([o[1] for o in out]), np.array([o[2] for o in out])

    def next_shard(self, sp_rank: int = 0, sp_size: int = 1):
        """The next batch, this SP rank's slice: (inputs [B, L], targets [B, L], positions [L])."""
        text_rows = next(self.text).numpy() if self.text is not None else None
        full, answers, _ = self.batch(self.step, text_rows)
        self.step += 1
        return shard(full, answers, sp_rank, sp_size)

    def state_dict(self) -> dict:
        state = {"task": self.params.task, "step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                 "batch_size": self.batch_size, "dp_size": self.dp_size}
        if self.text is not None:
            state["text"] = self.text.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        for key in ("task", "seed", "seq_len", "batch_size", "dp_size"):
            if state.get(key) != self.state_dict()[key]:
                raise DataConfigError(f"data: the sampler state was saved with {key}={state.get(key)}, this run "
                                      f"has {key}={self.state_dict()[key]}; resume needs the same value")
        self.step = int(state["step"])
        if self.text is not None:
            self.text.load_state_dict(state["text"])


def shard(full: np.ndarray, answers: np.ndarray, sp_rank: int, sp_size: int):
    """Full sequences [B, seq_len+1] -> this SP rank's (inputs [B, L], targets [B, L], positions [L]),
    targets IGNORE_INDEX where ``answers`` [B, seq_len] is False."""
    seq_len = full.shape[1] - 1
    lo, L = shard_bounds(seq_len, sp_rank, sp_size)
    t = torch.from_numpy(full)
    targets = torch.where(torch.from_numpy(answers[:, lo: lo + L]), t[:, lo + 1: lo + L + 1], IGNORE_INDEX)
    return t[:, lo: lo + L], targets, torch.arange(lo, lo + L)


def depth_bin(start: np.ndarray, seq_len: int) -> np.ndarray:
    """Which fifth of the sequence each needle start lies in (0..DEPTH_BINS-1)."""
    return np.minimum(start * DEPTH_BINS // seq_len, DEPTH_BINS - 1)


def task_params(data) -> TaskParams:
    """The TaskParams of a config's ``data`` section (trainer/config/schema.py DataSection)."""
    return TaskParams(task=data.task, passkey=data.passkey, recall=data.recall, mix=data.mix)


# --- the natural-language passkey probe (eval_tasks=[passkey] on text models; trainer/evaluate.py) ---

@dataclass
class TaskBatch:
    inputs: torch.Tensor  # [B, seq_len]
    targets: torch.Tensor  # [B, seq_len], IGNORE_INDEX except the answer tokens
    info: dict = field(default_factory=dict)


PROBE_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PROBE_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PROBE_QUESTION = "What is the pass key? The pass key is "


def passkey_batch(seq_len: int, depth: float, rng: np.random.Generator | int, batch_size: int = 1) -> TaskBatch:
    """Passkey retrieval (Mohtashami & Jaggi 2023), byte tokens: a random 5-digit key in a needle
    sentence starting at relative ``depth`` of the filler, the question at the end, the key as the
    last 5 targets. ``info``: keys, needle_pos (start of the needle), key_pos (first key digit)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth: must be in [0, 1], got {depth}")
    rng = np.random.default_rng(rng)
    n_fill = seq_len + 1 - len(PROBE_NEEDLE.format(key="00000")) - len(PROBE_QUESTION) - 5
    if n_fill < 0:
        raise DataConfigError(f"seq_len: passkey needs at least {seq_len - n_fill}, got {seq_len}")
    hay = (PROBE_FILLER * (n_fill // len(PROBE_FILLER) + 1))[:n_fill]
    hay = hay[: hay.rfind(". ") + 2 if ". " in hay else 0].ljust(n_fill)  # whole sentences, space-padded
    # The needle goes at the sentence boundary nearest to the requested depth.
    starts = [0, n_fill] + [i + 2 for i in range(len(hay) - 1) if hay[i: i + 2] == ". "]
    pos = min(starts, key=lambda i: abs(i - depth * n_fill))
    keys = [f"{int(k):05d}" for k in rng.integers(10000, 100000, size=batch_size)]
    ids = np.stack([ByteTokenizer().encode(hay[:pos] + PROBE_NEEDLE.format(key=k) + hay[pos:] + PROBE_QUESTION + k)
                    for k in keys]).astype(np.int64)  # (B, seq_len + 1)
    targets = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
    targets[:, -5:] = torch.from_numpy(ids[:, -5:])
    info = {"keys": keys, "needle_pos": pos, "key_pos": pos + PROBE_NEEDLE.index("{key}")}
    return TaskBatch(torch.from_numpy(ids[:, :-1]), targets, info)
