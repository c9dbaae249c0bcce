"""Learned sink logits and document masking in the kernels, against the fp64 reference.

The reference computes the sink as a real extra softmax column and the document rule on the dense
mask; the blocked kernel joins the sink afterwards from (out, lse) and gathers only the keys each
query block's documents allow. So equal results check both the closed form and the narrowed plans.
"""

from __future__ import annotations

import pytest
import torch

from kernels import sparse_attention
from kernels.stats import head_summary, head_sums
from model.pattern import Dense, Window
from model.pattern.documents import document_rule
from tests.test_kernels import PATTERNS

# fp64 in, fp64 accumulated on both sides: they differ only by summation order (~1e-15), so 1e-10
# still catches one mis-masked key or a wrong sink weight (each moves values by ~1e-2).
TOL = 1e-10
FIELDS = ("out", "lse", "m", "max_logit", "global_mass", "sink_mass", "dq", "dk", "dv", "dsinks")


def random_docs(B: int, n: int, seed: int, short: int = 40, long: int = 200) -> torch.Tensor:
    """[B, n] ascending document ids: a mix of documents shorter than a block (1..short) and longer ones."""
    g = torch.Generator().manual_seed(seed)
    docs = torch.zeros(B, n, dtype=torch.long)
    for b in range(B):
        pos, doc = 0, 0
        while pos < n:
            size = int(torch.randint(1, short if torch.rand(1, generator=g) < 0.6 else long, (1,), generator=g))
            docs[b, pos:pos + size] = doc
            pos, doc = pos + size, doc + 1
    return docs


