"""Decoder-only language model: pure math on one device, given its positions and attention function.

    tokens [B, T] ─ embedding ─┬─ N × Block ── RMSNorm ── LM head ── logits [B, T', V]
    positions [T] ─────────────┘   Block: x + Attn(RMSNorm(x)); x + MLP(RMSNorm(x))
                                   MLP: SwiGLU, or with n_experts > 0 gpt-oss's mixture (model.moe)

The model never knows about ranks. A sequence shard passes its own ``positions`` (absolute, in the
full sequence of length ``seq_len``) and an ``attention_fn`` that fetches the keys the shard's
queries need (``model.attention.AttentionFn``); one device passes the defaults.

Learned global tokens: with ``n_learned_global = g`` the first g positions of the sequence are
global slots. Whatever token sits there is replaced by a learned embedding, and those rows give no
logits and no loss (T' = number of positions >= g). The slots are part of the sequence, so shards
stay equal in length, the pattern's ``num_global`` counts them, and the data pipeline is unchanged.

Packed documents: ``doc_ids`` [B, T] make every layer's attention stay inside a document (global
keys excepted), and ``rope_positions`` ([T] or [B, T], e.g. restarting at each document) replace
the absolute positions in the rotary angles only; the patterns keep the absolute ones.
``ModelConfig.sink_logits`` gives every layer its own learned sink logit per head (``Attention``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels.global_part import GLOBAL_ROPE, check_patterns
from model.attention import Attention, AttentionFn, StatSums, check_heads, local_attention
from model.moe import MoE, RouterSums, merge_router_sums
from model.pattern import Dense, Pattern, from_config
from model.rope import RopeScaling, scaled_rotary_angles


@dataclass
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int | None = None  # None: SwiGLU's 8/3·d_model rounded up to a multiple of ``multiple_of``
    multiple_of: int = 32
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    activation_checkpointing: bool = False
    n_learned_global: int = 0
    sink_logits: bool = False  # a learned [n_heads] sink logit per layer (gpt-oss), initialised to 0.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # Imported architectures (trainer/hf); the defaults are the models trained here, bit for bit.
    head_dim: int | None = None  # None: d_model // n_heads
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2, gpt-oss)
    out_bias: bool = False  # a bias on the attention's output projection (gpt-oss, Llama attention_bias)
    rope_scaling: dict | None = None  # a Hugging Face rope_parameters entry (model.rope.RopeScaling fields)
    hidden_act: str = "silu"  # SwiGLU's gate; the only one the MLP computes
    # > 0: the LM head and cross-entropy run over this many rows at a time, each chunk recomputed in
    # backward, so no [tokens, vocab] logits tensor exists (ALST's tiled loss); the output then has
    # no logits. 0: one matmul over every row.
    loss_chunk: int = 0
    # Mixture of experts (model.moe): n_experts > 0 replaces every layer's SwiGLU by gpt-oss's router and
    # experts, each of hidden size ffn_dim, experts_per_token of them per token; swiglu_alpha/limit are the
    # experts' clamped SwiGLU. router_aux_loss_coef > 0 adds that times the load-balancing loss (the trainer).
    n_experts: int = 0
    experts_per_token: int = 2
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    router_aux_loss_coef: float = 0.0
    # Rotary distance to the global keys (model.attention, kernels.global_part): position = each query's
    # own; fixed = every query at global_rope_distance from the last global key, whatever its position.
    global_rope: str = "position"
    global_rope_distance: int = 1

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return self.multiple_of * math.ceil(8 * self.d_model / 3 / self.multiple_of)

    def validate(self) -> ModelConfig:
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "multiple_of"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key}: must be >= 1, got {getattr(self, key)}")
        if self.loss_chunk < 0:
            raise ValueError(f"model.loss_chunk: must be >= 0 (0 = unchunked), got {self.loss_chunk}")
        if self.n_learned_global < 0:
            raise ValueError(f"model.n_learned_global: must be >= 0, got {self.n_learned_global}")
        if self.n_experts < 0:
            raise ValueError(f"model.n_experts: must be >= 0 (0 = a dense SwiGLU), got {self.n_experts}")
        if self.n_experts and not 1 <= self.experts_per_token <= self.n_experts:
            raise ValueError(f"model.experts_per_token: must be in [1, model.n_experts={self.n_experts}], got "
                             f"{self.experts_per_token}")
        for key in ("swiglu_alpha", "swiglu_limit"):
            if not getattr(self, key) > 0:
                raise ValueError(f"model.{key}: must be > 0, got {getattr(self, key)}")
        if not self.router_aux_loss_coef >= 0:
            raise ValueError(f"model.router_aux_loss_coef: must be >= 0 (0 = no load-balancing loss), got "
                             f"{self.router_aux_loss_coef}")
        if self.router_aux_loss_coef and not self.n_experts:
            raise ValueError("model.router_aux_loss_coef: weighs the experts' load-balancing loss; it needs "
                             f"model.n_experts > 0, got n_experts=0 and router_aux_loss_coef={self.router_aux_loss_coef}")
        if self.global_rope not in GLOBAL_ROPE:
            raise ValueError(f"model.global_rope: must be one of {', '.join(GLOBAL_ROPE)}; got {self.global_rope!r}")
        if self.global_rope_distance < 0:
            raise ValueError(f"model.global_rope_distance: must be >= 0 (the rotary distance to the last global "
                             f"key), got {self.global_rope_distance}")
        if self.hidden_act != "silu":
            raise ValueError(f"model.hidden_act: must be silu (the SwiGLU gate), got {self.hidden_act!r}")
        if self.head_dim is None:
            check_heads(self.d_model, self.n_heads, self.n_kv_heads)
        else:
            check_heads(self.n_heads * self.head_dim, self.n_heads, self.n_kv_heads)
        self.rope()
        return self

    def rope(self) -> RopeScaling | None:
        """The rotary scaling, validated; None for the plain rotary of ``model.attention``."""
        if self.rope_scaling is None:
            return None
        try:
            return RopeScaling(**self.rope_scaling).validate()
        except TypeError as e:
            raise ValueError(f"model.rope_scaling: {e}") from None

    @property
    def plain_attention(self) -> bool:
        """True for the attention of the models trained here (no head_dim, biases or rope scaling)."""
        return self.head_dim is None and not self.qkv_bias and not self.out_bias and self.rope_scaling is None


# vocab 50304 = GPT-2's 50257 padded to a multiple of 128; a byte-level run overrides vocab_size=256.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2),
    "small": dict(vocab_size=256, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4),
    "125m": dict(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048),
    "1b": dict(vocab_size=50304, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
               rope_theta=500000.0),
}


def model_preset(name: str, **overrides) -> ModelConfig:
    """The ModelConfig of a named preset, with any field overridden (e.g. ``vocab_size=256``)."""
    if name not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides}).validate()


def layer_patterns(base_pattern: Pattern, n_layers: int, dense_every: int = 0,
                   overrides: Mapping[int, Pattern | Mapping] | None = None) -> list[Pattern]:
    """One pattern per layer: ``base_pattern`` everywhere, except that with ``dense_every = k`` every
    k-th layer (0-indexed k-1, 2k-1, ...) is dense (same causality and globals), and ``overrides``
    maps a layer index (negative counts from the end) to a Pattern or an ``attention`` mapping."""
    if dense_every < 0:
        raise ValueError(f"model.dense_every: must be >= 0 (0 = never), got {dense_every}")
    dense = Dense(causal=base_pattern.causal, num_global=base_pattern.num_global)
    pats = [dense if dense_every and (i + 1) % dense_every == 0 else base_pattern for i in range(n_layers)]
    return override_layers(pats, overrides)


def override_layers(pats: Sequence[Pattern], overrides: Mapping[int, Pattern | Mapping] | None) -> list[Pattern]:
    """``pats`` with the layers ``overrides`` names replaced (model.layer_overrides)."""
    pats, n_layers = list(pats), len(pats)
    for idx, p in (overrides or {}).items():
        if not -n_layers <= idx < n_layers:
            raise ValueError(f"model.layer_overrides: layer {idx} out of range for n_layers={n_layers}")
        pats[idx] = p if isinstance(p, Pattern) else from_config(p)
    return pats


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in fp32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """w2(silu(w1 x) · w3 x) (Shazeer 2020)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ProjectedAttention(Attention):
    """``Attention`` with the head size free of d_model, optional q/k/v biases and scaled rotary
    frequencies (``model.rope``): what Llama, Mistral and Qwen2 checkpoints need. The same
    parameter names, so a state dict maps one to one; the forward is ``Attention.forward`` with the
    rotary angles from ``scaled_rotary_angles`` (dynamic NTK reads the sequence length ``seq_len``)."""

    def __init__(self, cfg: ModelConfig):
        hd = cfg.head_dim or cfg.d_model // cfg.n_heads
        super().__init__(cfg.n_heads * hd, cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta, cfg.sink_logits,
                         cfg.global_rope, cfg.global_rope_distance)
        self.rope = cfg.rope() or RopeScaling()
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.d_model, bias=cfg.out_bias)

    def angles(self, rope: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return scaled_rotary_angles(rope, self.head_dim, self.rope_theta, self.rope, seq_len)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = (Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta, cfg.sink_logits,
                               cfg.global_rope, cfg.global_rope_distance)
                     if cfg.plain_attention else ProjectedAttention(cfg))
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = (MoE(cfg.d_model, cfg.ffn_dim, cfg.n_experts, cfg.experts_per_token, cfg.swiglu_alpha,
                        cfg.swiglu_limit) if cfg.n_experts else SwiGLU(cfg.d_model, cfg.ffn_dim))

    def forward(self, x, positions, pattern, attention_fn, seq_len, return_stats, doc_ids=None, rope_positions=None,
                layer=0):
        """-> (x, per-head stat sums or None, the router's sums or None)."""
        a, sums = self.attn(self.attn_norm(x), positions, pattern, attention_fn, seq_len, return_stats, doc_ids,
                            rope_positions, layer)
        x = x + a
        if isinstance(self.mlp, MoE):
            m, router = self.mlp(self.mlp_norm(x))
            return x + m, sums, router
        return x + self.mlp(self.mlp_norm(x)), sums, None


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=-100, reduction="sum")


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
    """Σ cross_entropy(h @ weightᵀ, targets) over [N, C] rows, ``rows`` at a time: each chunk's
    [rows, V] logits live only inside its own forward and are recomputed in its backward
    (non-reentrant checkpoint), so peak memory is O(rows · V), not O(N · V). The same sum as one
    matmul, in another order (fp32 accumulation)."""
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], rows):
        part = (h[i:i + rows], weight, targets[i:i + rows])
        total = total + (checkpoint(_chunk_loss, *part, use_reentrant=False) if torch.is_grad_enabled()
                         else _chunk_loss(*part))
    return total


