"""The attention contract, in one place: what every attention call takes beside (q, k, v, pattern)
and the one result every backend, strategy and adapter returns.

    AttnCall     the call description (positions, sequence length, scale, sinks, documents, layer,
                 whether statistics are wanted, the queries for the global keys); adapters pass it on
                 whole, so a new field reaches every backend and strategy by construction
                 (``dataclasses.replace`` narrows it)
    AttnResult   (out, lse, stats): out [B, H, Q, D] in q's dtype, lse [B, H, Q] fp32 (−inf for a
                 row with no key and no sink), stats ``AttnStats`` (per-query partials, merged as
                 ``kernels.stats`` derives) or None — None
                 exactly when ``call.return_stats`` is False. Always three fields, never two.
    BACKENDS     the backend table: what each kernel supports (documents, sinks inside the kernel,
                 statistics, devices, dtypes); ``kernels.choose_backend`` reads it, once per call.

Shapes: q [B, H, Q, D]; k, v [B, Hkv, K, D] with H % Hkv == 0 (GQA); q_pos [Q], k_pos [K] absolute
positions (None: arange); q_doc [B, Q], k_doc [B, K] integer document ids (both or neither);
sinks [H] fp32 learned sink logits (one extra softmax column per head, no value).
q_global [B, H, Q, D] (model.global_rope=fixed): the queries that score the keys a query sees only
because they are global (``kernels.global_part``); every other key is scored with q. None: q for all.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class AttnCall:
    """One attention call's description (see the module docstring)."""

    q_pos: torch.Tensor | None = None
    k_pos: torch.Tensor | None = None
    seq_len: int | None = None  # length n of the whole (unsharded) sequence; None: the keys' extent
    scale: float | None = None  # None: 1/sqrt(D)
    sinks: torch.Tensor | None = None
    q_doc: torch.Tensor | None = None
    k_doc: torch.Tensor | None = None
    return_stats: bool = False
    layer: int = 0  # the calling layer's index, for adapters that keep per-layer state or counters
    q_global: torch.Tensor | None = None  # [B, H, Q, D]: queries for the keys seen only as globals

    @property
    def global_part(self) -> bool:
        """Whether the global keys are scored apart, with ``q_global`` (``kernels.global_part``)."""
        return self.q_global is not None

    @property
    def docs(self) -> bool:
        return self.q_doc is not None or self.k_doc is not None

    def at(self, q_pos, k_pos, q_doc=None, k_doc=None) -> AttnCall:
        """The same call over other rows (a shard's queries, received keys) at their true positions."""
        return replace(self, q_pos=q_pos, k_pos=k_pos, q_doc=q_doc, k_doc=k_doc)

    def without_sinks(self) -> AttnCall:
        """The call over keys only: strategies join the sinks once, after merging every partial."""
        return self if self.sinks is None else replace(self, sinks=None)


@dataclass
class AttnStats:
    """Per-query partials [B, H, Q] (fp32). ``lse`` travels beside them as the kernels' second output."""

    m: torch.Tensor  # Σ p·s
    max_logit: torch.Tensor  # max s
    global_mass: torch.Tensor  # Σ p over global keys
    sink_mass: torch.Tensor | None = None  # p of the learned sink (after apply_sinks), else None

    def fields(self):
        """The three mergeable partials (``sink_mass`` is not one: the sink joins after merging)."""
        return self.m, self.max_logit, self.global_mass


class AttnResult(NamedTuple):
    out: torch.Tensor
    lse: torch.Tensor
    stats: AttnStats | None


def result(out: torch.Tensor, lse: torch.Tensor, stats: AttnStats | None, call: AttnCall) -> AttnResult:
    """The result with ``stats`` kept only when the call wants them."""
    return AttnResult(out, lse, stats if call.return_stats else None)


@dataclass(frozen=True)
class Backend:
    """One row of the backend table: what the kernel does itself. What it lacks the dispatcher
    supplies: sinks are joined after it (``kernels.stats.apply_sinks``), documents send the call to
    ``blocked``."""

    name: str
    documents: bool  # applies q_doc / k_doc in the kernel
    sinks: bool  # joins the learned sinks inside the kernel
    stats: bool  # returns AttnStats when asked
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] | None  # None: any floating dtype
    note: str = ""


FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("reference", documents=True, sinks=True, stats=True, devices=("cpu", "cuda"), dtypes=None,
            note="the oracle: dense scores and mask (O(Q·K) memory)"),
    Backend("blocked", documents=True, sinks=False, stats=True, devices=("cpu", "cuda"), dtypes=None,
            note="block-sparse PyTorch: only key blocks the pattern (and the documents) reach"),
    Backend("flex", documents=True, sinks=False, stats=False, devices=("cuda",), dtypes=FLOATS,
            note="torch FlexAttention; positional patterns; no CPU backward"),
    Backend("fused", documents=True, sinks=True, stats=True, devices=("cpu",), dtypes=(torch.float32, torch.bfloat16),
            note="C++ band kernel for Window patterns (bf16: on fp32 copies); other inputs run blocked"),
)}
