"""The global keys scored apart: a layer's attention as two partials merged by LSE (model.global_rope=fixed).

With rotary embeddings a query at position i scores a global key j < g at the rotary distance i − j,
so a model trained at length n has never scored its global keys at distances beyond n. The remedy
(``model.attention``) scores the keys a query sees *only because they are global* with other
queries, ``call.q_global`` (rotated at one fixed position: a fixed distance to every global key);
every other key keeps q. For a causal positional pattern P with g = ``num_global`` > 0:

    local(P)   = P without its globals (num_global 0 in every part): the window, blocks, strides
    apart(i,j) = j < g and P allows (i, j) and local(P) does not (with documents: or j is in
                 another document than i — globals are visible across documents, local keys not)

    (a) attend(q, k, v, local(P))                                 any backend, any SP strategy
    (b) softmax(q_global · k_gᵀ · scale, masked to apart) v_g     dense over the g global keys
    out, lse = merge_two(a, b)                                    exact: the key sets are disjoint
    out, lse = apply_sinks(out, lse, sinks)                       once, after the merge

Every key P allows lies in exactly one partial (a global key inside the window stays in (a) with
ordinary rotary, it is not "seen only because global"), so nothing is counted twice or missed. The
statistics merge as every other partial does (``kernels.stats``); ``global_mass`` then counts the
mass of (b) only: a global key in the window is scored as a local key and counted as one.

Refused (one line naming model.global_rope): bidirectional patterns (a global query there sees every
key, which no dense [Q, g] partial holds) and content-based ones (their choice of blocks includes
the global block: it cannot be taken apart from the local part).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from kernels.contract import AttnCall, AttnResult, AttnStats, result
from kernels.stats import apply_sinks, merge_partials, stats_from_probs
from model.pattern import Dense, Pattern, PatternUnion

GLOBAL_ROPE = ("position", "fixed")
ROWS = 16384  # queries per chunk of the dense global partial: bounds its [B, H, rows, g] scores


def scores_apart(pattern: Pattern) -> bool:
    """Whether a query of this pattern may see a global key only because it is global (False: its
    local part already reaches every key — dense — and q_global changes nothing)."""
    if not pattern.num_global:
        return False
    local = local_part(pattern)
    parts = local.parts if isinstance(local, PatternUnion) else (local,)
    return not any(isinstance(p, Dense) for p in parts)


def check_patterns(patterns: Sequence[Pattern]) -> None:
    """ValueError naming model.global_rope for a layer whose global keys cannot be scored apart."""
    for i, p in enumerate(patterns):
        if not scores_apart(p):
            continue
        if p.content_based:
            raise ValueError(f"model.global_rope=fixed: layer {i}'s pattern {type(p).__name__} is content-based (its "
                             "chosen blocks include the global block); use model.global_rope=position")
        if not p.causal:
            raise ValueError(f"model.global_rope=fixed: layer {i}'s pattern is bidirectional (a global query sees "
                             "every key); it needs causal layers (attention.causal=true), or model.global_rope=position")


def check_model(patterns: Sequence[Pattern]) -> None:
    """``check_patterns`` over a run's layers, and a ValueError when no layer has a global key to take
    apart: the config setting would change nothing (the config refuses it; the model class itself
    allows it and then computes what position does, bit for bit)."""
    check_patterns(patterns)
    if not any(scores_apart(p) for p in patterns):
        raise ValueError("model.global_rope=fixed: no layer sees a key only because it is global (attention."
                         "num_global=0 or dense in every layer), so it would change nothing; give the layers "
                         "global tokens (e.g. attention=sink) or use model.global_rope=position")


def local_part(pattern: Pattern) -> Pattern:
    """The pattern without its global tokens: what a query sees by its local rule alone."""
    if isinstance(pattern, PatternUnion):
        return replace(pattern, num_global=0, parts=tuple(local_part(p) for p in pattern.parts))
    return replace(pattern, num_global=0)


def apart_mask(pattern: Pattern, q_pos: torch.Tensor, g_pos: torch.Tensor, seq_len: int | None,
               q_doc: torch.Tensor | None = None, g_doc: torch.Tensor | None = None) -> torch.Tensor:
    """BoolTensor [Q, G] (with documents [B, Q, G]): which of the keys at ``g_pos`` each query at
    ``q_pos`` sees only because they are global (false for every key at or past num_global).
    ``q_doc`` [B, Q], ``g_doc`` [B, G]."""
    q_pos, g_pos = q_pos.long(), g_pos.long()
    seen = pattern.mask(q_pos, g_pos, seq_len).to(q_pos.device) & (g_pos < pattern.num_global)  # (Q, G)
    local = local_part(pattern).mask(q_pos, g_pos, seq_len).to(q_pos.device)
    if q_doc is not None:
        local = local[None] & (q_doc[:, :, None] == g_doc[:, None, :])  # (B, Q, G): local keys stay in their document
    return seen & ~local


def global_partial(q_global: torch.Tensor, k_g: torch.Tensor, v_g: torch.Tensor, apart: torch.Tensor,
                   scale: float | None = None, return_stats: bool = False) -> AttnResult:
    """Partial (b): q_global [B, H, Q, D] over the global keys k_g, v_g [B, Hkv, G, D] (GQA when
    Hkv < H), allowed where ``apart`` [Q, G] or [B, Q, G]. fp32 softmax (fp64 for fp64 inputs); a
    row with no such key gives out 0, lse −inf (it merges as nothing) and finite gradients."""
    B, H, Q, D = q_global.shape
    G = k_g.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = torch.promote_types(q_global.dtype, torch.float32)
    k_g = k_g.repeat_interleave(H // k_g.shape[1], dim=1).to(acc)  # (B, H, G, D): g rows, cheap to repeat
    v_g = v_g.repeat_interleave(H // v_g.shape[1], dim=1).to(acc)
    mask = apart if apart.dim() == 3 else apart[None]  # (B or 1, Q, G)
    outs, lses, stats = [], [], []
    for a in range(0, max(Q, 1), ROWS):
        s = torch.einsum("bhqd,bhkd->bhqk", q_global[:, :, a:a + ROWS].to(acc), k_g) * scale  # (B, H, rows, G)
        m = mask[:, None, a:a + ROWS].to(s.device)  # (B or 1, 1, rows, G)
        s = s.masked_fill(~m, float("-inf"))
        empty = ~m.any(-1)  # (B or 1, 1, rows)
        lse = torch.logsumexp(s.masked_fill(empty[..., None], 0.0), dim=-1)  # finite on empty rows
        p = torch.exp(s - lse[..., None])  # exactly 0 where masked
        outs.append(torch.einsum("bhqk,bhkd->bhqd", p, v_g))
        lses.append(lse.masked_fill(empty, float("-inf")))
        if return_stats:
            with torch.no_grad():
                stats.append(stats_from_probs(s, p, torch.ones(G, dtype=torch.bool, device=s.device)))
    out, lse = torch.cat(outs, dim=2).to(q_global.dtype), torch.cat(lses, dim=2)
    if not return_stats:
        return AttnResult(out, lse, None)
    return AttnResult(out, lse, AttnStats(*(torch.cat(f, dim=2) for f in zip(*(st.fields() for st in stats),
                                                                                strict=True))))


def merged(local: AttnResult, glob: AttnResult, call: AttnCall) -> AttnResult:
    """(a) and (b) merged by LSE (``kernels.stats.merge_partials``), then the call's sinks joined."""
    out, lse, st = merge_partials(tuple(local), tuple(glob))
    return result(*apply_sinks(out, lse, call.sinks, st), call)


