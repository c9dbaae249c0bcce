"""model.global_rope=fixed: the global keys at a fixed rotary distance, as a second partial merged by LSE.

The oracle here is this file's own: a float64 dense score matrix built with the two rotary rules —
the query at its position for keys it sees by its window, at g − 1 + D for the keys it sees only
because they are global (outside its window, or in another document) — masked, softmaxed with the
sink column, and multiplied by v. Against it: the kernels (every CPU backend of the local part, the
decode cache), the model's Attention module (forward and gradients), sequence parallelism (SP=2, 3
against one device, the bytes of the global keys), and ``position`` bit for bit as before.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels import attend
from kernels.contract import AttnCall
from kernels.global_part import local_part
from model.attention import Attention, local_attention
from model.decode import generate
from model.pattern import Dense, PatternUnion, Strided, TopKBlocks, Window
from model.transformer import ModelConfig, Transformer
from tests.mp_utils import run_workers
from tests.test_sinks_docs import random_docs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

THETA = 10000.0


def rotate(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """fp64 rotary of x [..., T, D] at positions pos [T] (the half-split layout), written out here."""
    D = x.shape[-1]
    ang = pos.double()[:, None] * THETA ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (T, D/2)
    x1, x2 = x.double().chunk(2, dim=-1)
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], dim=-1)


def dense_reference(q_raw, k_raw, v, left, g, distance, sinks=None, docs=None):
    """fp64 (out [B, H, T, D], lse [B, H, T]) of a causal sink pattern (window ``left`` + g globals)
    with the global keys outside a query's window (or document) at the fixed rotary distance."""
    B, H, T, D = q_raw.shape
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    window = (j >= i - left) & (j <= i)  # (T, T): the local rule, self included
    same = torch.ones(B, T, T, dtype=torch.bool) if docs is None else docs[:, :, None] == docs[:, None, :]
    local = window[None] & same  # (B, T, T): seen by the window, in the query's document
    seen = local | ((j < g) & (j <= i))[None]  # globals: every later query, across documents
    fixed = seen & ~local  # seen only because global: the fixed distance
    rep = H // k_raw.shape[1]
    pos = torch.arange(T)
    k = rotate(k_raw, pos).repeat_interleave(rep, 1)
    s_pos = torch.einsum("bhqd,bhkd->bhqk", rotate(q_raw, pos), k)
    s_fix = torch.einsum("bhqd,bhkd->bhqk", rotate(q_raw, torch.full((T,), g - 1 + distance)), k)
    s = torch.where(fixed[:, None], s_fix, s_pos) / math.sqrt(D)
    s = s.masked_fill(~seen[:, None], float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double()[None, :, None, None].expand(B, H, T, 1)], dim=-1)
    p = torch.softmax(s, dim=-1)[..., :T]
    return torch.einsum("bhqk,bhkd->bhqd", p, v.double().repeat_interleave(rep, 1)), torch.logsumexp(s, dim=-1)


def _raw(B=2, H=4, Hkv=2, T=70, D=16, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, D, generator=gen, dtype=dtype).requires_grad_() for h in (H, Hkv, Hkv)]


# --- the kernels ----------------------------------------------------------------------------------

# fp64 throughout, the same products in another order (LSE merge vs one softmax): ~1e-14; a key on
# the wrong side of the rule changes outputs by ~1e-1.
TOL64 = 1e-10


