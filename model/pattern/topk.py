"""Content-based top-k block pattern: its key set depends on q and k, not only on positions.

Part of ``model.pattern`` (imported and re-exported by its ``__init__``); kept apart because it is the one
pattern whose mask needs the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.pattern.base import Pattern, PatternError


@dataclass(frozen=True)
class TopKBlocks(Pattern):
    """Content-based: per query block of ``block_size``, the ``top_k`` key blocks with the highest
    score ``summary(q_block) · mean(k_block)`` (``query_summary``: the mean of the block's queries, or
    its first query when causal), plus always its own block and the global/sink block 0
    (causal: only blocks at or before its own). The positional mask is the union of all blocks the
    content could pick (everything); the data-dependent one is ``content_mask`` from q and k.
    The global tokens live in block 0, which every query keeps; global queries follow the content
    selection like every other query (they do not see every key, even when bidirectional)."""

    top_k: int = 4
    block_size: int = 64

    bounded: bool = field(default=False, init=False, repr=False, compare=False)
    content_based: bool = field(default=True, init=False, repr=False, compare=False)

    def _rule(self, qi, kj, seq_len):
        return torch.ones(torch.broadcast_shapes(qi.shape, kj.shape), dtype=torch.bool, device=qi.device)

    def _rule_ranges(self, q_start, q_end, seq_len):
        return [(0, seq_len)]

    def select_blocks(self, q_blocks: torch.Tensor, k_blocks: torch.Tensor, q_block_ids: torch.Tensor,
                      k_block_ids: torch.Tensor) -> torch.Tensor:
        """BoolTensor[B, H, nQ, nK] of chosen key blocks from block summaries.

        q_blocks [B, H, nQ, D] and k_blocks [B, H, nK, D] are per-block mean queries/keys (GQA
        already expanded); *_block_ids [nQ]/[nK] are their absolute block indices. A sequence shard
        passes the gathered summaries of every key block, so all ranks select identically.
        """
        scores = torch.einsum("bhqd,bhkd->bhqk", q_blocks.float(), k_blocks.float())
        qb, kb = q_block_ids[:, None].to(scores.device), k_block_ids[None, :].to(scores.device)
        forced = (kb == qb) | (kb == 0)
        allowed = kb <= qb if self.causal else torch.ones_like(forced)
        scores = scores.masked_fill(~allowed | forced, float("-inf"))
        k = min(self.top_k, scores.shape[-1])
        top = scores.topk(k, dim=-1).indices
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
        chosen &= torch.isfinite(scores)  # top-k may have picked -inf entries when few candidates
        return chosen | (forced & allowed)

    def query_summary(self, q: torch.Tensor, inv: torch.Tensor, n: int) -> torch.Tensor:
        """[B, H, n, D] fp32: what each of the n query blocks (rows of q [B, H, T, D] grouped by ``inv``
        [T], ascending positions) selects its key blocks with. Bidirectional: the mean of the block's
        queries. Causal: the block's first query. The mean would make a query's key set depend on
        the later queries of its block, hence on later tokens, its own next-token target among them;
        the first query is the one every query of the block may depend on."""
        if not self.causal:
            return block_mean(q, inv, n)
        idx = torch.arange(inv.numel(), device=inv.device)
        first = torch.full((n,), inv.numel(), dtype=torch.long, device=inv.device).scatter_reduce(
            0, inv.to(idx.device), idx, reduce="amin")  # (n,) first row of each block
        return q[:, :, first.to(q.device)].float()

    def content_mask(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """BoolTensor[B, H, Q, K] for q [B, H, Q, D] and k [B, Hkv, K, D] with absolute positions."""
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        bs = self.block_size
        q_ids, q_inv = torch.unique(q_pos // bs, return_inverse=True)
        k_ids, k_inv = torch.unique(k_pos // bs, return_inverse=True)
        chosen = self.select_blocks(self.query_summary(q, q_inv, len(q_ids)), block_mean(k, k_inv, len(k_ids)),
                                    q_ids, k_ids)
        m = chosen[:, :, q_inv][:, :, :, k_inv]  # (B, H, Q, K)
        return m & self.mask(q_pos, k_pos).to(m.device)

    def validate(self, seq_len=None):
        super().validate(seq_len)
        if self.top_k < 1:
            raise PatternError(f"attention.top_k: must be >= 1, got {self.top_k}")
        if self.block_size < 1:
            raise PatternError(f"attention.block_size: must be >= 1, got {self.block_size}")
        if self.num_global > self.block_size:
            raise PatternError(f"attention.num_global: must be <= block_size={self.block_size} for topk, got {self.num_global}")
        return self


def block_mean(x: torch.Tensor, inv: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of x [B, H, T, D] over T grouped by ``inv`` [T] into n groups -> [B, H, n, D]."""
    out = torch.zeros(*x.shape[:2], n, x.shape[-1], dtype=torch.float32, device=x.device)
    out.index_add_(2, inv.to(x.device), x.float())
    return out / torch.bincount(inv, minlength=n).to(out)[:, None]
