"""Causal self-attention with grouped-query heads, rotary embeddings and optional learned sinks.

The module projects x to q, k, v, rotates q and k by their *absolute* positions (a ``positions``
LongTensor [T]), and hands the attention itself to an injected function. So a sequence shard that
holds positions [r·L, (r+1)·L) rotates exactly as the unsharded model does, and the same module
runs on one device (``local_attention``) or sequence-parallel (``parallel/`` supplies a function
with the same signature that exchanges halo and global keys first).

The injection contract is the kernels' (``kernels.contract``)::

    attention_fn(q, k, v, pattern, call: AttnCall) -> AttnResult(out, lse, stats | None)

    q          [B, H, T, D]    this rank's queries, rotated
    k, v       [B, Hkv, T, D]  this rank's keys/values (GQA when Hkv < H), k rotated
    pattern    model.pattern.Pattern of this layer
    call       q_pos = k_pos = the absolute positions [T] of the T rows (ascending); seq_len, the
               length n of the full (unsharded) sequence; sinks [H] when the layer has them (joined
               once per query after all its keys, ``kernels.stats.apply_sinks``); q_doc = k_doc =
               the rows' document ids [B, T] for packed documents; return_stats; layer, the calling
               layer's index (0-based) for functions that keep per-layer state (a KV cache,
               per-layer counters), passed explicitly, never inferred from the order of calls
    out        [B, H, T, D]    attention output of the T queries over every key the pattern allows,
                               wherever those keys live
    lse, stats [B, H, T]       of those queries, over every key (and the sink); stats None unless
                               ``call.return_stats``

The module turns the statistics into per-head sums over its queries (``kernels.stats.head_sums``), so
an attention function never has to.

Rotary angles come from ``rope_positions`` when given (e.g. restarting at every document: [T] or
[B, T]), otherwise from ``positions``; the pattern always sees the absolute ``positions``, so the
halo plan of a sequence shard does not depend on where documents start.

``global_rope`` (model.global_rope): ``position`` rotates every query at its own position, so a
query at i scores the global key j at rotary distance i − j — distances a model trained at length n
has never seen beyond n. ``fixed`` also hands the attention function ``call.q_global``: the queries
rotated as if they sat at position g − 1 + ``global_rope_distance`` (g = the layer's num_global), so
every query sees global key j at distance D + g − 1 − j, whatever its own position. The attention
function scores with it the keys a query sees only because they are global (``kernels.global_part``);
keys in its window keep their ordinary distances.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn

from kernels import attend
from kernels.contract import AttnCall, AttnResult
from kernels.global_part import scores_apart
from kernels.stats import head_sums
from model.pattern import Pattern

StatSums = dict[str, torch.Tensor]


class AttentionFn(Protocol):
    """The attention function the model calls; see the module docstring for the contract."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern,
                 call: AttnCall) -> AttnResult: ...


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, call: AttnCall,
                    backend: str = "auto") -> AttnResult:
    """Single-device ``AttentionFn``: every key is local, so the call goes to the kernel as it is. Bind
    another kernel with ``functools.partial(local_attention, backend="reference")``."""
    return attend(q, k, v, pattern, call, backend)


# --- rotary embeddings ----------------------------------------------------------------------------

def rotary_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [..., T, head_dim/2] fp32, for ``positions`` [..., T] (RoFormer, Su et al. 2021).

    Computed from the positions on every call rather than from a table of max length: a shard of a
    1M-token sequence needs only its own rows, and no maximum length has to be fixed up front.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    # fp64 product: positions up to millions times frequencies keep their phase to well under 1e-6 rad.
    ang = (positions.to(torch.float64)[..., None] * inv_freq).float()  # (..., T, D/2)
    return ang.cos(), ang.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] pairwise: (x1, x2) halves of the head dim (the GPT-NeoX/LLaMA layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, H, T, D/2) each
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


def check_heads(d_model: int, n_heads: int, n_kv_heads: int) -> None:
    """The head rule, in one place (the model and the trainer's config check call it): heads split
    d_model into even sizes (rotary rotates pairs), key/value heads divide the query heads (GQA)."""
    if d_model % n_heads or (d_model // n_heads) % 2:
        raise ValueError(f"model.n_heads: must divide model.d_model={d_model} into even head sizes; got {n_heads}")
    if n_heads % n_kv_heads:
        raise ValueError(f"model.n_kv_heads: must divide model.n_heads={n_heads}; got {n_kv_heads}")


class Attention(nn.Module):
    """q/k/v projections (GQA: ``n_kv_heads`` key/value heads shared by groups of query heads),
    rotary on absolute positions, an injected attention function, and the output projection.

    ``sink_logits``: a learned fp32 logit per query head (``self.sinks`` [H]), initialised to
    ``SINK_INIT`` = 0.0 — a sink that starts as one more key scoring 0, i.e. about as likely as an
    average key of the near-zero initial scores; gpt-oss learns them from such zero-ish values."""

    SINK_INIT = 0.0

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, rope_theta: float = 10000.0,
                 sink_logits: bool = False, global_rope: str = "position", global_rope_distance: int = 1):
        super().__init__()
        check_heads(d_model, n_heads, n_kv_heads)
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.rope_theta = rope_theta
        self.global_rope, self.global_rope_distance = global_rope, global_rope_distance
        self.wq = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.sinks = nn.Parameter(torch.full((n_heads,), self.SINK_INIT)) if sink_logits else None  # (H,) fp32

    def angles(self, rope: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the rotary angles at positions ``rope``; subclasses scale the frequencies."""
        return rotary_angles(rope, self.head_dim, self.rope_theta)

    def global_queries(self, q: torch.Tensor, pattern: Pattern, seq_len: int) -> torch.Tensor | None:
        """q [B, H, T, D] (not yet rotated) rotated at the one position g − 1 + global_rope_distance
        (model.global_rope=fixed, a layer with g global tokens its local rule does not all reach), else None."""
        if self.global_rope != "fixed" or not scores_apart(pattern):
            return None
        at = torch.tensor([pattern.num_global - 1 + self.global_rope_distance], device=q.device)
        cos, sin = self.angles(at, seq_len)  # (1, D/2): one position for every query
        return apply_rotary(q, cos, sin)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, pattern: Pattern, attention_fn: AttentionFn,
                seq_len: int, return_stats: bool = False, doc_ids: torch.Tensor | None = None,
                rope_positions: torch.Tensor | None = None, layer: int = 0) -> tuple[torch.Tensor, StatSums | None]:
        """x [B, T, C] at absolute ``positions`` [T] -> (y [B, T, C], per-head stat sums or None).
        ``doc_ids`` [B, T] and ``rope_positions`` [T] or [B, T]: see the module docstring; ``layer``:
        this layer's index, handed to ``attention_fn``."""
        B, T, C = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        rope = positions if rope_positions is None else rope_positions
        cos, sin = self.angles(rope, seq_len)  # (T, D/2) or (B, T, D/2)
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D/2): one set of angles per batch row
        q_global = self.global_queries(q, pattern, seq_len)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        call = AttnCall(q_pos=positions, k_pos=positions, seq_len=seq_len, sinks=self.sinks, q_doc=doc_ids,
                        k_doc=doc_ids, return_stats=return_stats, layer=layer, q_global=q_global)
        res = attention_fn(q, k, v, pattern, call)
        y = res.out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, H, T, D) -> (B, T, H·D)
        return self.wo(y), (head_sums(res.lse, res.stats) if return_stats else None)