@pytest.mark.parametrize("backend", ["reference", "blocked"])
@pytest.mark.parametrize("sinks,docs", [(False, False), (True, False), (False, True), (True, True)])
def test_attend_equals_dense_reference(backend, sinks, docs):
    """attend with q_global == the fp64 dense oracle: out, lse and the gradients of q, q_global, k, v, sinks."""
    left, g, dist, T = 9, 5, 3, 70
    q_raw, k_raw, v = _raw(T=T)
    s = torch.randn(4, dtype=torch.float64, requires_grad=True) if sinks else None
    d = random_docs(2, T, 1, short=10, long=30) if docs else None
    pos = torch.arange(T)
    q, qg, k = rotate(q_raw, pos), rotate(q_raw, torch.full((T,), g - 1 + dist)), rotate(k_raw, pos)
    q, qg, k = (x.detach().requires_grad_() for x in (q, qg, k))
    res = attend(q, k, v, Window(window_left=left, num_global=g), AttnCall(seq_len=T, sinks=s, q_doc=d, k_doc=d,
                                                                           q_global=qg), backend)
    ref_out, ref_lse = dense_reference(q_raw, k_raw, v, left, g, dist, s, d)
    torch.testing.assert_close(res.out, ref_out, atol=TOL64, rtol=TOL64)
    torch.testing.assert_close(res.lse, ref_lse, atol=TOL64, rtol=TOL64)
    w = torch.randn_like(ref_out)
    inputs = [q_raw, k_raw, v] + ([s] if sinks else [])
    want = torch.autograd.grad((ref_out * w).sum(), inputs)
    # the chain rule through this file's rotation: d q_raw = Rᵀ d q + Rᵀ_fixed d q_global, likewise k
    got_q, got_qg, got_k, got_v, *got_s = torch.autograd.grad((res.out * w).sum(), [q, qg, k, v] + inputs[3:])
    chain = torch.autograd.grad([rotate(q_raw, pos), rotate(q_raw, torch.full((T,), g - 1 + dist)),
                                 rotate(k_raw, pos)], [q_raw, k_raw], [got_q, got_qg, got_k])
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), [*chain, got_v, *got_s], want, strict=False):
        torch.testing.assert_close(a, b, atol=TOL64, rtol=TOL64, msg=lambda m, n=name: f"{n}: {m}")


def test_fused_local_part_matches_reference():
    """backend=auto in fp32 runs the local part on the fused band kernel: the same as the reference backend."""
    left, g, T = 9, 5, 70
    q, k, v = _raw(T=T, dtype=torch.float32)
    qg = torch.randn_like(q)
    call = AttnCall(seq_len=T, sinks=torch.randn(4), q_global=qg, return_stats=True)
    p = Window(window_left=left, num_global=g)
    a, b = attend(q, k, v, p, call, "auto"), attend(q, k, v, p, call, "reference")
    # fp32, values O(1): the kernels sum in different orders (~1e-6)
    torch.testing.assert_close(a.out, b.out, atol=2e-5, rtol=1e-5)
    for x, y in zip(a.stats.fields(), b.stats.fields(), strict=True):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-5)


def test_global_keys_inside_the_window_keep_their_distance():
    """With a window that covers every global key, fixed changes nothing (they are local keys), and a
    union's parts lose their globals too."""
    q, k, v = _raw(T=20)
    p = Window(window_left=30, num_global=4)
    a = attend(q, k, v, p, AttnCall(q_global=torch.randn_like(q)), "reference")
    b = attend(q, k, v, p, AttnCall(), "reference")
    assert torch.equal(a.out, b.out)
    u = PatternUnion(parts=(Window(window_left=3, num_global=4), Strided(stride=5, num_global=2)), num_global=4)
    assert local_part(u).num_global == 0 and all(part.num_global == 0 for part in local_part(u).parts)


# --- the model ------------------------------------------------------------------------------------

