"""A Hugging Face model directory's config.json -> the ModelConfig fields and per-layer patterns.

Only plain JSON is read: ``auto_map`` (remote code) is refused, and so is anything in the config
that changes the math and that the model does not compute (another activation, Llama's o_proj or
MLP biases, partial rotary, longrope). Every error is one ``ValueError`` line naming the setting;
the trainer's validation turns it into a ConfigError before any process group.

Patterns (``hf_layer_attention``): no window -> dense causal; Mistral ``sliding_window = W`` -> a
causal window of ``window_left = W - 1`` in every layer (Hugging Face's window counts the query
itself: key j is seen when i - j < W); Qwen2 ``layer_types`` (or, in older configs,
``use_sliding_window`` with ``max_window_layers``: layers >= it slide) -> per layer. A window that
covers the whole training sequence (W - 1 >= seq_len) is dense causal there, and is written so.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GptOssForCausalLM")
SINK_ARCHITECTURES = ("GptOssForCausalLM",)  # one learned sink logit per head (self_attn.sinks)
ROPE_KEYS = ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")


def read_hf_config(path: str) -> dict:
    """config.json of the model directory ``path``, checked: one line per problem."""
    return dict(_read(str(Path(path).expanduser().resolve())))


@functools.lru_cache(maxsize=8)
def _read(path: str) -> dict:
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"model.init_from: {path} is not a directory; it must be a local Hugging Face model "
                         "directory (config.json, model.safetensors, tokenizer.json)")
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"model.init_from: {path} has no config.json; it must be a Hugging Face model directory")
    try:
        hf = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"model.init_from: {cfg_file} is not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"model.init_from: {cfg_file} must hold a JSON object")
    if hf.get("auto_map"):
        raise ValueError(f"model.init_from: {cfg_file} asks for remote code (auto_map); Haloformer runs no code "
                         f"from a model directory; supported: {', '.join(ARCHITECTURES)}")
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ValueError(f"model.init_from: architecture {', '.join(map(str, archs)) or '(none)'} of {cfg_file} is "
                         f"not supported; supported: {', '.join(ARCHITECTURES)}")
    quant = hf.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise ValueError(f"model.init_from: {cfg_file} holds quantized weights (quantization_config: {method}); "
                         "Haloformer imports fp32/bf16/fp16 weights only: dequantize once with transformers "
                         "(gpt-oss: from_pretrained(DIR, quantization_config=Mxfp4Config(dequantize=True)), then "
                         "save_pretrained) and import that directory")
    return hf


def architecture(hf: dict) -> str:
    return hf["architectures"][0]


def rope_fields(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from ``rope_parameters`` (transformers 5) or the older
    ``rope_theta`` / ``rope_scaling`` keys, with Hugging Face's defaults."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if hf.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("model.init_from: partial_rotary_factor != 1 is not supported (every head dimension rotates)")
    if kind == "default":
        return theta, None
    if kind not in ("linear", "dynamic", "yarn", "llama3"):
        raise ValueError(f"model.init_from: rope type {kind!r} is not supported; supported: default, linear, dynamic, "
                         "yarn, llama3")
    out = {"rope_type": kind, "max_position_embeddings": int(hf.get("max_position_embeddings", 2048))}
    out.update({k: rope[k] for k in ROPE_KEYS if rope.get(k) is not None})
    if kind in ("yarn", "llama3"):
        out.setdefault("original_max_position_embeddings", out["max_position_embeddings"])
    return theta, out


def model_fields(hf: dict) -> dict:
    """The ModelConfig fields config.json decides."""
    arch = architecture(hf)
    act = hf.get("hidden_act", "silu")
    if act != "silu" and arch != "GptOssForCausalLM":  # gpt-oss's experts have their own activation
        raise ValueError(f"model.init_from: hidden_act={act!r} is not supported; the MLP computes silu (SwiGLU)")
    if hf.get("mlp_bias"):
        raise ValueError("model.init_from: mlp_bias=true is not supported (no dense-MLP biases); supported: "
                         "mlp_bias=false")
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or int(hf["hidden_size"]) // heads
    theta, scaling = rope_fields(hf)
    bias = bool(hf.get("attention_bias", arch == "GptOssForCausalLM"))  # Llama, gpt-oss: q, k, v and o
    moe = {}
    if arch == "GptOssForCausalLM":
        moe = {"n_experts": int(hf.get("num_local_experts", 128)), "experts_per_token": int(hf.get("num_experts_per_tok", 4)),
               "swiglu_alpha": float(hf.get("swiglu_alpha", 1.702)), "swiglu_limit": float(hf.get("swiglu_limit", 7.0)),
               "sink_logits": True}
    return {**moe, "vocab_size": int(hf["vocab_size"]), "d_model": int(hf["hidden_size"]),
            "n_layers": int(hf["num_hidden_layers"]), "n_heads": heads,
            "n_kv_heads": int(hf.get("num_key_value_heads") or heads), "d_ff": int(hf["intermediate_size"]),
            "rope_theta": theta, "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "head_dim": None if head_dim * heads == int(hf["hidden_size"]) else int(head_dim),
            "qkv_bias": arch == "Qwen2ForCausalLM" or bias, "out_bias": bias, "rope_scaling": scaling,
            "hidden_act": "silu"}


def layer_windows(hf: dict) -> list[int | None]:
    """Per layer: Hugging Face's sliding window W (keys with i - j < W), or None for full attention."""
    n, arch, window = int(hf["num_hidden_layers"]), architecture(hf), hf.get("sliding_window")
    if arch == "LlamaForCausalLM" or not window:
        return [None] * n
    if arch == "MistralForCausalLM":
        return [int(window)] * n
    if arch == "GptOssForCausalLM":  # layer_types always (its config's default: sliding on even layers)
        types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    elif not hf.get("use_sliding_window", False):
        return [None] * n
    else:
        types = hf.get("layer_types") or ["sliding_attention" if i >= int(hf.get("max_window_layers", 28))
                                          else "full_attention" for i in range(n)]
    if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"model.init_from: layer_types must list {n} of sliding_attention / full_attention; "
                         f"got {types!r}")
    return [int(window) if t == "sliding_attention" else None for t in types]


def hf_layer_attention(hf: dict, seq_len: int) -> list[dict]:
    """One ``attention`` mapping per layer (model.pattern.from_config's input)."""
    out = []
    for w in layer_windows(hf):
        if w is None or w - 1 >= seq_len:
            out.append({"name": "dense", "causal": True, "num_global": 0})
        else:
            out.append({"name": "window", "causal": True, "window_left": w - 1, "window_right": 0, "num_global": 0})
    return out
