"""Incremental decoding (model/decode.py) against full forwards, the bounded cache's size, sampling,
and the ``python -m trainer.generate`` command on a checkpoint the real trainer wrote."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from kernels import sparse_attention
from kernels.contract import AttnCall
from model.decode import (
    CachedAttention,
    Decoder,
    Documents,
    RingCache,
    Sampling,
    bounded_reach,
    generate,
    next_token,
)
from model.pattern import BigBird, Dense, PatternUnion, Strided, TopKBlocks, Window
from model.transformer import ModelConfig, Transformer
from tests.train_utils import PY, REPO, _env, train
from trainer.config.validate import ConfigError
from trainer.data.corpus import DOC_SEP, ByteTokenizer, load_corpus
from trainer.data.sampling import LongDocSampler, document_positions
from trainer.state.run import load_run, resolve_checkpoint
from trainer.tools.generate import (
    _preflight,
    documents_of,
    load_generate_config,
    run_config,
)

# Tiny model with GQA (4 query heads on 2 key/value heads) and 2 learned global slots. init_std 0.3
# (not 0.02) makes attention peaked and its output large in the residual stream, so a key missing
# from (or wrongly added to) a cache moves the logits far beyond the tolerance below.
CFG = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, n_learned_global=2, init_std=0.3)
# fp32 throughout; the decoder sums over keys in another order (ring slots, one query) than the
# training kernels, which moves logits of magnitude ~5 by up to ~8e-6 (measured); 1e-4 is far below what one
# wrong key changes (test_missing_key_is_detected measures > 1e-2).
ATOL = 1e-4

PATTERNS = {
    "dense": Dense(num_global=2),
    "window": Window(window_left=5),
    "sink": Window(window_left=5, num_global=2),
    "dilated": Window(window_left=7, dilation=3, num_global=2),
    "strided": Strided(stride=4, num_global=2),
    "bigbird": BigBird(window_left=3, num_global=2, random_blocks=2, block_size=4),
    "topk": TopKBlocks(top_k=2, block_size=4, num_global=2),
    "topk_query": TopKBlocks(top_k=2, block_size=4, num_global=2, select="query"),
    "union": PatternUnion(parts=(Window(window_left=3, num_global=2), Strided(stride=5)), num_global=2),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model(pattern, **overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**CFG, **overrides})
    if pattern.num_global < cfg.n_learned_global:
        cfg.n_learned_global = pattern.num_global
    model = Transformer(cfg, pattern).eval()
    for block in model.blocks:  # learned sinks away from their 0.0 init, some above the scores, some below
        if block.attn.sinks is not None:
            block.attn.sinks.data = torch.randn(cfg.n_heads) * 2
    return model


def prefix_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token logits [B, V] of a full forward (the training kernels) over ``tokens`` [B, T]."""
    with torch.no_grad():
        return model(tokens).logits[:, -1]


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_greedy_decoding_equals_full_forward(name, sinks):
    """Every step's logits equal a full forward over the prefix, and greedy picks its argmax."""
    model = tiny_model(PATTERNS[name], sink_logits=sinks)
    prompt = torch.randint(0, 64, (2, 9))
    out = generate(model, prompt, max_new_tokens=15, keep_logits=True)
    for n in range(15):
        ref = prefix_logits(model, out.tokens[:, :9 + n])
        torch.testing.assert_close(out.step_logits[:, n], ref, atol=ATOL, rtol=0)
        assert torch.equal(out.tokens[:, 9 + n], ref.argmax(-1))


def test_layers_with_different_patterns():
    """Each layer gets the cache of its own pattern (dense_every / layer_overrides make mixed models)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CFG), [PATTERNS["sink"], PATTERNS["topk"]]).eval()
    out = generate(model, torch.randint(0, 64, (1, 9)), max_new_tokens=12, keep_logits=True)
    for n in range(12):
        torch.testing.assert_close(out.step_logits[:, n], prefix_logits(model, out.tokens[:, :9 + n]), atol=ATOL, rtol=0)
    assert out.cache == "layer 0: bounded: 2 global + ring of 6; layer 1: full (+ current top-k query block of 4)"


def test_topk_query_decoding_keeps_no_block_queries():
    """select=query: a step's one query ranks the blocks itself, so the cache keeps no queries."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CFG), [PATTERNS["topk_query"], PATTERNS["topk"]]).eval()
    out = generate(model, torch.randint(0, 64, (1, 9)), max_new_tokens=4, keep_logits=True)
    assert out.cache == "layer 0: full; layer 1: full (+ current top-k query block of 4)"