class LMOutput(NamedTuple):
    logits: torch.Tensor | None  # [B, T', V]: rows of the positions >= n_learned_global (None: model.loss_chunk)
    loss: torch.Tensor | None  # mean cross-entropy over the n_targets non-ignored targets (0 if none)
    n_targets: torch.Tensor | None  # how many targets the loss averages: weights for merging shards
    stats: list[StatSums] | None  # per layer, per-head sums over this call's queries (detached)
    # model.n_experts > 0: the routers' sums over this call's tokens, all layers pooled (model.moe.aux_loss)
    router: RouterSums | None = None
    router_layers: list[RouterSums] | None = None  # the same per layer (tokens per expert in the metrics)


def check_learned_global(n_learned_global: int, patterns: Sequence[Pattern]) -> None:
    """The learned global slots are global tokens of every layer (the model and the config check call it)."""
    for i, p in enumerate(patterns):
        if p.num_global < n_learned_global:
            raise ValueError(f"model.n_learned_global: must be <= attention.num_global of every layer "
                             f"(layer {i} has {p.num_global}); got {n_learned_global}")


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, patterns: Pattern | Sequence[Pattern]):
        super().__init__()
        cfg.validate()
        patterns = [patterns] * cfg.n_layers if isinstance(patterns, Pattern) else list(patterns)
        if len(patterns) != cfg.n_layers:
            raise ValueError(f"model.n_layers: {cfg.n_layers} layers but {len(patterns)} patterns given")
        check_learned_global(cfg.n_learned_global, patterns)
        if cfg.global_rope == "fixed":
            check_patterns(patterns)
        self.cfg, self.patterns = cfg, patterns
        self.attention_fn: AttentionFn = local_attention  # bound once by the trainer (``bind_attention``)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.n_learned_global:
            self.global_emb = nn.Parameter(torch.empty(cfg.n_learned_global, cfg.d_model))
        else:  # no parameter without slots (ZeRO-3 cannot gather an empty one); the state dict keeps the key
            self.register_buffer("global_emb", torch.empty(0, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    def reset_parameters(self):
        """GPT-2 init, deterministic given the torch seed: N(0, std) for every matrix; the projections
        that write into the residual stream scaled by 1/sqrt(2·n_layers) (GPT-2 paper, §2.3)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("attn.sinks"):
                nn.init.constant_(p, Attention.SINK_INIT)
            elif name.endswith((".bias", "_bias")):
                nn.init.zeros_(p)
            elif name.endswith(("attn.wo.weight", "mlp.w2.weight", "mlp.experts.down_proj")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def bind_attention(self, attention_fn: AttentionFn) -> None:
        """The attention every forward uses unless it passes its own (torchtitan's parallelize-once: the
        trainer binds the sequence-parallel one at startup; the decoder passes its caches per call)."""
        self.attention_fn = attention_fn

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied matrix once

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[B, T] tokens -> [B, T, C], with the learned global embeddings in the global slots."""
        x = self.wte(tokens)  # (B, T, C)
        g = self.cfg.n_learned_global
        if g:
            is_g = (positions < g)[None, :, None]  # (1, T, 1)
            x = torch.where(is_g, self.global_emb[positions.clamp(max=g - 1)][None], x)
        return x

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                attention_fn: AttentionFn | None = None, seq_len: int | None = None,
                targets: torch.Tensor | None = None, return_stats: bool = False, doc_ids: torch.Tensor | None = None,
                rope_positions: torch.Tensor | None = None, logits_to_keep: int = 0,
                head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> LMOutput:
        """tokens [B, T] at ascending absolute ``positions`` [T] (default arange) of a sequence of
        ``seq_len`` (default: last position + 1, right only for the last shard or a whole sequence).
        ``targets`` [B, T] (next tokens, -100 = ignore) gives the loss. ``doc_ids`` [B, T] and
        ``rope_positions`` [T] or [B, T]: packed documents (see the module docstring). ``attention_fn``:
        this call's attention (default: the bound one, ``bind_attention``; unbound: ``local_attention``).
        ``logits_to_keep`` k > 0 (transformers' name; no ``targets``): logits of the last k positions only,
        so a prefill never holds [T, V]. ``head``: applied to the kept rows instead of ``lm_head`` (the
        decoder passes the same weight laid out for one-row products, ``model.decode.DecodeHead``)."""
        if logits_to_keep and targets is not None:
            raise ValueError("logits_to_keep: only without targets (the loss needs every position's logits)")
        if head is not None and targets is not None:
            raise ValueError("head: only without targets (the loss reads lm_head's own weight)")
        B, T = tokens.shape
        positions = torch.arange(T, device=tokens.device) if positions is None else positions
        attention_fn = self.attention_fn if attention_fn is None else attention_fn
        seq_len = int(positions[-1]) + 1 if seq_len is None else seq_len
        x = self.embed(tokens, positions)
        stats = [] if return_stats else None
        routers = []
        for i, (block, pattern) in enumerate(zip(self.blocks, self.patterns)):
            args = (x, positions, pattern, attention_fn, seq_len, return_stats, doc_ids, rope_positions, i)
            if self.cfg.activation_checkpointing and torch.is_grad_enabled():
                x, sums, router = checkpoint(block, *args, use_reentrant=False)  # recomputed in backward
            else:
                x, sums, router = block(*args)
            if return_stats:
                stats.append({k: s.detach() for k, s in sums.items()})
            if router is not None:
                routers.append(router)
        moe = dict(router=merge_router_sums(routers), router_layers=routers) if routers else {}
        # The global slots are a prefix of the positions (they are ascending): drop their rows.
        # int() is a host sync, paid only when learned globals are on.
        n_drop = int((positions < self.cfg.n_learned_global).sum()) if self.cfg.n_learned_global else 0
        h = self.norm(x[:, n_drop:])  # (B, T', C)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        if targets is not None and self.cfg.loss_chunk:
            t = targets[:, n_drop:].reshape(-1)
            n_targets = (t != -100).sum()
            loss_sum = chunked_cross_entropy(h.reshape(-1, h.shape[-1]), self.lm_head.weight, t, self.cfg.loss_chunk)
            return LMOutput(None, loss_sum / n_targets.clamp(min=1), n_targets, stats, **moe)
        logits = (self.lm_head if head is None else head)(h)  # (B, T', V)
        loss = n_targets = None
        if targets is not None:
            t = targets[:, n_drop:].reshape(-1)
            n_targets = (t != -100).sum()
            loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), t, ignore_index=-100,
                                       reduction="sum")
            loss = loss_sum / n_targets.clamp(min=1)
        return LMOutput(logits, loss, n_targets, stats, **moe)
