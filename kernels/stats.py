"""Attention statistics as mergeable per-query partials.

For one query with scaled scores s over its allowed keys and p = softmax(s):
  entropy  H = lse − Σ p·s                      (so carry m = Σ p·s)
  max logit    = max s
  global mass  = Σ_{j < num_global} p_j
Two partials over disjoint key sets merge exactly with weights w = exp(lse_part − lse):
  lse = logaddexp(lse_a, lse_b);  m = w_a·m_a + w_b·m_b;  gmass likewise;  max = max(max_a, max_b).
(Same derivation as merging outputs, e.g. FlashAttention-2 §3.1 / ring-flash-attention's
``update_out_and_lse``: every quantity that is an expectation under p merges as the output does.)

Learned sinks (gpt-oss): per head a scalar logit s_h acts as one more key with score s_h and no value.
Every statistic is then defined over the keys *plus the sink*: p runs over both, the entropy counts
the sink's share, the max logit is max(max over keys, s_h), and the global mass is the keys' global
share of the extended softmax. The sink is applied once per query, after all partials over keys are
merged (``apply_sinks``), with w = sigmoid(lse_keys − s_h) = exp(lse_keys − lse'):
  lse' = logaddexp(lse_keys, s_h);  out' = w·out;  m' = w·m + (1 − w)·s_h;  gmass' = w·gmass;
  max' = max(max, s_h);  sink_mass = 1 − w = sigmoid(s_h − lse_keys).
``sink_mass`` is not a merge partial (it only exists after the merge); it is None without sinks.
"""

from __future__ import annotations

import torch

from kernels.contract import AttnResult, AttnStats


