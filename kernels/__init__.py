"""Sparse attention kernels. One contract for every backend:

    sparse_attention(q, k, v, pattern, q_pos=None, k_pos=None, backend="auto", return_stats=False,
                     sinks=None, q_doc=None, k_doc=None)
        -> (out, lse) or (out, lse, stats)

q [B, H, Q, D]; k, v [B, Hkv, K, D] (GQA when Hkv < H); q_pos [Q], k_pos [K] absolute positions
(default arange), so a sequence shard — queries a sub-range, keys ``[globals | range]`` — is computed
exactly. ``lse`` [B, H, Q] fp32 lets partial results be merged (kernels.stats.merge_two); ``stats``
are the per-query partials of entropy, max logit and global mass (kernels.stats.AttnStats).

``sinks`` [H] (fp32, differentiable): learned sink logits, one extra softmax column per head with no
value (gpt-oss). The reference computes that column directly and backends in ``SINK_BACKENDS`` start
each row's online softmax from it; every other backend runs without it and joins it from (out, lse)
afterwards (``kernels.stats.apply_sinks``), so any backend supports it.
``q_doc`` [B, Q], ``k_doc`` [B, K] LongTensors: packed documents (``kernels.reference.document_rule``):
a query sees a key only if the pattern allows it and both are in the same document, except global
keys (seen by all) and, when bidirectional, global queries (see all). Backends in ``DOC_BACKENDS``
apply it in the kernel (skipping key blocks no query of a block can see); any other backend falls back
to ``blocked`` when document ids are given.
"""

from __future__ import annotations

import torch

from kernels.inputs import check_inputs
from kernels.reference import EmptyRowError, reference_attention
from kernels.stats import join_sinks
from model.pattern import Pattern

DOC_BACKENDS = ("reference", "blocked", "flex", "fused")  # backends that take q_doc / k_doc themselves
SINK_BACKENDS = ("fused",)  # backends that join the learned sinks inside the kernel (reference: below)


# Each backend behind one signature: (q, k, v, pattern, q_pos, k_pos, scale, seq_len, return_stats,
# docs) -> (out, lse[, stats]). Imported on first use: flex needs torch's FlexAttention, fused a build.
def _reference(q, k, v, pattern, q_pos, k_pos, scale, seq_len, return_stats, docs):
    return reference_attention(q, k, v, pattern, q_pos, k_pos, scale, seq_len, return_stats, **docs)


def _blocked(q, k, v, pattern, q_pos, k_pos, scale, seq_len, return_stats, docs):
    from kernels.blocked import blocked_attention

    return blocked_attention(q, k, v, pattern, q_pos, k_pos, scale, seq_len, return_stats, **docs)


def _flex(q, k, v, pattern, q_pos, k_pos, scale, seq_len, return_stats, docs):
    from kernels.flex import flex_attention_backend

    return flex_attention_backend(q, k, v, pattern, q_pos, k_pos, scale, seq_len, return_stats, **docs)


def _fused(q, k, v, pattern, q_pos, k_pos, scale, seq_len, return_stats, docs, sinks=None):
    from kernels.fused import (
        fused_attention,  # C++ band kernel (CPU, fp32, Window); blocked where it does not apply
    )

    return fused_attention(q, k, v, pattern, q_pos, k_pos, scale, seq_len, return_stats, sinks, **docs)


KERNELS = {"reference": _reference, "blocked": _blocked, "flex": _flex, "fused": _fused}
BACKENDS = ("auto", *KERNELS)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern,
                     q_pos: torch.Tensor | None = None, k_pos: torch.Tensor | None = None,
                     backend: str = "auto", return_stats: bool = False, scale: float | None = None,
                     seq_len: int | None = None, sinks: torch.Tensor | None = None,
                     q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None):
    """Sparse attention with the pattern; see the module docstring for the contract."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {', '.join(BACKENDS)}; got {backend!r}")
    check_inputs(q, k, v, q_pos, k_pos)
    if sinks is not None and tuple(sinks.shape) != (q.shape[1],):
        raise ValueError(f"sinks: must be [H] = [{q.shape[1]}] (one logit per query head), got {list(sinks.shape)}")
    if backend == "auto":
        backend = pick_backend(q, pattern, return_stats)
    if backend == "reference":  # the oracle computes the sink column itself
        return reference_attention(q, k, v, pattern, q_pos, k_pos, scale, seq_len, return_stats, q_doc, k_doc, sinks)
    docs = {} if q_doc is None and k_doc is None else {"q_doc": q_doc, "k_doc": k_doc}
    if docs and backend not in DOC_BACKENDS:
        backend = "blocked"
    if backend in SINK_BACKENDS:  # the kernel joins the sinks itself
        return KERNELS[backend](q, k, v, pattern, q_pos, k_pos, scale, seq_len, return_stats, docs, sinks=sinks)
    res = KERNELS[backend](q, k, v, pattern, q_pos, k_pos, scale, seq_len, return_stats, docs)
    return join_sinks(res, sinks, return_stats)


def pick_backend(q: torch.Tensor, pattern: Pattern, return_stats: bool) -> str:
    """``flex`` only where it runs forward and backward (CUDA, positional pattern, no stats);
    ``fused`` for fp32 band patterns on CPU (kernels.fused); ``blocked`` everywhere else.
    FlexAttention has no CPU backward, so ``auto`` never picks it on CPU."""
    if q.is_cuda and not pattern.content_based and not return_stats:
        from kernels.flex import flex_available

        if flex_available():
            return "flex"
    if not q.is_cuda:
        from kernels.fused import pattern_supported

        if pattern_supported(q, pattern):  # fp32 Window band on CPU: the fused C++ kernel
            return "fused"
    return "blocked"


__all__ = ["sparse_attention", "reference_attention", "EmptyRowError", "BACKENDS", "DOC_BACKENDS", "SINK_BACKENDS",
           "KERNELS", "pick_backend"]
