"""The pattern against its definition: mask, kv_ranges, block_layout, counts, config errors, top-k.

``allowed_bf`` below is an independent, loop-by-loop transcription of the binding semantics
(DESIGN.md, "The pattern is the one truth"); every derived quantity is checked against it or against
the dense mask that it has validated.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.pattern import Pattern, PatternError, TopKBlocks, from_config

WINDOWS = ("window", "longformer", "sink", "dilated")
POSITIONAL = (*WINDOWS, "dense", "strided", "bigbird", "union")


# --- the definition, transcribed -----------------------------------------------------------------

@functools.cache
def _random_blocks(part: Pattern, q_block: int, seq_len: int) -> frozenset[int]:
    return frozenset(int(b) for b in part.random_key_blocks(q_block, seq_len))


def rule_bf(cfg: dict, part: Pattern, i: int, j: int, n: int) -> bool:
    """The pattern-specific part for one (query i, key j); ``part`` only supplies BigBird's draw."""
    name = cfg["name"]
    if name == "dense":
        return True
    if name == "union":
        return any(allowed_bf(c, p, i, j, n) for c, p in zip(cfg["parts"], part.parts))
    if name == "strided":
        s = cfg["stride"]
        if cfg["variant"] == "strided":
            return abs(i - j) < s or (i - j) % s == 0
        return i // s == j // s or j % s >= s - cfg["summary"]
    left, right, d = cfg.get("window_left", 0), cfg.get("window_right", 0), cfg.get("dilation", 1)
    if i - left <= j <= i + right and (i - j) % d == 0:
        return True
    return name == "bigbird" and j // cfg["block_size"] in _random_blocks(part, i // cfg["block_size"], n)


def allowed_bf(cfg: dict, part: Pattern, i: int, j: int, n: int) -> bool:
    g, causal = cfg.get("num_global", 0), cfg["causal"]
    ok = rule_bf(cfg, part, i, j, n) or j < g or (not causal and i < g)
    return ok and (j <= i or not causal)


# --- strategies -----------------------------------------------------------------------------------

def _part_cfg(draw, name: str, causal: bool, n: int) -> dict:
    cfg = {"name": name, "causal": causal, "num_global": draw(st.integers(0, min(3, n - 1)))}
    if name in (*WINDOWS, "bigbird"):
        cfg["window_left"] = draw(st.integers(0, 30))
        cfg["window_right"] = 0 if causal else draw(st.integers(0, 30))
        cfg["dilation"] = draw(st.integers(2, 6)) if name == "dilated" else 1
    if name == "strided":
        cfg["stride"] = draw(st.integers(1, 20))
        cfg["variant"] = draw(st.sampled_from(["strided", "fixed"]))
        cfg["summary"] = draw(st.integers(1, cfg["stride"]))
    if name == "bigbird":
        cfg.update(random_blocks=draw(st.integers(0, 3)), block_size=draw(st.integers(1, 16)),
                   seed=draw(st.integers(0, 10**6)))
    return cfg


@st.composite
def pattern_cfgs(draw, names=POSITIONAL, max_len: int = 96):
    """(cfg, seq_len) for a random valid positional pattern."""
    n = draw(st.integers(2, max_len))
    name, causal = draw(st.sampled_from(names)), draw(st.booleans())
    if name != "union":
        return _part_cfg(draw, name, causal, n), n
    part_names = st.lists(st.sampled_from([*WINDOWS, "dense", "strided", "bigbird"]), min_size=1, max_size=3)
    parts = [_part_cfg(draw, p, causal, n) for p in draw(part_names)]
    return {"name": "union", "causal": causal, "num_global": draw(st.integers(0, min(2, n - 1))), "parts": parts}, n


@st.composite
def position_sets(draw, n: int) -> list[int]:
    """All positions, a non-contiguous unsorted subset, or shard-shaped [globals | range]."""
    kind = draw(st.sampled_from(["all", "subset", "shard"]))
    if kind == "all":
        return list(range(n))
    if kind == "subset":
        return draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=40, unique=True))
    g, a = draw(st.integers(0, min(3, n - 1))), draw(st.integers(0, n - 1))
    b = draw(st.integers(a + 1, n))
    return sorted(set(range(g)) | set(range(a, b)))