def _inputs(B, H, Hkv, Q, K, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
    return make(B, H, Q, D), make(B, Hkv, K, D), make(B, Hkv, K, D), make(H)


def _run(backend, q, k, v, sinks, pattern, q_doc, k_doc, q_pos=None, k_pos=None, seq_len=None):
    out, lse, st = sparse_attention(q, k, v, pattern, q_pos, k_pos, backend=backend, return_stats=True,
                                    seq_len=seq_len, sinks=sinks, q_doc=q_doc, k_doc=k_doc)
    finite = torch.isfinite(lse)  # a row with no key (only in partials without sinks) has lse = -inf
    loss = (out * torch.cos(out)).sum() + torch.sin(torch.where(finite, lse, 0.0)).sum()
    inputs = (q, k, v) + ((sinks,) if sinks is not None else ())
    grads = torch.autograd.grad(loss, inputs)
    sink_mass = st.sink_mass if st.sink_mass is not None else torch.zeros_like(lse)
    return (out, lse, st.m, st.max_logit, st.global_mass, sink_mass, *grads)


def _assert_match(*args, **kwargs):
    ref = _run("reference", *args, **kwargs)
    got = _run("blocked", *args, **kwargs)
    for name, a, b in zip(FIELDS, ref, got):
        torch.testing.assert_close(b, a, atol=TOL, rtol=TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_sinks_and_documents_match_reference(name):
    pattern, n = PATTERNS[name], 261  # not a multiple of the block: padded rows carry documents too
    q, k, v, sinks = _inputs(2, 4, 2, n, n, seed=len(name))
    docs = random_docs(2, n, seed=len(name))
    _assert_match(q, k, v, sinks, pattern, docs, docs)


@pytest.mark.parametrize("name", ["sink", "longformer", "dense"])
@pytest.mark.parametrize("what", ["sinks", "docs"])
def test_each_feature_alone(name, what):
    q, k, v, sinks = _inputs(1, 4, 2, 260, 260, seed=3)
    docs = random_docs(1, 260, seed=5)
    if what == "sinks":
        _assert_match(q, k, v, sinks, PATTERNS[name], None, None)
    else:
        _assert_match(q, k, v, None, PATTERNS[name], docs, docs)


@pytest.mark.parametrize("name", ["sink", "longformer", "bigbird", "dilated_bidir"])
@pytest.mark.parametrize("sinks_on", [True, False], ids=["sinks", "nosinks"])
def test_shard_partial_over_remote_keys(name, sinks_on):
    """Queries of a shard against only its left/right halo and globals — what a rank computes over the
    keys it received (here without the globals, which would keep every row non-empty). Documents end
    inside the halos, so some queries have no key at all here
    (lse -inf, out 0) and must merge as nothing; without sinks that is what both backends return."""
    pattern, n = PATTERNS[name], 400
    q_lo, q_hi = 150, 281
    ranges = pattern.kv_ranges(q_lo, q_hi, n)
    k_pos = torch.cat([torch.arange(s, e) for s, e in ranges])
    k_pos = k_pos[((k_pos < q_lo) | (k_pos >= q_hi)) & (k_pos >= pattern.num_global)]  # the halos only
    q_pos = torch.arange(q_lo, q_hi)
    q_pos = q_pos[pattern.mask(q_pos, k_pos, n).any(1)]  # the rows with a pattern key here, as a rank computes
    docs = torch.zeros(1, n, dtype=torch.long)
    for cut in (60, 130, 140, 160, 275, 290):  # boundaries inside both halos and inside the shard
        docs[:, cut:] += 1
    q, k, v, sinks = _inputs(1, 4, 2, len(q_pos), len(k_pos), seed=11)
    _assert_match(q, k, v, sinks if sinks_on else None, pattern, docs[:, q_pos], docs[:, k_pos], q_pos, k_pos,
                  seq_len=n)
    if not sinks_on:
        out, lse, _ = sparse_attention(q, k, v, pattern, q_pos, k_pos, backend="blocked", seq_len=n,
                                    q_doc=docs[:, q_pos], k_doc=docs[:, k_pos])
        assert torch.isneginf(lse).any(), "the case must contain rows left empty by the documents"
        assert (out[torch.isneginf(lse)] == 0).all()


def test_sink_limits():
    """A sink at -inf changes nothing; a very large one takes all the mass (out -> 0, lse -> s)."""
    pattern = PATTERNS["sink"]
    q, k, v, _ = _inputs(1, 2, 2, 150, 150, seed=2)
    base_out, base_lse, _ = sparse_attention(q, k, v, pattern, backend="blocked")
    out, lse, _ = sparse_attention(q, k, v, pattern, backend="blocked", sinks=torch.full((2,), float("-inf")))
    torch.testing.assert_close(out, base_out, atol=0, rtol=0)  # sigmoid(+inf) is exactly 1
    torch.testing.assert_close(lse, base_lse, atol=0, rtol=0)
    out, lse, _ = sparse_attention(q, k, v, pattern, backend="blocked", sinks=torch.full((2,), 60.0, dtype=torch.float64))
    assert out.abs().max() < 1e-15 and torch.allclose(lse, torch.full_like(lse, 60.0))  # e^-50 of the keys left


def test_sink_mass_and_entropy_include_the_sink():
    pattern = PATTERNS["sink"]
    q, k, v, sinks = _inputs(2, 4, 2, 200, 200, seed=5)
    _, lse, st = sparse_attention(q, k, v, pattern, backend="blocked", return_stats=True, sinks=sinks)
    summ = head_summary(head_sums(lse, st))
    mask = pattern.mask(torch.arange(200), torch.arange(200))
    s = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, 1)).detach() / 4.0
    s = torch.cat([s.masked_fill(~mask, float("-inf")), sinks.detach()[None, :, None, None].expand(2, 4, 200, 1)], -1)
    p = torch.softmax(s, -1)
    torch.testing.assert_close(summ["sink_mass"], p[..., -1].mean(dim=(0, 2)), atol=TOL, rtol=TOL)
    torch.testing.assert_close(summ["entropy"], -torch.special.xlogy(p, p).sum(-1).mean(dim=(0, 2)), atol=TOL, rtol=TOL)
    torch.testing.assert_close(summ["global_mass"], p[..., : pattern.num_global].sum(-1).mean(dim=(0, 2)), atol=TOL,
                               rtol=TOL)
    assert torch.equal(summ["max_logit"], torch.maximum(s[..., :-1].amax(dim=(0, 2, 3)), sinks.detach()))


