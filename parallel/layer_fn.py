"""What the halo and top-k strategies share: one autograd Function per attention layer whose
forward builds an inner autograd graph (exchanges + local kernel), so that its backward can run
the exchanges in the same fixed order on every rank (see ``parallel/halo_attention.py``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels.stats import AttnStats


def run_layer(fn: type[torch.autograd.Function], forward: Callable, q, k, v, spec, return_stats: bool):
    """(out, lse, AttnStats | None): ``fn.apply`` when a gradient is wanted, else ``forward`` without
    keeping any graph (inference takes the same steps)."""
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))):
        with torch.no_grad():
            s = forward(q, k, v, spec)
        return s["out"], s["lse"], s["stats"]
    out, lse, stats = fn.apply(q, k, v, spec)
    return out, lse, (AttnStats(*stats.unbind(-1)) if return_stats else None)


def forward_with_inner_graph(fctx, forward: Callable, q, k, v, spec):
    """The body of such a Function's forward: run ``forward`` with grad enabled, keep its state
    (with the inner graph) on ``fctx`` for backward, return detached (out, lse, packed stats)."""
    with torch.enable_grad():
        state = forward(q, k, v, spec)
    fctx.spec, fctx.state = spec, state
    out, lse, stats = state["out"], state["lse"], state["stats"]
    packed = torch.stack(stats.fields(), -1) if stats is not None else lse.new_zeros(0)
    fctx.mark_non_differentiable(lse, packed)
    return out.detach(), lse.detach(), packed.detach()