def test_attention_module_equals_dense_reference():
    """The Attention module with global_rope=fixed (its own rotation at g − 1 + D) == the fp64 oracle,
    forward and the gradients of x and every projection."""
    torch.manual_seed(0)
    left, g, dist, T = 7, 4, 5, 50
    attn = Attention(32, 4, 2, sink_logits=True, global_rope="fixed", global_rope_distance=dist).double()
    attn.sinks.data = torch.randn(4, dtype=torch.float64)
    x = torch.randn(2, T, 32, dtype=torch.float64, requires_grad=True)
    y, _ = attn(x, torch.arange(T), Window(window_left=left, num_global=g), local_attention, T)
    B, H, D = 2, 4, 8
    q = attn.wq(x).view(B, T, H, D).transpose(1, 2)
    k, v = (w(x).view(B, T, 2, D).transpose(1, 2) for w in (attn.wk, attn.wv))
    out, _ = dense_reference(q, k, v, left, g, dist, attn.sinks)
    ref = attn.wo(out.transpose(1, 2).reshape(B, T, H * D))
    # the module rotates in fp32 (cos/sin and the rotated q, k): ~1e-7 relative on values O(0.1)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    w = torch.randn_like(ref)
    params = [x, attn.wq.weight, attn.wk.weight, attn.wv.weight, attn.sinks]
    for a, b in zip(torch.autograd.grad((y * w).sum(), params), torch.autograd.grad((ref * w).sum(), params),
                    strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _model(global_rope="position", pattern=None, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.3,
                      global_rope=global_rope, **kw)
    return Transformer(cfg, pattern or Window(window_left=5, num_global=3))


def test_position_is_bit_identical():
    """position (the default) hands the attention no q_global and computes exactly what it always did;
    fixed on a pattern without globals computes the very same bits."""
    seen = []

    def spy(q, k, v, pattern, call):
        seen.append(call.q_global)
        return local_attention(q, k, v, pattern, call)

    x = torch.randint(0, 64, (2, 40))
    default, explicit = _model(), _model("position")
    a = default(x, targets=x, attention_fn=spy)
    b = explicit(x, targets=x)
    assert seen == [None, None] and torch.equal(a.logits, b.logits)
    a.loss.backward()
    b.loss.backward()
    assert all(torch.equal(p.grad, r.grad) for p, r in zip(default.parameters(), explicit.parameters(), strict=True))
    no_globals = Window(window_left=5)
    assert torch.equal(_model("fixed", no_globals)(x).logits, _model("position", no_globals)(x).logits)
    moved = (_model("fixed")(x).logits - b.logits).abs().max()
    assert moved > 1e-3  # and with globals beyond the window, fixed does compute something else


@pytest.mark.parametrize("sinks", [False, True])
def test_generation_equals_full_forward(sinks):
    """trainer.generate's decoder with global_rope=fixed: every step's logits == a full forward."""
    model = _model("fixed", sink_logits=sinks, n_learned_global=2).eval()
    prompt = torch.randint(0, 64, (2, 9))
    out = generate(model, prompt, max_new_tokens=15, keep_logits=True)
    for n in range(15):
        with torch.no_grad():
            ref = model(out.tokens[:, :9 + n]).logits[:, -1]
        # fp32; the one-query step sums keys in ring order (~1e-6 on logits ~5), a wrong key moves > 1e-2
        torch.testing.assert_close(out.step_logits[:, n], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kwargs,pattern,message", [
    (dict(global_rope="fixd"), None, "model.global_rope: must be one of position, fixed; got 'fixd'"),
    (dict(global_rope="fixed", global_rope_distance=-1), None, "model.global_rope_distance: must be >= 0"),
    (dict(global_rope="fixed"), Window(causal=False, window_left=3, window_right=3, num_global=2),
     "model.global_rope=fixed: layer 0's pattern is bidirectional"),
    (dict(global_rope="fixed"), TopKBlocks(top_k=2, block_size=4, num_global=2),
     "model.global_rope=fixed: layer 0's pattern TopKBlocks is content-based"),
])
def test_bad_settings_are_one_line(kwargs, pattern, message):
    with pytest.raises(ValueError) as e:
        torch.manual_seed(0)
        Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, **kwargs), pattern or Window(num_global=2))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides,message", [
    (["model.global_rope=fixed", "attention=longformer", "objective=mlm"],
     "model.global_rope=fixed: layer 0's pattern is bidirectional"),
    (["model.global_rope=fixed", "attention=topk"], "model.global_rope=fixed: layer 0's pattern TopKBlocks"),
    (["model.global_rope=fixed", "model.global_rope_distance=-1"], "model.global_rope_distance: must be >= 0"),
    (["model.global_rope=fixed", "attention=dense"], "model.global_rope=fixed: no layer sees a key only"),
    (["model.global_rope=fixed", "parallel=sp2", "parallel.strategy=ulysses"],
     "model.global_rope=fixed: layer 0's local part would run on parallel.strategy=ulysses"),
])
def test_bad_configs_are_one_config_error(overrides, message):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from trainer.config.validate import ConfigError, load_config

    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        node = compose(config_name="config", overrides=[*overrides, "trainer.ckpt_dir=/tmp/unused"])
    with pytest.raises(ConfigError) as e:
        load_config(node, world_size=2 if "parallel=sp2" in overrides else 1)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_export_refuses_fixed():
    from trainer.config.validate import ConfigError
    from trainer.tools.export import export

    with pytest.raises(ConfigError, match="export: model.global_rope=fixed scores the global keys"):
        export(_model("fixed"), None, None, as_dense=True)


# --- sequence parallelism -------------------------------------------------------------------------

L = 24  # local length; seq_len = L·P
# fp32: sharding reorders the softmax sums and merges (a few ulps on values up to ~10); a wrong key,
# a global key counted twice or a lost gradient share is >= 1e-2.
ATOL, RTOL = 3e-5, 1e-5
SP_CASES = {  # name: (pattern, sinks, documents)
    "sink": (Window(window_left=9, num_global=5), True, True),
    "sink_plain": (Window(window_left=9, num_global=5), False, False),
    "globals_gt_L": (Window(window_left=9, num_global=L + 6), True, True),  # two owners of global keys
    "window_past_shard": (Window(window_left=L + 7, num_global=4), True, False),  # multi-hop halo
    "union": (PatternUnion(parts=(Window(window_left=4, num_global=3), Strided(stride=7)), num_global=3), False,
              True),
    "dense": (Dense(num_global=3), True, False),  # nothing is seen only as global
}


