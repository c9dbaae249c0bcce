"""Coverage (trainer/coverage.py): the attention mass a candidate pattern keeps, checked against a
hand-built attention distribution, and the per-layer measurement on a small model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kernels.contract import AttnCall
from model.pattern import BigBird, Dense, Window, from_config
from model.transformer import Transformer, model_preset
from trainer.tools.coverage import CoverageError, check_subset, measure, pattern_coverage

T = 40


def _hand_built(scores: np.ndarray):
    """q, k with q·kᵀ·scale = scores exactly: k = identity rows (D = T), q = scores / scale."""
    D = scores.shape[-1]
    k = torch.eye(D, dtype=torch.float64)[None, None]  # (1, 1, T, T)
    q = torch.from_numpy(scores)[None, None] * math.sqrt(D)  # (1, 1, T, T); the kernel scales by 1/sqrt(D)
    v = torch.zeros_like(k)
    return q, k, v


def _expected(scores: np.ndarray, keys_of) -> np.ndarray:
    """Σ_{j in keys_of(i)} softmax over the causal row i, written out by hand (no pattern code)."""
    out = []
    for i in range(len(scores)):
        p = np.exp(scores[i, : i + 1] - scores[i, : i + 1].max())
        p /= p.sum()
        out.append(sum(p[j] for j in keys_of(i)))
    return np.array(out)


@pytest.mark.parametrize("backend", ["reference", "blocked"])
def test_coverage_of_sink_on_a_hand_built_distribution(backend):
    scores = np.random.default_rng(0).normal(0, 2.0, size=(T, T))
    q, k, v = _hand_built(scores)
    pos = torch.arange(T)
    sink = Window(causal=True, window_left=3, num_global=2)
    got = pattern_coverage(q, k, v, Dense(causal=True), sink, AttnCall(pos, pos, T), backend)[0, 0].numpy()
    want = _expected(scores, lambda i: sorted({0, 1, *range(max(0, i - 3), i + 1)} & set(range(i + 1))))
    # fp64 inputs: the kernels keep fp64, so only summation order separates the two (~1e-15).
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    assert got[-1] < 0.9  # a random distribution over 40 keys is not all inside 6 of them


def test_uniform_attention_keeps_the_fraction_of_keys():
    scores = np.zeros((T, T))  # every allowed key equally likely
    q, k, v = _hand_built(scores)
    window = Window(causal=True, window_left=5)
    got = pattern_coverage(q, k, v, Dense(causal=True), window, AttnCall(seq_len=T))[0, 0].numpy()
    want = np.minimum(np.arange(T) + 1, 6) / (np.arange(T) + 1)  # |window keys| / |causal keys|
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)  # fp64 end to end


def test_coverage_against_a_sparse_trained_pattern():
    """Against a trained sink pattern, a narrower window keeps exactly its share of the sink's mass."""
    scores = np.random.default_rng(1).normal(0, 1.0, size=(T, T))
    q, k, v = _hand_built(scores)
    own = Window(causal=True, window_left=8, num_global=2)
    cand = Window(causal=True, window_left=2, num_global=2)
    got = pattern_coverage(q, k, v, own, cand, AttnCall(seq_len=T))[0, 0].numpy()
    own_keys = lambda i: {0, 1, *range(max(0, i - 8), i + 1)} & set(range(i + 1))  # noqa: E731
    cand_keys = lambda i: {0, 1, *range(max(0, i - 2), i + 1)} & set(range(i + 1))  # noqa: E731
    want = _expected(scores, cand_keys) / _expected(scores, own_keys)  # renormalised over the sink's keys
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)  # fp64 end to end


def test_a_candidate_outside_the_trained_pattern_is_refused():
    with pytest.raises(CoverageError, match="^candidates: wide allows keys"):
        check_subset(Window(causal=True, window_left=9), Window(causal=True, window_left=4), 64, "wide")
    check_subset(BigBird(causal=True, window_left=4, num_global=2, random_blocks=1, block_size=8),
                 Dense(causal=True), 64, "bigbird")  # inside causal dense: no error


def test_measure_per_layer_on_a_model():
    torch.manual_seed(0)
    seq = 64
    model = Transformer(model_preset("tiny", n_layers=2), Dense(causal=True)).eval()
    x = torch.randint(0, 256, (2, seq))
    batches = [(x, torch.roll(x, -1, 1), torch.arange(seq))]
    cands = {"dense": Dense(causal=True), "window": from_config({"name": "window", "window_left": 4})}
    res = measure(model, batches, cands, backend="reference")
    assert len(res["coverage"]["window"]) == 2
    for layer in res["coverage"]["dense"]:  # the trained pattern itself keeps all of its mass
        assert layer["mean"] == pytest.approx(1.0, abs=1e-6)  # fp32 lse difference of equal sums
    for layer in res["coverage"]["window"]:
        assert 0.0 < layer["min_head"] <= layer["mean"] < 1.0
    # substituting the trained pattern changes nothing; fp32 forward, same kernel: equal to 1e-5
    assert res["eval_loss"]["dense"] == pytest.approx(res["eval_loss_trained"], abs=1e-5)
    assert res["eval_loss"]["window"] != pytest.approx(res["eval_loss_trained"], abs=1e-6)
    assert model.patterns == [Dense(causal=True)] * 2  # restored after the substitution
