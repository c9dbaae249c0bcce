"""Export a checkpoint as a Hugging Face model directory:
``python -m trainer.export trainer.resume=RUN_OR_CKPT out=DIR [as_dense=true] [dtype=bfloat16]``.

Writes config.json, model.safetensors (fp32, or bf16 with dtype=bfloat16), generation_config.json and — for a model with a
Hugging Face tokenizer (data.tokenizer=hf:DIR, the default with model.init_from) — that
tokenizer's files, so that ``AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` load it. Which architecture, and which patterns are refused,
is ``trainer.hf.export_map``'s rule: a mixture-of-experts model (model.n_experts) is gpt-oss, whose
attention has sink logits (model.sink_logits: required there, and only there). Learned global slots
have no Hugging Face equivalent and are refused, and so are global keys at a fixed rotary distance
(model.global_rope=fixed). Errors are one line, exit 2, before anything is written.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from kernels.global_part import scores_apart
from model.pattern import PatternError
from trainer.config.validate import ConfigError, TrainConfig
from trainer.data.corpus import DataConfigError, get_tokenizer
from trainer.data.hf_tokenizer import FILES, is_hf, tokenizer_dir
from trainer.hf.config_map import architecture, read_hf_config
from trainer.hf.export_map import choose_architecture, hf_config, layer_windows
from trainer.hf.weights import hf_state_dict

KEYS = ("trainer.resume", "out", "as_dense", "dtype")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_checkpoint(resume: str):
    """(model, train config, checkpoint path): the run loader's (``trainer.state.run.load_run``: every
    ZeRO stage, strict keys, weights_only), as generation and coverage read it."""
    from trainer.state.run import load_run, resolve_checkpoint

    ckpt = resolve_checkpoint(resume)
    cfg, model, _ = load_run(ckpt, "cpu")
    return model, cfg, ckpt


def parse_args(argv: list[str]) -> dict:
    args = {"as_dense": "false", "dtype": "float32"}
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq or key not in KEYS:
            raise ConfigError(f"{key}: unknown argument; allowed: {', '.join(k + '=...' for k in KEYS)}")
        args[key] = value
    for key in ("trainer.resume", "out"):
        if not args.get(key):
            raise ConfigError(f"{key}: missing; usage: python -m trainer.export trainer.resume=RUN_OR_CKPT out=DIR")
    if args["as_dense"] not in ("true", "false"):
        raise ConfigError(f"as_dense: must be true or false, got {args['as_dense']!r}")
    if args["dtype"] not in DTYPES:
        raise ConfigError(f"dtype: must be one of {', '.join(DTYPES)}, got {args['dtype']!r}")
    return {**args, "as_dense": args["as_dense"] == "true"}


def export(model, cfg: TrainConfig, out: Path, as_dense: bool, dtype: str = "float32") -> str:
    """Write the directory; returns the architecture written."""
    mcfg = model.cfg
    if mcfg.n_learned_global:
        raise ConfigError("export: model.n_learned_global has no Hugging Face equivalent; export a model trained "
                          "without learned global slots")
    if mcfg.global_rope == "fixed" and any(scores_apart(p) for p in model.patterns):
        raise ConfigError("export: model.global_rope=fixed scores the global keys at a fixed rotary distance, which "
                          "no Hugging Face attention does; export a model trained with model.global_rope=position")
    if bool(mcfg.sink_logits) != bool(mcfg.n_experts):
        raise ConfigError("export: model.sink_logits and model.n_experts go together in Hugging Face's models "
                          "(gpt-oss has both; Llama, Mistral and Qwen2 neither); this model has sink_logits="
                          f"{str(bool(mcfg.sink_logits)).lower()}, n_experts={mcfg.n_experts}")
    try:
        windows = layer_windows(model.patterns, as_dense)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    source = cfg.model.init_from
    base = read_hf_config(source) if source else {}
    arch = "GptOssForCausalLM" if mcfg.n_experts else choose_architecture(
        architecture(base) if source else "LlamaForCausalLM", windows)
    if mcfg.out_bias and arch not in ("LlamaForCausalLM", "GptOssForCausalLM"):
        raise ConfigError(f"export: this model has attention output biases (o_proj.bias), which {arch} (what its "
                          "patterns export as) lacks; only Llama (dense layers) and gpt-oss have them")
    tok = get_tokenizer(cfg.data.tokenizer) if is_hf(cfg.data.tokenizer) else None
    bos, eos = (tok.bos_id, tok.eos_id) if tok is not None else (None, None)
    config = hf_config(mcfg, arch, windows, base, cfg.seq_len, bos, eos)
    tensors = hf_state_dict(model.state_dict(), mcfg.tie_embeddings)
    # Qwen2 always has q/k/v biases, Llama and gpt-oss with attention_bias all four: zero ones compute the same
    four = ("q_proj", "k_proj", "v_proj", "o_proj") if config.get("attention_bias") else ()
    zero_bias = {"Qwen2ForCausalLM": ("q_proj", "k_proj", "v_proj"), "LlamaForCausalLM": four, "GptOssForCausalLM": four}
    for i, block in enumerate(model.blocks):
        for hf in zero_bias.get(arch, ()):
            lin = getattr(block.attn, {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo"}[hf])
            tensors.setdefault(f"model.layers.{i}.self_attn.{hf}.bias", torch.zeros(lin.out_features))
    tensors = {k: v.to(DTYPES[dtype]) for k, v in tensors.items()}
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2) + "\n")
    gen_src = Path(source).expanduser() / "generation_config.json" if source else None
    gen = json.loads(gen_src.read_text()) if gen_src is not None and gen_src.is_file() else {}
    gen.update({k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos)) if v is not None})
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tok is not None:
        for name in FILES[:3]:
            if (Path(tokenizer_dir(cfg.data.tokenizer)).expanduser() / name).is_file():
                shutil.copyfile(Path(tokenizer_dir(cfg.data.tokenizer)).expanduser() / name, out / name)
    return arch


def cli() -> None:
    from trainer.state.faults import config_error

    try:
        args = parse_args(sys.argv[1:])
        model, cfg, ckpt = load_checkpoint(args["trainer.resume"])
        arch = export(model, cfg, Path(args["out"]).expanduser(), args["as_dense"], args["dtype"])
    except (ConfigError, DataConfigError, PatternError, ValueError) as e:
        config_error(str(e).splitlines()[0], None)
    dense = " with dense attention in every layer (as_dense=true)" if args["as_dense"] else ""
    tok = "" if is_hf(cfg.data.tokenizer) else f"; no tokenizer files (data.tokenizer={cfg.data.tokenizer} is not a Hugging Face one)"
    print(f"exported {ckpt} as {arch} to {args['out']}{dense}{tok}", file=sys.stderr)
