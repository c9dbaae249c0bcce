"""FlexAttention backend: the pattern's mask as a ``BlockMask`` + ``mask_mod`` for PyTorch's fused kernel.

The BlockMask is built here, in plain torch on the CPU, from ``pattern.allowed`` evaluated only on the
key blocks ``pattern.kv_ranges`` can reach (never the dense Q×K mask), so it is exact for any query/key
positions — a sequence shard with ``[globals | halo | local]`` keys included. Inside partial blocks the
kernel calls ``mask_mod``: the pattern's own rule on looked-up positions
(``pattern.allowed(q_pos[q_idx], k_pos[kv_idx], seq_len)``). Some rules cannot be traced by Dynamo/vmap
(BigBird's seeded numpy draw, PatternUnion's in-place ``|=``); for those — detected by the failing call, then
remembered per pattern — ``mask_mod`` looks the answer up in a table of the partial blocks' masks
(``P × 128 × 128`` bools, plus two constant blocks), which scales with the number of partial blocks.

Device facts (torch 2.13): CUDA runs the compiled kernel forward and backward. CPU runs eager
``flex_attention`` forward only — it materialises the B·H·Q·K scores and has no backward, and the
compiled CPU kernel returns no LSE — so this backend refuses CPU inputs that require grad.
``lse`` comes back in natural-log units (torch rescales the kernel's base-2 value; tests check it
against the reference). Statistics are not computed here: ask the blocked backend for them.

Document ids (q_doc [B, Q], k_doc [B, K]) add ``document_rule`` to ``mask_mod`` (plain tensor
indexing, traceable) and make the block flags per batch element: a key block no query of a query
block may see is absent from the BlockMask, so short documents skip most blocks.
"""

from __future__ import annotations

import functools
import hashlib
import math

import torch

from kernels.caches import LRUCache
from kernels.contract import AttnResult
from kernels.inputs import EmptyRowError, check_docs, check_inputs
from model.pattern import Pattern
from model.pattern.documents import document_rule

BLOCK = 128  # FlexAttention's default sparse block size
# Process-wide memo of this backend (see kernels.caches; clear_caches empties all three):
BLOCK_MASKS = LRUCache(maxsize=8)  # (pattern, positions digest, shape, device, table?) -> BlockMask
UNTRACEABLE: set = set()  # patterns whose rule failed inside mask_mod; they use the table


@functools.cache
def _compiled_flex():
    """flex_attention compiled once per process (the fused Triton kernel); built on the first CUDA call."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, fullgraph=True)


def clear_caches() -> None:
    """Forget the memoised block masks, the untraceable patterns and the compiled kernel. Results do
    not change; the next calls rebuild (and recompile) what they need."""
    BLOCK_MASKS.clear()
    UNTRACEABLE.clear()
    _compiled_flex.cache_clear()


def flex_available() -> bool:
    """Whether FlexAttention with ``return_aux`` (the LSE API used here) can be imported."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_attention_backend(q, k, v, pattern: Pattern, q_pos=None, k_pos=None, scale=None, seq_len=None,
                           return_stats=False, q_doc=None, k_doc=None):
    """``AttnResult`` (out [B, H, Q, D], lse [B, H, Q] fp32, None) with FlexAttention; same contract as reference_attention."""
    if pattern.content_based:
        raise ValueError(f"backend=flex takes positional patterns only; {type(pattern).__name__} is content-based "
                         "(use backend=blocked or backend=reference)")
    if return_stats:
        raise ValueError("backend=flex does not compute attention statistics; they come from backend=blocked")
    if not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("flex backend has no CPU backward; use backend=blocked")
    B, H, Q, D, Hkv, K = check_inputs(q, k, v, q_pos, k_pos)
    docs = check_docs(q_doc, k_doc, B, Q, K)
    docs = None if docs[0] is None else docs
    q_pos = torch.arange(Q) if q_pos is None else q_pos.cpu().long()  # CPU copies: a CUDA sync point
    k_pos = torch.arange(K) if k_pos is None else k_pos.cpu().long()
    n = seq_len if seq_len is not None else int(max(q_pos.max(), k_pos.max())) + 1
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if pattern not in UNTRACEABLE:
        try:
            return _run(q, k, v, _block_mask(pattern, q_pos, k_pos, n, q.device, False, docs), scale, H != Hkv)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # Dynamo's Unsupported and vmap errors are RuntimeErrors
            UNTRACEABLE.add(pattern)
    return _run(q, k, v, _block_mask(pattern, q_pos, k_pos, n, q.device, True, docs), scale, H != Hkv)


