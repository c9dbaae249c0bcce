"""Hugging Face import and export against transformers itself (the oracle; never imported at run time).

Tiny random Llama / Mistral / Qwen2 models are built with transformers' own classes and written with
``save_pretrained`` into temporary directories (nothing is downloaded). initializer_range=0.3 makes
logits spread widely, so a mistake in any weight, bias, rotary angle or window shows up, and greedy
decoding has no near-ties.
"""

from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from model.decode import Sampling, generate  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from tests.train_utils import PY, REPO, _env, train  # noqa: E402
from trainer.config.schema import ConfigError  # noqa: E402
from trainer.data.hf_tokenizer import HfTokenizer  # noqa: E402
from trainer.hf.weights import load_into  # noqa: E402

# fp32 on both sides; the sums run in different orders (SDPA vs our kernels, fp64 vs fp32 rotary
# products), which moves logits of magnitude ~10 by a few 1e-6: 1e-4 leaves room without hiding a
# wrong weight, bias or angle (those move them by >= 1e-2).
ATOL = 1e-4
SEQ = 40  # longer than every window below (8), so the windows matter
SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             initializer_range=0.3, bos_token_id=0, eos_token_id=1)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def save_tokenizer(d: Path) -> None:
    """A byte-level BPE with <s> (BOS, added by the template) and </s> (EOS), as PreTrainedTokenizerFast."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["def f(x): return x + 1\n" * 20, "the quick brown fox jumps over the lazy dog " * 20],
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>").save_pretrained(d)


def save_model(d: Path, arch: str, n_layers: int = 2, **config):
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    torch.manual_seed(0)
    model = cls[1](cls[0](**{**SHAPE, "num_hidden_layers": n_layers, **config})).eval()
    with torch.no_grad():  # transformers initialises biases to zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0.0, 0.3)
    model.save_pretrained(d)
    save_tokenizer(d)
    return model


CASES = {
    "llama_tied_llama3": ("llama", dict(tie_word_embeddings=True, max_position_embeddings=64, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "mistral_head_dim_window": ("mistral", dict(head_dim=32, sliding_window=8)),
    "qwen2_bias_untied_mixed": ("qwen2", dict(n_layers=3, tie_word_embeddings=False, use_sliding_window=True,
                                              sliding_window=8, layer_types=["full_attention", "sliding_attention",
                                                                             "full_attention"])),
    "llama_attention_bias": ("llama", dict(attention_bias=True)),  # q, k, v and o biases
    "rope_default_theta": ("llama", dict(rope_parameters=dict(rope_type="default", rope_theta=5000.0))),
    "rope_linear": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    # dynamic NTK changes the base only past max_position_embeddings: SEQ = 40 > 16
    "rope_dynamic": ("llama", dict(max_position_embeddings=16, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "rope_yarn": ("llama", dict(max_position_embeddings=64, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16))),
}


def config_of(*overrides: str):
    from hydra import compose, initialize_config_dir

    import trainer.train  # noqa: F401  (registers the launch_stamp resolver)
    from trainer.config.validate import load_config

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        node = compose(config_name="config", overrides=["trainer.ckpt_dir=unused", f"seq_len={SEQ}", *overrides])
    return load_config(node, 1)


def imported(d: Path, *overrides: str) -> Transformer:
    cfg = config_of(f"model.init_from={d}", *overrides)
    model = Transformer(cfg.model_config(), cfg.patterns())
    load_into(model, str(d))
    return model.eval()


def hf_greedy(hf, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' greedy ids: prompt + exactly n new tokens. attention_mask given: without it
    generate takes the BOS (id 0) for padding (pad_token_id=0) and masks it; min_new_tokens: n tokens
    even where the random model's argmax is EOS (ours does not stop at EOS)."""
    return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)


def text_dir(root: Path) -> Path:
    """Three small text files, the training data of the import tests."""
    text = root / "text"
    text.mkdir(exist_ok=True)
    for i in range(3):
        (text / f"{i}.txt").write_text(f"the quick brown fox {i} def f(x): return x\n" * 200)
    return text


def assert_logits_match(ours, hf, vocab: int, seq: int = SEQ) -> None:
    """Our imported model's logits equal Hugging Face's on random tokens (fp32: ATOL)."""
    tokens = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(tokens).logits, ours(tokens).logits
    assert want.abs().max() > 1.0  # logits that spread: the comparison below can fail
    assert (got - want).abs().max() <= ATOL


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: (root / name, save_model(root / name, arch, **config)) for name, (arch, config) in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_imported_logits_equal_hugging_face(hf_dirs, name):
    d, hf = hf_dirs[name]
    assert_logits_match(imported(d), hf, SHAPE["vocab_size"])


