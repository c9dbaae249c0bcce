"""Content-based top-k block pattern: its key set depends on q and k, not only on positions.

Part of ``model.pattern`` (imported and re-exported by its ``__init__``); kept apart because it is the one
pattern whose mask needs the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.pattern.base import Pattern, PatternError

SELECTIONS = ("block", "query")  # attention.select: who ranks the key blocks (see TopKBlocks)
SCORE_ELEMS = 1 << 22  # select=query: per-query block scores are computed this many elements at a time


@dataclass(frozen=True)
class TopKBlocks(Pattern):
    """Content-based: the ``top_k`` key blocks (of ``block_size``) with the highest score
    ``summary · mean(k_block)``, plus always the query's own block and the global/sink block 0
    (causal: only blocks at or before its own; the own block causally masked). The positional mask is
    the union of all blocks the content could pick (everything); the data-dependent one is
    ``content_mask`` from q and k. The global tokens live in block 0, which every query keeps; global
    queries follow the content selection like every other query (they do not see every key, even
    when bidirectional).

    ``select`` says whose summary ranks the blocks. ``block``: one choice per query block, by
    ``query_summary`` (the mean of the block's queries, or its first query when causal); every query
    of the block sees the same blocks. ``query`` (MoBA, NSA): each query q_i ranks the blocks by
    q_i · mean(k_block) itself, so the queries of one block may see different blocks. Either way the
    candidates are the blocks other than the forced two (causal: strictly before the query's block,
    whose mean would include later keys)."""

    top_k: int = 4
    block_size: int = 64
    select: str = "block"

    bounded: bool = field(default=False, init=False, repr=False, compare=False)
    content_based: bool = field(default=True, init=False, repr=False, compare=False)

    def _rule(self, qi, kj, seq_len):
        return torch.ones(torch.broadcast_shapes(qi.shape, kj.shape), dtype=torch.bool, device=qi.device)

    def _rule_ranges(self, q_start, q_end, seq_len):
        return [(0, seq_len)]

    @property
    def per_query(self) -> bool:
        """Whether each query ranks the key blocks itself (``select=query``)."""
        return self.select == "query"

    def select_blocks(self, q_blocks: torch.Tensor, k_blocks: torch.Tensor, q_block_ids: torch.Tensor,
                      k_block_ids: torch.Tensor) -> torch.Tensor:
        """BoolTensor[B, H, R, nK] of chosen key blocks for R rows of selectors.

        q_blocks [B, H, R, D] are the rows that rank (block summaries with select=block, single queries
        with select=query) and q_block_ids [R] the absolute block index of each row; k_blocks
        [B, H, nK, D] are per-block mean keys (GQA already expanded) with absolute indices
        k_block_ids [nK]. A sequence shard passes the gathered summaries of every key block, so all
        ranks select identically.
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
        [T], ascending positions) selects its key blocks with (select=block). Bidirectional: the mean
        of the block's queries. Causal: the block's first query. The mean would make a query's key set
        depend on the later queries of its block, hence on later tokens, its own next-token target
        among them; the first query is the one every query of the block may depend on."""
        if not self.causal:
            return block_mean(q, inv, n)
        idx = torch.arange(inv.numel(), device=inv.device)
        first = torch.full((n,), inv.numel(), dtype=torch.long, device=inv.device).scatter_reduce(
            0, inv.to(idx.device), idx, reduce="amin")  # (n,) first row of each block
        return q[:, :, first.to(q.device)].float()

    def query_choice(self, q: torch.Tensor, q_block_ids: torch.Tensor, k_means: torch.Tensor,
                     k_ids: torch.Tensor) -> torch.Tensor:
        """select=query: LongTensor[B, H, Q, top_k + 2] of the key blocks (indices into the nK of
        ``k_means`` [B, H, nK, D], GQA expanded) each query of q [B, H, Q, D] sees, ascending, −1 where a
        query sees fewer (few candidates). ``q_block_ids`` [Q]: each query's absolute block. The
        scores are computed ``SCORE_ELEMS`` at a time, so memory stays O(Q · top_k), not O(Q · nK)."""
        B, H, Q, nk = q.shape[0], q.shape[1], q.shape[2], k_means.shape[2]
        width = min(self.top_k + 2, nk)
        out = torch.full((B, H, Q, width), -1, dtype=torch.long, device=q.device)
        rows = max(1, SCORE_ELEMS // max(1, B * H * nk))
        for s in range(0, Q, rows):
            chosen = self.select_blocks(q[:, :, s:s + rows], k_means, q_block_ids[s:s + rows], k_ids)  # (B, H, r, nK)
            cols = torch.arange(nk, device=chosen.device).expand_as(chosen)
            first = torch.where(chosen, cols, nk).topk(width, dim=-1, largest=False).values  # chosen first, ascending
            out[:, :, s:s + rows] = first.masked_fill(first == nk, -1).to(out.device)
        return out

    def block_choice(self, q: torch.Tensor, q_inv: torch.Tensor, q_ids: torch.Tensor, k_means: torch.Tensor,
                     k_ids: torch.Tensor) -> torch.Tensor:
        """BoolTensor[B, H, nQ, nK]: the key blocks some query of each query block sees (q [B, H, T, D]
        grouped by ``q_inv`` [T] into the blocks ``q_ids`` [nQ]). select=block: the block's choice;
        select=query: the union of its queries' (what a tile or a shard must hold)."""
        if not self.per_query:
            return self.select_blocks(self.query_summary(q, q_inv, len(q_ids)), k_means, q_ids, k_ids)
        return union_per_block(self.query_choice(q, q_ids[q_inv.to(q_ids.device)], k_means, k_ids), q_inv,
                               len(q_ids), k_means.shape[2])

    def content_mask(self, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """BoolTensor[B, H, Q, K] for q [B, H, Q, D] and k [B, Hkv, K, D] with absolute positions."""
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        bs = self.block_size
        q_ids, q_inv = torch.unique(q_pos // bs, return_inverse=True)
        k_ids, k_inv = torch.unique(k_pos // bs, return_inverse=True)
        k_means = block_mean(k, k_inv, len(k_ids))
        if self.per_query:  # (B, H, Q, nK): the oracle holds Q x K anyway
            m = self.select_blocks(q, k_means, q_pos // bs, k_ids)[:, :, :, k_inv]
        else:
            chosen = self.select_blocks(self.query_summary(q, q_inv, len(q_ids)), k_means, q_ids, k_ids)
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
        if self.select not in SELECTIONS:
            raise PatternError(f"attention.select: must be one of {', '.join(SELECTIONS)}; got {self.select!r}")
        return self


def block_mean(x: torch.Tensor, inv: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of x [B, H, T, D] over T grouped by ``inv`` [T] into n groups -> [B, H, n, D]."""
    out = torch.zeros(*x.shape[:2], n, x.shape[-1], dtype=torch.float32, device=x.device)
    out.index_add_(2, inv.to(x.device), x.float())
    return out / torch.bincount(inv, minlength=n).to(out)[:, None]


def union_per_block(choice: torch.Tensor, inv: torch.Tensor, n: int, nk: int) -> torch.Tensor:
    """BoolTensor[B, H, n, nK]: per group of rows (``inv`` [Q] into n groups), the union of the rows'
    chosen blocks ``choice`` [B, H, Q, S] (indices into nK, −1 for none; ``TopKBlocks.query_choice``)."""
    B, H, Q, S = choice.shape
    flat = inv.to(choice.device)[:, None] * (nk + 1) + torch.where(choice < 0, nk, choice)  # (B, H, Q, S)
    out = torch.zeros(B, H, n * (nk + 1), dtype=torch.bool, device=choice.device)
    out.scatter_(-1, flat.reshape(B, H, Q * S), True)
    return out.view(B, H, n, nk + 1)[..., :nk]
