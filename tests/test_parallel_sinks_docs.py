"""Learned sinks and packed documents under sequence parallelism, P ∈ {2, 3, 4}, every strategy.

Each rank builds the full q, k, v, sinks and document ids from a shared seed, computes the
single-device reference on them, runs ``sp_attention`` on its shard and compares its output, lse,
statistics (sink mass included) and the gradients of its q, k, v. The sinks' gradient is this
rank's queries' share; the parent sums it over ranks and compares with the reference's.
"""

from __future__ import annotations

import zlib

import torch

from kernels.contract import AttnCall
from model.pattern import BigBird, TopKBlocks, Window
from tests.mp_utils import assert_no_rank_failures, parity_suite
from tests.test_sinks_docs import random_docs

L = 48  # local length: seq_len = 96, 144, 192 for P = 2, 3, 4
D = 16
# fp32 throughout: sharding only reorders the softmax sums (LSE merges) and the sink's sigmoid
# weight, a few ulps on values up to ~10; a wrong key, document or double-applied sink is >= 1e-2.
ATOL, RTOL = 2e-5, 1e-5


def _cases(P: int) -> list[tuple[str, object, str, bool, bool]]:
    """(name, pattern, strategy, sinks on, documents on)."""
    sink = Window(causal=True, window_left=20, num_global=4)
    longformer = Window(causal=False, window_left=12, window_right=12, num_global=4)
    return [
        ("sink", sink, "halo", True, True),
        ("window_no_globals", Window(causal=True, window_left=20), "halo", False, True),  # empty remote rows
        ("longformer", longformer, "halo", True, True),
        ("longformer_sinks_only", longformer, "halo", True, False),
        ("dilated", Window(causal=True, window_left=30, dilation=3, num_global=2), "halo", True, True),
        ("bigbird_bidir", BigBird(causal=False, window_left=8, window_right=8, num_global=4, random_blocks=2,
                                  block_size=16, seed=3), "halo", True, True),
        ("multihop_causal", Window(causal=True, window_left=5 * L // 2, num_global=3), "halo", True, True),
        ("globals_gt_L_bidir", Window(causal=False, window_left=10, window_right=10, num_global=L + 10), "halo",
         True, True),
        ("topk", TopKBlocks(causal=True, top_k=2, block_size=16, num_global=4), "topk", True, True),
        ("topk_query", TopKBlocks(causal=True, top_k=2, block_size=16, num_global=4, select="query"), "topk", True,
         True),
        ("sink_ulysses", sink, "ulysses", True, True),
        ("longformer_ulysses", longformer, "ulysses", True, True),
    ]


def _heads(P: int, strategy: str) -> tuple[int, int]:
    return (2 * P, P) if strategy == "ulysses" and 4 % P else (4, 2)


def _data(seed, H, Hkv, n, B=2):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, w = (torch.randn(B, h, n, D, generator=gen) for h in (H, Hkv, Hkv, H))
    sinks = torch.randn(H, generator=gen)
    return [x.requires_grad_(i < 3 or i == 4) for i, x in enumerate((q, k, v, w, sinks))]


def _close(name, what, got, want, failures):
    if not torch.allclose(got, want, atol=ATOL, rtol=RTOL):
        failures.append(f"{name}: {what} max err {float((got - want).abs().max()):.3g}")


def _run_case(ctx, name, pattern, strategy, with_sinks, with_docs, backend="reference"):
    """(failures, this rank's d sinks, reference d sinks) for one configuration."""
    from kernels.reference import reference_attention
    from parallel.sharding import shard
    from parallel.sp_attention import sp_attention

    n = ctx.sp_size * L
    H, Hkv = _heads(ctx.sp_size, strategy)
    seed = zlib.crc32(name.encode()) % 1000
    q, k, v, w, sinks = _data(seed, H, Hkv, n)
    sinks = sinks if with_sinks else None
    docs = random_docs(2, n, seed, short=12, long=60) if with_docs else None  # boundaries inside the halos
    ref, ref_lse, ref_st = reference_attention(q, k, v, pattern, seq_len=n, return_stats=True, q_doc=docs,
                                               k_doc=docs, sinks=sinks)
    (ref * w).sum().backward()
    mine = [shard(x.detach(), ctx, 2).clone().requires_grad_() for x in (q, k, v)]
    my_sinks = None if sinks is None else sinks.detach().clone().requires_grad_()
    st = sp_attention(*mine, pattern, ctx, AttnCall(seq_len=n, return_stats=True, sinks=my_sinks,
                                                    q_doc=None if docs is None else shard(docs, ctx, 1)),
                      strategy=strategy, backend=backend)
    out = st.out
    failures = []
    _close(name, "out", out.detach(), shard(ref, ctx, 2).detach(), failures)
    (out * shard(w, ctx, 2)).sum().backward()
    for label, x, full in zip("qkv", mine, (q, k, v), strict=True):
        _close(name, f"d{label}", x.grad, shard(full.grad, ctx, 2), failures)
    _close(name, "lse", st.lse, shard(ref_lse, ctx, 2), failures)
    for field, got, want in zip(("m", "max_logit", "global_mass"), st.stats.fields(), ref_st.fields(), strict=True):
        _close(name, field, got, shard(want, ctx, 2), failures)
    if with_sinks:
        _close(name, "sink_mass", st.stats.sink_mass, shard(ref_st.sink_mass, ctx, 2), failures)
        return failures, my_sinks.grad.clone(), sinks.grad.clone()
    if st.stats.sink_mass is not None:
        failures.append(f"{name}: sink_mass without sinks")
    return failures, None, None


def _bytes(ctx):
    """doc_ids bytes of the causal sink at n and 2n (halo strategy) and the K/V halo bytes beside them."""
    from parallel.comm import CommCounter
    from parallel.sharding import shard
    from parallel.sp_attention import sp_attention

    out = {}
    pattern = Window(causal=True, window_left=20, num_global=4)
    for n in (ctx.sp_size * L, 2 * ctx.sp_size * L):
        q, k, v, _, sinks = _data(0, 4, 2, n)
        docs = random_docs(2, n, 0)
        counter = CommCounter()
        x = sp_attention(*(shard(t.detach(), ctx, 2).clone().requires_grad_() for t in (q, k, v)), pattern, ctx,
                         AttnCall(sinks=sinks, q_doc=shard(docs, ctx, 1)), strategy="halo", backend="reference",
                         counter=counter).out
        x.sum().backward()
        out[n] = counter.as_dict()
    return out


def _suite(rank, world_size):
    from parallel.context import init_parallel

    ctx = init_parallel(sequence_parallel_size=world_size, timeout_s=30)
    results = {"cases": {}, "dsinks": {}}
    try:
        for name, pattern, strategy, with_sinks, with_docs in _cases(world_size):
            fails, mine, ref = _run_case(ctx, name, pattern, strategy, with_sinks, with_docs)
            results["cases"][name], results["dsinks"][name] = fails, (mine, ref)
        for name, pattern, strategy in (("sink_auto", Window(causal=True, window_left=20, num_global=4), "halo"),
                                        ("longformer_auto", Window(causal=False, window_left=12, window_right=12,
                                                                      num_global=4), "halo"),
                                        ("topk_query_auto", TopKBlocks(causal=True, top_k=2, block_size=16, num_global=4,
                                                                       select="query"), "topk")):
            fails, mine, ref = _run_case(ctx, name, pattern, strategy, True, True, backend="auto")
            results["cases"][name], results["dsinks"][name] = fails, (mine, ref)
        results["bytes"] = _bytes(ctx)
    finally:
        ctx.destroy()
    return results


suite = parity_suite(_suite, [2, 3, 4])


def test_matches_reference(suite):
    _, per_rank = suite
    assert_no_rank_failures(per_rank, "cases")


def test_sink_gradients_sum_over_ranks(suite):
    """Each rank returns its queries' share of d sinks (Ulysses: its heads' slice); their sum — what
    the trainer's gradient all-reduce forms — equals the single-device gradient."""
    _, per_rank = suite
    for name, (_, ref) in per_rank[0]["dsinks"].items():
        if ref is None:
            continue
        total = sum(res["dsinks"][name][0] for res in per_rank)
        # sums of up to 2·192 per-query terms of size ~1: fp32 ulps add up, hence 1e-4
        assert torch.allclose(total, ref, atol=1e-4, rtol=1e-4), (name, total, ref)
        if "ulysses" in name:  # a rank's gradient lives in its own heads only
            assert all(int((res["dsinks"][name][0] != 0).sum()) <= ref.numel() // len(per_rank) for res in per_rank)


def test_document_ids_ride_along_with_the_halo(suite):
    """Document ids of received keys: 8 bytes per key row and batch element, on the K/V routes — the
    same count at n and 2n (no O(n) exchange), and 8 / (Hkv·D·2·4) of the K/V bytes."""
    P, per_rank = suite
    for r, res in enumerate(per_rank):
        small, large = res["bytes"][P * L], res["bytes"][2 * P * L]
        doc = small.get("comm/0/forward/doc_ids/recv", 0)
        assert doc == large.get("comm/0/forward/doc_ids/recv", 0), r
        kv = sum(small.get(f"comm/0/forward/{kind}/recv", 0) for kind in ("halo", "global", "blocks"))
        assert doc * (2 * D * 2 * 4) == kv * 8, (r, doc, kv)  # Hkv=2, D, K and V, fp32 vs one int64
        if r > 0:
            assert doc == (20 + 4) * 2 * 8, r  # 20 halo + 4 global keys, B = 2
        assert "comm/0/backward/doc_ids/recv" not in small  # ids carry no gradient
