"""Hugging Face Llama / Mistral / Qwen2 weights <-> Haloformer's state dict names, both ways.

Read: ``model.safetensors``, a sharded ``model.safetensors.index.json``, or — only when neither is
there — ``pytorch_model.bin`` through ``torch.load(weights_only=True)``, which unpickles tensors and
containers and refuses anything else (a pickle that would run code is an error, not a call). Every
tensor is checked against the model the config describes: a missing one, an unexpected one, or a
shape that differs is one ``ValueError`` line naming the tensor and both shapes.

The rotary layout needs no permutation: both sides rotate the (first half, second half) pairs of
each head (Hugging Face's ``rotate_half``; ``model.attention.apply_rotary``).
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "mlp_norm.weight",
          "mlp.gate_proj.weight": "mlp.w1.weight", "mlp.up_proj.weight": "mlp.w3.weight",
          "mlp.down_proj.weight": "mlp.w2.weight"}
for _hf, _ours in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
    for _kind in ("weight", "bias"):
        _LAYER[f"self_attn.{_hf}.{_kind}"] = f"attn.{_ours}.{_kind}"
_LAYER["self_attn.sinks"] = "attn.sinks"  # gpt-oss
for _name in ("router.weight", "router.bias", "experts.gate_up_proj", "experts.gate_up_proj_bias",
              "experts.down_proj", "experts.down_proj_bias"):  # gpt-oss's MoE: model.moe keeps its names
    _LAYER[f"mlp.{_name}"] = f"mlp.{_name}"
_TOP = {"model.embed_tokens.weight": "wte.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "lm_head.weight"}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_OUR_LAYER = re.compile(r"blocks\.(\d+)\.(.+)")


def hf_to_ours(name: str) -> str | None:
    if name in _TOP:
        return _TOP[name]
    m = _HF_LAYER.fullmatch(name)
    if m and m.group(2) in _LAYER:
        return f"blocks.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def ours_to_hf(name: str) -> str | None:
    inverse_top = {v: k for k, v in _TOP.items()}
    if name in inverse_top:
        return inverse_top[name]
    m = _OUR_LAYER.fullmatch(name)
    inverse = {v: k for k, v in _LAYER.items()}
    if m and m.group(2) in inverse:
        return f"model.layers.{m.group(1)}.{inverse[m.group(2)]}"
    return None


def read_hf_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the model directory ``path``, by its Hugging Face name."""
    from safetensors.torch import load_file

    root = Path(path).expanduser()
    single, index, pickled = root / "model.safetensors", root / "model.safetensors.index.json", root / "pytorch_model.bin"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"model.init_from: {index} is not a safetensors index ({e})") from None
        out = {}
        for shard in shards:
            file = (root / shard).resolve()
            if file.parent != root.resolve() or not file.is_file():
                raise ValueError(f"model.init_from: {index} names shard {shard!r}, which is not a file of {root}")
            out.update(load_file(str(file)))
        return out
    if pickled.is_file():
        try:
            state = torch.load(pickled, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise ValueError(f"model.init_from: {pickled} is not a plain tensor file (weights_only refused it: "
                             f"{str(e).splitlines()[0][:120]}); convert it to model.safetensors") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"model.init_from: {pickled} must hold a dict of tensors")
        return state
    raise ValueError(f"model.init_from: {root} holds no weights (model.safetensors, model.safetensors.index.json or "
                     "pytorch_model.bin)")