def test_short_documents_gather_fewer_keys():
    """The blocked plan skips keys no query of a block can see: with 64-token documents a dense
    causal layer gathers at most (64 + BLOCK + globals) keys per block instead of the whole prefix."""
    from kernels.blocked_docs import doc_plan
    from kernels.blocked_plan import BLOCK

    n, pattern = 1024, Dense(causal=True, num_global=2)
    q, k = torch.zeros(1, 2, n, 8), torch.zeros(1, 2, n, 8)
    docs = (torch.arange(n) // 64)[None]
    plan = doc_plan(pattern, q, k, torch.arange(n), torch.arange(n), docs, docs, n)
    gathered = [c.idx.shape[-1] for c in plan.chunks]
    assert max(gathered) <= 64 + BLOCK + 2, gathered
    # the documents, not the pattern, did it: without them the last block gathers all n keys
    assert pattern.kv_ranges(n - BLOCK, n, n) == [(0, n)]


def test_document_rule_globals():
    causal, bidir = Window(window_left=5, num_global=2), Window(causal=False, window_left=5, window_right=5, num_global=2)
    qi, kj = torch.tensor([[1], [7]]), torch.tensor([[0, 1, 7]])
    qd, kd = torch.tensor([[0], [1]]), torch.tensor([[0, 0, 1]])
    assert document_rule(causal, qi, kj, qd, kd).tolist() == [[True, True, False], [True, True, True]]
    qd = torch.tensor([[5], [1]])  # a global query in another document
    assert document_rule(causal, qi, kj, qd, kd).tolist() == [[True, True, False], [True, True, True]]
    assert document_rule(bidir, qi, kj, qd, kd).tolist() == [[True, True, True], [True, True, True]]


@pytest.mark.parametrize("name", ["sink", "bigbird_bidir"])  # a traced mask_mod and a table one
def test_flex_forward_with_documents_and_sinks(name):
    """CPU FlexAttention runs forward only: out and lse against the reference (traced and table mask_mod)."""
    from kernels.flex import flex_available

    if not flex_available():
        pytest.skip("FlexAttention unavailable in this torch")
    pattern, n = PATTERNS[name], 200
    q, k, v, sinks = (t.detach().float() for t in _inputs(2, 4, 2, n, n, seed=7))
    docs = random_docs(2, n, seed=9)
    ref = sparse_attention(q, k, v, pattern, backend="reference", sinks=sinks, q_doc=docs, k_doc=docs)
    got = sparse_attention(q, k, v, pattern, backend="flex", sinks=sinks, q_doc=docs, k_doc=docs)
    for a, b in zip(ref, got):  # fp32 on both sides, ~1e-6 relative rounding
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_bad_document_ids_are_one_line_errors():
    q, k, v, sinks = _inputs(1, 2, 2, 10, 10)
    with pytest.raises(ValueError, match=r"q_doc, k_doc: must be \[B, Q\]"):
        sparse_attention(q, k, v, Dense(), q_doc=torch.zeros(1, 9, dtype=torch.long), k_doc=torch.zeros(1, 10))
    with pytest.raises(ValueError, match="both queries and keys"):
        sparse_attention(q, k, v, Dense(), q_doc=torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"sinks: must be \[H\]"):
        sparse_attention(q, k, v, Dense(), sinks=torch.zeros(3))


# --- the model: sink parameters, documents and per-document rotary positions ------------------------

def _tiny(sink_logits: bool, pattern):
    from model.transformer import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, sink_logits=sink_logits)
    return Transformer(cfg, pattern).double()