def _run(q, k, v, block_mask, scale, gqa):
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    fn = flex_attention
    if q.is_cuda:  # fused Triton kernel; eager would materialise the scores
        fn = _compiled_flex()
    out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_aux=AuxRequest(lse=True))
    return AttnResult(out, aux.lse.float(), None)


def _block_mask(pattern, q_pos, k_pos, seq_len, device, table, docs=None):
    """The BlockMask for these positions and document ids, memoised in ``BLOCK_MASKS``."""
    raw = q_pos.numpy().tobytes() + b"|" + k_pos.numpy().tobytes()
    if docs is not None:
        raw += b"|" + docs[0].numpy().tobytes() + b"|" + docs[1].numpy().tobytes() + repr(docs[0].shape).encode()
    digest = hashlib.sha1(raw).hexdigest()
    key = (pattern, digest, len(q_pos), len(k_pos), seq_len, str(device), table)
    return BLOCK_MASKS.get_or_build(key, lambda: build_block_mask(pattern, q_pos, k_pos, seq_len, device, table,
                                                                  docs))


def block_flags(pattern, q_pos, k_pos, seq_len, docs=None):
    """(partial [nQB, nKB], full [nQB, nKB], partial block masks [P, BLOCK, BLOCK]) from pattern.allowed.

    Per query block, only key blocks whose position span meets ``kv_ranges`` of the block's position
    span are evaluated; a block is full when all BLOCK×BLOCK entries are allowed (so a ragged last
    block is always partial and the kernel masks its padding), partial when some are. With ``docs``
    (q_doc [B, Q], k_doc [B, K]) the flags are [B, nQB, nKB] of the pattern AND ``document_rule``,
    while the tiles stay the pattern's own (the table ``mask_mod`` ANDs the documents itself).
    """
    Q, K = len(q_pos), len(k_pos)
    nq, nk = math.ceil(Q / BLOCK), math.ceil(K / BLOCK)
    k_pad = torch.cat([k_pos, k_pos[-1:].expand(nk * BLOCK - K)]).view(nk, BLOCK)
    k_lo, k_hi = k_pad.amin(1), k_pad.amax(1)  # (nKB,) position span of each key block
    partial = torch.zeros(nq, nk, dtype=torch.bool)
    full = torch.zeros(nq, nk, dtype=torch.bool)
    nb = 1 if docs is None else docs[0].shape[0]
    d_partial, d_full = torch.zeros(nb, nq, nk, dtype=torch.bool), torch.zeros(nb, nq, nk, dtype=torch.bool)
    tiles = []
    for qb in range(nq):
        qp = q_pos[qb * BLOCK : (qb + 1) * BLOCK]
        r = torch.tensor(pattern.kv_ranges(int(qp.min()), int(qp.max()) + 1, seq_len)).view(-1, 2)
        cand = ((k_lo[None] < r[:, 1:]) & (k_hi[None] >= r[:, :1])).any(0).nonzero()[:, 0]  # (C,)
        idx = (cand[:, None] * BLOCK + torch.arange(BLOCK)).flatten()  # (C·BLOCK,) key indices
        ok = idx < K
        m = torch.zeros(BLOCK, len(idx), dtype=torch.bool)  # padded query rows stay False
        m[: len(qp), ok] = pattern.mask(qp, k_pos[idx[ok]], seq_len)
        if not m[: len(qp)].any(1).all():
            first = int(qp[~m[: len(qp)].any(1)][0])
            raise EmptyRowError(f"query at position {first} has no allowed key among the {K} keys given")
        if docs is not None:
            _doc_flags(pattern, m, qp, k_pos, idx, ok, docs, qb, cand, d_partial, d_full)
        m = m.view(BLOCK, len(cand), BLOCK).transpose(0, 1)  # (C, BLOCK_q, BLOCK_k)
        some, every = m.flatten(1).any(1), m.flatten(1).all(1)
        partial[qb, cand[some & ~every]] = True
        full[qb, cand[every]] = True
        tiles.append(m[some & ~every])
    tiles = torch.cat(tiles) if tiles else torch.zeros(0, BLOCK, BLOCK, dtype=torch.bool)
    if docs is not None:
        return d_partial, d_full, tiles
    return partial, full, tiles