def keys_call(call: AttnCall) -> AttnCall:
    """The call of partial (a): no q_global, no sinks (they join after the merge)."""
    return replace(call, q_global=None, sinks=None)


def attend_apart(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, call: AttnCall,
                 attend_local: Callable) -> AttnResult:
    """The call with every key at hand (one device, a decode prefill): (a) through ``attend_local``
    (``kernels.attend``'s signature), (b) over the keys at positions < num_global among k."""
    g = pattern.num_global
    if not scores_apart(pattern):  # no key is seen only as a global one: q_global scores nothing
        return attend_local(q, k, v, pattern, replace(call, q_global=None))
    check_patterns([pattern])
    if tuple(call.q_global.shape) != tuple(q.shape):
        raise ValueError(f"q_global: must have q's shape {list(q.shape)}, got {list(call.q_global.shape)}")
    Q, K = q.shape[2], k.shape[2]
    q_pos = torch.arange(Q, device=q.device) if call.q_pos is None else call.q_pos
    k_pos = torch.arange(K, device=q.device) if call.k_pos is None else call.k_pos
    local = attend_local(q, k, v, local_part(pattern), keys_call(call))
    idx = torch.nonzero(k_pos < g).flatten().to(k.device)
    g_doc = None if call.k_doc is None else call.k_doc[:, idx]
    apart = apart_mask(pattern, q_pos, k_pos[idx], call.seq_len, call.q_doc, g_doc)
    glob = global_partial(call.q_global, k[:, :, idx], v[:, :, idx], apart, call.scale, call.return_stats)
    return merged(local, glob, call)
