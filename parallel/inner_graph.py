"""What the halo and top-k strategies share: one autograd Function per attention layer whose
forward builds an inner autograd graph (exchanges + local kernel), so that its backward can run
the exchanges in the same fixed order on every rank (see ``parallel/halo_attention.py``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels.stats import AttnStats


def run_layer(fn: type[torch.autograd.Function], forward: Callable, q, k, v, sinks, spec, return_stats: bool):
    """(out, lse, AttnStats | None): ``fn.apply`` when a gradient is wanted, else ``forward`` without
    keeping any graph (inference takes the same steps). ``sinks`` [H] or None: learned sink logits,
    an input of the Function so that its gradient (this rank's queries' share) comes back."""
    inputs = (q, k, v) + ((sinks,) if sinks is not None else ())
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in inputs)):
        with torch.no_grad():
            s = forward(q, k, v, sinks, spec)
        return s["out"], s["lse"], s["stats"]
    out, lse, stats = fn.apply(q, k, v, sinks, spec)
    return out, lse, (AttnStats(*stats.unbind(-1)) if return_stats else None)


def sink_leaf(sinks):
    """The inner graph's own leaf for the sink logits (None stays None)."""
    return None if sinks is None else sinks.detach().requires_grad_(torch.is_grad_enabled())


def forward_with_inner_graph(fctx, forward: Callable, q, k, v, sinks, spec):
    """The body of such a Function's forward: run ``forward`` with grad enabled, keep its state
    (with the inner graph) on ``fctx`` for backward, return detached (out, lse, packed stats)."""
    with torch.enable_grad():
        state = forward(q, k, v, sinks, spec)
    fctx.spec, fctx.state = spec, state
    out, lse, stats = state["out"], state["lse"], state["stats"]
    fields = () if stats is None else stats.fields() + ((stats.sink_mass,) if stats.sink_mass is not None else ())
    packed = torch.stack(fields, -1) if stats is not None else lse.new_zeros(0)
    fctx.mark_non_differentiable(lse, packed)
    return out.detach(), lse.detach(), packed.detach()