@pytest.mark.parametrize("name", list(PATTERNS))
def test_cached_attention_with_sinks_equals_kernel(name):
    """Learned sink logits: each decoded query's output equals the training kernel's with the same
    sinks over the prefix (GQA, 4 query heads on 2 key/value heads); without them it would not."""
    pattern, T, P = PATTERNS[name], 24, 7
    q, k, v = torch.randn(2, 4, T, 8), torch.randn(2, 2, T, 8), torch.randn(2, 2, T, 8)
    sinks = torch.randn(4) * 2
    attn = CachedAttention([pattern])
    out = [attn(q[:, :, :P], k[:, :, :P], v[:, :, :P], pattern, AttnCall(torch.arange(P), torch.arange(P), T, sinks=sinks)).out[:, :, -1]]
    for t in range(P, T):
        at = torch.tensor([t])
        out.append(attn(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], pattern,
                        AttnCall(at, at, T, sinks=sinks)).out[:, :, 0])
    for t in range(P - 1, T):
        ref = sparse_attention(q[:, :, :t + 1], k[:, :, :t + 1], v[:, :, :t + 1], pattern, seq_len=T, sinks=sinks)[0]
        # fp32, O(1) values: summation order alone differs (~1e-7)
        torch.testing.assert_close(out[t - P + 1], ref[:, :, -1], atol=1e-5, rtol=0)
        no_sink = sparse_attention(q[:, :, :t + 1], k[:, :, :t + 1], v[:, :, :t + 1], pattern, seq_len=T)[0]
        assert (no_sink[:, :, -1] - ref[:, :, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("name,mask,reset", [("sink", True, True), ("sink", True, False), ("sink", False, True),
                                             ("dense", True, True), ("bigbird", True, True), ("topk", True, True),
                                             ("topk_query", True, True)])
def test_packed_documents(name, mask, reset):
    """data.document_mask / data.reset_positions: document ids and per-document rotary positions
    continue across steps exactly as trainer.data.sampling.document_positions counts them (sinks on too)."""
    model = tiny_model(PATTERNS[name], sink_logits=True)
    tokens = torch.randint(1, 64, (2, 30))
    tokens[torch.rand(2, 30) < 0.15] = DOC_SEP  # a few documents per row, at different places
    dec = Decoder(model, 30, documents=Documents(DOC_SEP, mask=mask, reset_positions=reset))
    logits, moved = dec.prefill(tokens[:, :8]), 0.0
    for t in range(8, 31):
        doc, rope = document_positions(tokens[:, :t])
        with torch.no_grad():
            ref = model(tokens[:, :t], doc_ids=doc if mask else None, rope_positions=rope if reset else None).logits
        torch.testing.assert_close(logits, ref[:, -1], atol=ATOL, rtol=0)
        moved = max(moved, float((ref[:, -1] - prefix_logits(model, tokens[:, :t])).abs().max()))
        if t < 30:
            logits = dec.step(tokens[:, t])
    assert moved > 100 * ATOL  # the documents did change what the model computes


def test_missing_key_is_detected():
    """The comparison above can fail: a ring one slot too short drops the window's oldest key."""
    model = tiny_model(PATTERNS["sink"])
    dec = Decoder(model, 40)
    dec.attn.caches[0] = RingCache(2, bounded_reach(PATTERNS["sink"]))  # reach, not reach + 1
    tokens = torch.randint(0, 64, (1, 30))
    dec.prefill(tokens[:, :8])
    worst = 0.0
    for t in range(8, 30):
        logits = dec.step(tokens[:, t])
        worst = max(worst, float((logits - prefix_logits(model, tokens[:, :t + 1])).abs().max()))
    assert worst > 100 * ATOL


def test_bounded_cache_never_exceeds_its_bound():
    """Sink (window 5, 2 globals): 2 + 6 slots per layer from the 8th token on, whatever the length."""
    pattern = PATTERNS["sink"]
    model = tiny_model(pattern)
    dec = Decoder(model, 60)
    logits = dec.prefill(torch.randint(0, 64, (1, 4)))
    bound = pattern.num_global + bounded_reach(pattern) + 1
    per_key = 2 * model.cfg.n_kv_heads * model.blocks[0].attn.head_dim * 4 + 8  # k and v fp32, position int64
    sizes = []
    for _ in range(50):
        logits = dec.step(logits.argmax(-1))
        for cache in dec.attn.caches:
            assert cache.k.shape[2] == bound and cache.view()[0].shape[2] <= bound
        sizes.append(dec.cache_bytes())
    assert max(sizes) == sizes[-1] == model.cfg.n_layers * bound * per_key
    assert dec.allocated_bytes() == sizes[-1]


@pytest.mark.parametrize("name", list(PATTERNS))
def test_caches_that_skip_the_mask_hold_only_keys_the_query_sees(name):
    """A cache with ``sees_all`` (plain causal windows, causal dense) attends without a mask: at every
    step the pattern's own mask over its held keys must then be all true; the others must keep it."""
    pattern = PATTERNS[name]
    model = tiny_model(pattern)
    dec = Decoder(model, 60)
    logits = dec.prefill(torch.randint(0, 64, (1, 4)))
    flags = {c.sees_all for c in dec.attn.caches}
    assert flags == {name in ("dense", "window", "sink")}
    for _ in range(40):
        logits = dec.step(logits.argmax(-1))
        for cache in dec.attn.caches:
            k_pos = cache.view()[2]
            if cache.sees_all:
                assert bool(pattern.mask(torch.tensor([dec.pos - 1]), k_pos, 60).all())


def test_decode_head_is_the_lm_head():
    """The decoder's head (a transposed copy on CPU) gives lm_head's logits."""
    model = tiny_model(PATTERNS["sink"])
    dec = Decoder(model, 20)
    h = torch.randn(2, 1, CFG["d_model"])
    # the same products summed in another order: fp32 rounding of |logit| ~ 10, far below a wrong weight
    torch.testing.assert_close(dec.head(h), model.lm_head(h), atol=1e-5, rtol=0)
    assert dec.head.nbytes() == model.lm_head.weight.numel() * 4


def test_union_of_windows_is_bounded_and_strided_is_not():
    assert bounded_reach(PatternUnion(parts=(Window(window_left=3), Window(window_left=9, dilation=4)))) == 8
    assert bounded_reach(PATTERNS["union"]) is None
    assert bounded_reach(BigBird(window_left=3, random_blocks=0)) == 3
    assert bounded_reach(PATTERNS["bigbird"]) is None


def test_bidirectional_is_refused():
    model = tiny_model(Window(window_left=3, window_right=3, causal=False, num_global=2))
    with pytest.raises(ValueError, match="attention.causal: layer 0 is bidirectional"):
        Decoder(model, 10)


def test_sampling_reproducible_from_seed():
    model = tiny_model(PATTERNS["sink"])
    prompt = torch.randint(0, 64, (2, 6))
    hot = Sampling(temperature=1.5, top_k=40, top_p=0.95, seed=7)
    a = generate(model, prompt, 20, hot).tokens
    assert torch.equal(a, generate(model, prompt, 20, hot).tokens)
    assert not torch.equal(a, generate(model, prompt, 20, Sampling(temperature=1.5, top_k=40, top_p=0.95, seed=8)).tokens)
    greedy = generate(model, prompt, 20).tokens
    assert torch.equal(generate(model, prompt, 20, Sampling(temperature=1.0, top_k=1, seed=3)).tokens, greedy)


def test_top_k_and_top_p_filter():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]])  # probabilities ≈ .72, .26, .013, .005
    gen = torch.Generator().manual_seed(0)
    draws = {int(next_token(logits, Sampling(temperature=1.0, top_k=2), gen)) for _ in range(200)}
    assert draws == {0, 1}
    draws = {int(next_token(logits, Sampling(temperature=1.0, top_p=0.5), gen)) for _ in range(50)}
    assert draws == {0}  # the first token alone already holds 0.72 >= 0.5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real training run (1 step) with its checkpoint: sink pattern, GQA, the 4 globals as learned
    slots, learned sink logits and packed documents (document mask, per-document rotary positions)."""
    run = tmp_path_factory.mktemp("gen") / "run"
    train("seq_len=128", "steps=1", "trainer.ckpt_every=1", f"hydra.run.dir={run}", "eval_every=0", "eval_batches=1",
          "logging.wandb=disabled", "logging.mask_png=false", "attention.window_left=16", "attention.num_global=4",
          "model.n_learned_global=4", "model.sink_logits=true", "data.document_mask=true", timeout=240)
    return run


def test_checkpoint_rebuilds_the_trained_model(run_dir):
    """The model rebuilt from the checkpoint alone scores the trainer's own final eval loss."""
    cfg, model, _ = load_run(resolve_checkpoint(str(run_dir)), torch.device("cpu"))
    assert [p.window_left for p in model.patterns] == [16, 16] and model.cfg.n_learned_global == 4
    assert documents_of(cfg) == Documents(DOC_SEP, mask=True, reset_positions=True)
    corpus = load_corpus(None, "bytes", None, cfg.data.val_fraction)
    sampler = LongDocSampler(corpus.val, cfg.seq_len, cfg.batch_size, cfg.seed, documents=True, reset_positions=True)
    tokens, targets, positions, rope, doc = sampler.next_shard()
    with torch.no_grad():
        loss = float(model(tokens, positions=positions, targets=targets, rope_positions=rope, doc_ids=doc).loss)
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["eval/loss"]
    assert loss == pytest.approx(logged, abs=1e-5)  # fp32, same batch and weights; kernels may differ in sum order