def test_patterns_follow_the_config(hf_dirs):
    llama = imported(hf_dirs["llama_tied_llama3"][0]).patterns
    assert [(type(p).__name__, p.causal, p.num_global) for p in llama] == [("Dense", True, 0)] * 2
    mistral = imported(hf_dirs["mistral_head_dim_window"][0]).patterns
    assert [(type(p).__name__, p.window_left) for p in mistral] == [("Window", 7)] * 2  # HF's W counts the query
    qwen = imported(hf_dirs["qwen2_bias_untied_mixed"][0]).patterns
    assert [type(p).__name__ for p in qwen] == ["Dense", "Window", "Dense"]
    # patterns_from=config: the attention group replaces them (LongLoRA-style sparse extension)
    sink = imported(hf_dirs["llama_tied_llama3"][0], "model.patterns_from=config", "attention.window_left=8")
    assert all(p.num_global > 0 and p.window_left == 8 for p in sink.patterns)


@pytest.mark.parametrize("name", ["llama_tied_llama3", "mistral_head_dim_window", "qwen2_bias_untied_mixed"])
def test_greedy_ids_equal_hugging_face_generate(hf_dirs, name):
    d, hf = hf_dirs[name]
    ours = imported(d)
    prompt = torch.tensor([HfTokenizer(str(d)).encode("def f(x): the quick").tolist()])
    want = hf_greedy(hf, prompt, 32)
    got = generate(ours, prompt, 32, Sampling()).tokens
    assert got.shape == want.shape == (1, prompt.shape[1] + 32)
    assert torch.equal(got, want)


@pytest.mark.parametrize("text", ["def f(x): return x", "the lazy dog\n\n  jumps", "unicode: é ü 漢字", ""])
def test_prompt_encoding_equals_hugging_face(hf_dirs, text):
    d = hf_dirs["mistral_head_dim_window"][0]
    assert HfTokenizer(str(d)).encode(text).tolist() == transformers.AutoTokenizer.from_pretrained(d)(text).input_ids


def test_documents_end_with_the_eos(hf_dirs):
    from trainer.data.cache import build_cache
    from trainer.data.corpus import Source

    tok = HfTokenizer(str(hf_dirs["mistral_head_dim_window"][0]))
    assert (tok.eos_id, tok.bos_id) == (1, 0)

    data = hf_dirs["mistral_head_dim_window"][0].parent / "two.jsonl"
    data.write_text('{"text": "the fox"}\n{"text": "the fox"}\n')
    dest = data.with_name("cache.bin")
    build_cache(Source(path=str(data)), tok, dest)
    import numpy as np

    ids = np.fromfile(dest, dtype=np.uint16).tolist()
    one = tok.encode("the fox").tolist() + [1]
    assert ids == one + one and 0 not in ids[1:len(one)]  # BOS first, EOS last, not id 0 as separator


def _tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def test_convert_and_export_round_trip_is_bit_exact(hf_dirs, tmp_path):
    """steps=0 writes the imported model as a checkpoint; the export of it equals the source."""
    d, hf = hf_dirs["mistral_head_dim_window"]
    text = text_dir(tmp_path)
    run = tmp_path / "run"
    train(f"model.init_from={d}", "steps=0", f"data.path={text}", "data.val_fraction=0.1", f"seq_len={SEQ}",
          f"hydra.run.dir={run}", "logging.mask_png=false", timeout=120)
    assert (run / "checkpoints" / "step_00000000").is_dir()
    out = tmp_path / "out"
    proc = subprocess.run([PY, "-m", "trainer.export", f"trainer.resume={run}", f"out={out}"], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    src, dst = _tensors(d), _tensors(out)
    assert set(src) == set(dst) and all(torch.equal(src[k], dst[k]) for k in src)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == "MistralForCausalLM" and back.config.sliding_window == 8
    tokens = torch.randint(0, SHAPE["vocab_size"], (1, SEQ))
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, hf(tokens).logits)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok("the fox").input_ids == HfTokenizer(str(d)).encode("the fox").tolist()
    # trainer.generate format=json on the checkpoint: the prompt encoded as transformers does, the greedy ids its own
    proc = subprocess.run([PY, "-m", "trainer.generate", f"trainer.resume={run}", "prompt='def f(x): the'",
                           "max_new_tokens=16", "format=json"], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout)
    prompt = torch.tensor([hf_tok("def f(x): the").input_ids])
    want = hf_greedy(back, prompt, 16)
    assert row["prompt_ids"] == prompt[0].tolist() and row["ids"] == want[0, prompt.shape[1]:].tolist()
    assert row["cache_bytes"] > 0 and row["text"] == hf_tok.decode(row["ids"], skip_special_tokens=True)


