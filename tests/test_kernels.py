"""The blocked kernel against the dense reference: out, lse, stats and the gradients of q, k, v."""

from __future__ import annotations

import pytest
import torch

from kernels import EmptyRowError, pick_backend, sparse_attention
from kernels.blocked_plan import BLOCK
from kernels.stats import head_summary, head_sums, merge_stats, merge_two
from model.pattern import BigBird, Dense, PatternUnion, Strided, TopKBlocks, Window

PATTERNS = {
    "window": Window(window_left=37),
    "longformer": Window(causal=False, window_left=30, window_right=45, num_global=5),
    "sink": Window(window_left=70, num_global=4),
    "dilated": Window(window_left=90, dilation=3, num_global=2),
    "dilated_bidir": Window(causal=False, window_left=40, window_right=40, dilation=2, num_global=3),
    "strided": Strided(stride=24),
    "fixed": Strided(stride=32, variant="fixed", summary=3),
    "bigbird": BigBird(window_left=40, num_global=3, random_blocks=2, block_size=32, seed=3),
    "bigbird_bidir": BigBird(causal=False, window_left=20, window_right=20, num_global=3, random_blocks=2, block_size=32),
    "union": PatternUnion(parts=(Window(window_left=16), Strided(stride=50, variant="fixed")), num_global=2),
    "dense": Dense(),
    "dense_bidir": Dense(causal=False),
    "topk": TopKBlocks(top_k=2, block_size=BLOCK, num_global=4),
    "topk_bidir": TopKBlocks(causal=False, top_k=2, block_size=BLOCK, num_global=4),
    "topk_small_blocks": TopKBlocks(top_k=3, block_size=32, num_global=4),
    # select=query: each query its own blocks; a tile holds their union and masks per row (blocks small
    # enough that the queries of one block choose differently: test_blocked_topk_query_tiles_are_unions)
    "topk_query": TopKBlocks(top_k=2, block_size=32, num_global=4, select="query"),
    "topk_query_bidir": TopKBlocks(causal=False, top_k=2, block_size=32, num_global=4, select="query"),
    "topk_query_small_blocks": TopKBlocks(top_k=3, block_size=16, num_global=4, select="query"),
}


def _inputs(B, H, Hkv, Q, K, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return make(B, H, Q, D), make(B, Hkv, K, D), make(B, Hkv, K, D)


def _run(backend, q, k, v, pattern, q_pos, k_pos, seq_len=None):
    out, lse, st = sparse_attention(q, k, v, pattern, q_pos, k_pos, backend=backend, return_stats=True, seq_len=seq_len)
    # A loss that uses out and lse non-trivially, so that the lse gradient path is exercised too.
    loss = (out * torch.cos(out)).sum() + torch.sin(lse).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    return (out, lse, st.m, st.max_logit, st.global_mass, *grads)


NAMES = ("out", "lse", "stat_m", "max_logit", "global_mass", "dq", "dk", "dv")


def _assert_match(q, k, v, pattern, q_pos=None, k_pos=None, seq_len=None, atol=1e-10):
    ref = _run("reference", q, k, v, pattern, q_pos, k_pos, seq_len)
    got = _run("blocked", q, k, v, pattern, q_pos, k_pos, seq_len)
    for name, a, b in zip(NAMES, ref, got):
        torch.testing.assert_close(b, a, atol=atol, rtol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("seq_len", [200, 333])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)], ids=["gqa", "mha"])
def test_blocked_matches_reference(name, seq_len, heads):
    # fp64 in, fp64 accumulated on both sides: they differ only by summation order (~1e-15), so a
    # tolerance of 1e-10 still catches a single mis-masked key (which moves values by ~1e-2).
    H, Hkv = heads
    q, k, v = _inputs(2, H, Hkv, seq_len, seq_len, 16, seed=seq_len)
    _assert_match(q, k, v, PATTERNS[name])