def test_generate_cli(run_dir):
    proc = subprocess.run([PY, "-m", "trainer.generate", f"trainer.resume={run_dir}", "prompt='def f(x):'",
                           "max_new_tokens=124"], cwd=REPO, env=_env(), capture_output=True, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err[-3000:]
    assert "tokens/s decoding" in err and "4 global + ring of 17" in err
    assert "note: prompt + max_new_tokens = 137 positions > the trained seq_len=128" in err  # allowed, said once
    cfg, model, _ = load_run(resolve_checkpoint(str(run_dir)), torch.device("cpu"))
    prompt = torch.tensor([[DOC_SEP] * 4 + list(b"def f(x):")])  # 4 learned global slots, then the prompt
    out = generate(model, prompt, 124, documents=documents_of(cfg))  # greedy, as the CLI by default
    text = ByteTokenizer().decode(out.tokens[0, 4:])
    assert text.startswith("def f(x):") and len(text) > len("def f(x):")
    assert proc.stdout == (text + "\n").encode()


def test_bidirectional_checkpoint_refused(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = (run / "config.yaml").read_text().replace("causal: true", "causal: false")
    (run / "config.yaml").write_text(config.replace("window_right: 0", "window_right: 16"))
    with pytest.raises(ConfigError, match=r"^attention.causal: .* needs causal patterns") as e:
        run_config(resolve_checkpoint(str(run)))
    assert "\n" not in str(e.value)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["sink", "dense", "bigbird", "topk", "topk_query"])
def test_cuda_decoding_equals_full_forward(name):
    """On CUDA the prefill and the full forwards run FlexAttention (top-k: blocked)."""
    model = tiny_model(PATTERNS[name]).cuda()
    prompt = torch.randint(0, 64, (2, 9), device="cuda")
    out = generate(model, prompt, max_new_tokens=15, keep_logits=True)
    for n in range(15):
        ref = prefix_logits(model, out.tokens[:, :9 + n])
        # fp32 on both sides, but cuBLAS / Flex reduction orders differ from the CPU's: 10x the CPU tolerance
        torch.testing.assert_close(out.step_logits[:, n], ref, atol=10 * ATOL, rtol=0)
        assert torch.equal(out.tokens[:, 9 + n], ref.argmax(-1))


@pytest.mark.parametrize("override,message", [
    ("max_new_tokens=0", "max_new_tokens: must be >= 1, got 0"),
    ("format=yaml", "format: must be one of text, json; got 'yaml'"),
    ("temperature=-1", "temperature: must be >= 0 (0 = greedy), got -1.0"),
    ("top_p=1.5", "top_p: must be in (0, 1], got 1.5"),
    ("backend=fast", "backend: must be one of auto, reference, blocked, flex, fused; got 'fast'"),
    ("trainer.resume=none", "trainer.resume: give the checkpoint to sample from"),
])
def test_bad_generate_settings_are_one_line(override, message):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        dcfg = compose(config_name="generate", overrides=["trainer.resume=/x", override])
    with pytest.raises(ConfigError) as e:
        load_generate_config(dcfg)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert _preflight(["trainer.resume=/x", "temprature=1"]) == (
        "temprature: not a key of the generate config; did you mean temperature?")
    assert _preflight(["trainer.resume=/x", "zzz=1"]) == (  # nothing close: the keys there are
        "zzz: not a key of the generate config; allowed: trainer.resume, prompt, max_new_tokens, temperature, top_k, "
        "top_p, seed, backend, device, format")
