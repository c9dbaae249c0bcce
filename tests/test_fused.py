"""The fused C++ band kernel against the dense reference: out, lse, stats, dq/dk/dv with the lse
gradient, GQA, shard-shaped keys, lengths that are not multiples of the 64-row tiles, learned sinks
and packed documents.

The kernel computes in fp32; the reference runs on the same values in fp64, so the comparison
measures the kernel's own error. The first test in a fresh checkout compiles the extension (~1 min).
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

import kernels.fused as fused
from kernels import EmptyRowError, cpu, pick_backend, sparse_attention
from kernels.stats import apply_sinks
from model.pattern import BigBird, Window

PATTERNS = {
    "window": Window(window_left=37),
    "sink": Window(window_left=70, num_global=4),
    "wide_sink": Window(window_left=150, num_global=70),  # globals span two key tiles
    "longformer": Window(causal=False, window_left=30, window_right=45, num_global=5),
    "bidir": Window(causal=False, window_left=64, window_right=10),
    "whole": Window(window_left=1000, num_global=2),  # the window covers every earlier key
}
NAMES = ("out", "lse", "stat_m", "max_logit", "global_mass", "dq", "dk", "dv")
# fp32 rounding (~6e-8 relative per operation) accumulated over dot products of length D and sums
# over up to a few hundred keys or queries stays below ~1e-5 of the values' scale; a mis-masked key
# or a missing gradient term moves them by ~1e-2.
TOL = 1e-4


@pytest.fixture(autouse=True, params=tuple(cpu.FUSED_ISAS))
def isa(request, monkeypatch):
    """Every test on each build of the kernel this CPU runs (AVX2, AVX-512), the C++ kernel compiled (or
    loaded from the cache) for it; a build the CPU cannot run skips, naming what it lacks. bf16 inputs
    run the fp32 kernel on copies here (the native bf16 kernel: tests/test_fused_isa.py)."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the fused kernel falls back to blocked (tested in test_fallback_*)")
    missing = cpu.info().missing(request.param)
    if missing:
        pytest.skip(f"the {request.param} build of the fused kernel needs {missing}; this CPU lacks them")
    monkeypatch.setenv(cpu.ISA_ENV, request.param)
    monkeypatch.setenv(cpu.BF16_ENV, "fp32")
    assert fused.extension() is not None, f"the {request.param} fused extension did not build"
    assert fused.extension().isa == request.param
    return request.param


def _inputs(B, H, Hkv, Q, K, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for shape in
            ((B, H, Q, D), (B, Hkv, K, D), (B, Hkv, K, D))]


def _run(backend, qkv, pattern, q_pos, k_pos, dtype):
    q, k, v = (t.to(dtype).requires_grad_() for t in qkv)
    out, lse, st = sparse_attention(q, k, v, pattern, q_pos, k_pos, backend=backend, return_stats=True)
    # A loss that uses out and lse non-trivially, so that the lse gradient path is exercised too.
    loss = (out * torch.cos(out)).sum() + torch.sin(lse).sum()
    return (out, lse, st.m, st.max_logit, st.global_mass, *torch.autograd.grad(loss, (q, k, v)))


def _assert_match(qkv, pattern, q_pos=None, k_pos=None, backend="fused"):
    q, k = (t.float() for t in qkv[:2])
    assert isinstance(fused.geometry(q, k, pattern, q_pos, k_pos), fused.Geometry), "fused kernel not used"
    ref = _run("reference", qkv, pattern, q_pos, k_pos, torch.float64)
    got = _run(backend, qkv, pattern, q_pos, k_pos, torch.float32)
    for name, a, b in zip(NAMES, ref, got):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b.double(), a, atol=TOL, rtol=TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("seq_len", [200, 333])
