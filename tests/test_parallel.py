"""Sequence-parallel attention on P ∈ {2, 3, 4} gloo ranks equals the single-device reference.

One process group per P runs every case (``_suite``); the tests below assert on what it brought
back. Each rank builds the full q, k, v from a shared seed, computes the reference on them, runs
``sp_attention`` on its shard, and compares its output, the gradients of its q, k, v and its
statistics with the matching slice of the reference.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from kernels.contract import AttnCall
from model.pattern import BigBird, Dense, PatternUnion, Strided, TopKBlocks, Window
from tests.mp_utils import assert_no_rank_failures, parity_suite

L = 48  # local length: seq_len = 96, 144, 192 for P = 2, 3, 4
D = 16
# fp32 throughout: sharding only changes the order of the softmax sums (LSE merges of partials), so
# outputs and gradients (values up to ~10) agree to a few ulps; a wrong key set is off by >= 1e-2.
ATOL, RTOL = 2e-5, 1e-5


def _cases(P: int) -> list[tuple[str, object, int, str]]:
    """(name, pattern, seq_len, strategy) for one P; all at B=1, H=4, Hkv=2 unless Ulysses needs 6/3."""
    n = P * L
    return [
        ("causal_window", Window(causal=True, window_left=20), n, "auto"),
        ("sink", Window(causal=True, window_left=20, num_global=4), n, "auto"),
        ("longformer", Window(causal=False, window_left=12, window_right=12, num_global=4), n, "auto"),
        ("dilated", Window(causal=True, window_left=30, dilation=3, num_global=2), n, "auto"),
        ("dilated_bidir", Window(causal=False, window_left=21, window_right=21, dilation=4), n, "auto"),
        ("strided", Strided(causal=True, stride=16), n, "halo"),
        ("strided_wide", Strided(causal=True, stride=64), n, "halo"),
        ("strided_auto", Strided(causal=True, stride=16), n, "auto"),
        ("fixed", Strided(causal=True, stride=16, variant="fixed", summary=2), n, "halo"),
        ("bigbird", BigBird(causal=True, window_left=16, num_global=4, random_blocks=2, block_size=16), n, "auto"),
        ("bigbird_bidir", BigBird(causal=False, window_left=8, window_right=8, num_global=4, random_blocks=2,
                                  block_size=16, seed=3), n, "auto"),
        ("union", PatternUnion(causal=True, parts=(Window(causal=True, window_left=6),
                                            Strided(causal=True, stride=24, variant="fixed"))), n, "halo"),
        ("multihop_causal", Window(causal=True, window_left=5 * L // 2, num_global=3), n, "halo"),
        ("multihop_bidir", Window(causal=False, window_left=2 * L, window_right=L + 5, num_global=3), n, "halo"),
        ("globals_gt_L_causal", Window(causal=True, window_left=10, num_global=L + 10), n, "halo"),
        ("globals_gt_L_bidir", Window(causal=False, window_left=10, window_right=10, num_global=L + 10), n, "halo"),
        ("dense", Dense(causal=True), n, "auto"),
        ("topk", TopKBlocks(causal=True, top_k=2, block_size=16, num_global=4), n, "auto"),
        ("sink_ulysses", Window(causal=True, window_left=20, num_global=4), n, "ulysses"),
        ("longformer_ulysses", Window(causal=False, window_left=12, window_right=12, num_global=4), n, "ulysses"),
    ]


def _heads(P: int, strategy: str, pattern) -> tuple[int, int]:
    ulysses = strategy == "ulysses" or pattern.content_based
    return (2 * P, P) if ulysses and 4 % P else (4, 2)


def _data(seed, H, Hkv, n, B=1):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, w = (torch.randn(B, h, n, D, generator=gen) for h in (H, Hkv, Hkv, H))
    return [x.requires_grad_(i < 3) for i, x in enumerate((q, k, v, w))]


def _close(name, what, got, want, failures):
    if not torch.allclose(got, want, atol=ATOL, rtol=RTOL, equal_nan=False):
        failures.append(f"{name}: {what} max err {float((got - want).abs().max()):.3g}")


def _run_case(ctx, name, pattern, n, strategy, backend="reference", return_stats=True, batch=1, grad=True,
              expect_fused=False):
    """Compare one configuration with the reference; returns (failures, output). ``expect_fused``: the
    fused C++ kernel must be what ran (a case that silently went to blocked would prove nothing of it)."""
    import kernels.fused as fused
    from kernels.reference import reference_attention
    from parallel.sharding import shard
    from parallel.sp_attention import sp_attention

    H, Hkv = _heads(ctx.sp_size, strategy, pattern)
    q, k, v, w = _data(zlib.crc32(repr(pattern).encode()) % 1000, H, Hkv, n, batch)  # same pattern, same data
    ref, ref_lse, ref_st = reference_attention(q, k, v, pattern, seq_len=n, return_stats=True)
    (ref * w).sum().backward()
    mine = [shard(x.detach(), ctx, 2).clone().requires_grad_(grad) for x in (q, k, v)]
    failures, fused_calls, apply = [], [], fused.FusedAttention.apply
    fused.FusedAttention.apply = lambda *a: fused_calls.append(1) or apply(*a)
    try:
        st = sp_attention(*mine, pattern, ctx, AttnCall(seq_len=n, return_stats=return_stats), strategy=strategy,
                          backend=backend)
    finally:
        fused.FusedAttention.apply = apply
    if expect_fused and not fused_calls:
        failures.append(f"{name}: the fused kernel did not run")
    out = st.out
    assert (st.stats is None) == (not return_stats)  # one result shape: stats None exactly when not asked
    st = st if return_stats else None
    _close(name, "out", out.detach(), shard(ref, ctx, 2).detach(), failures)
    if grad:
        (out * shard(w, ctx, 2)).sum().backward()
        for label, x, full in zip("qkv", mine, (q, k, v), strict=True):
            _close(name, f"d{label}", x.grad, shard(full.grad, ctx, 2), failures)
    if st is not None:
        _check_stats(ctx, name, st, ref_lse, ref_st, failures)
    return failures, out.detach()


def _check_stats(ctx, name, st, ref_lse, ref_st, failures):
    """Per-query partials merged across ranks, and per-head sums reduced over the group."""
    from kernels.stats import head_sums, reduce_head_sums
    from parallel.sharding import shard

    _close(name, "lse", st.lse, shard(ref_lse, ctx, 2), failures)
    for field, got, want in zip(("m", "max_logit", "global_mass"), st.stats.fields(), ref_st.fields(), strict=True):
        _close(name, field, got, shard(want, ctx, 2), failures)
    ref_sums, sums = head_sums(ref_lse, ref_st), reduce_head_sums(head_sums(st.lse, st.stats), ctx.sp_group)
    for key in ref_sums:  # sums over up to 192 queries: the ulps add up, hence 1e-4 relative
        if not torch.allclose(sums[key].to(ref_sums[key].dtype), ref_sums[key], atol=1e-4, rtol=1e-4):
            failures.append(f"{name}: head sum {key} {sums[key].tolist()} != {ref_sums[key].tolist()}")


def _variants(P: int) -> list[tuple[str, object, dict]]:
    """Other paths on inputs of earlier cases: no stats, the fast local kernel (fused under halo and
    Ulysses; top-k's content-based pattern is not a band, so it runs blocked), batch 2, no grad."""
    sink = Window(causal=True, window_left=20, num_global=4)
    longformer = Window(causal=False, window_left=12, window_right=12, num_global=4)
    bigbird = BigBird(causal=False, window_left=8, window_right=8, num_global=4, random_blocks=2, block_size=16)
    return [
        ("sink_halo_for_ulysses", sink, {"strategy": "halo", "return_stats": False}),
        ("longformer_auto", longformer, {"strategy": "halo", "backend": "auto", "expect_fused": True}),
        ("sink_ulysses_fused", sink, {"strategy": "ulysses", "backend": "fused", "expect_fused": True}),
        ("bigbird_bidir_blocked", bigbird, {"strategy": "halo", "backend": "auto", "return_stats": False}),
        ("bigbird_bidir_batch2", bigbird, {"strategy": "halo", "batch": 2}),
        ("longformer_ulysses_batch2", longformer, {"strategy": "ulysses", "batch": 2}),
        ("longformer_no_grad", longformer, {"strategy": "halo", "grad": False}),
    ]


def _bytes_cases(ctx):
    """Halo + global bytes of the causal sink at n and 2n, and of Longformer at n and 2n."""
    from parallel.comm import CommCounter
    from parallel.sharding import shard
    from parallel.sp_attention import sp_attention

    out = {}
    for name, pattern in (("sink", Window(causal=True, window_left=20, num_global=4)),
                          ("longformer", Window(causal=False, window_left=12, window_right=9, num_global=4))):
        for n in (ctx.sp_size * L, 2 * ctx.sp_size * L):
            q, k, v, _ = _data(0, 4, 2, n)
            counter = CommCounter()
            x = sp_attention(*(shard(t.detach(), ctx, 2).clone().requires_grad_() for t in (q, k, v)), pattern, ctx,
                             AttnCall(layer=0), strategy="halo", backend="reference", counter=counter).out
            x.sum().backward()
            out[(name, n)] = counter.as_dict()
    return out


def _guard_cases(ctx):
    """The guard passes on correct setups and names the rank whose local kernel is broken."""
    from kernels import attend
    from parallel.guard import ShardMismatchError, check_sp_attention

    failures = []
    for pattern in (Window(causal=True, window_left=40, num_global=4),
                    Window(causal=False, window_left=8, window_right=8, num_global=4),
                    TopKBlocks(causal=True, top_k=2, block_size=16, num_global=4)):
        try:
            check_sp_attention(pattern, ctx, backend="reference")
        except Exception as exc:  # collected, asserted in the parent
            failures.append(f"guard rejected a correct setup: {exc}")
    bad_rank = ctx.sp_size - 1

    def broken(q, k, v, pattern, call):  # a wrong pattern in the local compute, on one rank only
        if ctx.sp_rank == bad_rank:
            pattern = Window(causal=True, window_left=pattern.window_left - 3, num_global=pattern.num_global)
        return attend(q, k, v, pattern, call, backend="reference")

    sink = Window(causal=True, window_left=20, num_global=4)
    try:
        check_sp_attention(sink, ctx, strategy="halo", backend=broken)
        failures.append("guard missed a broken local kernel")
    except ShardMismatchError as exc:
        if f"local kernel differs on SP rank(s) [{bad_rank}]" not in str(exc) or "window_left=20" not in str(exc):
            failures.append(f"guard message does not name the rank/pattern: {exc}")
    return failures


def _suite(rank, world_size):
    from parallel.context import ParallelConfigError, init_parallel

    results = {"cases": {}, "outs": {}, "config_error": None}
    try:  # a size that does not tile the world fails on every rank before any group is built
        init_parallel(sequence_parallel_size=world_size + 1)
    except ParallelConfigError as exc:
        results["config_error"] = str(exc)
    ctx = init_parallel(sequence_parallel_size=world_size, timeout_s=30)
    try:
        for name, pattern, n, strategy in _cases(world_size):
            results["cases"][name], results["outs"][name] = _run_case(ctx, name, pattern, n, strategy)
        for name, pattern, opts in _variants(world_size):
            results["cases"][name], results["outs"][name] = _run_case(ctx, name, pattern, world_size * L, **opts)
        results["bytes"] = _bytes_cases(ctx)
        results["guard"] = _guard_cases(ctx)
    finally:
        ctx.destroy()
    return results


suite = parity_suite(_suite, [2, 3, 4])


def test_matches_reference(suite):
    _, per_rank = suite
    assert_no_rank_failures(per_rank, "cases")


def test_ulysses_equals_halo(suite):
    P, per_rank = suite
    if 4 % P:
        pytest.skip(f"Ulysses splits the 4 heads over the ranks: P={P} does not divide them")
    for r, res in enumerate(per_rank):
        outs = res["outs"]
        # same shapes (4 heads) where Ulysses needs no head change; exact up to fp32 reordering
        assert torch.allclose(outs["sink_ulysses"], outs["sink_halo_for_ulysses"], atol=ATOL, rtol=RTOL), r


def test_halo_bytes_match_cost_model_and_do_not_grow_with_n(suite):
    from parallel.comm import halo_cost

    P, per_rank = suite
    row = 1 * 2 * D * 2 * 4  # one key position: B=1, Hkv=2, D, K and V, fp32
    for r, res in enumerate(per_rank):
        b = res["bytes"]
        for name in ("sink", "longformer"):
            assert b[(name, P * L)] == b[(name, 2 * P * L)], (name, r)
        fwd = {k: v for k, v in b[("sink", P * L)].items() if "/forward/" in k}
        if r > 0:  # interior/last rank of the causal sink: w keys of halo + g globals, nothing else
            assert fwd.get("comm/0/forward/halo/recv", 0) == 20 * row
            assert fwd.get("comm/0/forward/global/recv", 0) == 4 * row
            assert sum(v for k, v in fwd.items() if k.endswith("/recv")) == halo_cost(20, 4, 2, D, 4)
        lf = b[("longformer", P * L)]
        left, right = (12 if r > 0 else 0), (9 if r < P - 1 else 0)
        assert lf.get("comm/0/forward/halo/recv", 0) == (left + right) * row, r
        assert lf.get("comm/0/forward/global/recv", 0) == (4 * row if r > 0 else 0), r


def test_backward_bytes_mirror_forward(suite):
    _, per_rank = suite
    for res in per_rank:
        for counts in res["bytes"].values():
            for kind in ("halo", "global", "global_q", "global_partial"):
                fwd_sent = counts.get(f"comm/0/forward/{kind}/sent", 0)
                assert fwd_sent == counts.get(f"comm/0/backward/{kind}/recv", 0), kind
                assert counts.get(f"comm/0/forward/{kind}/recv", 0) == counts.get(f"comm/0/backward/{kind}/sent", 0)


def test_startup_guard(suite):
    _, per_rank = suite
    failures = [f"rank {r}: {f}" for r, res in enumerate(per_rank) for f in res["guard"]]
    assert not failures, "\n".join(failures)


def test_sizes_that_do_not_tile_the_world_are_rejected(suite):
    P, per_rank = suite
    for res in per_rank:
        assert res["config_error"] and f"parallel.sequence_parallel_size={P + 1}" in res["config_error"]