def _dense(p: Pattern, n: int) -> torch.Tensor:
    pos = torch.arange(n)
    return p.mask(pos, pos, n)


# --- 1. the seed example ----------------------------------------------------------------------------

def test_seed_example_sink_query_499():
    p = from_config({"name": "sink", "causal": True, "window_left": 2, "num_global": 1})
    assert p.keys_of(499, 1024) == [0, 497, 498, 499]
    assert p.num_keys(499, 1024) == 4
    row = p.mask(torch.tensor([499]), torch.arange(1024), 1024)[0]
    assert row.nonzero().flatten().tolist() == [0, 497, 498, 499]


# --- 2. mask == definition ---------------------------------------------------------------------------

@settings(max_examples=100)
@given(data=st.data())
def test_mask_matches_definition(data):
    cfg, n = data.draw(pattern_cfgs())
    p = from_config(cfg, seq_len=n)
    q_pos, k_pos = data.draw(position_sets(n)), data.draw(position_sets(n))
    got = p.mask(torch.tensor(q_pos), torch.tensor(k_pos), n)
    assert got.shape == (len(q_pos), len(k_pos)) and got.dtype == torch.bool
    want = [[allowed_bf(cfg, p, i, j, n) for j in k_pos] for i in q_pos]
    assert got.tolist() == want, f"{p!r} at seq_len={n}"


def test_union_globals_are_the_largest_parts():
    cfg = {"name": "union", "causal": True, "parts": [{"name": "sink", "window_left": 1, "num_global": 3},
                                                      {"name": "strided", "stride": 8, "num_global": 1}]}
    assert from_config(cfg).num_global == 3


# --- 3. kv_ranges: sorted, disjoint, covering, tight where bounded ---------------------------------

@pytest.mark.parametrize("names", [WINDOWS, ("dense", "strided", "bigbird", "union")], ids=["bounded", "unbounded"])
@settings(max_examples=100)
@given(data=st.data())
def test_kv_ranges_cover_and_are_tight(names, data):
    cfg, n = data.draw(pattern_cfgs(names, max_len=160))
    p = from_config(cfg, seq_len=n)
    qs = data.draw(st.integers(0, n - 1))
    qe = data.draw(st.integers(qs + 1, n))
    ranges = p.kv_ranges(qs, qe, n)
    flat = [x for r in ranges for x in r]
    assert all(s < e for s, e in ranges), ranges
    assert flat == sorted(flat) and len(set(flat)) == len(flat), f"not sorted/disjoint/merged: {ranges}"
    assert all(0 <= s and e <= n for s, e in ranges), ranges
    inside = torch.zeros(n, dtype=torch.bool)
    for s, e in ranges:
        inside[s:e] = True
    needed = p.mask(torch.arange(qs, qe), torch.arange(n), n).any(0)
    assert not (needed & ~inside).any(), f"missing keys {(needed & ~inside).nonzero().flatten().tolist()}"
    if cfg["name"] in WINDOWS:  # bounded: a shard receives nothing that none of its queries uses
        extra = inside & ~needed
        assert not extra.any(), f"{p!r} [{qs},{qe}) fetches unused keys {extra.nonzero().flatten().tolist()}"


def test_kv_ranges_of_a_shard_are_halo_plus_globals():
    p = from_config({"name": "sink", "causal": True, "window_left": 100, "num_global": 4})
    assert p.kv_ranges(512, 768, 1024) == [(0, 4), (412, 768)]
    p = from_config({"name": "longformer", "causal": False, "window_left": 3, "window_right": 5, "num_global": 2})
    assert p.kv_ranges(10, 20, 100) == [(0, 2), (7, 25)]
    assert p.kv_ranges(0, 20, 100) == [(0, 100)]  # a global query sees every key


def test_dilated_halo_skips_unreachable_keys():
    # left=5, d=2: the farthest key a query reaches is 4 back (5 is not a multiple of 2), so key 5
    # is needed by no query of [10, 20); a halo of 5 would send one useless key per layer.
    p = from_config({"name": "dilated", "causal": True, "window_left": 5, "dilation": 2})
    assert p.kv_ranges(10, 20, 40) == [(6, 20)]
    p = from_config({"name": "dilated", "causal": False, "window_left": 0, "window_right": 3, "dilation": 2})
    assert p.kv_ranges(0, 2, 10) == [(0, 4)]


