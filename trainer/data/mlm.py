"""The masked-LM objective (``objective=mlm``): BERT-style corruption of the input, loss on the chosen
positions only. This is how bidirectional patterns (Longformer, BigBird) train honestly: under the
next-token objective a query that sees a later key sees its own target.

Corruption (Devlin et al. 2019, §3.1): each position is chosen with probability ``mlm.mask_prob``;
a chosen position's input becomes the mask token with probability 0.8, a uniformly random token of the
tokenizer's vocabulary with probability 0.1, and stays itself with probability 0.1. Its target is the
original token; every other target is ``IGNORE_INDEX``. Global positions (``< num_global`` of any
layer, which includes the learned global slots) are never chosen: every query sees them, so hiding
their tokens would only teach the model to read the globals.

The mask token is one id past the tokenizer's vocabulary (``mask_id = tokenizer vocab``): 256 for
bytes, ``data.bpe_vocab_size`` for BPE; ``model.vocab_size`` left null follows (tokenizer vocab + 1).

Determinism. Every draw is a hash of (seed, sampler step, window, absolute position) — a counter-based
generator, not a stateful one — so a sequence-parallel rank that holds positions [r·L, (r+1)·L) of a
window corrupts them exactly as one device holding the whole window would, a resumed run continues
with the same masks, and evaluation uses the same masks every time (its sampler restarts at step 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainer.data.sampling import LongDocSampler, shard_bounds
from trainer.data.stream import IGNORE_INDEX

MASK_FRAC, RANDOM_FRAC = 0.8, 0.1  # of the chosen positions; the remaining 0.1 keep their token
ACTION_KEEP, ACTION_MASK, ACTION_RANDOM = 0, 1, 2  # what happened at a chosen position

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_STREAMS = (np.uint64(0x243F6A8885A308D3), np.uint64(0x13198A2E03707344), np.uint64(0xA4093822299F31D0))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele et al. 2014): a bijection of uint64 whose output bits all depend
    on every input bit. uint64 arithmetic wraps modulo 2**64, which is what the hash wants."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _unit(h: np.ndarray) -> np.ndarray:
    """uint64 hashes -> uniform floats in [0, 1) from their top 53 bits."""
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass(frozen=True)
class MlmSpec:
    mask_prob: float
    mask_id: int  # the mask token: one id past the tokenizer's vocabulary
    tokenizer_vocab: int  # random replacements are drawn from [0, tokenizer_vocab)
    num_global: int  # positions below this are never chosen
    seed: int


def draws(spec: MlmSpec, salt: int, windows: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, ...]:
    """(chosen [B, L] bool, action [B, L] int8, random token [B, L] int64) for the windows ``windows``
    [B] (any integer identity, e.g. the stream offset) at absolute ``positions`` [L]. A pure function
    of its arguments: no token enters it."""
    with np.errstate(over="ignore"):
        base = _mix(_mix(np.uint64(spec.seed) + _GOLDEN) ^ np.uint64(salt))
        row = _mix(base ^ np.asarray(windows, dtype=np.uint64))[:, None]  # (B, 1)
        key = _mix(row ^ (np.asarray(positions, dtype=np.uint64)[None, :] * _GOLDEN))  # (B, L)
        u_choose, u_action = (_unit(_mix(key ^ s)) for s in _STREAMS[:2])
        rand_tok = (_mix(key ^ _STREAMS[2]) % np.uint64(spec.tokenizer_vocab)).astype(np.int64)
    chosen = (u_choose < spec.mask_prob) & (np.asarray(positions)[None, :] >= spec.num_global)
    action = np.where(u_action < MASK_FRAC, ACTION_MASK,
                      np.where(u_action < MASK_FRAC + RANDOM_FRAC, ACTION_RANDOM, ACTION_KEEP)).astype(np.int8)
    return chosen, action, rand_tok


def corrupt(tokens: torch.Tensor, positions: torch.Tensor, windows: np.ndarray, salt: int,
            spec: MlmSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, L] at absolute ``positions`` [L] -> (inputs [B, L], targets [B, L]): the corrupted
    input, and the original token at the chosen positions (``IGNORE_INDEX`` elsewhere)."""
    chosen, action, rand_tok = draws(spec, salt, windows, positions.numpy())
    orig = tokens.numpy()
    inputs = np.where(chosen & (action == ACTION_MASK), spec.mask_id,
                      np.where(chosen & (action == ACTION_RANDOM), rand_tok, orig))
    targets = np.where(chosen, orig, IGNORE_INDEX)
    return torch.from_numpy(inputs.astype(np.int64)), torch.from_numpy(targets.astype(np.int64))


class MaskedLMSampler:
    """A ``LongDocSampler`` whose shards are corrupted for the masked-LM objective: the same windows
    (their first seq_len tokens), the same state (it is the wrapped sampler's), inputs corrupted and
    targets at the same position (not the next one)."""

    def __init__(self, sampler: LongDocSampler, spec: MlmSpec):
        self.sampler, self.spec = sampler, spec

    def next_shard(self, sp_rank: int = 0, sp_size: int = 1):
        starts = self.sampler.next_starts()
        # The sampler's (epoch, step) after advancing: what a resumed run or another rank also sees.
        salt = (self.sampler.epoch << 32) | self.sampler.step
        lo, L = shard_bounds(self.sampler.seq_len, sp_rank, sp_size)
        positions = torch.arange(lo, lo + L)
        inputs, targets = corrupt(self.sampler.read(starts, lo, lo + L), positions, starts, salt, self.spec)
        return inputs, targets, positions

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