def _sp_case(ctx, name, pattern, with_sinks, with_docs):
    from parallel.comm import CommCounter
    from parallel.sharding import shard
    from parallel.sp_attention import sp_attention

    n = ctx.sp_size * L
    gen = torch.Generator().manual_seed(len(name))
    q, qg, k, v, w = (torch.randn(2, h, n, 8, generator=gen) for h in (4, 4, 2, 2, 4))
    sinks = torch.randn(4, generator=gen) if with_sinks else None
    docs = random_docs(2, n, 3, short=8, long=30) if with_docs else None
    full = [x.clone().requires_grad_() for x in (q, qg, k, v)] + ([sinks.clone().requires_grad_()] if with_sinks else [])
    ref = attend(full[0], full[2], full[3], pattern, AttnCall(seq_len=n, sinks=full[4] if with_sinks else None,
                                                              q_doc=docs, k_doc=docs, q_global=full[1],
                                                              return_stats=True), "reference")
    (ref.out * w).sum().backward()
    mine = [shard(x.detach(), ctx, 2).clone().requires_grad_() for x in (q, qg, k, v)]
    my_sinks = sinks.clone().requires_grad_() if with_sinks else None
    counter = CommCounter()
    res = sp_attention(mine[0], mine[2], mine[3], pattern, ctx,
                       AttnCall(seq_len=n, sinks=my_sinks, q_doc=None if docs is None else shard(docs, ctx, 1),
                                q_global=mine[1], return_stats=True), backend="reference", counter=counter)
    (res.out * shard(w, ctx, 2)).sum().backward()
    fails = []

    def close(what, got, want):
        if not torch.allclose(got, want, atol=ATOL, rtol=RTOL):
            fails.append(f"{name}: {what} max err {float((got - want).abs().max()):.3g}")

    close("out", res.out.detach(), shard(ref.out.detach(), ctx, 2))
    close("lse", res.lse, shard(ref.lse, ctx, 2))
    for f, a, b in zip(("m", "max_logit", "global_mass"), res.stats.fields(), ref.stats.fields(), strict=True):
        close(f, a, shard(b, ctx, 2))
    for label, x, f in zip(("dq", "dq_global", "dk", "dv"), mine, full, strict=False):
        zero = torch.zeros_like(x)  # q_global of a dense layer reaches nothing: no gradient on either side
        close(label, zero if x.grad is None else x.grad, zero if f.grad is None else shard(f.grad, ctx, 2))
    return fails, (my_sinks.grad.clone(), full[4].grad.clone()) if with_sinks else None, counter.as_dict()


def _model_case(ctx):
    """A fixed model's loss and gradients under SP (sp_attention as the trainer binds it) == one device."""
    from parallel.sharding import shard
    from parallel.sp_attention import sp_attention

    model = _model("fixed", sink_logits=True)
    n = ctx.sp_size * L
    x = torch.randint(0, 64, (2, n), generator=torch.Generator().manual_seed(1))
    one = model(x, targets=x).loss
    ref = torch.autograd.grad(one, list(model.parameters()))

    def fn(q, k, v, pattern, call):
        return sp_attention(q, k, v, pattern, ctx, call)

    pos = torch.arange(ctx.sp_rank * L, (ctx.sp_rank + 1) * L)
    out = model(shard(x, ctx, 1), positions=pos, attention_fn=fn, seq_len=n, targets=shard(x, ctx, 1))
    grads = torch.autograd.grad(out.loss * out.n_targets, list(model.parameters()))
    return {"loss_sum": float(out.loss * out.n_targets), "one": float(one * (x.numel())), "grads": grads, "ref": ref}