def test_model_sinks_are_per_layer_parameters_that_learn():
    model = _tiny(True, Window(window_left=8, num_global=1))
    sinks = [b.attn.sinks for b in model.blocks]
    assert all(s.shape == (4,) and torch.equal(s, torch.zeros(4, dtype=s.dtype)) for s in sinks)  # initial 0.0
    tokens = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    out = model(tokens, targets=tokens, return_stats=True)
    out.loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in sinks)
    # at initialisation every score is ~0, so the sink (logit 0) takes ~1/(keys + 1) of the mass
    assert all(float(st["sink_mass_sum"].sum()) > 0 for st in out.stats)


@pytest.mark.parametrize("pattern", [Window(window_left=6), Dense()], ids=["window", "dense"])
def test_packed_document_equals_the_document_alone(pattern):
    """With document masking and rotary positions restarting per document, the second document of a
    packed row gives the logits it gives alone (the pattern depends only on offsets j − i here)."""
    model = _tiny(True, pattern)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, 64, (1, 13), generator=g), torch.randint(0, 64, (1, 19), generator=g)
    packed = torch.cat([a, b], 1)
    docs = torch.tensor([[0] * 13 + [1] * 19])
    rope = torch.cat([torch.arange(13), torch.arange(19)])
    both = model(packed, doc_ids=docs, rope_positions=rope[None]).logits
    alone = model(b).logits
    torch.testing.assert_close(both[:, 13:], alone, atol=1e-10, rtol=1e-10)  # fp64: summation order only
    # without the masking the second document sees the first: a different result
    assert not torch.allclose(model(packed, rope_positions=rope).logits[:, 13:], alone, atol=1e-3)


@pytest.mark.parametrize("name", ["sink", "longformer"])
def test_documents_with_many_chunks(name, monkeypatch):
    """Tiny chunks: document-narrowed window plans keep the band form, chunk by chunk, with margins."""
    import kernels.blocked as blocked
    import kernels.blocked_docs as blocked_docs
    import kernels.blocked_plan as blocked_plan

    monkeypatch.setattr(blocked_plan, "CHUNK_ELEMS", 1 << 15)
    blocked.clear_caches()  # plans memoised with the real CHUNK_ELEMS must not be reused
    q, k, v, sinks = _inputs(1, 2, 2, 700, 700, D=8, seed=13)
    docs = random_docs(1, 700, seed=13, short=100, long=400)
    plan = blocked_docs.doc_plan(PATTERNS[name], q, k, torch.arange(700), torch.arange(700), docs, docs, 700)
    assert len(plan.chunks) > 2 and any(c.band is not None for c in plan.chunks)
    _assert_match(q, k, v, sinks, PATTERNS[name], docs, docs)  # fp64: summation order only, see TOL
    blocked.clear_caches()  # nor these tiny-chunk plans by later tests


def test_no_future_leak_with_sinks_and_documents():
    """clm: with sinks, document masking and per-document positions, the logits at positions < t do
    not change when every token from t on (and so the later document ids) changes."""
    from trainer.data.sampling import document_positions

    model = _tiny(True, Window(window_left=10, num_global=2))
    g = torch.Generator().manual_seed(4)
    a = torch.randint(0, 8, (1, 60), generator=g)  # small vocabulary: separators (token 0) are frequent
    b = a.clone()
    b[:, 37:] = torch.randint(0, 8, (1, 23), generator=g)
    outs = []
    for tokens in (a, b):
        docs, rope = document_positions(tokens)
        outs.append(model(tokens, doc_ids=docs, rope_positions=rope).logits)
    # fp64: the later documents may change which keys a query block gathers (summation order), ~1e-16;
    # a leak of one later token moves logits by far more than 1e-12
    torch.testing.assert_close(outs[1][:, :37], outs[0][:, :37], atol=1e-12, rtol=1e-12)
    assert not torch.allclose(outs[1][:, 37:], outs[0][:, 37:])