@pytest.mark.parametrize("bad", [(-1, 4), (3, 3), (0, 11)])
def test_kv_ranges_rejects_bad_shard(bad):
    with pytest.raises(PatternError, match="q_start"):
        from_config({"name": "window", "window_left": 2}).kv_ranges(*bad, 10)


# --- 4. block_layout ⊇ mask, exact for plain windows -----------------------------------------------

@settings(max_examples=100)
@given(data=st.data())
def test_block_layout_covers_mask(data):
    cfg, n = data.draw(pattern_cfgs(max_len=160))
    block = data.draw(st.integers(2, 32).filter(lambda b: n % b != 0))
    p = from_config(cfg, seq_len=n)
    nb = -(-n // block)
    padded = torch.zeros(nb * block, nb * block, dtype=torch.bool)
    padded[:n, :n] = _dense(p, n)
    touched = padded.reshape(nb, block, nb, block).any(3).any(1)  # (nQB, nKB)
    layout = p.block_layout(n, block)
    assert layout.shape == (nb, nb)
    assert not (touched & ~layout).any(), f"{p!r}: layout misses blocks {(touched & ~layout).nonzero().tolist()}"
    if cfg["name"] in WINDOWS and cfg["dilation"] == 1:
        assert torch.equal(layout, touched), f"{p!r}: layout has empty blocks {(layout & ~touched).nonzero().tolist()}"


# --- 5. counts agree with the dense mask ------------------------------------------------------------

@settings(max_examples=60)
@given(data=st.data())
def test_counts_match_dense_mask(data):
    cfg, n = data.draw(pattern_cfgs(max_len=200))
    p = from_config(cfg, seq_len=n)
    dense = _dense(p, n)
    assert torch.equal(p.key_counts(n, chunk=data.draw(st.integers(1, 64))), dense.sum(1))
    assert p.density(n) == pytest.approx(dense.sum().item() / n**2, abs=1e-12)  # same integer ratio
    for i in data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=5)):
        assert p.num_keys(i, n) == int(dense[i].sum())
        assert p.keys_of(i, n) == dense[i].nonzero().flatten().tolist()


# --- 8. invalid settings name their key ---------------------------------------------------------------

BAD = [
    ({"name": "window", "window_left": -1}, None, "window_left"),
    ({"name": "longformer", "causal": False, "window_right": -2}, None, "window_right"),
    ({"name": "sink", "causal": True, "window_right": 3}, None, "window_right"),
    ({"name": "sink", "num_global": 8}, 8, "num_global"),
    ({"name": "sink", "num_global": 9}, 8, "num_global"),
    ({"name": "sink", "num_global": -1}, None, "num_global"),
    ({"name": "nope"}, None, "name"),
    ({"causal": True}, None, "name"),
    ({"name": "topk", "top_k": 0}, None, "top_k"),
    ({"name": "topk", "block_size": 0}, None, "block_size"),
    ({"name": "topk", "num_global": 65, "block_size": 64}, None, "num_global"),
    ({"name": "topk", "select": "token"}, None, "select"),
    ({"name": "topk", "select": 1}, None, "select"),
    ({"name": "bigbird", "block_size": 0}, None, "block_size"),
    ({"name": "bigbird", "block_size": -4}, None, "block_size"),
    ({"name": "bigbird", "random_blocks": -1}, None, "random_blocks"),
    ({"name": "dilated", "dilation": 0}, None, "dilation"),
    ({"name": "strided", "stride": 0}, None, "stride"),
    ({"name": "strided", "variant": "diagonal"}, None, "variant"),
    ({"name": "strided", "stride": 4, "summary": 5}, None, "summary"),
    ({"name": "sink", "window_size": 3}, None, "window_size"),
    ({"name": "sink", "window_left": 2.5}, None, "window_left"),
    ({"name": "sink", "window_left": "2"}, None, "window_left"),
    ({"name": "sink", "num_global": True}, None, "num_global"),
    ({"name": "strided", "stride": 4.0}, None, "stride"),
    ({"name": "sink", "causal": "yes"}, None, "causal"),
    ({"name": "union", "parts": []}, None, "parts"),
    ({"name": "union", "causal": True, "parts": [{"name": "longformer", "causal": False}]}, None, "parts"),
    ({"name": "union", "parts": [{"name": "window", "window_left": -3}]}, None, "window_left"),
    ({"name": "union", "num_global": "2", "parts": [{"name": "sink"}]}, None, "num_global"),
    ({"name": "union", "causal": True, "num_global": 4, "parts": [{"name": "sink", "window_left": 1}]}, 4, "num_global"),
]