def read_hf_shapes(path: str) -> dict[str, torch.Size]:
    """The tensors' shapes, from the safetensors headers alone (config validation reads no data)."""
    from safetensors import safe_open

    root = Path(path).expanduser()
    files = [root / "model.safetensors"] if (root / "model.safetensors").is_file() else []
    if not files and (root / "model.safetensors.index.json").is_file():
        try:
            files = [root / s for s in sorted(set(json.loads((root / "model.safetensors.index.json").read_text())
                                                  ["weight_map"].values()))]
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"model.init_from: {root / 'model.safetensors.index.json'} is not a safetensors index "
                             f"({e})") from None
    if not files:
        return {k: v.shape for k, v in read_hf_tensors(path).items()}
    shapes = {}
    for file in files:
        if not file.is_file():
            raise ValueError(f"model.init_from: the index names shard {file.name!r}, which is not a file of {root}")
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes.update({k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()})
        except Exception as e:  # noqa: BLE001 - a corrupt header of any kind is one line
            raise ValueError(f"model.init_from: {file} is not a safetensors file ({str(e).splitlines()[0][:120]})") \
                from None
    return shapes


def check_shapes(shapes: dict[str, torch.Size], expected: dict[str, torch.Size], tied: bool) -> None:
    """``to_ours``'s checks on shapes alone (meta tensors stand in for the data)."""
    to_ours({k: torch.empty(v, device="meta") for k, v in shapes.items()}, expected, tied)


def to_ours(hf_tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size], tied: bool) -> dict[str, torch.Tensor]:
    """Rename and check: ``expected`` is our state dict's shapes (lm_head left out when ``tied``)."""
    out = {}
    for name, t in sorted(hf_tensors.items()):  # sorted: the same tensor is named first every time
        if name == "lm_head.weight" and tied:
            continue  # some tied checkpoints store the shared matrix twice
        ours = hf_to_ours(name)
        if name.endswith(("_blocks", "_scales")):
            raise ValueError(f"model.init_from: tensor {name} is MXFP4-quantized; Haloformer imports fp32/bf16/fp16 "
                             "weights only: dequantize once with transformers (Mxfp4Config(dequantize=True), then "
                             "save_pretrained) and import that directory")
        if ours is None or ours not in expected:
            raise ValueError(f"model.init_from: unexpected tensor {name} {list(t.shape)}: the config describes no "
                             "such weight")
        if t.shape != expected[ours]:
            raise ValueError(f"model.init_from: tensor {name} has shape {list(t.shape)}, the config needs "
                             f"{list(expected[ours])}")
        out[ours] = t
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ValueError(f"model.init_from: tensor {ours_to_hf(missing[0])} (shape {list(expected[missing[0]])}) is "
                         "missing from the weights")
    return out


def expected_shapes(model, hf_sinks: bool = False) -> dict[str, torch.Size]:
    """Our parameters that come from a checkpoint: all but a tied head and what the Hugging Face
    model lacks (learned global slots; sink logits unless ``hf_sinks``, as gpt-oss has them: added to
    an imported model, they keep their init)."""
    skip = {"global_emb"} | ({"lm_head.weight"} if model.cfg.tie_embeddings else set())
    return {k: v.shape for k, v in model.state_dict().items()
            if k not in skip and (hf_sinks or not k.endswith("attn.sinks"))}


def load_into(model, path: str) -> None:
    """Copy the directory's weights into ``model`` (fp32 or the model's dtype), checked first."""
    from trainer.hf.config_map import SINK_ARCHITECTURES, architecture, read_hf_config

    hf_sinks = architecture(read_hf_config(path)) in SINK_ARCHITECTURES
    state = to_ours(read_hf_tensors(path), expected_shapes(model, hf_sinks), model.cfg.tie_embeddings)
    with torch.no_grad():
        params = model.state_dict()
        for k, t in state.items():
            params[k].copy_(t.to(params[k].dtype))


def hf_state_dict(model_state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Our state dict -> Hugging Face names (contiguous, cloned: safetensors refuses shared storage)."""
    out = {}
    for k, t in model_state.items():
        if k == "global_emb" or (tied and k == "lm_head.weight"):
            continue
        name = ours_to_hf(k)
        if name is None:
            raise ValueError(f"export: weight {k} has no Hugging Face counterpart")
        out[name] = t.detach().contiguous().clone()
    return out