@pytest.mark.parametrize("shape", [(2, 4, 2), (2, 2, 2), (1, 2, 1)], ids=["gqa", "mha", "one_kv_head"])
def test_fused_matches_reference(name, seq_len, shape):
    # (1, 2, 1): a single kv head is cut into query segments whose private dK/dV are summed after;
    # (2, 2, 2) and (2, 4, 2) write dK/dV in place (on 1–2 threads).
    B, H, Hkv = shape
    _assert_match(_inputs(B, H, Hkv, seq_len, seq_len, 16, seed=seq_len), PATTERNS[name])


@pytest.mark.parametrize("name", ["window", "sink", "wide_sink", "longformer", "bidir"])
def test_fused_shard_shaped(name):
    """Queries a sub-range, keys [globals | halo + local]: what a sequence shard computes."""
    pattern, n = PATTERNS[name], 400
    q_pos = torch.arange(150, 281)  # not tile-aligned on either side
    k_pos = torch.cat([torch.arange(s, e) for s, e in pattern.kv_ranges(150, 281, n)])
    _assert_match(_inputs(1, 4, 2, len(q_pos), len(k_pos), 8, seed=7), pattern, q_pos, k_pos)


def test_fused_global_queries_against_a_shard():
    """Bidirectional global queries see every key: their partial over another rank's keys."""
    pattern = PATTERNS["longformer"]
    q_pos, k_pos = torch.arange(pattern.num_global), torch.arange(100, 260)
    _assert_match(_inputs(2, 4, 2, len(q_pos), len(k_pos), 8, seed=3), pattern, q_pos, k_pos)


def test_fused_scattered_query_positions():
    """Query positions need not be contiguous (the remote rows of a halo shard are a subset)."""
    pattern = PATTERNS["sink"]
    q_pos = torch.tensor([3, 90, 91, 150, 151, 152, 260, 299] * 10).sort().values.unique()
    _assert_match(_inputs(1, 2, 1, len(q_pos), 300, 8, seed=5), pattern, q_pos, torch.arange(300))


def test_auto_picks_fused_for_fp32_bands_on_cpu(monkeypatch):
    q32, q64 = torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16, dtype=torch.float64)
    assert pick_backend(q32, PATTERNS["sink"], return_stats=True) == "fused"
    assert pick_backend(q64, PATTERNS["sink"], return_stats=False) == "blocked"
    assert pick_backend(q32, Window(window_left=9, dilation=2), return_stats=False) == "blocked"
    assert pick_backend(torch.zeros(1, 2, 8, 12), PATTERNS["sink"], return_stats=False) == "blocked"
    monkeypatch.setenv("HALOFORMER_FUSED", "0")
    assert pick_backend(q32, PATTERNS["sink"], return_stats=False) == "blocked"
    monkeypatch.delenv("HALOFORMER_FUSED")
    _assert_match(_inputs(1, 2, 2, 200, 200, 16, seed=1), PATTERNS["sink"], backend="auto")


@pytest.mark.parametrize("name", ["sink", "longformer"])
def test_fused_bf16_inputs_run_the_fp32_kernel(name):
    """bf16 q/k/v: ``auto`` picks fused, which computes in fp32 on the bf16 values and rounds out (and,
    through autograd, dq/dk/dv) to bf16 once; lse and the statistics stay fp32. Against the fp64
    reference on the same bf16 values, with a loss whose output gradient is exact in bf16 (weights
    that are bf16 numbers): out and the gradients are off by at most one bf16 rounding (half an ulp:
    2^-8 = 3.9e-3 relative; 3.88e-3 measured; 5e-3 leaves room for fp32 noise), lse and the
    statistics by fp32 noise only (1e-4). The blocked kernel in bf16 misses this (dq off by 0.85
    relative at worst, measured)."""
    from kernels import AttnCall, choose_backend

    pattern = PATTERNS[name]
    qkv = [t.bfloat16().double() for t in _inputs(1, 4, 2, 200, 200, 16, seed=11)]
    w = torch.randn(1, 4, 200, 16, generator=torch.Generator().manual_seed(12)).bfloat16().double()
    q16 = qkv[0].bfloat16()
    assert choose_backend(q16, qkv[1].bfloat16(), pattern, AttnCall()) == "fused"

    def run(dtype, backend):
        q, k, v = (t.to(dtype).requires_grad_() for t in qkv)
        out, lse, st = sparse_attention(q, k, v, pattern, backend=backend, return_stats=True)
        loss = (out.double() * w).sum() + lse.double().sum()
        return (out, lse, st.m, st.max_logit, st.global_mass, *torch.autograd.grad(loss, (q, k, v)))

    ref, got = run(torch.float64, "reference"), run(torch.bfloat16, "auto")
    for name_, a, b in zip(NAMES, ref, got):
        rounded = name_ in ("out", "dq", "dk", "dv")
        assert b.dtype == (torch.bfloat16 if rounded else torch.float32), name_
        tol = dict(rtol=5e-3, atol=1e-4) if rounded else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b.double(), a, **tol, msg=lambda m, n=name_: f"{n}: {m}")