@pytest.mark.parametrize("name", ["window", "sink", "longformer", "dilated", "bigbird", "strided", "union"])
def test_blocked_shard_shaped(name):
    """Queries a sub-range, keys [globals | range]: what a sequence shard computes."""
    pattern, n = PATTERNS[name], 400
    q_start, q_end = 150, 281  # not block-aligned on either side
    ranges = pattern.kv_ranges(q_start, q_end, n)
    k_pos = torch.cat([torch.arange(s, e) for s, e in ranges])
    q_pos = torch.arange(q_start, q_end)
    q, k, v = _inputs(1, 4, 2, len(q_pos), len(k_pos), 8, seed=7)
    _assert_match(q, k, v, pattern, q_pos, k_pos, seq_len=n)


@pytest.mark.parametrize("name", ["topk", "topk_query"])
def test_blocked_topk_shard_shaped(name):
    # top-k needs block-aligned query shards (each rank holds whole blocks); keys are everything
    # up to the shard end, as after gathering the selected blocks' rows.
    pattern, n = PATTERNS[name], 320
    q_pos, k_pos = torch.arange(128, 256), torch.arange(0, 256)
    q, k, v = _inputs(1, 4, 2, len(q_pos), len(k_pos), 8, seed=9)
    _assert_match(q, k, v, pattern, q_pos, k_pos, seq_len=n)


@pytest.mark.parametrize("name", ["topk_query", "topk_query_bidir", "topk_query_small_blocks"])
def test_blocked_topk_query_tiles_are_unions(name):
    """The select=query cases above do exercise the per-row masks: some tile holds more blocks than
    one query sees (top_k + 2), and the mask differs from select=block's on these inputs."""
    import dataclasses

    from kernels.blocked_plan import content_plan

    pattern, n = PATTERNS[name], 333
    q, k, _ = _inputs(2, 4, 2, n, n, 16, seed=n)
    pos = torch.arange(n)
    plan = content_plan(pattern, q.detach(), k.detach(), pos, pos, n)
    assert max(c.idx.shape[-1] for c in plan.chunks) > (pattern.top_k + 2) * pattern.block_size
    by_block = dataclasses.replace(pattern, select="block")
    assert not torch.equal(pattern.content_mask(q.detach(), k.detach(), pos, pos),
                           by_block.content_mask(q.detach(), k.detach(), pos, pos))


def test_blocked_unsorted_keys():
    pattern = PATTERNS["sink"]
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    q, k, v = _inputs(1, 2, 2, 300, 300, 8, seed=1)
    _assert_match(q, k, v, pattern, torch.arange(300), perm)


def test_blocked_fp32():
    # fp32 end to end: differences are rounding in dot products of length D and sums over
    # ~100 keys, ~1e-6 relative; 1e-4 leaves room without hiding a masking error.
    q, k, v = _inputs(1, 4, 2, 257, 257, 32, dtype=torch.float32, seed=2)
    _assert_match(q, k, v, PATTERNS["sink"], atol=1e-4)


def test_blocked_lse_merge_of_two_key_halves_is_exact():
    """Two partials over disjoint key sets, merged by LSE, equal one pass over all keys."""
    pattern, n = PATTERNS["longformer"], 300
    q, k, v = _inputs(1, 2, 2, n, n, 8, seed=4)
    full_out, full_lse, full_st = sparse_attention(q, k, v, pattern, backend="blocked", return_stats=True)
    ref = _reference_masked_halves(q, k, v, pattern, cut=170)
    out, lse, (wa, wb) = merge_two(ref[0][0], ref[0][1], ref[1][0], ref[1][1])
    st = merge_stats(ref[0][2], ref[1][2], wa, wb)
    torch.testing.assert_close(out, full_out, atol=1e-10, rtol=1e-10)  # fp64: summation order only
    torch.testing.assert_close(lse, full_lse, atol=1e-10, rtol=1e-10)
    for a, b in zip(st.fields(), full_st.fields()):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def _reference_masked_halves(q, k, v, pattern, cut):
    """Partials (out, lse, stats) over keys [0, cut) and [cut, n) with the pattern's mask; rows
    with no key in a half get lse = -inf, out = 0 (what a rank holding no key of theirs returns)."""
    from kernels.stats import stats_from_probs

    n = q.shape[2]
    pos = torch.arange(n)
    res = []
    for sl in (slice(0, cut), slice(cut, n)):
        mask = pattern.mask(pos, pos[sl])
        s = torch.einsum("bhqd,bhkd->bhqk", q, k[:, :, sl]) / q.shape[-1] ** 0.5
        s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
        st = stats_from_probs(s, p, pos[sl] < pattern.num_global)
        st.m = st.m.nan_to_num(0.0)
        res.append((torch.einsum("bhqk,bhkd->bhqd", p, v[:, :, sl]), lse, st))
    return res