def test_export_of_mixed_layers_is_qwen2_and_sparse_needs_as_dense(hf_dirs, tmp_path):
    from trainer.tools.export import export

    d, hf = hf_dirs["qwen2_bias_untied_mixed"]
    cfg = config_of(f"model.init_from={d}")
    model = Transformer(cfg.model_config(), cfg.patterns())
    load_into(model, str(d))
    assert export(model, cfg, tmp_path / "q", as_dense=False) == "Qwen2ForCausalLM"
    src, dst = _tensors(d), _tensors(tmp_path / "q")
    assert set(src) == set(dst) and all(torch.equal(src[k], dst[k]) for k in src)
    assert json.loads((tmp_path / "q" / "config.json").read_text())["layer_types"] == [
        "full_attention", "sliding_attention", "full_attention"]
    sink_cfg = config_of(f"model.init_from={d}", "model.patterns_from=config", "attention.window_left=8")
    sparse = Transformer(sink_cfg.model_config(), sink_cfg.patterns())
    with pytest.raises(ConfigError, match=r"layer 0's pattern .* as_dense=true"):
        export(sparse, sink_cfg, tmp_path / "s", as_dense=False)
    assert not (tmp_path / "s").exists()
    assert export(sparse, sink_cfg, tmp_path / "s", as_dense=True) == "Qwen2ForCausalLM"
    assert json.loads((tmp_path / "s" / "config.json").read_text())["use_sliding_window"] is False


