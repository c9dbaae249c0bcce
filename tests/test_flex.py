"""FlexAttention backend vs the dense reference.

On CPU FlexAttention runs eagerly, forward only, and its eager path evaluates ``mask_mod`` on every
(q, k) pair — it never looks at the BlockMask's block lists. So the block lists (what the fused CUDA
kernel iterates over) are checked separately against the dense mask, and forward + backward through
the fused kernel is checked by the ``cuda`` tests.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from kernels import sparse_attention
from kernels.flex import BLOCK, block_flags, build_block_mask, flex_attention_backend, flex_available
from kernels.reference import EmptyRowError, reference_attention
from model.pattern import BigBird, TopKBlocks, Window

pytestmark = [
    pytest.mark.skipif(not flex_available(), reason="torch.nn.attention.flex_attention not importable"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # "flex_attention called without torch.compile()"
]

PATTERNS = {
    "window": Window(causal=True, window_left=40),
    "sink": Window(causal=True, window_left=70, num_global=4),
    "longformer": Window(causal=False, window_left=30, window_right=25, num_global=3),
    "dilated": Window(causal=True, window_left=90, dilation=3, num_global=2),
    "bigbird": BigBird(causal=False, window_left=20, window_right=20, num_global=2, random_blocks=2, block_size=32),
}
N = 300  # not a multiple of the 128 block: the last query and key blocks are ragged


def qkv(n_q, n_k, B=2, H=4, Hkv=2, D=16, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, n_q), (Hkv, n_k), (Hkv, n_k)))
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def shard_positions(pattern, q_start, q_end, seq_len):
    """A sequence shard: queries [q_start, q_end); keys the globals ∪ [q_start - left, q_end + right)."""
    g, a = pattern.num_global, max(q_start - pattern.window_left, 0)
    b = q_end if pattern.causal else min(q_end + pattern.window_right, seq_len)
    return torch.arange(q_start, q_end), torch.cat([torch.arange(0, min(g, a)), torch.arange(a, b)])


def assert_close_ref(q, k, v, pattern, q_pos=None, k_pos=None, seq_len=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, lse, _ = flex_attention_backend(q, k, v, pattern, q_pos, k_pos, seq_len=seq_len)
    ref_out, ref_lse, _ = reference_attention(q, k, v, pattern, q_pos, k_pos, seq_len=seq_len)
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    # fp32 throughout; only the summation order differs from the reference (~1e-6 observed).
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    # Natural-log units: a log2 lse would be off by a factor 1/ln 2 ≈ 1.44 and fail at once.
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", PATTERNS)
def test_forward_matches_reference(name):
    assert_close_ref(*qkv(N, N), PATTERNS[name])


@pytest.mark.parametrize("name", ["sink", "longformer"])
def test_shard_positions(name):
    p, n = PATTERNS[name], 700
    q_pos, k_pos = shard_positions(p, 350, 555, n)
    assert_close_ref(*qkv(len(q_pos), len(k_pos)), p, q_pos, k_pos, seq_len=n)


@pytest.mark.parametrize("name", ["sink", "longformer", "dilated", "bigbird"])
def test_block_lists_match_dense_mask(name):
    """Every block holding an allowed pair is listed; full blocks are exactly the complete all-True ones."""
    p, n = PATTERNS[name], 700
    for q_pos, k_pos in [(torch.arange(n), torch.arange(n)), shard_positions(p, 300, 555, n)]:
        partial, full, tiles = block_flags(p, q_pos, k_pos, n)
        dense = torch.zeros(math.ceil(len(q_pos) / BLOCK) * BLOCK, math.ceil(len(k_pos) / BLOCK) * BLOCK,
                            dtype=torch.bool)
        dense[: len(q_pos), : len(k_pos)] = p.mask(q_pos, k_pos, n)
        blocks = dense.view(partial.shape[0], BLOCK, partial.shape[1], BLOCK).transpose(1, 2).flatten(2)
        assert torch.equal(full, blocks.all(-1))
        assert torch.equal(partial, blocks.any(-1) & ~blocks.all(-1))
        assert torch.equal(tiles, blocks[partial].view(-1, BLOCK, BLOCK))
        bm = build_block_mask(p, q_pos, k_pos, n, "cpu")
        assert torch.equal(bm.to_dense()[0, 0].bool(), partial | full)


def test_dispatch_through_sparse_attention():
    q, k, v = qkv(N, N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, lse, _ = sparse_attention(q, k, v, PATTERNS["sink"], backend="flex")
    ref_out, ref_lse, _ = reference_attention(q, k, v, PATTERNS["sink"])
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)  # fp32, as above


def test_cpu_backward_is_refused():
    q, k, v = qkv(N, N)
    with pytest.raises(RuntimeError, match="no CPU backward; use backend=blocked"):
        flex_attention_backend(q.requires_grad_(), k, v, PATTERNS["sink"])


def test_content_based_and_stats_are_refused():
    q, k, v = qkv(N, N)
    with pytest.raises(ValueError, match="positional patterns only"):
        flex_attention_backend(q, k, v, TopKBlocks(causal=True, top_k=2, block_size=64))
    with pytest.raises(ValueError, match="backend=blocked"):
        flex_attention_backend(q, k, v, PATTERNS["sink"], return_stats=True)


def test_query_without_keys_raises_like_the_reference():
    q_pos, k_pos = torch.arange(200, 210), torch.arange(0, 50)  # window 40 reaches back to 160 only
    with pytest.raises(EmptyRowError, match="position 200"):
        flex_attention_backend(*qkv(10, 50), PATTERNS["window"], q_pos, k_pos, seq_len=300)


# --- the fused kernel: forward and backward -------------------------------------------------------

def _fwd_bwd(fn, q, k, v, pattern, q_pos, k_pos, n):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, pattern, q_pos, k_pos, seq_len=n)
    g = torch.Generator(device=q.device).manual_seed(1)
    (out.float() * torch.randn(out.shape, generator=g, device=q.device)).sum().backward()
    return out.float(), lse, q.grad.float(), k.grad.float(), v.grad.float()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["sink", "longformer", "bigbird"])
def test_cuda_forward_backward(name, dtype):
    p, n = PATTERNS[name], 1000
    q_pos, k_pos = shard_positions(p, 450, 777, n)
    q, k, v = qkv(len(q_pos), len(k_pos), D=64, device="cuda", dtype=dtype)
    got = _fwd_bwd(flex_attention_backend, q, k, v, p, q_pos, k_pos, n)
    want = _fwd_bwd(reference_attention, q, k, v, p, q_pos, k_pos, n)  # fp32 math on the same inputs
    if dtype == torch.float32:
        tol = dict(atol=2e-4, rtol=2e-4)  # fp32 (no TF32 in flex by default); summation order only
    else:
        # bf16 keeps 8 mantissa bits (relative step 2^-8 ≈ 4e-3); the kernel rounds P to bf16 before
        # P·V, while the reference computes in fp32 and rounds only its outputs: a few steps of 4e-3.
        tol = dict(atol=3e-2, rtol=3e-2)
    for a, b, what in zip(got, want, ("out", "lse", "dq", "dk", "dv")):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, what=what: f"{what}: {m}")

