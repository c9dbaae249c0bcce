"""gpt-oss: import, train (SP=2 = SP=1, ZeRO-3 over DP ranks), generate and export, against
transformers' ``GptOssForCausalLM`` itself (the oracle; never imported at run time).

Tiny random models are built with transformers' classes and ``save_pretrained`` (nothing is
downloaded): 4 experts, top-2, sliding (window 8) and full layers, YaRN rope, and every bias and
sink drawn from N(0, 0.3) — transformers initialises biases to zero, so a dropped bias or sink would
not show. initializer_range=0.3 spreads logits so greedy decoding has no near-ties.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model.decode import Sampling, generate  # noqa: E402
from model.moe import MoE, aux_loss  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from tests.test_hf import (  # noqa: E402
    SEQ,
    assert_logits_match,
    config_of,
    hf_greedy,
    imported,
    save_tokenizer,
    text_dir,
)
from tests.train_utils import PY, REPO, _env, rows, train  # noqa: E402
from trainer.config.schema import ConfigError  # noqa: E402
from trainer.data.hf_tokenizer import HfTokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8, initializer_range=0.3,
            bos_token_id=0, eos_token_id=1, pad_token_id=0)
CASES = {
    # gpt-oss's own rope: yarn, truncate=False (factor 32 over an "original" context of 16 here)
    "alternating_yarn": dict(num_hidden_layers=2, max_position_embeddings=512, rope_parameters=dict(
        rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
        original_max_position_embeddings=16)),
    # three layers (full first), head_dim != hidden/heads, top-1 routing, truncate=True
    "full_first_top1": dict(num_hidden_layers=3, head_dim=24, num_experts_per_tok=1, max_position_embeddings=64,
                            layer_types=["full_attention", "sliding_attention", "full_attention"],
                            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, truncate=True,
                                                 original_max_position_embeddings=16)),
}


def save_gpt_oss(d: Path, **config):
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**{**BASE, **config})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks")):
                p.normal_(0.0, 0.3)
    model.save_pretrained(d)
    save_tokenizer(d)
    return model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss")
    return {name: (root / name, save_gpt_oss(root / name, **config)) for name, config in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_hugging_face(dirs, name):
    d, hf = dirs[name]
    ours = imported(d)
    assert ours.cfg.n_experts == 4 and ours.cfg.sink_logits and ours.cfg.out_bias
    assert_logits_match(ours, hf, BASE["vocab_size"], SEQ)


def test_patterns_and_sinks_follow_the_config(dirs):
    ours = imported(dirs["full_first_top1"][0])
    assert [(type(p).__name__, getattr(p, "window_left", None)) for p in ours.patterns] == [
        ("Dense", None), ("Window", 7), ("Dense", None)]  # HF's window of 8 counts the query: window_left 7
    hf = dirs["full_first_top1"][1]
    assert torch.equal(ours.blocks[1].attn.sinks, hf.model.layers[1].self_attn.sinks)


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_ids_equal_hugging_face_generate(dirs, name):
    d, hf = dirs[name]
    ours = imported(d)
    prompt = torch.tensor([HfTokenizer(str(d)).encode("def f(x): the quick").tolist()])
    want = hf_greedy(hf, prompt, 32)
    got = generate(ours, prompt, 32, Sampling()).tokens
    assert got.shape == want.shape == (1, prompt.shape[1] + 32)
    assert torch.equal(got, want)


def test_load_balancing_loss_equals_hugging_face(dirs):
    """model.moe.aux_loss on one device (all counts local) = transformers' aux_loss (its
    load_balancing_loss_func over every layer's router logits); fp32 sums in another order."""
    d, hf = dirs["full_first_top1"]
    ours = imported(d)
    tokens = torch.randint(0, BASE["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(tokens, output_router_logits=True).aux_loss
        out = ours(tokens)
    got = aux_loss(out.router, out.router.counts, out.router.tokens)
    assert len(out.router_layers) == 3 and out.router.tokens == 3 * 2 * SEQ  # layers pooled, as Hugging Face does
    assert float(out.router.counts.sum()) == 3 * 2 * SEQ * 1  # top-1: every token counted once per layer
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_moe_matches_a_dense_loop_and_routes_every_token():
    """The expert dispatch (sort by expert, one matmul each) equals the definition token by token:
    y_t = Σ_k softmax(top-k logits)_k · expert_k(x_t); fp32, the same products in another grouping."""
    torch.manual_seed(0)
    moe = MoE(d_model=16, d_ff=8, n_experts=5, top_k=3, alpha=1.702, limit=0.5)  # a small limit: the clamps bite
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.5)
    x = torch.randn(2, 7, 16)
    y, sums = moe(x)
    ex = moe.experts
    want = torch.zeros(14, 16)
    for t, xt in enumerate(x.reshape(14, 16)):
        top, idx = moe.router(xt).topk(3)
        for w, e in zip(top.softmax(-1), idx.tolist()):
            gu = xt @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
            gate, up = gu[::2].clamp(max=0.5), gu[1::2].clamp(-0.5, 0.5)
            want[t] += w * (((up + 1) * gate * torch.sigmoid(1.702 * gate)) @ ex.down_proj[e] + ex.down_proj_bias[e])
    assert torch.allclose(y.reshape(14, 16), want, atol=1e-5)  # fp32 sums of ~1e0 terms in another order
    assert float(sums.counts.sum()) == 14 * 3 and sums.tokens == 14


def test_convert_export_round_trip_is_bit_exact_and_bf16_loads(dirs, tmp_path):
    d, hf = dirs["alternating_yarn"]
    run = tmp_path / "run"
    train(f"model.init_from={d}", "steps=0", f"data.path={text_dir(tmp_path)}", "data.val_fraction=0.1",
          f"seq_len={SEQ}", f"hydra.run.dir={run}", "logging.mask_png=false", timeout=120)
    from safetensors.torch import load_file

    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        proc = subprocess.run([PY, "-m", "trainer.export", f"trainer.resume={run}", f"out={out}", f"dtype={dtype}"],
                              cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        src, dst = load_file(str(d / "model.safetensors")), load_file(str(out / "model.safetensors"))
        assert set(src) == set(dst)
        assert all(torch.equal(src[k].to(getattr(torch, dtype)), dst[k]) for k in src)
        back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert type(back).__name__ == "GptOssForCausalLM" and back.config.layer_types == hf.config.layer_types
        assert back.config.rope_parameters["truncate"] is False and back.config.sliding_window == 8
        tokens = torch.randint(0, BASE["vocab_size"], (1, SEQ))
        with torch.no_grad():
            if dtype == "float32":
                assert torch.equal(back(tokens).logits, hf(tokens).logits)
            else:  # bf16 weights: ~3 significant digits per weight, logits of ~10 move by ~0.1
                assert (back(tokens).logits - hf(tokens).logits).abs().max() < 1.0


def test_sp2_trains_as_sp1_with_the_aux_loss_and_exports(dirs, tmp_path):
    """Sliding layers under the halo strategy, full ones under theirs (auto: Ulysses, 4 heads over 2
    ranks), learned sinks and the router's load-balancing loss (its counts all-reduced): SP=1 and
    SP=2 give the same losses, aux losses, tokens per expert and gradient norms; the trained
    checkpoint exports and transformers' greedy ids on it are ours."""
    from trainer.tools.export import export, load_checkpoint

    d = dirs["alternating_yarn"][0]
    common = (f"model.init_from={d}", "steps=3", f"data.path={text_dir(tmp_path)}", "data.val_fraction=0.1",
              "seq_len=64", "eval_every=3", "eval_batches=1", "optim.warmup_steps=1", "optim.lr=1e-3",
              "logging.mask_png=false", "parallel.timeout_s=30", "model.router_aux_loss_coef=0.01")
    train(*common, f"hydra.run.dir={tmp_path / 'sp1'}", timeout=240)
    proc = train(*common, f"hydra.run.dir={tmp_path / 'sp2'}", nproc=2, timeout=240)
    a, b = rows(tmp_path / "sp1"), rows(tmp_path / "sp2")
    # tolerances as tests/test_hf.py's SP test (reordered fp32 sums; initializer_range=0.3 makes the model sharp)
    for step in (1, 2, 3):
        assert a[step]["train/loss"] == pytest.approx(b[step]["train/loss"], rel=1e-5, abs=1e-6), step
        assert a[step]["train/aux_loss"] == pytest.approx(b[step]["train/aux_loss"], rel=1e-5), step
        assert a[step]["train/grad_norm"] == pytest.approx(b[step]["train/grad_norm"], rel=1e-4), step
        experts = [k for k in a[step] if k.startswith("moe/layer")]
        assert experts and all(a[step][k] == b[step][k] for k in experts), step  # routing is per token: equal
        assert a[step]["moe/dropped_tokens"] == b[step]["moe/dropped_tokens"] == 0.0
    assert sum(a[1][f"moe/layer0/expert{e}_tokens"] for e in range(4)) == 64 * 2  # every token, top-2
    assert b[3]["comm/kind/window/forward_bytes"] > 0 and b[3]["comm/kind/dense/forward_bytes"] > 0
    assert "comm bytes/step by kind" in proc.stdout + proc.stderr
    model, cfg, _ = load_checkpoint(str(tmp_path / "sp2"))
    export(model, cfg, tmp_path / "out", as_dense=False)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    prompt = torch.tensor([HfTokenizer(str(d)).encode("the quick").tolist()])
    want = hf_greedy(back, prompt, 32)
    assert torch.equal(generate(model, prompt, 32, Sampling()).tokens, want)


def test_bad_inputs_are_one_line(dirs, tmp_path):
    good = dirs["alternating_yarn"][0]
    config = json.loads((good / "config.json").read_text())
    quant = tmp_path / "mxfp4"
    quant.mkdir()
    (quant / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "mxfp4"}}))
    blocks = tmp_path / "blocks"
    blocks.mkdir()
    (blocks / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(good / "model.safetensors"))
    tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"] = torch.zeros(4, 96, 2, 16, dtype=torch.uint8)
    save_file(tensors, str(blocks / "model.safetensors"))
    experts = tmp_path / "experts"
    experts.mkdir()
    (experts / "config.json").write_text(json.dumps({**config, "num_local_experts": 8}))
    (experts / "model.safetensors").symlink_to(good / "model.safetensors")
    cases = {"quantized": ([f"model.init_from={quant}"], "holds quantized weights .*mxfp4.*dequantize"),
             "blocks": ([f"model.init_from={blocks}"], "gate_up_proj_blocks is MXFP4-quantized"),
             "experts": ([f"model.init_from={experts}"], r"experts.down_proj has shape \[4, 48, 64\], the config needs \[8, 48, 64\]"),
             "contradiction": ([f"model.init_from={good}", "model.n_experts=2"], "model.n_experts: 2 contradicts"),
             "sinks_off": ([f"model.init_from={good}", "model.sink_logits=false"], "model.sink_logits: False contradicts"),
             "top_k": (["model.n_experts=4", "model.experts_per_token=5"],
                       r"model.experts_per_token: must be in \[1, model.n_experts=4\], got 5"),
             "aux_without_experts": (["model.router_aux_loss_coef=0.01"], "router_aux_loss_coef: .* needs model.n_experts > 0"),
             "negative": (["model.n_experts=-1"], "model.n_experts: must be >= 0"),
             "limit": (["model.n_experts=2", "model.swiglu_limit=0"], "model.swiglu_limit: must be > 0")}
    for case, (overrides, message) in cases.items():
        with pytest.raises(ConfigError, match=message) as e:
            config_of(*overrides)
        assert "\n" not in str(e.value), case


