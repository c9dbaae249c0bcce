"""The dense reference attention against torch's SDPA with the same boolean mask: out, lse, all
gradients, and the statistics partials; plus exactness on shard-shaped positions and empty rows.

Inputs are float64 and the reference then computes in float64 too (fp32 for fp16/bf16/fp32 inputs),
so the float64 SDPA/logsumexp oracle is matched to fp64 rounding (``TOL``); one test feeds fp32
inputs and holds them to fp32 rounding (``TOL32``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.reference import EmptyRowError, pattern_mask, reference_attention
from model.pattern import Pattern, from_config

# fp64 rounding of O(1) scores and probabilities summed over <= 131 keys stays ~1e-14; the margin
# covers einsum-vs-matmul summation order. A wrong mask, scale or GQA head mapping moves results by
# O(0.01-1).
TOL = {"atol": 1e-9, "rtol": 1e-7}
# fp32 inputs: unit roundoff 6e-8 times O(1) magnitudes and <= 131-term sums gives ~1e-6.
TOL32 = {"atol": 2e-5, "rtol": 1e-4}

CASES = {  # sequence lengths deliberately not multiples of 64 (or of the pattern's own block)
    "sink": ({"name": "sink", "causal": True, "window_left": 5, "num_global": 2}, 77),
    "longformer": ({"name": "longformer", "causal": False, "window_left": 7, "window_right": 4, "num_global": 3}, 100),
    "dilated": ({"name": "dilated", "causal": True, "window_left": 12, "dilation": 3, "num_global": 1}, 131),
    "strided": ({"name": "strided", "causal": False, "stride": 7, "variant": "strided", "num_global": 1}, 65),
    "fixed": ({"name": "strided", "causal": True, "stride": 9, "variant": "fixed", "summary": 2}, 70),
    "bigbird": ({"name": "bigbird", "causal": False, "window_left": 3, "window_right": 3, "num_global": 2,
                 "random_blocks": 2, "block_size": 16, "seed": 3}, 90),
    "union": ({"name": "union", "causal": True, "parts": [{"name": "sink", "window_left": 4, "num_global": 1},
                                                          {"name": "strided", "stride": 10, "variant": "fixed"}]}, 83),
    "dense": ({"name": "dense", "causal": True}, 50),
    "topk": ({"name": "topk", "causal": True, "top_k": 2, "block_size": 16, "num_global": 4}, 100),
    "topk_query": ({"name": "topk", "causal": True, "top_k": 2, "block_size": 16, "num_global": 4, "select": "query"},
                   100),
}
CONTENT = {"topk", "topk_query"}


def positions(p: Pattern, n: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_pos, k_pos): the full sequence, a middle shard with the keys it receives
    ([globals | halo | local], from kv_ranges), or all keys in a random order."""
    if kind == "full":
        return torch.arange(n), torch.arange(n)
    if kind == "shard":
        a, b = n // 3, 2 * n // 3
        return torch.arange(a, b), torch.cat([torch.arange(s, e) for s, e in p.kv_ranges(a, b, n)])
    return torch.arange(n), torch.randperm(n)


