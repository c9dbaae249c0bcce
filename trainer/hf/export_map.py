"""What a Haloformer model is in Hugging Face's terms: the architecture and config.json it exports as.

Per layer, a pattern Hugging Face can run is dense causal (full attention) or a causal window
without globals or dilation (its ``sliding_window`` = window_left + 1, counting the query). Then:

- every layer dense -> the source architecture (``model.init_from``'s), Llama for a model trained here;
- every layer the same window -> Mistral (Qwen2 for a Qwen2 source, with ``layer_types``);
- dense and window layers mixed (one window size) -> Qwen2 ``layer_types`` (zero q/k/v biases are
  written for a source without them: the same function);
- a mixture of experts (model.n_experts, with sink logits) -> gpt-oss, ``layer_types`` per layer.

Anything else (globals, BigBird, strided, dilated, top-k, two window sizes) raises one line naming
the layer, its pattern and the way out, ``as_dense=true``: the same weights with dense attention
(sparse in training, dense at inference, as LongLoRA does).
"""

from __future__ import annotations

from model.pattern import Dense, Pattern, Window
from model.transformer import ModelConfig

MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
               "GptOssForCausalLM": "gpt_oss"}


def hf_window(p: Pattern) -> int | None:
    """Hugging Face's sliding window for ``p``, None for full causal attention; ValueError otherwise."""
    if type(p) is Dense and p.causal and p.num_global == 0:
        return None
    if type(p) is Window and p.causal and p.num_global == 0 and p.window_right == 0 and p.dilation == 1:
        return p.window_left + 1
    raise ValueError(p)


def layer_windows(patterns: list[Pattern], as_dense: bool) -> list[int | None]:
    out = []
    for i, p in enumerate(patterns):
        try:
            out.append(hf_window(p))
        except ValueError:
            if not as_dense:
                raise ValueError(f"export: layer {i}'s pattern {p} has no Hugging Face equivalent (only dense causal "
                                 "and causal windows without globals); as_dense=true writes the same weights with "
                                 "dense attention") from None
            out.append(None)
    if len({w for w in out if w is not None}) > 1:
        if not as_dense:
            raise ValueError(f"export: the layers' windows differ ({sorted({w for w in out if w})}); Hugging Face has "
                             "one sliding_window; as_dense=true writes the same weights with dense attention")
        out = [None] * len(out)
    return out


def choose_architecture(source: str, windows: list[int | None]) -> str:
    if all(w is None for w in windows):
        return source
    if all(w is not None for w in windows) and source != "Qwen2ForCausalLM":
        return "MistralForCausalLM"
    return "Qwen2ForCausalLM"


def hf_config(cfg: ModelConfig, arch: str, windows: list[int | None], base: dict, max_positions: int,
              bos: int | None, eos: int | None) -> dict:
    """config.json: ``base`` (the source's, for keys Haloformer does not model) with every field
    that decides the math written from ``cfg`` and ``windows``."""
    for key in ("auto_map", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
                "rope_scaling", "rope_theta", "attention_bias", "mlp_bias", "quantization_config"):
        base.pop(key, None)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope.update({k: v for k, v in cfg.rope_scaling.items() if k != "max_position_embeddings"})
    out = {**base, "architectures": [arch], "model_type": MODEL_TYPES[arch], "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
           "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
           "head_dim": cfg.head_dim or cfg.d_model // cfg.n_heads, "hidden_act": cfg.hidden_act,
           "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": rope,
           "max_position_embeddings": (cfg.rope_scaling or {}).get("max_position_embeddings",
                                                                   base.get("max_position_embeddings", max_positions)),
           "bos_token_id": bos, "eos_token_id": eos}
    window = next((w for w in windows if w is not None), None)
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=cfg.qkv_bias or cfg.out_bias, mlp_bias=False)
    elif arch == "MistralForCausalLM":
        out["sliding_window"] = window
    elif arch == "GptOssForCausalLM":
        out.update(sliding_window=window or base.get("sliding_window") or 128, attention_bias=cfg.qkv_bias or cfg.out_bias,
                   layer_types=["full_attention" if w is None else "sliding_attention" for w in windows],
                   num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token,
                   swiglu_alpha=cfg.swiglu_alpha, swiglu_limit=cfg.swiglu_limit,
                   router_aux_loss_coef=cfg.router_aux_loss_coef or base.get("router_aux_loss_coef", 0.001))
    else:
        out.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0,
                   layer_types=["full_attention" if w is None else "sliding_attention" for w in windows])
    return out
