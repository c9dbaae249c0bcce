"""What the halo and top-k strategies share: one autograd Function per attention layer whose
forward builds an inner autograd graph (exchanges + local kernel), so that its backward can run
the exchanges in the same fixed order on every rank (see ``parallel/halo_attention.py``).

A strategy supplies two functions and a state dataclass (its ``Leaves``, what its backward needs,
and its ``output``):

    forward(q, k, v, sinks, spec) -> state      run with grad enabled; the state keeps the inner graph
    backward(spec, state, g_out, g_lse) -> (g_q, g_k, g_v, g_sinks)

The layer's lse is differentiable too (g_lse None when nothing downstream used it): a caller that
merges another partial into the result by LSE (``parallel.global_part``) needs its gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from kernels.contract import AttnCall, AttnResult
from kernels.stats import AttnStats
from model.pattern import Pattern


def leaf(x: torch.Tensor | None) -> torch.Tensor | None:
    """The inner graph's own leaf for ``x`` (None stays None): where backward stops differentiating.

    It requires grad only when grad is enabled: inside the Function's forward (always enabled
    there), not on the inference path, which runs the same forward under ``torch.no_grad``."""
    return None if x is None else x.detach().requires_grad_(torch.is_grad_enabled())


@dataclass
class Leaves:
    """The layer's inputs as leaves of the inner graph, and K/V stacked for the exchanges."""

    q: torch.Tensor  # [B, H, L, D]
    k: torch.Tensor  # [B, Hkv, L, D]
    v: torch.Tensor  # [B, Hkv, L, D]
    sinks: torch.Tensor | None  # [H] learned sink logits, or None
    kv: torch.Tensor  # (2, B, Hkv, L, D): one message per peer for K and V

    @classmethod
    def of(cls, q, k, v, sinks) -> Leaves:
        q, k, v, sinks = leaf(q), leaf(k), leaf(v), leaf(sinks)
        return cls(q, k, v, sinks, torch.stack([k, v]))


@dataclass
class Output:
    """A layer's result for this rank's queries."""

    out: torch.Tensor  # [B, H, L, D]
    lse: torch.Tensor  # [B, H, L]
    stats: AttnStats | None


class KernelCall(Protocol):
    """What ``attend`` reads from a strategy's spec (``HaloSpec`` and ``TopKSpec`` both have it)."""

    pattern: Pattern
    call: AttnCall  # the layer's call over keys (no sinks: they join after the merge)
    kernel: Callable  # (q, k, v, pattern, call) -> AttnResult, ``kernels.attend``-like


def attend(spec: KernelCall, q, k, v, q_pos, k_pos, q_doc=None, k_doc=None) -> AttnResult:
    """``spec.kernel`` on these rows at their true positions (and document ids)."""
    return spec.kernel(q, k, v, spec.pattern, spec.call.at(q_pos, k_pos, q_doc, k_doc))


def grads_or_zeros(outputs, grad_outputs, inputs) -> list[torch.Tensor]:
    """torch.autograd.grad over the (output, grad) pairs that exist (an output may be None or outside
    the graph on a rank with no such rows, a grad None where nothing used it); zeros for inputs the
    outputs do not reach."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True)
             if o is not None and g is not None and o.requires_grad]
    if not pairs:
        return [torch.zeros_like(x) for x in inputs]
    got = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, got, strict=True)]


def run_layer(forward: Callable, backward: Callable, q, k, v, sinks, spec, return_stats: bool) -> AttnResult:
    """``AttnResult`` of the layer: through the Function when a gradient is wanted, else ``forward``
    without keeping any graph (inference takes the same steps). ``sinks`` [H] or None: learned sink
    logits, an input of the Function so that its gradient (this rank's queries' share) comes back."""
    inputs = (q, k, v) + ((sinks,) if sinks is not None else ())
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in inputs)):
        with torch.no_grad():
            res = forward(q, k, v, sinks, spec).output
        return AttnResult(res.out, res.lse, res.stats)
    out, lse, stats = _InnerGraphLayer.apply(q, k, v, sinks, spec, forward, backward)
    return AttnResult(out, lse, AttnStats(*stats.unbind(-1)) if return_stats else None)


class _InnerGraphLayer(torch.autograd.Function):
    @staticmethod
    def forward(fctx, q, k, v, sinks, spec, forward, backward):
        """Run the strategy's ``forward`` with grad enabled, keep its state (with the inner graph) for
        backward, return detached (out, lse, packed stats)."""
        with torch.enable_grad():
            state = forward(q, k, v, sinks, spec)
        fctx.spec, fctx.state, fctx.strategy_backward = spec, state, backward
        res = state.output
        stats = res.stats
        fields = () if stats is None else stats.fields() + ((stats.sink_mass,) if stats.sink_mass is not None else ())
        packed = torch.stack(fields, -1) if stats is not None else res.lse.new_zeros(0)
        fctx.mark_non_differentiable(packed)
        fctx.set_materialize_grads(False)  # an unused lse gets None: backward then takes exactly its old steps
        fctx.out_like = (res.out.shape, res.out.dtype, res.out.device)
        return res.out.detach(), res.lse.detach(), packed.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(fctx, g_out, g_lse, _g_stats):
        state, fctx.state = fctx.state, None  # the inner graph is freed once backward returns
        if g_out is None:
            shape, dtype, device = fctx.out_like
            g_out = torch.zeros(shape, dtype=dtype, device=device)
        gq, gk, gv, g_sinks = fctx.strategy_backward(fctx.spec, state, g_out, g_lse)
        return gq, gk, gv, g_sinks, None, None, None