@pytest.mark.parametrize("cfg,seq_len,key", BAD, ids=[f"{c.get('name')}-{k}-{i}" for i, (c, _, k) in enumerate(BAD)])
def test_invalid_setting_names_its_key(cfg, seq_len, key):
    with pytest.raises(PatternError, match=rf"^attention\.{re.escape(key)}:") as err:
        from_config(cfg, seq_len=seq_len)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("query", [-1, 1024])
def test_keys_of_rejects_out_of_range_query(query):
    with pytest.raises(PatternError, match="query"):
        from_config({"name": "sink", "window_left": 2}).keys_of(query, 1024)


# --- 9. content-based top-k blocks ------------------------------------------------------------------

def _block_scores(q: torch.Tensor, k: torch.Tensor, q_pos: list[int], k_pos: list[int], bs: int, causal: bool):
    """{(b, h, qb, kb): summary(q over qb)·mean(k over kb)} in float64, GQA by head // group. The
    query summary: the mean of the block's queries, or (causal) its first query, which is all a
    causal query may depend on."""
    group = q.shape[1] // k.shape[1]
    qbs, kbs = sorted({i // bs for i in q_pos}), sorted({j // bs for j in k_pos})
    out = {}
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for qb in qbs:
                rows = q[b, h, [a for a, i in enumerate(q_pos) if i // bs == qb]].double()
                qm = rows[0] if causal else rows.mean(0)
                for kb in kbs:
                    km = k[b, h // group, [c for c, j in enumerate(k_pos) if j // bs == kb]].double().mean(0)
                    out[b, h, qb, kb] = float(qm @ km)
    return out


def _query_scores(q: torch.Tensor, k: torch.Tensor, k_pos: list[int], bs: int):
    """{(b, h, a, kb): q[a]·mean(k over kb)} in float64 (select=query: each query ranks the blocks)."""
    group = q.shape[1] // k.shape[1]
    out = {}
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for kb in sorted({j // bs for j in k_pos}):
                km = k[b, h // group, [c for c, j in enumerate(k_pos) if j // bs == kb]].double().mean(0)
                for a, s in enumerate((q[b, h].double() @ km).tolist()):
                    out[b, h, a, kb] = s
    return out


@settings(max_examples=60)
@given(data=st.data())
def test_topk_content_mask_invariants(data):
    n, bs = data.draw(st.integers(2, 72)), data.draw(st.integers(1, 12))
    p = TopKBlocks(causal=data.draw(st.booleans()), top_k=data.draw(st.integers(1, 5)), block_size=bs,
                   select=data.draw(st.sampled_from(["block", "query"])))
    qs = data.draw(st.integers(0, n - 1))
    q_pos, k_pos = list(range(qs, data.draw(st.integers(qs + 1, n)))), data.draw(position_sets(n))
    hkv = data.draw(st.sampled_from([1, 2, 4]))  # 2: query heads 0,1 share kv head 0 (GQA)
    q, k = torch.randn(1, 4, len(q_pos), 4), torch.randn(1, hkv, len(k_pos), 4)
    m = p.content_mask(q, k, torch.tensor(q_pos), torch.tensor(k_pos))
    assert m.shape == (1, 4, len(q_pos), len(k_pos))
    ml = m.tolist()
    scores = _query_scores(q, k, k_pos, bs) if p.per_query else _block_scores(q, k, q_pos, k_pos, bs, p.causal)
    for b in range(1):
        for h in range(4):
            for a, i in enumerate(q_pos):
                for c, j in enumerate(k_pos):
                    if p.causal and j > i:
                        assert not ml[b][h][a][c], f"query {i} sees future key {j}"
                    elif j // bs in (0, i // bs):
                        assert ml[b][h][a][c], f"query {i} misses key {j} of its own block or block 0"
            if p.per_query:  # each query on its own: its top_k candidates by its own scores
                for a, i in enumerate(q_pos):
                    _check_choice(p, ml[b][h], [a], i // bs, k_pos, {kb: scores.get((b, h, a, kb)) for kb in range(n)})
                continue
            for qb in sorted({i // bs for i in q_pos}):
                rows = [a for a, i in enumerate(q_pos) if i // bs == qb]
                _check_choice(p, ml[b][h], rows, qb, k_pos, {kb: scores.get((b, h, qb, kb)) for kb in range(n)})


def _check_choice(p: TopKBlocks, ml: list, rows: list[int], qb: int, k_pos: list[int], scores: dict) -> None:
    """The query rows ``rows`` of the mask ``ml`` [Q][K] (one query block, or one query with
    select=query) see exactly the top_k best candidate blocks by ``scores`` (key block -> score), whole."""
    bs = p.block_size
    cands = {j // bs for j in k_pos if j // bs not in (0, qb) and (j // bs < qb or not p.causal)}
    seen = {}  # key block -> is it visible to every query of the rows
    for kb in cands:
        cells = [ml[a][c] for a in rows for c, j in enumerate(k_pos) if j // bs == kb]
        if any(cells):
            seen[kb] = all(cells)
    assert len(seen) == min(p.top_k, len(cands)), (qb, rows, sorted(cands), seen)
    assert all(seen.values()), f"a chosen block is only partly visible: {seen}"
    rest = [scores[kb] for kb in cands - set(seen)]
    if seen and rest:  # 1e-5: the pattern scores block means in fp32, this check in fp64
        assert min(scores[kb] for kb in seen) >= max(rest) - 1e-5


@pytest.mark.parametrize("causal", [True, False])
def test_topk_select_blocks_stays_in_allowed_blocks(causal):
    # 6 key blocks, top_k larger than any candidate set: every allowed block and nothing else.
    p = TopKBlocks(causal=causal, top_k=10, block_size=4)
    ids = torch.arange(6)
    chosen = p.select_blocks(torch.randn(1, 2, 6, 3), torch.randn(1, 2, 6, 3), ids, ids)  # (B, H, nQ, nK)
    allowed = ids[None, :] <= ids[:, None] if causal else torch.ones(6, 6, dtype=torch.bool)
    assert torch.equal(chosen, allowed.expand(1, 2, 6, 6))


@pytest.mark.parametrize("select", ["block", "query"])
def test_topk_picks_the_aligned_block(select):
    bs, n, d = 8, 64, 4
    q = torch.zeros(1, 1, n, d)
    q[..., 0] = 1.0  # every query points along e0
    k = 0.1 * torch.randn(1, 1, n, d)
    k[0, 0, 5 * bs : 6 * bs, 0] = 10.0  # key block 5 is hugely aligned with every query
    k[0, 0, 3 * bs : 4 * bs, 0] = -10.0  # key block 3 is anti-aligned
    pos = torch.arange(n)
    for causal in (True, False):
        m = TopKBlocks(causal=causal, top_k=1, block_size=bs, select=select).content_mask(q, k, pos, pos)[0, 0]
        blocks = m.reshape(n // bs, bs, n // bs, bs).any(3).any(1)  # (nQB, nKB)
        for qb in range(n // bs):
            picked = set(blocks[qb].nonzero().flatten().tolist()) - {0, qb}
            if qb != 5 and (qb > 5 or not causal):
                assert picked == {5}, (causal, qb, picked)
            elif qb in (0, 1):  # no candidate besides the forced blocks
                assert picked == set(), (causal, qb, picked)
            else:  # one pick, never the future block 5 when causal, never the anti-aligned block 3
                assert len(picked) == 1 and picked.isdisjoint({3, 5}), (causal, qb, picked)


@pytest.mark.parametrize("causal", [True, False])
def test_topk_per_query_selection_differs_from_per_block(causal):
    """Crafted: in query block 3 the first query points at key block 1, the others at key block 2.
    select=block (causal: ranked by the first query; bidirectional: by the mean, which the three
    later queries dominate) gives every query of the block one block; select=query gives each its own."""
    bs, n, d = 4, 32, 4
    q = torch.zeros(1, 1, n, d)
    k = 0.01 * torch.randn(1, 1, n, d, generator=torch.Generator().manual_seed(0))
    k[0, 0, 1 * bs:2 * bs, 0] = 1.0  # key block 1 along e0
    k[0, 0, 2 * bs:3 * bs, 1] = 1.0  # key block 2 along e1
    q[0, 0, 3 * bs, 0] = 1.0  # the first query of block 3 wants block 1
    q[0, 0, 3 * bs + 1:4 * bs, 1] = 1.0  # the other three want block 2
    pos = torch.arange(n)

    def picked(select):
        m = TopKBlocks(causal=causal, top_k=1, block_size=bs, select=select).content_mask(q, k, pos, pos)[0, 0]
        blocks = m[3 * bs:4 * bs].reshape(bs, n // bs, bs).any(-1)  # (queries of block 3, key blocks)
        return [set(row.nonzero().flatten().tolist()) - {0, 3} for row in blocks]

    assert picked("block") == [{1 if causal else 2}] * bs
    assert picked("query") == [{1}, {2}, {2}, {2}]


@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("select", ["block", "query"])
def test_topk_later_tokens_never_change_earlier_outputs(select, backend):
    """Causal top-k: a change to q, k, v at positions >= t leaves the output (and lse) of every query
    before t as it was — the selection reads nothing later (select=block ranks by the block's first
    query, select=query by the query itself, over blocks before its own) — and does change later ones."""
    from kernels import sparse_attention

    p = TopKBlocks(causal=True, top_k=2, block_size=8, num_global=2, select=select)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 70, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    for t in (5, 8, 29, 40, 63):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t:] += 3 * torch.randn(x[:, :, t:].shape, generator=gen, dtype=torch.float64)
        a = sparse_attention(q, k, v, p, backend=backend)
        b = sparse_attention(q2, k2, v2, p, backend=backend)
        # fp64: the earlier rows see the same keys; only a tile's width (its later queries' blocks) and so
        # the summation order may change: ~1e-16, far below what one more key moves (~1e-2)
        torch.testing.assert_close(b.out[:, :, :t], a.out[:, :, :t], atol=1e-12, rtol=0)
        torch.testing.assert_close(b.lse[:, :, :t], a.lse[:, :, :t], atol=1e-12, rtol=0)
        assert (b.out[:, :, t:] - a.out[:, :, t:]).abs().max() > 1e-2


def test_topk_query_choice_in_chunks_is_the_same(monkeypatch):
    """select=query scores SCORE_ELEMS at a time: tiny chunks give the same choice, and the union per
    block is what content_mask lets some query of the block see."""
    import model.pattern.topk as topk
    from model.pattern import block_mean, union_per_block

    p = TopKBlocks(causal=True, top_k=3, block_size=4, num_global=1, select="query")
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 4, 52, 8, generator=gen), torch.randn(2, 2, 52, 8, generator=gen)
    pos = torch.arange(52)
    ids, inv = torch.unique(pos // 4, return_inverse=True)
    k_means = block_mean(k.repeat_interleave(2, dim=1), inv, len(ids))
    whole = p.query_choice(q, pos // 4, k_means, ids)
    monkeypatch.setattr(topk, "SCORE_ELEMS", 7)
    assert torch.equal(p.query_choice(q, pos // 4, k_means, ids), whole)
    m = p.content_mask(q, k, pos, pos)  # (B, H, Q, K)
    seen = m.reshape(2, 4, len(ids), 4, len(ids), 4).any(-1).any(3)  # (B, H, query block, key block)
    assert torch.equal(union_per_block(whole, inv, len(ids), len(ids)), seen)
    assert torch.equal(p.block_choice(q, inv, ids, k_means, ids), seen)


def test_union_built_in_code_counts_its_parts_globals_and_reach():
    """The union's rules live in the pattern (not in from_config): globals are the largest of the
    parts', the local reach the widest."""
    from model.pattern import PatternUnion, Strided, Window

    u = PatternUnion(parts=(Window(window_left=4, num_global=3), Strided(stride=8)))
    assert u.num_global == 3
    assert u.kv_ranges(10, 11, 20)[0] == (0, 11)  # globals, window and strided offsets merged
    assert u.local_reach() == (7, 0) and Window(causal=False, window_left=2, window_right=5).local_reach() == (2, 5)