def _lse_grad_case(ctx, pattern, strategy):
    """sp_attention's lse is differentiable (what the merge of partial (b) needs): max errors of
    d q, d k, d v of a loss on out and lse against one device."""
    from kernels.reference import reference_attention
    from parallel.sharding import shard
    from parallel.sp_attention import sp_attention

    n = ctx.sp_size * 2 * L
    gen = torch.Generator().manual_seed(5)
    q, k, v, w = (torch.randn(1, h, n, 8, generator=gen) for h in (4, 2, 2, 4))
    w_lse = torch.randn(1, 4, n, generator=gen)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse, _ = reference_attention(*full, pattern, seq_len=n)
    ((out * w).sum() + (lse * w_lse).sum()).backward()
    mine = [shard(x, ctx, 2).clone().requires_grad_() for x in (q, k, v)]
    res = sp_attention(*mine, pattern, ctx, AttnCall(seq_len=n), strategy=strategy, backend="reference")
    ((res.out * shard(w, ctx, 2)).sum() + (res.lse * shard(w_lse, ctx, 2)).sum()).backward()
    return [float((a.grad - shard(b.grad, ctx, 2)).abs().max()) for a, b in zip(mine, full, strict=True)]


def _sp_worker(rank, world_size):
    from parallel.context import init_parallel

    ctx = init_parallel(sequence_parallel_size=world_size, timeout_s=30)
    try:
        cases = {name: _sp_case(ctx, name, *case) for name, case in SP_CASES.items()}
        lse = {"halo": _lse_grad_case(ctx, Window(window_left=9, num_global=5), "halo"),
               "topk": _lse_grad_case(ctx, TopKBlocks(top_k=2, block_size=8, num_global=4), "topk")}
        return {"cases": cases, "model": _model_case(ctx), "lse": lse}
    finally:
        ctx.destroy()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda p: f"P{p}")
def sp_suite(request):
    return request.param, run_workers(_sp_worker, request.param, timeout_s=240, collective_timeout_s=30)


def test_sp_equals_one_device(sp_suite):
    """Every rank's out, lse, statistics and the gradients of q, q_global, k, v == the single-device call."""
    _, per_rank = sp_suite
    fails = [f"rank {r}: {f}" for r, res in enumerate(per_rank) for fs, _, _ in res["cases"].values() for f in fs]
    assert not fails, "\n".join(fails)


def test_sp_sink_gradients_sum_to_one_device(sp_suite):
    _, per_rank = sp_suite
    for name, (_, dsinks, _) in per_rank[0]["cases"].items():
        if dsinks is not None:
            total = sum(res["cases"][name][1][0] for res in per_rank)
            # sums of ~2·L·P per-query terms of size ~1 in fp32: 1e-4
            torch.testing.assert_close(total, dsinks[1], atol=1e-4, rtol=1e-4)


def test_sp_global_key_bytes(sp_suite):
    """The global keys travel once per rank, from their owners: B·Hkv·g·2D·4 bytes received by every
    rank that owns none of them, counted as ``global``; the local part's halo plan moves none."""
    from parallel.plan import build_plan

    P, per_rank = sp_suite
    for name in ("sink", "sink_plain"):
        g = SP_CASES[name][0].num_global
        want = 2 * 2 * g * 2 * 8 * 4  # B · Hkv · g · (K | V) · D · fp32
        for r, res in enumerate(per_rank):
            comm = res["cases"][name][2]
            recv = comm.get("comm/0/forward/global/recv", 0)
            assert recv == (0 if r == 0 else want), (name, r, comm)
            assert comm.get("comm/0/backward/global/sent", 0) == (0 if r == 0 else want)
        assert comm.get("comm/0/forward/halo/recv", 0) > 0  # the window's halo still travels
        plan = build_plan(local_part(SP_CASES[name][0]), P * L, P)
        assert not [t for t in plan.transfers if t.kind == "global"]


def test_sp_model_equals_one_device(sp_suite):
    _, per_rank = sp_suite
    total = sum(res["model"]["loss_sum"] for res in per_rank)
    # summed per-token losses of ~4 nats over 2·L·P tokens, fp32: ~1e-4 relative
    assert math.isclose(total, per_rank[0]["model"]["one"], rel_tol=1e-5)
    for i, ref in enumerate(per_rank[0]["model"]["ref"]):
        got = sum(res["model"]["grads"][i] for res in per_rank) / (2 * L * len(per_rank))
        # the shards' summed gradients over the token count == the mean loss's gradient (fp32 sums: 1e-5)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


def test_sp_lse_is_differentiable(sp_suite):
    """A loss on sp_attention's lse (halo and top-k) gets the single-device gradients."""
    _, per_rank = sp_suite
    for res in per_rank:
        for strategy, errs in res["lse"].items():
            # fp32, values O(1) summed over ~100 keys: ~1e-6; a dropped lse gradient is O(1)
            assert max(errs) < 1e-4, (strategy, errs)