class _Boom:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def _bad_dirs(root: Path, good: Path) -> dict[str, tuple[str, str]]:
    """case -> (override, the message's start)."""
    (root / "noconfig").mkdir()
    arch = root / "gpt2"
    arch.mkdir()
    (arch / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    remote = root / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({**json.loads((good / "config.json").read_text()),
                                                    "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    shape = root / "shape"
    shape.mkdir()
    (shape / "config.json").write_text(json.dumps({**json.loads((good / "config.json").read_text()),
                                                   "intermediate_size": 128}))
    (shape / "model.safetensors").symlink_to(good / "model.safetensors")
    pkl = root / "pickle"
    pkl.mkdir()
    (pkl / "config.json").write_text((good / "config.json").read_text())
    (pkl / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _Boom(str(root / "ran"))}))
    return {"missing": (f"model.init_from={root / 'absent'}", "model.init_from: .* is not a directory"),
            "no_config": (f"model.init_from={root / 'noconfig'}", "model.init_from: .* has no config.json"),
            "architecture": (f"model.init_from={arch}", "architecture GPT2LMHeadModel .* supported: LlamaForCausalLM, "
                                                        "MistralForCausalLM, Qwen2ForCausalLM"),
            "remote_code": (f"model.init_from={remote}", "asks for remote code"),
            "shape": (f"model.init_from={shape}", r"tensor model.layers.0.mlp.down_proj.weight has shape \[64, 96\], "
                                                  r"the config needs \[64, 128\]"),
            "pickle": (f"model.init_from={pkl}", "pytorch_model.bin is not a plain tensor file"),
            "override": (f"model.init_from={good}", "model.d_model: 128 contradicts")}


def test_bad_inputs_are_one_line(hf_dirs, tmp_path):
    good = hf_dirs["mistral_head_dim_window"][0]
    for case, (override, message) in _bad_dirs(tmp_path, good).items():
        extra = ["model.d_model=128"] if case == "override" else []
        with pytest.raises(ConfigError, match=message) as e:
            config_of(override, *extra)
        assert "\n" not in str(e.value), case
    assert not (tmp_path / "ran").exists()  # the pickle's code did not run


def test_bad_input_exits_2_before_any_process_group(hf_dirs, tmp_path):
    proc = train(f"model.init_from={tmp_path / 'absent'}", f"hydra.run.dir={tmp_path / 'run'}", check=False,
                 timeout=60)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("config error: model.init_from:") and len(
        [ln for ln in lines if "config error" in ln]) == 1


def test_imported_model_trains_under_sp2_as_under_sp1_and_exports(hf_dirs, tmp_path):
    """Qwen2 with a dense and a sliding layer (halo exchange under SP=2): the same losses and gradient
    norms at SP=1 and SP=2 (sharding reorders fp32 sums only, tolerance as in test_train.py); the
    trained checkpoint exports, and transformers' greedy ids on it equal ours."""
    from tests.train_utils import rows
    from trainer.tools.export import export, load_checkpoint

    d = hf_dirs["qwen2_bias_untied_mixed"][0]
    text = text_dir(tmp_path)
    common = (f"model.init_from={d}", "steps=3", f"data.path={text}", "data.val_fraction=0.1", "seq_len=64",
              "eval_every=3", "eval_batches=1", "optim.warmup_steps=1", "optim.lr=1e-3", "logging.mask_png=false",
              "parallel.timeout_s=30")
    train(*common, f"hydra.run.dir={tmp_path / 'sp1'}", timeout=180)
    train(*common, f"hydra.run.dir={tmp_path / 'sp2'}", nproc=2, timeout=180)
    a, b = rows(tmp_path / "sp1"), rows(tmp_path / "sp2")
    # rel 1e-4 on the gradient norm, not test_train.py's 1e-5: initializer_range=0.3 makes the model sharp
    # (grad norms ~20), and after two Adam steps the reordered sums differ by ~1.5e-5; a wrong reduction
    # is a factor (x2 for averaging instead of summing), a missing halo a loss off by >1e-2.
    for step in (1, 2, 3):
        assert a[step]["train/loss"] == pytest.approx(b[step]["train/loss"], rel=1e-5, abs=1e-6), step
        assert a[step]["train/grad_norm"] == pytest.approx(b[step]["train/grad_norm"], rel=1e-4), step
    model, cfg, _ = load_checkpoint(str(tmp_path / "sp2"))
    assert not torch.equal(model.wte.weight, _tensors(d)["model.embed_tokens.weight"])  # it trained
    export(model, cfg, tmp_path / "out", as_dense=False)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    prompt = torch.tensor([HfTokenizer(str(d)).encode("the quick").tolist()])
    want = hf_greedy(back, prompt, 32)
    assert torch.equal(generate(model, prompt, 32, Sampling()).tokens, want)


def test_logits_to_keep_is_the_last_rows_of_the_full_logits():
    """A prefill keeps only the last position's logits (transformers' ``logits_to_keep``): the same
    row and [B, 1, V] instead of [B, T, V]; with learned global slots the kept row is still the last
    token's. Not bit for bit: BLAS takes another path for one row than for twelve (fp32 sums in
    another order, ~1e-7 relative); 1e-5 leaves room, a wrong row differs by O(1)."""
    from model.pattern import Window
    from model.transformer import ModelConfig

    for g in (0, 2):
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_learned_global=g),
                            Window(window_left=4, num_global=2, causal=True)).eval()
        tokens = torch.randint(0, 64, (2, 12))
        with torch.no_grad():
            full, last = model(tokens).logits, model(tokens, logits_to_keep=1).logits
        assert last.shape == (2, 1, 64) and full.shape == (2, 12 - g, 64)
        torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(tokens, targets=tokens, logits_to_keep=1)


def test_chunked_lm_head_and_loss_equal_the_unchunked_without_the_logits():
    """model.loss_chunk: the same loss and gradients (fp32 sums in another order: ~1e-7 relative; 1e-5
    leaves room, a chunk dropped or counted twice is off by >= 1/7 of the loss), and no tensor saved
    for backward holds more than one chunk of logits (the unchunked path saves [T, V])."""
    from model.pattern import Dense
    from model.transformer import ModelConfig

    T, V, chunk = 70, 512, 16  # 70 rows: the last chunk is partial
    cfg = dict(vocab_size=V, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, tie_embeddings=True)
    torch.manual_seed(0)
    tokens, targets = torch.randint(0, V, (1, T)), torch.randint(0, V, (1, T))
    targets[0, :5] = -100  # ignored targets stay ignored
    results = []
    for loss_chunk in (0, chunk):
        torch.manual_seed(1)
        model = Transformer(ModelConfig(**cfg, loss_chunk=loss_chunk), Dense(causal=True))
        biggest = []

        def pack(t, biggest=biggest):
            biggest.append(t.numel() if t.dim() >= 2 and t.shape[-1] == V else 0)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(tokens, targets=targets)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}, max(biggest)))
    (full, g_full, big_full), (chunked, g_chunked, big_chunked) = results
    assert chunked.logits is None and int(chunked.n_targets) == int(full.n_targets) == T - 5
    assert float(chunked.loss) == pytest.approx(float(full.loss), rel=1e-5)
    for name in g_full:
        assert torch.allclose(g_chunked[name], g_full[name], rtol=1e-5, atol=1e-7), name
    assert big_full >= T * V and big_chunked <= chunk * V
