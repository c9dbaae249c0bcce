"""Packed documents, as a rule that wraps any pattern (attention-gym's ``document_mask`` idea): the
pattern decides which positions a query sees, documents narrow that. The oracle, every kernel and the
decode cache apply this one rule; none keeps its own."""

from __future__ import annotations

import torch

from model.pattern.base import Pattern


def document_rule(pattern: Pattern, qi: torch.Tensor, kj: torch.Tensor, q_doc: torch.Tensor,
                  k_doc: torch.Tensor) -> torch.Tensor:
    """Packed documents: may query i see key j as far as documents go (the pattern decides the rest).

    Same document, or j is a global key (visible to every query), or — bidirectional patterns only —
    i is a global query (it sees every key). All arguments broadcast; not in place (FlexAttention
    traces it inside ``mask_mod``)."""
    ok = (q_doc == k_doc) | (kj < pattern.num_global)
    if not pattern.causal:
        ok = ok | (qi < pattern.num_global)
    return ok
