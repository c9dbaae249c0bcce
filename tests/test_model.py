"""The model: shapes and GQA, learning, sharded-forward equivalence through absolute rotary positions,
per-layer patterns, learned global tokens, activation checkpointing, init and presets."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from kernels import sparse_attention
from model.attention import Attention, apply_rotary, local_attention, rotary_angles
from model.pattern import Dense, Window, from_config
from model.transformer import ModelConfig, Transformer, layer_patterns, model_preset


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: syncing two threads costs more than it saves, and on a shared machine a busy
    second core makes every op wait for it (20x slower measured). Restored after this module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SINK = from_config({"name": "sink", "window_left": 8, "num_global": 2})


def tiny(**overrides) -> ModelConfig:
    return model_preset("tiny", **overrides)


class Recorder:
    """An AttentionFn test double: records what the model hands over, then computes locally."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, pattern, call):
        self.calls.append(dict(q=q.detach(), k=k.detach(), v=v.detach(), pattern=pattern,
                               positions=call.q_pos, seq_len=call.seq_len, layer=call.layer))
        return local_attention(q, k, v, pattern, call)


def test_shapes_and_gqa():
    cfg = tiny()
    model = Transformer(cfg, SINK)
    attn = model.blocks[0].attn
    assert attn.wq.weight.shape == (4 * 16, 64)  # n_heads · head_dim
    assert attn.wk.weight.shape == attn.wv.weight.shape == (2 * 16, 64)  # n_kv_heads · head_dim
    rec, tokens = Recorder(), torch.randint(0, 256, (3, 20))
    out = model(tokens, attention_fn=rec)
    assert out.logits.shape == (3, 20, 256)
    assert out.loss is None and out.stats is None
    assert len(rec.calls) == cfg.n_layers
    assert rec.calls[0]["q"].shape == (3, 4, 20, 16)
    assert rec.calls[0]["k"].shape == rec.calls[0]["v"].shape == (3, 2, 20, 16)
    assert rec.calls[0]["seq_len"] == 20
    with pytest.raises(ValueError, match="model.n_kv_heads"):
        Attention(64, n_heads=4, n_kv_heads=3)


def test_stats_per_layer():
    cfg = tiny()
    model = Transformer(cfg, SINK)
    out = model(torch.randint(0, 256, (2, 30)), return_stats=True)
    assert len(out.stats) == cfg.n_layers
    for sums in out.stats:
        assert set(sums) == {"entropy_sum", "global_mass_sum", "count", "max_logit"}
        assert sums["count"].tolist() == [60.0] * cfg.n_heads  # B · T queries per head
        assert not sums["entropy_sum"].requires_grad  # logging only: no graph kept alive
        # Every query sees at most 8 + 1 + 2 keys: entropy per query <= log(11).
        assert (sums["entropy_sum"] / sums["count"] <= torch.log(torch.tensor(11.0)) + 1e-5).all()


def test_loss_decreases_on_repeated_pattern():
    model = Transformer(tiny(), SINK)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.tensor(list(b"abcdefgh-0123" * 8))[None, :].repeat(4, 1)  # (4, 104)
    x, y = data[:, :-1], data[:, 1:]
    losses = []
    for _ in range(20):
        loss = model(x, targets=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 5.0  # ~ln 256 = 5.55 at init: the model starts near uniform
    assert losses[-1] < 0.3 * losses[0], losses


def test_rotary_depends_only_on_relative_position():
    cos_a, sin_a = rotary_angles(torch.tensor([5, 9]), head_dim=16, theta=10000.0)
    cos_b, sin_b = rotary_angles(torch.tensor([1005, 1009]), head_dim=16, theta=10000.0)
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16)
    score = lambda c, s: apply_rotary(q, c, s)[0, 0, 1] @ apply_rotary(k, c, s)[0, 0, 0]
    # fp32 rotation of O(1) values; shifting both positions by 1000 changes only rounding.
    torch.testing.assert_close(score(cos_a, sin_a), score(cos_b, sin_b), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(cos_a, sin_a), q[0, 0, 1] @ k[0, 0, 0])  # it does rotate


def full_kv_attention(full_calls):
    """AttentionFn test double for a shard: per layer, the shard's queries attend over the full
    sequence's K/V recorded by an unsharded run, with the shard's own rows put in from this call
    (what sequence parallelism delivers). Asserts the shard's keys equal the full run's rows."""
    layers = iter(full_calls)

    def attend(q, k, v, pattern, call):
        ref, positions, seq_len = next(layers), call.q_pos, call.seq_len
        # Rotary used the absolute positions: the shard's keys are the full run's rows (fp32 rounding).
        torch.testing.assert_close(k, ref["k"][:, :, positions], rtol=1e-5, atol=1e-5)
        k_all, v_all = ref["k"].clone(), ref["v"].clone()
        k_all[:, :, positions], v_all[:, :, positions] = k, v
        return sparse_attention(q, k_all, v_all, pattern, q_pos=positions, k_pos=torch.arange(seq_len),
                                seq_len=seq_len)

    return attend


@torch.no_grad()
def test_sharded_forward_equals_full():
    """Two halves, each at its absolute positions, reproduce the full sequence's logits."""
    model, T = Transformer(tiny(), SINK), 48
    tokens = torch.randint(0, 256, (2, T))
    full_rec = Recorder()
    full = model(tokens, attention_fn=full_rec).logits
    for lo, hi in [(0, 24), (24, 48)]:
        half = model(tokens[:, lo:hi], positions=torch.arange(lo, hi), attention_fn=full_kv_attention(full_rec.calls),
                     seq_len=T).logits
        # Same math on different matrix shapes: fp32 summation order differs at the 1e-6 level.
        torch.testing.assert_close(half, full[:, lo:hi], rtol=1e-4, atol=1e-5)


