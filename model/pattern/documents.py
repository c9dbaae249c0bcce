"""Packed documents, as a rule that wraps any pattern (attention-gym's ``document_mask`` idea): the
pattern decides which positions a query sees, documents narrow that. The oracle, every kernel and the
decode cache apply this one rule; none keeps its own. ``document_positions`` is the one count of
documents and positions within them from the separators, for the trainer's windows and for decoding."""

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


def document_positions(tokens: torch.Tensor, separator: int, positions: torch.Tensor | None = None,
                       state: tuple[torch.Tensor, torch.Tensor] | None = None):
    """(doc ids, positions within the document, state), each [B, T], of ``tokens`` [B, T] at ``positions``
    [T] (default 0..T-1).

    A separator ends its document: the doc id of position i counts the separators before i, and the
    next token starts the next document at position 0. A window's first document starts at its first
    position (its earlier part lies before the window). ``state`` = (separators so far, where the current
    document began), each [B], continues a stream one chunk at a time (decoding): chunks give what the
    whole sequence gives at once. None: a fresh start."""
    sep = (tokens == separator).long()
    n_sep, doc_start = state if state is not None else (torch.zeros_like(sep[:, 0]), torch.zeros_like(sep[:, 0]))
    doc = n_sep[:, None] + torch.cumsum(sep, dim=1) - sep  # separators strictly before each position
    idx = (torch.arange(tokens.shape[1], device=tokens.device) if positions is None else positions)
    idx = idx[None, :].expand_as(tokens)
    after = torch.where(sep.bool(), idx + 1, torch.zeros_like(idx))  # where a document starts after a separator
    starts = torch.cummax(torch.cat([doc_start[:, None], after[:, :-1]], dim=1), dim=1).values
    return doc, idx - starts, (n_sep + sep.sum(1), torch.maximum(doc_start, after.max(1).values))