@pytest.mark.parametrize("case", ["dilated", "bigbird", "two_runs", "unsorted"])
def test_fallback_to_blocked_where_fused_does_not_apply(case):
    """What the fused kernel cannot take runs ``blocked`` and still matches the reference."""
    n, pattern, k_pos = 300, PATTERNS["sink"], None
    if case == "dilated":
        pattern = Window(window_left=60, dilation=3, num_global=2)
    elif case == "bigbird":
        pattern = BigBird(window_left=40, num_global=3, random_blocks=2, block_size=32)
    elif case == "two_runs":
        k_pos = torch.cat([torch.arange(0, 100), torch.arange(150, 300)])
    else:
        k_pos = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    qkv = _inputs(1, 2, 2, n, n if k_pos is None else len(k_pos), 16, seed=2)
    assert isinstance(fused.geometry(qkv[0].float(), qkv[1].float(), pattern, None, k_pos), str)
    ref = _run("reference", qkv, pattern, None, k_pos, torch.float64)
    got = _run("fused", qkv, pattern, None, k_pos, torch.float32)
    for name, a, b in zip(NAMES, ref, got):
        torch.testing.assert_close(b.double(), a, atol=TOL, rtol=TOL, msg=lambda m, n=name: f"{n}: {m}")


def test_fallback_without_compiler_warns_once(monkeypatch):
    monkeypatch.setattr(fused, "_exts", {})
    monkeypatch.setattr(fused.shutil, "which", lambda name: None)
    qkv = [t.float() for t in _inputs(1, 2, 2, 100, 100, 16)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, lse, _ = sparse_attention(*qkv, PATTERNS["sink"], backend="fused")
        sparse_attention(*qkv, PATTERNS["sink"], backend="fused")
    assert [str(w.message) for w in caught] == ["kernels.fused: no C++ compiler found; using the blocked kernel instead"]
    ref_out, ref_lse, _ = sparse_attention(*qkv, PATTERNS["sink"], backend="blocked")
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)  # it is the blocked kernel


def test_fused_empty_row_is_an_error():
    q, k, v = (t.float() for t in _inputs(1, 1, 1, 1, 10, 8))
    with pytest.raises(EmptyRowError, match="position 100"):
        sparse_attention(q, k, v, Window(window_left=3), torch.tensor([100]), torch.arange(10), backend="fused")