def _doc_flags(pattern, m, qp, k_pos, idx, ok, docs, qb, cand, d_partial, d_full):
    """Per batch element: the candidate blocks of query block ``qb`` under pattern AND documents."""
    q_doc, k_doc = docs
    rows = torch.arange(qb * BLOCK, qb * BLOCK + len(qp))
    for b in range(q_doc.shape[0]):
        md = m.clone()  # (BLOCK, C·BLOCK) pattern mask; padded rows/columns stay False
        md[: len(qp), ok] &= document_rule(pattern, qp[:, None], k_pos[idx[ok]][None, :], q_doc[b, rows][:, None],
                                           k_doc[b, idx[ok]][None, :])
        md = md.view(BLOCK, len(cand), BLOCK).transpose(0, 1).flatten(1)  # (C, BLOCK·BLOCK)
        some, every = md.any(1), md.all(1)
        d_partial[b, qb, cand[some & ~every]] = True
        d_full[b, qb, cand[every]] = True


def build_block_mask(pattern, q_pos, k_pos, seq_len, device, table=False, docs=None):
    """A FlexAttention BlockMask for the pattern at these positions; ``table`` picks the lookup mask_mod;
    ``docs`` (q_doc [B, Q], k_doc [B, K]) adds document masking (block flags per batch element)."""
    if docs is not None:
        flags = block_flags(pattern, q_pos, k_pos, seq_len, docs)
        pattern_mod = _pattern_mod(pattern, q_pos, k_pos, seq_len, device, table)
        q_doc, k_doc = (d.to(device) for d in docs)
        q_d, k_d = q_pos.to(device), k_pos.to(device)

        def doc_mod(b, h, q_idx, kv_idx):
            return pattern_mod(b, h, q_idx, kv_idx) & document_rule(pattern, q_d[q_idx], k_d[kv_idx], q_doc[b, q_idx],
                                                                    k_doc[b, kv_idx])

        return _from_flags(flags[0], flags[1], doc_mod, q_pos, k_pos, device)
    partial, full, tiles = block_flags(pattern, q_pos, k_pos, seq_len)
    return _from_flags(partial, full, _pattern_mod(pattern, q_pos, k_pos, seq_len, device, table, (partial, full, tiles)),
                       q_pos, k_pos, device)


def _pattern_mod(pattern, q_pos, k_pos, seq_len, device, table, flags=None):
    """The pattern's own ``mask_mod``: its rule on looked-up positions, or the table of partial tiles."""
    if table:
        partial, full, tiles = flags if flags is not None else block_flags(pattern, q_pos, k_pos, seq_len)
        # Tile 0 is all False (absent blocks), tile 1 all True (full blocks): eager CPU flex evaluates
        # mask_mod on every (q, k), not only in partial blocks, so every block needs an answer.
        const = torch.stack([torch.zeros(BLOCK, BLOCK, dtype=torch.bool), torch.ones(BLOCK, BLOCK, dtype=torch.bool)])
        tiles_d = torch.cat([const, tiles]).to(device)  # (2 + P, BLOCK, BLOCK)
        tile_id = full.int()
        tile_id[partial] = torch.arange(2, 2 + len(tiles), dtype=torch.int32)  # row-major, as tiles were appended
        tile_id = tile_id.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            return tiles_d[tile_id[q_idx // BLOCK, kv_idx // BLOCK], q_idx % BLOCK, kv_idx % BLOCK]
    else:
        q_d, k_d = q_pos.to(device), k_pos.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            return pattern.allowed(q_d[q_idx], k_d[kv_idx], seq_len)
    return mask_mod


def _from_flags(partial, full, mask_mod, q_pos, k_pos, device):
    """BlockMask from partial/full block flags [nQB, nKB] (shared by the batch) or [B, nQB, nKB]."""
    from torch.nn.attention.flex_attention import BlockMask

    def ordered(dense):  # (B?, nQB, nKB) bool -> counts [B|1, 1, nQB], column indices [B|1, 1, nQB, nKB]
        d = dense.int().reshape(-1, 1, *dense.shape[-2:])
        return (d.sum(-1).int().to(device), torch.argsort(d, dim=-1, descending=True, stable=True).int().to(device))

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(len(q_pos), len(k_pos)))