def test_local_positions_would_break_the_shard():
    """The negative control of the test above: rotating the second half as if it started at 0
    gives different keys, so that test can fail."""
    attn = Attention(64, 4, 2)
    x = torch.randn(1, 16, 64)
    rec_abs, rec_loc = Recorder(), Recorder()
    attn(x[:, 8:], torch.arange(8, 16), SINK, rec_abs, 16)
    attn(x[:, 8:], torch.arange(0, 8), SINK, rec_loc, 16)
    assert not torch.allclose(rec_abs.calls[0]["k"], rec_loc.calls[0]["k"], atol=1e-3)


def test_layer_patterns_dense_every_and_overrides():
    base = Window(window_left=4, num_global=1)
    pats = layer_patterns(base, 6, dense_every=3, overrides={0: {"name": "window", "window_left": 2}})
    assert [type(p).__name__ for p in pats] == ["Window", "Window", "Dense", "Window", "Window", "Dense"]
    assert pats[0].window_left == 2 and pats[1] is base
    assert pats[2] == Dense(causal=True, num_global=1)
    assert layer_patterns(base, 3) == [base] * 3
    with pytest.raises(ValueError, match="model.layer_overrides"):
        layer_patterns(base, 3, overrides={5: base})
    with pytest.raises(ValueError, match="model.dense_every"):
        layer_patterns(base, 3, dense_every=-1)

    model, rec = Transformer(tiny(n_layers=3), layer_patterns(base, 3, dense_every=2)), Recorder()
    model(torch.randint(0, 256, (1, 10)), attention_fn=rec)
    assert [c["pattern"] for c in rec.calls] == [base, Dense(num_global=1), base]  # each layer its own
    assert [c["layer"] for c in rec.calls] == [0, 1, 2]  # the index is handed over, not inferred
    with pytest.raises(ValueError, match="model.n_layers"):
        Transformer(tiny(n_layers=3), [base] * 2)


def test_learned_global_tokens():
    cfg = tiny(n_learned_global=2)
    model, T = Transformer(cfg, SINK), 20
    tokens, targets = torch.randint(0, 256, (2, T)), torch.randint(0, 256, (2, T))
    out = model(tokens, targets=targets)
    assert out.logits.shape == (2, T - 2, 256)  # no logits for the two global slots
    assert out.n_targets.item() == 2 * (T - 2)
    manual = F.cross_entropy(out.logits.reshape(-1, 256), targets[:, 2:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)
    # The tokens and targets in the global slots are ignored: the slots hold learned embeddings.
    tokens2, targets2 = tokens.clone(), targets.clone()
    tokens2[:, :2], targets2[:, :2] = 7, 9
    out2 = model(tokens2, targets=targets2)
    torch.testing.assert_close(out2.logits, out.logits, rtol=0, atol=0)
    torch.testing.assert_close(out2.loss, out.loss, rtol=0, atol=0)
    out.loss.backward()
    assert model.global_emb.grad.abs().sum() > 0  # the learned globals are trained through attention
    # A shard that does not hold the globals keeps all its rows.
    assert model(tokens, positions=torch.arange(40, 60), seq_len=60).logits.shape == (2, T, 256)
    with pytest.raises(ValueError, match="model.n_learned_global"):
        Transformer(tiny(n_learned_global=3), SINK)


def test_activation_checkpointing_same_gradients():
    model = Transformer(tiny(), SINK)
    ckpt = copy.deepcopy(model)
    ckpt.cfg = tiny(activation_checkpointing=True)
    tokens = torch.randint(0, 256, (2, 40))
    targets = torch.roll(tokens, -1, 1)
    recs = [Recorder(), Recorder()]
    for m, rec in zip((model, ckpt), recs):
        m(tokens, targets=targets, attention_fn=rec).loss.backward()
    assert (len(recs[0].calls), len(recs[1].calls)) == (2, 4)  # checkpointing recomputed each layer
    # The recomputation (in backward, last layer first) carries each layer's own index.
    assert [c["layer"] for c in recs[1].calls] == [0, 1, 1, 0]
    for (name, p), q in zip(model.named_parameters(), ckpt.parameters()):
        # Recomputation repeats the same CPU ops in the same order: the gradients are bitwise equal.
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)


def test_reference_backend_matches_default():
    model = Transformer(tiny(), SINK)
    tokens = torch.randint(0, 256, (2, 70))  # not a multiple of the blocked kernel's 128-row block
    ref = functools.partial(local_attention, backend="reference")
    # Two fp32 kernels with different summation orders.
    torch.testing.assert_close(model(tokens).logits, model(tokens, attention_fn=ref).logits, rtol=1e-4, atol=1e-5)


def test_init_deterministic_and_tied():
    torch.manual_seed(3)
    a = Transformer(tiny(), SINK)
    torch.manual_seed(3)
    b = Transformer(tiny(), SINK)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert a.lm_head.weight is a.wte.weight
    untied = Transformer(tiny(tie_embeddings=False), SINK)
    assert untied.num_params() == a.num_params() + 256 * 64


@pytest.mark.parametrize("name,lo,hi", [("125m", 110e6, 140e6), ("1b", 0.9e9, 1.3e9)])
def test_preset_sizes(name, lo, hi):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = Transformer(model_preset(name), SINK)
    assert lo < model.num_params() < hi
    with pytest.raises(ValueError, match="model.preset"):
        model_preset("huge")