def test_fused_saves_only_inputs_out_and_lse_and_leaves_inputs_untouched():
    """FlashAttention-style memory: autograd keeps q, k, v, out, lse — nothing of size n·w."""
    n, D = 1024, 16
    q, k, v = (t.float().requires_grad_() for t in _inputs(1, 2, 2, n, n, D))
    before = [t.detach().clone() for t in (q, k, v)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out, lse, _ = sparse_attention(q, k, v, Window(window_left=256), backend="fused")
    assert sum(saved) <= 4 * (2 * n * D) + 2 * n, f"saved {saved}: more than q, k, v, out and lse"
    (out.sum() + lse.sum()).backward()
    assert all(torch.equal(t, b) for t, b in zip((q, k, v), before))


def test_fused_with_learned_sinks():
    """Sinks join after the kernel from (out, lse): their gradient reaches q, k, v through dlse."""
    pattern = PATTERNS["sink"]
    qkv = _inputs(1, 4, 2, 150, 150, 16, seed=8)
    sinks = torch.linspace(-1.0, 2.0, 4, dtype=torch.float64)
    res = []
    for backend, dtype in (("reference", torch.float64), ("fused", torch.float32)):
        q, k, v, s = (t.to(dtype).requires_grad_() for t in (*qkv, sinks))
        out, lse, _ = sparse_attention(q, k, v, pattern, backend=backend, sinks=s)
        loss = (out * torch.cos(out)).sum() + torch.sin(lse).sum()
        res.append((out, lse, *torch.autograd.grad(loss, (q, k, v, s))))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), *res):
        torch.testing.assert_close(b.double(), a, atol=TOL, rtol=TOL, msg=lambda m, n=name: f"{n}: {m}")  # TOL: see above


# ---- learned sinks joined inside the kernel (the row's online softmax starts from the sink) ----

SINK_NAMES = ("out", "lse", "stat_m", "max_logit", "global_mass", "sink_mass", "dq", "dk", "dv", "dsinks")


def _sinks(H):
    # From a sink that barely counts (−3) to one that takes nearly all the mass (8: the rows' running
    # max starts at the sink and every key is rescaled below it).
    return torch.linspace(-3.0, 8.0, H, dtype=torch.float64)


def _run_sinks(backend, qkv, sinks, pattern, q_pos, k_pos, dtype):
    q, k, v, s = (t.to(dtype).requires_grad_() for t in (*qkv, sinks))
    out, lse, st = sparse_attention(q, k, v, pattern, q_pos, k_pos, backend=backend, return_stats=True, sinks=s)
    loss = (out * torch.cos(out)).sum() + torch.sin(lse).sum()  # uses the lse gradient too
    return (out, lse, st.m, st.max_logit, st.global_mass, st.sink_mass, *torch.autograd.grad(loss, (q, k, v, s)))