def oracle(q, k, v, mask, scale):
    """(out, lse, scaled masked scores) by SDPA + logsumexp in the inputs' dtype; GQA expanded."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, K, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))  # (B, H, Q, K)
    return out, torch.logsumexp(s, dim=-1), s


def inputs(n_q: int, n_k: int, h: int = 4, hkv: int = 2, d: int = 16):
    q = torch.randn(2, h, n_q, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, hkv, n_k, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, hkv, n_k, d, dtype=torch.float64, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("kind", ["full", "shard", "permuted"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_matches_sdpa_forward_and_backward(name, kind):
    cfg, n = CASES[name]
    p = from_config(cfg, seq_len=n)
    q_pos, k_pos = positions(p, n, kind)
    q, k, v = inputs(len(q_pos), len(k_pos))
    explicit = name in ("sink", "bigbird")  # some cases pass a scale, the others use the default
    scale = 0.3 if explicit else 1 / math.sqrt(q.shape[-1])
    out, lse, _ = reference_attention(q, k, v, p, q_pos, k_pos, scale=scale if explicit else None, seq_len=n)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float64

    mask = pattern_mask(p, q, k, q_pos, k_pos, n)
    if name in CONTENT:  # the content choice must prune below the positional (causal) bound
        assert mask.shape == (2, 4, len(q_pos), len(k_pos)) and mask.sum() < 8 * p.mask(q_pos, k_pos).sum()
    else:
        assert mask.shape == (len(q_pos), len(k_pos)) and not mask.all(), "the case must be sparse"
    want_out, want_lse, _ = oracle(q, k, v, mask, scale)
    torch.testing.assert_close(out, want_out, **TOL)
    torch.testing.assert_close(lse, want_lse, **TOL)

    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)  # lse has a gradient too (merges use it)
    got = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), (q, k, v))
    want = torch.autograd.grad((want_out * g_out).sum() + (want_lse * g_lse).sum(), (q, k, v))
    for x, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, x=x: f"grad {x}: {m}")


@pytest.mark.parametrize("name", sorted(set(CASES) - CONTENT))  # top-k block means depend on the keys given
def test_shard_with_its_kv_ranges_equals_full_rows(name):
    cfg, n = CASES[name]
    p = from_config(cfg, seq_len=n)
    q, k, v = inputs(n, n)
    full_out, full_lse, _ = reference_attention(q, k, v, p, seq_len=n)
    q_pos, k_pos = positions(p, n, "shard")
    out, lse, _ = reference_attention(q[:, :, q_pos], k[:, :, k_pos], v[:, :, k_pos], p, q_pos, k_pos, seq_len=n)
    # Same fp64 arithmetic on the same allowed keys (masked ones add exact zeros); only the
    # summation order over keys differs, which moves the last few bits.
    torch.testing.assert_close(out, full_out[:, :, q_pos], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, full_lse[:, :, q_pos], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("hkv", [1, 4])
def test_reference_mqa_and_mha(hkv):
    cfg, n = CASES["longformer"]
    p = from_config(cfg, seq_len=n)
    q, k, v = inputs(n, n, hkv=hkv)
    out, lse, _ = reference_attention(q, k, v, p, seq_len=n)
    want_out, want_lse, _ = oracle(q, k, v, p.mask(torch.arange(n), torch.arange(n), n), 1 / math.sqrt(16))
    torch.testing.assert_close(out, want_out, **TOL)
    torch.testing.assert_close(lse, want_lse, **TOL)


@pytest.mark.parametrize("name", ["sink", "topk", "topk_query"])
def test_reference_fp32_inputs(name):
    cfg, n = CASES[name]
    p = from_config(cfg, seq_len=n)
    q, k, v = (x.detach().float().requires_grad_() for x in inputs(n, n))
    out, lse, _ = reference_attention(q, k, v, p, seq_len=n)
    assert out.dtype == lse.dtype == torch.float32
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))  # same values, fp64 oracle
    mask = pattern_mask(p, q64, k64, torch.arange(n), torch.arange(n), n)
    want_out, want_lse, _ = oracle(q64, k64, v64, mask, 1 / math.sqrt(16))
    torch.testing.assert_close(out.double(), want_out, **TOL32)
    torch.testing.assert_close(lse.double(), want_lse, **TOL32)
    g = torch.randn_like(want_out)
    got = torch.autograd.grad((out.double() * g).sum(), (q, k, v))
    want = torch.autograd.grad((want_out * g).sum(), (q64, k64, v64))
    for x, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a.double(), b, **TOL32, msg=lambda m, x=x: f"grad {x}: {m}")


@pytest.mark.parametrize("kind", ["full", "shard"])
@pytest.mark.parametrize("name", ["sink", "longformer", "union", "topk", "topk_query"])
def test_reference_stats(name, kind):
    cfg, n = CASES[name]
    p = from_config(cfg, seq_len=n)
    q_pos, k_pos = positions(p, n, kind)
    q, k, v = inputs(len(q_pos), len(k_pos))
    scale = 1 / math.sqrt(q.shape[-1])
    with torch.no_grad():
        _, lse, st = reference_attention(q, k, v, p, q_pos, k_pos, seq_len=n, return_stats=True)
        _, want_lse, s = oracle(q, k, v, pattern_mask(p, q, k, q_pos, k_pos, n), scale)
    prob = torch.softmax(s, dim=-1)  # (B, H, Q, K), exactly 0 on masked keys
    entropy = -torch.where(prob > 0, prob * prob.log(), torch.zeros_like(prob)).sum(-1)
    torch.testing.assert_close(lse - st.m, entropy, **TOL)
    gmass = (prob * (k_pos < p.num_global).double()).sum(-1)
    assert gmass.max() > 0.01, "the case must put visible mass on global tokens"
    torch.testing.assert_close(st.global_mass, gmass, **TOL)
    torch.testing.assert_close(st.max_logit, s.amax(-1), **TOL)


def test_query_without_keys_raises():
    p = from_config({"name": "window", "causal": True, "window_left": 5})
    q, k, v = inputs(1, 11)
    with pytest.raises(EmptyRowError, match="position 100"):
        reference_attention(q, k, v, p, torch.tensor([100]), torch.arange(11))


def test_heads_must_divide():
    q, k, v = inputs(8, 8, h=3, hkv=2)
    with pytest.raises(ValueError, match="multiple"):
        reference_attention(q, k, v, from_config({"name": "dense"}))