def merge_two(out_a, lse_a, out_b, lse_b):
    """Exact merge of two partial attentions over disjoint key sets (out [B,H,Q,D], lse [B,H,Q]).

    A side with lse = -inf (no keys) contributes nothing; both -inf gives lse = -inf and out 0.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w_a, w_b = torch.exp(lse_a - safe), torch.exp(lse_b - safe)
    acc = torch.promote_types(out_a.dtype, torch.float32)
    out = w_a[..., None].to(acc) * out_a.to(acc) + w_b[..., None].to(acc) * out_b.to(acc)
    return out.to(out_a.dtype), lse, (w_a, w_b)


def merge_stats(a: AttnStats, b: AttnStats, w_a: torch.Tensor, w_b: torch.Tensor) -> AttnStats:
    """Merge stats partials with the weights returned by ``merge_two``."""
    return AttnStats(
        m=w_a * a.m + w_b * b.m,
        max_logit=torch.maximum(a.max_logit, b.max_logit),
        global_mass=w_a * a.global_mass + w_b * b.global_mass,
    )


def merge_partials(a: tuple, b: tuple) -> tuple:
    """Merge two (out, lse, stats or None) partials over disjoint key sets: ``merge_two`` for out and
    lse, ``merge_stats`` with its weights (detached: statistics carry no gradient)."""
    out, lse, (w_a, w_b) = merge_two(a[0], a[1], b[0], b[1])
    stats = None if a[2] is None else merge_stats(a[2], b[2], w_a.detach(), w_b.detach())
    return out, lse, stats


class JoinSinks(torch.autograd.Function):
    """(out · w, logaddexp(lse, s)) with w = sigmoid(lse − s) per (batch, head, query), and its
    backward written out: with t = Σ_d dOut'·out, ∂/∂lse = t·w(1−w) + dlse'·w and ∂/∂s = −that sum
    over the same terms with (1−w) for dlse' (summed over batch and queries). One pass over the
    [B, H, Q, D] tensors each way and no [B, H, Q, D] temporary beyond the outputs; sigmoid keeps an
    empty row (lse = −inf) finite: w = 0."""

    @staticmethod
    def forward(ctx, out, lse, sinks):
        s = sinks.to(lse.dtype)[None, :, None]  # (1, H, 1)
        w = torch.sigmoid(lse - s)  # (B, H, Q): the keys' share
        ctx.save_for_backward(out, w)
        return (out.to(w.dtype) * w[..., None]).to(out.dtype), torch.logaddexp(lse, s)

    @staticmethod
    def backward(ctx, d_out, d_lse):
        out, w = ctx.saved_tensors
        d_in = (d_out.to(w.dtype) * w[..., None]).to(out.dtype) if d_out is not None else None
        g = w.new_zeros(w.shape) if d_out is None else \
            torch.einsum("bhqd,bhqd->bhq", d_out.to(w.dtype), out.to(w.dtype)) * w * (1 - w)
        d_lse_in, d_s = g, -g
        if d_lse is not None:
            d_lse_in = d_lse_in + d_lse * w
            d_s = d_s + d_lse * (1 - w)
        return d_in, d_lse_in, d_s.sum(dim=(0, 2))


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor | None, stats: AttnStats | None = None):
    """(out', lse', stats') with the learned sink logits ``sinks`` [H] joined to merged attention over
    keys (out [B, H, Q, D], lse [B, H, Q]); the identity when ``sinks`` is None. Differentiable in out,
    lse and sinks. A row with no key (lse = −inf) gets out' = 0, lse' = s_h: all its mass is the sink's."""
    if sinks is None:
        return out, lse, stats
    new_out, new_lse = JoinSinks.apply(out, lse, sinks)
    if stats is None:
        return new_out, new_lse, None
    with torch.no_grad():
        s = sinks.detach().to(lse.dtype)[None, :, None]  # (1, H, 1)
        w = torch.sigmoid(lse.detach() - s)
        m = torch.where(w > 0, w * stats.m, torch.zeros_like(w)) + (1 - w) * s  # w·m is 0·(-inf) when empty
        new_stats = AttnStats(m=m, max_logit=torch.maximum(stats.max_logit, s.expand_as(w)),
                              global_mass=w * stats.global_mass, sink_mass=torch.sigmoid(s - lse.detach()))
    return new_out, new_lse, new_stats


def join_sinks(res: AttnResult, sinks: torch.Tensor | None) -> AttnResult:
    """A kernel's result with the sinks joined by ``apply_sinks``; unchanged when ``sinks`` is None."""
    if sinks is None:
        return res
    return AttnResult(*apply_sinks(res.out, res.lse, sinks, res.stats))


def head_sums(lse: torch.Tensor, st: AttnStats) -> dict[str, torch.Tensor]:
    """Per-head sums over batch and queries ([H] each) that add up across sequence shards:
    ``entropy_sum``, ``global_mass_sum``, ``count`` (queries), ``max_logit`` (a max), and with
    learned sinks ``sink_mass_sum`` (the key is absent without sinks)."""
    sums = {
        "entropy_sum": (lse - st.m).sum(dim=(0, 2)),
        "global_mass_sum": st.global_mass.sum(dim=(0, 2)),
        "count": torch.full((lse.shape[1],), float(lse.shape[0] * lse.shape[2]), dtype=lse.dtype, device=lse.device),
        "max_logit": st.max_logit.amax(dim=(0, 2)),
    }
    if st.sink_mass is not None:
        sums["sink_mass_sum"] = st.sink_mass.sum(dim=(0, 2))
    return sums


def reduce_head_sums(sums: dict[str, torch.Tensor], group=None) -> dict[str, torch.Tensor]:
    """``head_sums`` of every rank of ``group`` combined, in fp64: summed, ``max_logit`` maxed — over an
    SP group, the single-device sums of the whole sequence. Two all-reduces whatever the keys."""
    import torch.distributed as dist

    keys = [k for k in sums if k != "max_logit"]
    summed = torch.stack([sums[k].double() for k in keys])
    peak = sums["max_logit"].double().clone()
    dist.all_reduce(summed, group=group)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    return {**dict(zip(keys, summed.unbind(0), strict=True)), "max_logit": peak}


def head_summary(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-head means [H]: ``entropy``, ``global_mass``, ``sink_mass`` (0 without sinks) and ``max_logit``."""
    sink = sums.get("sink_mass_sum", torch.zeros_like(sums["count"]))
    return {
        "entropy": sums["entropy_sum"] / sums["count"],
        "global_mass": sums["global_mass_sum"] / sums["count"],
        "sink_mass": sink / sums["count"],
        "max_logit": sums["max_logit"],
    }


def stats_from_probs(s: torch.Tensor, p: torch.Tensor, global_keys: torch.Tensor) -> AttnStats:
    """Partials from scaled scores s and probabilities p [B,H,Q,K] (masked s = -inf, p = 0);
    ``global_keys`` [K] marks the keys that are global tokens."""
    ps = torch.where(p > 0, p * s, torch.zeros_like(s))
    return AttnStats(
        m=ps.sum(-1),
        max_logit=s.amax(-1),
        global_mass=(p * global_keys.to(p)).sum(-1),
    )