def _assert_sinks_match(qkv, pattern, q_pos=None, k_pos=None):
    assert isinstance(fused.geometry(qkv[0].float(), qkv[1].float(), pattern, q_pos, k_pos), fused.Geometry)
    sinks = _sinks(qkv[0].shape[1])
    ref = _run_sinks("reference", qkv, sinks, pattern, q_pos, k_pos, torch.float64)
    got = _run_sinks("fused", qkv, sinks, pattern, q_pos, k_pos, torch.float32)
    for name, a, b in zip(SINK_NAMES, ref, got):
        assert b.dtype == torch.float32
        # TOL: see above; dsinks sums p_sink·(dlse − Δ) over B·Q <= 666 rows of fp32 terms (~1e-5 relative).
        torch.testing.assert_close(b.double(), a, atol=TOL, rtol=TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("shape", [(2, 4, 2), (1, 2, 1)], ids=["gqa", "one_kv_head"])
def test_fused_sinks_match_reference(name, shape):
    """out, lse, the stats over keys plus sink, and the gradients of q, k, v and sinks; (1, 2, 1) cuts
    the single kv head into query segments, so the sinks' per-task partial sums are combined too."""
    B, H, Hkv = shape
    _assert_sinks_match(_inputs(B, H, Hkv, 333, 333, 16, seed=11), PATTERNS[name])


@pytest.mark.parametrize("name", ["sink", "longformer", "bidir"])
def test_fused_sinks_shard_shaped(name):
    """A shard's queries against [globals | halo + local] keys at their true positions."""
    pattern, n = PATTERNS[name], 400
    q_pos = torch.arange(150, 281)
    k_pos = torch.cat([torch.arange(s, e) for s, e in pattern.kv_ranges(150, 281, n)])
    _assert_sinks_match(_inputs(2, 4, 2, len(q_pos), len(k_pos), 8, seed=12), pattern, q_pos, k_pos)


def test_fused_sinks_equal_the_join_after_the_kernel():
    """In-kernel sinks give what ``kernels.stats.apply_sinks`` gives joined after the kernel (the
    path every other backend takes): same out, lse, stats and gradients up to fp32 rounding."""
    pattern = PATTERNS["wide_sink"]
    qkv = [t.float() for t in _inputs(1, 4, 2, 300, 300, 16, seed=13)]
    sinks = _sinks(4).float()
    res = []
    for join_after in (False, True):
        q, k, v, s = (t.clone().requires_grad_() for t in (*qkv, sinks))
        if join_after:
            out, lse, st = fused.fused_attention(q, k, v, pattern, return_stats=True)
            out, lse, st = apply_sinks(out, lse, s, st)
        else:
            out, lse, st = fused.fused_attention(q, k, v, pattern, return_stats=True, sinks=s)
        loss = (out * torch.cos(out)).sum() + torch.sin(lse).sum()
        res.append((out, lse, st.m, st.max_logit, st.global_mass, st.sink_mass, *torch.autograd.grad(loss, (q, k, v, s))))
    for name, a, b in zip(SINK_NAMES, *res):
        # Both sides fp32: they differ by the order of a few roundings (sigmoid vs the online rescale).
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_fused_minus_inf_sink_is_no_sink():
    """A sink of −inf is a column of probability 0: the kernel starts that row from the empty state."""
    pattern = PATTERNS["sink"]
    q, k, v = (t.float() for t in _inputs(1, 2, 1, 130, 130, 8, seed=14))
    with_sink = fused.fused_attention(q, k, v, pattern, sinks=torch.tensor([float("-inf"), 0.5]))
    plain = fused.fused_attention(q, k, v, pattern)
    assert torch.equal(with_sink[0][:, 0], plain[0][:, 0]) and torch.equal(with_sink[1][:, 0], plain[1][:, 0])
    assert not torch.equal(with_sink[1][:, 1], plain[1][:, 1])


def test_fused_kernel_sink_only_row():
    """A row with no allowed key (``sparse_attention`` refuses it before the kernel, as the reference
    does; the kernel itself is called here) is all sink: out 0, lse s_h, and d s_h = dlse of the row."""
    pattern = Window(window_left=3)
    q, k, v = (t.float().contiguous() for t in _inputs(1, 2, 1, 2, 10, 8, seed=15))
    g = fused.geometry(q, k, pattern, torch.tensor([5, 100]), torch.arange(10))  # query 100 sees no key
    sinks, scale = torch.tensor([0.25, -1.5]), 8 ** -0.5
    out, lse = fused.extension().forward(q, k, v, sinks, *g.args(pattern), scale, False)
    assert torch.equal(out[0, :, 1], torch.zeros(2, 8)) and torch.equal(lse[0, :, 1], sinks)
    d_out, d_lse = torch.zeros_like(out), torch.zeros_like(lse)
    d_lse[0, :, 1] = torch.tensor([2.0, 3.0])  # only the empty row carries a gradient
    dq, dk, dv, ds = fused.extension().backward(q, k, v, sinks, d_out, out, lse, d_lse, *g.args(pattern), scale)
    assert torch.equal(ds, torch.tensor([2.0, 3.0])) and not dk.any() and not dv.any() and not dq.any()


def test_fused_sinks_fall_back_with_the_join():
    """Where the fused kernel does not apply (dilation), blocked runs and the sinks join after it."""
    pattern = Window(window_left=60, dilation=3, num_global=2)
    qkv = _inputs(1, 2, 2, 200, 200, 16, seed=16)
    sinks = _sinks(2)
    ref = _run_sinks("reference", qkv, sinks, pattern, None, None, torch.float64)
    got = _run_sinks("fused", qkv, sinks, pattern, None, None, torch.float32)
    for name, a, b in zip(SINK_NAMES, ref, got):
        torch.testing.assert_close(b.double(), a, atol=TOL, rtol=TOL, msg=lambda m, n=name: f"{n}: {m}")  # TOL: see above


# ---- packed documents inside the kernel (model.pattern.documents.document_rule) ----

DOC_NAMES = SINK_NAMES


def _docs(B, n, seed, sizes=(1, 5, 20, 63, 64, 65, 130)):
    """[B, n] nondecreasing ids, per row different: documents shorter than a tile, of exactly a tile,
    and longer, so boundaries fall inside tiles, on their edges and one off them."""
    g = torch.Generator().manual_seed(seed)
    docs = torch.zeros(B, n, dtype=torch.long)
    for b in range(B):
        pos, doc = 0, 0
        while pos < n:
            size = sizes[int(torch.randint(len(sizes), (1,), generator=g))]
            docs[b, pos:pos + size], pos, doc = doc, pos + size, doc + 1
    return docs


def _run_docs(backend, qkv, sinks, pattern, q_pos, k_pos, q_doc, k_doc, dtype):
    q, k, v = (t.to(dtype).requires_grad_() for t in qkv)
    s = None if sinks is None else sinks.to(dtype).requires_grad_()
    out, lse, st = sparse_attention(q, k, v, pattern, q_pos, k_pos, backend=backend, return_stats=True, sinks=s,
                                    q_doc=q_doc, k_doc=k_doc)
    finite = torch.isfinite(lse)  # a row the documents leave empty (a shard's partial) has lse −inf
    loss = (out * torch.cos(out)).sum() + torch.sin(torch.where(finite, lse, 0.0)).sum()
    grads = torch.autograd.grad(loss, (q, k, v) + ((s,) if s is not None else ()))
    sink_mass = st.sink_mass if st.sink_mass is not None else torch.zeros_like(lse)
    return (out, lse, st.m, st.max_logit, st.global_mass, sink_mass, *grads)


def _assert_docs_match(qkv, pattern, q_doc, k_doc, q_pos=None, k_pos=None, sinks=None, backend="fused"):
    calls = []
    real = fused.FusedAttention.apply
    with pytest.MonkeyPatch.context() as mp:  # the C++ kernel, not the blocked fallback, must run
        mp.setattr(fused.FusedAttention, "apply", lambda *a: calls.append(a[4][-1] is not None) or real(*a))
        got = _run_docs(backend, qkv, sinks, pattern, q_pos, k_pos, q_doc, k_doc, torch.float32)
    assert calls == [True], "the fused kernel did not run with the documents"
    ref = _run_docs("reference", qkv, sinks, pattern, q_pos, k_pos, q_doc, k_doc, torch.float64)
    for name, a, b in zip(DOC_NAMES, ref, got):
        # TOL: see above (fp32 kernel vs fp64 reference); a key of another document moves values by ~1e-2.
        torch.testing.assert_close(b.double(), a, atol=TOL, rtol=TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name", ["window", "sink", "wide_sink", "longformer", "bidir"])
@pytest.mark.parametrize("sinks_on", [False, True], ids=["nosinks", "sinks"])
def test_fused_documents_match_reference(name, sinks_on):
    """Ids differ per batch row; GQA (4 query heads on 2 kv heads) and, without sinks, B=1 with one kv
    head, whose query segments sum private dK/dV."""
    B, H, Hkv = (2, 4, 2) if sinks_on else (1, 2, 1)
    n = 333
    docs = _docs(B, n, seed=len(name))
    qkv = _inputs(B, H, Hkv, n, n, 16, seed=21)
    _assert_docs_match(qkv, PATTERNS[name], docs, docs, sinks=_sinks(H) if sinks_on else None)


@pytest.mark.parametrize("name", ["sink", "longformer", "bidir"])
def test_fused_documents_shard_shaped(name):
    """A shard's queries against [globals | halo + local] at true positions, ids gathered from the full row."""
    pattern, n = PATTERNS[name], 400
    q_pos = torch.arange(150, 281)
    k_pos = torch.cat([torch.arange(s, e) for s, e in pattern.kv_ranges(150, 281, n)])
    docs = _docs(2, n, seed=5)
    qkv = _inputs(2, 4, 2, len(q_pos), len(k_pos), 8, seed=22)
    # backend="auto" picks fused for fp32 bands on the CPU, documents or not.
    _assert_docs_match(qkv, pattern, docs[:, q_pos], docs[:, k_pos], q_pos, k_pos, sinks=_sinks(4), backend="auto")


def test_fused_documents_partial_with_empty_rows():
    """Queries against only their left halo (no globals): rows whose document starts inside the shard
    see no key here; the kernel gives out 0, lse −inf, m 0, mass 0 and zero gradients there."""
    pattern, n = PATTERNS["sink"], 400  # window 70: query 219 still reaches key 149
    q_pos, k_pos = torch.arange(150, 220), torch.arange(80, 150)
    docs = torch.zeros(1, n, dtype=torch.long)
    for cut in (100, 170, 200):
        docs[:, cut:] += 1
    qkv = _inputs(1, 2, 1, len(q_pos), len(k_pos), 8, seed=23)
    _assert_docs_match(qkv, pattern, docs[:, q_pos], docs[:, k_pos], q_pos, k_pos)
    out, lse, _ = sparse_attention(*(t.float() for t in qkv), pattern, q_pos, k_pos, backend="fused",
                                q_doc=docs[:, q_pos], k_doc=docs[:, k_pos])
    assert torch.isneginf(lse).any() and (out[torch.isneginf(lse)] == 0).all()


def test_fused_documents_unsorted_ids():
    """Ids that are not nondecreasing along positions (arbitrary labels, a document split in two)
    run in the fused kernel too: tiles are skipped by the id ranges computed from the ids."""
    n = 300
    g = torch.Generator().manual_seed(24)
    docs = torch.randint(0, 3, (2, n), generator=g) * 10 ** 10  # beyond int32: renumbered
    docs[:, 100:164] = 7  # one document across a whole tile: its tiles run unmasked
    qkv = _inputs(2, 2, 2, n, n, 8, seed=25)
    for name in ("sink", "longformer"):
        _assert_docs_match(qkv, PATTERNS[name], docs, docs, sinks=_sinks(2))


def test_cpu_features_are_read_from_cpuinfo(tmp_path):
    """kernels.cpu: the model name and the kernel-relevant flags of the first processor entry (an
    AVX-512/AMX Xeon and an AVX2-only EPYC, as /proc/cpuinfo writes them), and the build each runs; an
    unknown feature name is an error, not False."""
    xeon = tmp_path / "xeon"
    xeon.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum\nflags\t\t: fpu sse4_2 avx fma avx2 "
                    "avx512f avx512bw avx512vl avx512_bf16 amx_bf16 amx_tile\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    epyc = tmp_path / "epyc"
    epyc.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx fma avx2 sse4a\n")
    x, e = cpu.info(str(xeon)), cpu.info(str(epyc))
    assert x.model == "Intel(R) Xeon(R) Platinum" and x.has("amx_bf16") and x.has("avx512f")
    assert e.model == "AMD EPYC" and e.has("avx2") and not e.has("avx512f") and not e.has("amx_bf16")
    assert (x.fused_isa, x.fused_isas, e.fused_isa, e.fused_isas) == ("avx512", ("avx512", "avx2"), "avx2", ("avx2",))
    assert e.missing("avx512") == "avx512f avx512bw avx512vl" and x.missing("avx512") == ""
    assert "absent: avx512f" in cpu.describe(e, {}) and "fused kernel: avx512, bf16: avx512_bf16 vdpbf16ps" in cpu.describe(x, {})
    assert "fused kernel: avx2, bf16: fp32 kernel on copies" in cpu.describe(e, {})
    with pytest.raises(ValueError, match="feature: must be one of"):
        e.has("avx512")