def test_export_refuses_sinks_without_experts(tmp_path):
    from model.pattern import Dense
    from trainer.tools.export import export

    cfg = config_of("model.sink_logits=true", "attention=dense", "attention.causal=true")
    model = Transformer(cfg.model_config(), [Dense(causal=True)] * 2)
    with pytest.raises(ConfigError, match="sink_logits and model.n_experts go together"):
        export(model, cfg, tmp_path / "x", as_dense=True)
    assert not (tmp_path / "x").exists()


def test_moe_from_scratch_zero3_over_dp_ranks_equals_zero0(tmp_path):
    """model.n_experts from scratch (byte data) over 2 data-parallel ranks: ZeRO-3 partitions the
    expert tensors and gathers them per module; its losses and gradient norms equal ZeRO-0's (the
    same reduced gradients, fp32 sums in another order: rel 1e-5)."""
    common = ("model.n_experts=4", "model.experts_per_token=2", "model.router_aux_loss_coef=0.01", "steps=3",
              "seq_len=128", "attention=dense", "attention.causal=true", "parallel.sequence_parallel_size=1",
              "eval_every=3", "eval_batches=1", "optim.warmup_steps=1", "logging.mask_png=false",
              "parallel.timeout_s=60")
    train(*common, "parallel.zero_stage=0", f"hydra.run.dir={tmp_path / 'z0'}", nproc=2, timeout=300)
    train(*common, "parallel.zero_stage=3", f"hydra.run.dir={tmp_path / 'z3'}", nproc=2, timeout=300)
    a, b = rows(tmp_path / "z0"), rows(tmp_path / "z3")
    for step in (1, 2, 3):
        assert a[step]["train/loss"] == pytest.approx(b[step]["train/loss"], rel=1e-5), step
        assert a[step]["train/grad_norm"] == pytest.approx(b[step]["train/grad_norm"], rel=1e-5), step
        assert a[step]["train/aux_loss"] == pytest.approx(b[step]["train/aux_loss"], rel=1e-5), step
    assert a[3]["train/loss"] < a[1]["train/loss"]  # it learns


def test_sliding_layer_bytes_are_constant_in_the_sequence_length(dirs, tmp_path):
    """Under SP=2 a sliding layer receives O(window) bytes whatever the sequence length; a full
    layer receives what its strategy moves (Ulysses: O(n)), here doubling with n."""
    d = dirs["alternating_yarn"][0]
    byts = {}
    for n in (64, 128):
        run = tmp_path / f"n{n}"
        train(f"model.init_from={d}", "steps=1", f"data.path={text_dir(tmp_path)}", "data.val_fraction=0.2",
              f"seq_len={n}", "eval_every=0", "eval_batches=1", "logging.mask_png=false", "parallel.timeout_s=30",
              f"hydra.run.dir={run}", nproc=2, timeout=180)
        r = rows(run)[1]
        byts[n] = (r["comm/layer0/forward_bytes"], r["comm/layer1/forward_bytes"])
    assert byts[64][0] == byts[128][0] > 0  # sliding: the 7-key halo, the same at both lengths
    assert byts[128][1] == 2 * byts[64][1] > 0  # full (Ulysses all-to-all of q, k, v, out): linear in n