def test_head_summary_matches_direct_entropy():
    pattern = PATTERNS["sink"]
    q, k, v = _inputs(2, 4, 2, 200, 200, 8, seed=5)
    out, lse, st = sparse_attention(q, k, v, pattern, backend="blocked", return_stats=True)
    summ = head_summary(head_sums(lse, st))
    mask = pattern.mask(torch.arange(200), torch.arange(200))
    s = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, 1)) / 8**0.5
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    entropy = -(torch.special.xlogy(p, p)).sum(-1).mean(dim=(0, 2))
    gmass = p[..., : pattern.num_global].sum(-1).mean(dim=(0, 2))
    torch.testing.assert_close(summ["entropy"], entropy, atol=1e-10, rtol=1e-10)  # fp64
    torch.testing.assert_close(summ["global_mass"], gmass, atol=1e-10, rtol=1e-10)
    # The kernel scales q before the product, the test after: equal up to fp64 rounding.
    max_logit = s.masked_fill(~mask, float("-inf")).amax(dim=(0, 2, 3))
    torch.testing.assert_close(summ["max_logit"], max_logit, atol=1e-12, rtol=1e-12)


def test_blocked_saves_only_inputs_out_and_lse():
    """FlashAttention-style memory: autograd keeps q, k, v, out, lse — nothing of size n·w."""
    n, w = 1024, 256
    q, k, v = _inputs(1, 2, 2, n, n, 16, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        sparse_attention(q, k, v, Window(window_left=w), backend="blocked")
    per_token = 2 * n * 16  # one [B, H, n, D] tensor
    assert sum(saved) <= 4 * per_token + 2 * n, f"saved {saved}: more than q, k, v, out and lse"


def test_blocked_empty_row_is_an_error():
    q, k, v = _inputs(1, 1, 1, 1, 10, 4)
    with pytest.raises(EmptyRowError, match="position 100"):
        sparse_attention(q, k, v, Window(window_left=3), torch.tensor([100]), torch.arange(10), backend="blocked")


def test_auto_backend_is_blocked_on_cpu():
    q = torch.zeros(1, 1, 4, 4)
    assert pick_backend(q, PATTERNS["sink"], return_stats=False) == "blocked"
    with pytest.raises(ValueError, match="backend"):
        sparse_attention(q, q, q, PATTERNS["sink"], backend="nope")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_cuda(dtype):
    pattern = PATTERNS["sink"]
    q, k, v = (t.detach().cuda().to(dtype).requires_grad_() for t in _inputs(1, 4, 2, 333, 333, 64))
    ref = _run("reference", q, k, v, pattern, None, None)
    got = _run("blocked", q, k, v, pattern, None, None)
    # bf16 inputs carry 8 bits of mantissa (~4e-3 relative); both sides accumulate in fp32 but
    # round outputs and gradients to bf16. fp32: TF32-free matmuls, ~1e-5.
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
    for name, a, b in zip(NAMES, ref, got):
        torch.testing.assert_close(b.float(), a.float(), atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


def test_blocked_compiled_elementwise_matches_eager(monkeypatch):
    """HALOFORMER_COMPILE's fused elementwise steps give the eager path's results."""
    import kernels.blocked as blocked

    q, k, v = _inputs(1, 4, 2, 200, 200, 8, dtype=torch.float32, seed=11)
    pattern = PATTERNS["sink"]
    eager = _run("blocked", q, k, v, pattern, None, None)
    monkeypatch.setattr(blocked.SETTINGS, "compile", True)
    fused = _run("blocked", q, k, v, pattern, None, None)
    for name, a, b in zip(NAMES, eager, fused):
        # Same fp32 math in a different evaluation order (vectorised exp and reductions): ~1e-6.
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_blocked_leaves_inputs_untouched():
    # The kernel scales a padded copy of q in place; with Q a multiple of BLOCK there is no padding,
    # so this guards against that copy ever aliasing the caller's tensor.
    q, k, v = _inputs(1, 2, 2, 2 * BLOCK, 2 * BLOCK, 8, dtype=torch.float32)
    before = [t.detach().clone() for t in (q, k, v)]
    out, lse, _ = sparse_attention(q, k, v, PATTERNS["sink"], backend="blocked")
    (out.sum() + lse.sum()).backward()
    assert all(torch.equal(t, b) for t, b in zip((q, k, v), before))


@pytest.mark.parametrize("name", ["sink", "longformer", "bigbird", "dilated", "topk_small_blocks",
                                  "topk_query_small_blocks"])
def test_blocked_many_chunks(name, monkeypatch):
    """Tiny chunks: many chunks per call, each with its own band offset and the scatter margins."""
    import kernels.blocked as blocked
    import kernels.blocked_plan as blocked_plan

    monkeypatch.setattr(blocked_plan, "CHUNK_ELEMS", 1 << 15)
    blocked.clear_caches()  # plans memoised with the real CHUNK_ELEMS must not be reused
    q, k, v = _inputs(1, 2, 2, 700, 700, 8, seed=13)
    _assert_match(q, k, v, PATTERNS[name])  # fp64: summation order only, see above
    blocked.clear_caches()  # nor these tiny-chunk plans by later tests


def test_memo_caches_are_bounded_clearable_and_keep_results():
    """The kernels' process-wide memo (kernels.caches): least recently used entries go first, a failed
    build stores nothing, and clear_caches empties the plan and block-mask caches without changing
    a result."""
    import kernels.blocked as blocked
    import kernels.blocked_plan as blocked_plan
    import kernels.flex as flex
    from kernels.blocked_docs import DOC_PLANS
    from kernels.caches import LRUCache

    lru = LRUCache(maxsize=2)
    for key in "abca":  # "a" is used again, so "b" is the least recently used when "c" arrives
        lru.get_or_build(key, lambda k=key: k.upper())
    assert len(lru) == 2 and lru.get_or_build("b", lambda: "rebuilt") == "rebuilt"
    with pytest.raises(ZeroDivisionError):
        lru.get_or_build("z", lambda: 1 / 0)
    assert lru.get_or_build("z", lambda: "ok") == "ok"

    q, k, v = (t.detach() for t in _inputs(1, 2, 2, 300, 300, 8, dtype=torch.float32))
    docs = (torch.arange(300) // 100)[None]
    first = [sparse_attention(q, k, v, PATTERNS["sink"], backend="blocked", q_doc=d, k_doc=d)[0] for d in (None, docs)]
    assert blocked_plan.positional_plan.cache_info().currsize > 0 and len(DOC_PLANS) > 0
    blocked.clear_caches()
    assert blocked_plan.positional_plan.cache_info().currsize == 0 and len(DOC_PLANS) == 0
    again = [sparse_attention(q, k, v, PATTERNS["sink"], backend="blocked", q_doc=d, k_doc=d)[0] for d in (None, docs)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # the same plan rebuilt: bit-identical
    if flex.flex_available():  # CPU flex runs forward only, which is all the cache needs
        sparse_attention(q, k, v, PATTERNS["sink"], backend="flex")
        assert len(flex.BLOCK_MASKS) > 0
        flex.clear_caches()
        assert len(flex.BLOCK_MASKS) == 0 and not flex.UNTRACEABLE
