"""Incremental decoding with a per-layer KV cache chosen from the pattern: equal to a full forward.

    prompt [B, P] ── model.forward (prefill: the training kernels, ``kernels.attend``) ────────────┐
    token  [B]    ── model.forward at position [t] (one query over the cache) ── logits [B, V] ◀──┘

The model is not changed: decoding runs the model's own forward (embedding, learned global slots,
norms, MLP, head) with an ``AttentionFn`` (``CachedAttention``) that keeps, per layer, the keys and
values that layer's future queries may still need, and attends each new query over them.

What a layer keeps (``layer_cache``; ``Decoder.describe`` says it per layer):

- bounded positional patterns (window, sink, causal longformer, dilated, unions of them, BigBird
  without random blocks): the ``num_global`` global keys plus a ring buffer of the last
  ``reach + 1`` positions (the query's own key and the ``reach`` before it; ``reach`` is
  window_left, rounded down to a multiple of the dilation) — ``num_global + reach + 1`` slots for
  any length (``RingCache``);
- patterns whose reach is unbounded keep every key (``FullCache``): dense and strided (a later query
  may see any earlier key: every stride-th one), BigBird with random blocks (a later query block
  draws among *all* earlier blocks), top-k (the content may pick any earlier block).

Positions are absolute (0-indexed from the first token, learned global slots included) and every
rule is the pattern's own (``Pattern.mask``, ``TopKBlocks.content_mask``), so a sequence may run
past the length the model was trained at: the pattern applies as it is and rotary angles
extrapolate to positions the model has never seen. BigBird's causal random blocks depend on the
query block only (not on the sequence length), so they are well defined there too.

Top-k selects key blocks by the pattern's query summary of the query's block (``query_summary``:
causal, the block's first query, which every query of the block may depend on). The cache keeps
the current block's queries and hands them to ``content_mask``, which picks the summary itself, so
decoding step t equals a full forward over the whole sequence at t. With ``attention.select=query``
each query ranks the blocks itself: the step's one query is all ``content_mask`` needs.

Packed documents (``Documents``: a model trained with data.document_mask / data.reset_positions):
each cached key keeps its document id, a query sees its own document's keys and the globals
(``model.pattern.documents.document_rule``), and rotary positions restart after each separator, exactly as
``model.pattern.documents.document_positions`` counts them over the whole sequence.

Learned sink logits (``sinks`` [H], passed by a layer that has them) are one more softmax column with
no value: ``out' = out · sigmoid(lse − sinks[h])``, joined after the keys (``kernels.stats.apply_sinks``).

Global keys at a fixed rotary distance (model.global_rope=fixed: ``call.q_global``): the prefill runs
``kernels.attend``, which takes them apart itself; each step scores the cached keys the query sees
only because they are global (``kernels.global_part.apart_mask``) with q_global, the others with q —
one softmax over both, as the merged partials of a full forward.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from kernels import attend
from kernels.contract import AttnCall, AttnResult
from kernels.global_part import apart_mask, scores_apart
from kernels.stats import apply_sinks
from model.pattern import BigBird, Dense, Pattern, PatternUnion, Window
from model.pattern.documents import document_positions, document_rule


def bounded_reach(pattern: Pattern) -> int | None:
    """How far before a causal query its farthest non-global key can lie; None when unbounded."""
    if isinstance(pattern, PatternUnion):
        reaches = [bounded_reach(p) for p in pattern.parts]
        return None if None in reaches else max(reaches)
    if isinstance(pattern, BigBird) and pattern.random_blocks:
        return None  # random blocks are drawn among every earlier block
    if isinstance(pattern, Window):
        return pattern.window_left // pattern.dilation * pattern.dilation  # the farthest dilated key
    return None  # dense, strided, top-k


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class RingCache:
    """The global keys and a ring of the last ``window`` positions: ``num_global + window`` slots.
    Position p lives in slot p when global, else in slot ``num_global + (p − num_global) % window``.
    With packed documents each slot also keeps its key's document id (``doc`` [B, slots])."""

    def __init__(self, num_global: int, window: int, sees_all: bool = False):
        self.num_global, self.window = num_global, window
        # sees_all: every held key is in the next query's pattern (a causal window without dilation:
        # the globals and the last window positions are exactly its keys), so a step needs no mask
        self.sees_all = sees_all
        self.k = self.v = self.pos = self.doc = None  # allocated at the first add, when shapes are known
        self.filled = 0  # slots [0, filled) hold keys: globals come first, the ring fills in order

    @property
    def slots(self) -> int:
        return self.num_global + self.window

    def add(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, doc: torch.Tensor | None = None) -> None:
        """k, v [B, Hkv, T, D] at ascending ``positions`` [T] (the next T of the sequence); doc [B, T] or None."""
        g = self.num_global
        if self.k is None:
            shape = (*k.shape[:2], self.slots, k.shape[-1])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)  # (B, Hkv, g + w, D)
            self.pos = torch.full((self.slots,), -1, dtype=torch.long, device=positions.device)
            self.doc = None if doc is None else doc.new_full((k.shape[0], self.slots), -1)  # (B, g + w)
        if k.shape[2] == 1:  # one decoding step: no boolean indexing
            p = int(positions[0])
            s = p if p < g else g + (p - g) % self.window
            self.k[:, :, s], self.v[:, :, s], self.pos[s] = k[:, :, 0], v[:, :, 0], p
            if doc is not None:
                self.doc[:, s] = doc[:, 0]
            self.filled = max(self.filled, s + 1)
            return
        keep = (positions < g) | (positions > positions[-1] - self.window)  # older ones are overwritten
        pos = positions[keep]
        slots = torch.where(pos < g, pos, g + (pos - g) % self.window)
        self.k[:, :, slots], self.v[:, :, slots], self.pos[slots] = k[:, :, keep], v[:, :, keep], pos
        if doc is not None:
            self.doc[:, slots] = doc[:, keep]
        self.filled = max(self.filled, int(slots.max()) + 1)

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(k, v [B, Hkv, K, D], positions [K], doc ids [B, K] or None) of the held keys, in slot
        order (not position order)."""
        n = self.filled
        return self.k[:, :, :n], self.v[:, :, :n], self.pos[:n], None if self.doc is None else self.doc[:, :n]

    def nbytes(self) -> int:
        return 0 if self.k is None else _bytes(*(t for t in self.view() if t is not None))

    def allocated_bytes(self) -> int:
        return 0 if self.k is None else _bytes(*(t for t in (self.k, self.v, self.pos, self.doc) if t is not None))

    def describe(self) -> str:
        return f"bounded: {self.num_global} global + ring of {self.window}"


class FullCache:
    """Every key, in position order; capacity doubles when full (amortised O(1) per token).
    ``block_size`` > 0 (top-k) also keeps the queries of the current query block."""

    def __init__(self, block_size: int = 0, sees_all: bool = False):
        self.block_size = block_size
        self.sees_all = sees_all  # every held key is the next query's (causal dense): no mask
        self.k = self.v = self.pos = self.doc = None
        self.n = 0
        self.block_q = self.block_pos = None  # top-k: [B, H, <= block_size, D] queries of the current block

    def add(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, doc: torch.Tensor | None = None) -> None:
        T, n = k.shape[2], self.n
        if self.k is None or n + T > self.k.shape[2]:
            cap = max(2 * (0 if self.k is None else self.k.shape[2]), n + T, 16)
            shape = (*k.shape[:2], cap, k.shape[-1])  # (B, Hkv, capacity, D)
            old = None if self.k is None else self.view()
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
            self.pos = torch.full((cap,), -1, dtype=torch.long, device=positions.device)
            self.doc = None if doc is None else doc.new_full((k.shape[0], cap), -1)  # (B, capacity)
            if old is not None:
                self.k[:, :, :n], self.v[:, :, :n], self.pos[:n] = old[:3]
                if doc is not None:
                    self.doc[:, :n] = old[3]
        self.k[:, :, n:n + T], self.v[:, :, n:n + T], self.pos[n:n + T] = k, v, positions
        if doc is not None:
            self.doc[:, n:n + T] = doc
        self.n += T

    def add_queries(self, q: torch.Tensor, positions: torch.Tensor) -> None:
        """Keep the queries of ``q`` [B, H, T, D] that share the block of the last position."""
        block_start = int(positions[-1]) // self.block_size * self.block_size
        keep = positions >= block_start
        q, positions = q[:, :, keep], positions[keep]
        if self.block_pos is not None and int(self.block_pos[0]) >= block_start:  # same block: append
            q, positions = torch.cat([self.block_q, q], dim=2), torch.cat([self.block_pos, positions])
        self.block_q, self.block_pos = q, positions

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        n = self.n
        return self.k[:, :, :n], self.v[:, :, :n], self.pos[:n], None if self.doc is None else self.doc[:, :n]

    def _held(self) -> tuple[torch.Tensor, ...]:
        return () if self.block_q is None else (self.block_q, self.block_pos)

    def nbytes(self) -> int:
        return 0 if self.k is None else _bytes(*(t for t in self.view() if t is not None), *self._held())

    def allocated_bytes(self) -> int:
        bufs = (t for t in (self.k, self.v, self.pos, self.doc) if t is not None)
        return 0 if self.k is None else _bytes(*bufs, *self._held())

    def describe(self) -> str:
        return "full" + (f" (+ current top-k query block of {self.block_size})" if self.block_size else "")


def layer_cache(pattern: Pattern) -> RingCache | FullCache:
    """The cache a causal layer of this pattern needs (see the module docstring)."""
    reach = bounded_reach(pattern)
    if reach is not None:
        plain = type(pattern) is Window and pattern.causal and pattern.dilation == 1
        return RingCache(pattern.num_global, reach + 1, sees_all=plain)
    return FullCache(pattern.block_size if pattern.content_based and not pattern.per_query else 0,
                     sees_all=type(pattern) is Dense and pattern.causal)


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
               q_global: torch.Tensor | None = None, apart: torch.Tensor | None = None, need_lse: bool = True):
    """(out [B, H, 1, D], lse [B, H, 1] fp32): one query per row over the held keys, softmax in fp32.
    q [B, H, 1, D]; k, v [B, Hkv, K, D] (GQA: query head h reads key head h // (H / Hkv));
    ``allowed`` [1, K] (positional), [B, H, 1, K] (content-based, or with document ids) or None (every
    key); ``q_global`` [B, H, 1, D] scores the keys where ``apart`` ([1, K] or [B, 1, K]) is true.
    Without ``need_lse`` (no sinks to join) and without q_global: one fused SDPA call over fp32 copies
    (the same softmax in fp32, one op instead of six per layer and step), and lse None."""
    B, H, _, D = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    if not need_lse and q_global is None:  # the G query heads of a key head as G rows of one SDPA call
        mask = None if allowed is None else \
            allowed.reshape(B, Hkv, H // Hkv, K) if allowed.dim() == 4 else allowed.reshape(1, 1, 1, K)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.reshape(B, Hkv, H // Hkv, D).float(), k.float(), v.float(), attn_mask=mask)
        return out.reshape(B, H, 1, D).to(q.dtype), None

    def scores(x):  # (B, Hkv, G, K): the G heads sharing a key head
        return torch.matmul(x.reshape(B, Hkv, H // Hkv, D).float(), k.float().transpose(-1, -2)) / math.sqrt(D)

    s = scores(q)
    if q_global is not None:
        s = torch.where(apart.reshape(-1, 1, 1, K), scores(q_global), s)
    mask = None if allowed is None else \
        allowed.reshape(B, Hkv, H // Hkv, K) if allowed.dim() == 4 else allowed.reshape(1, 1, 1, K)
    s = s if allowed is None else s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, Hkv, G)
    out = torch.matmul(torch.exp(s - lse[..., None]), v.float())  # (B, Hkv, G, D)
    return out.reshape(B, H, 1, D).to(q.dtype), lse.reshape(B, H, 1)


class CachedAttention:
    """An ``AttentionFn`` (model/attention.py) with one cache per layer, chosen by the ``layer``
    index the model hands over. The first call of a layer prefills (the training kernel over the prompt); later calls get one
    query at the next position and attend it over the cache. ``sinks`` [H], when the layer passes
    them, join once per query after the keys (``kernels.stats.apply_sinks``), as in training."""

    def __init__(self, patterns: list[Pattern], backend: str = "auto"):
        self.caches = [layer_cache(p) for p in patterns]
        self.backend = backend
        self.next_pos = [0] * len(patterns)

    def __call__(self, q, k, v, pattern, call: AttnCall) -> AttnResult:
        if call.return_stats:
            raise ValueError("return_stats: decoding keeps no attention statistics")
        positions, seq_len, doc_ids = call.q_pos, call.seq_len, call.q_doc
        i, cache = call.layer, self.caches[call.layer]
        if int(positions[0]) != self.next_pos[i] or (self.next_pos[i] and q.shape[2] != 1):
            raise ValueError(f"decode: layer {i} expects one query at position {self.next_pos[i]} after the "
                             f"prompt, got positions {positions[0]}..{positions[-1]}")
        self.next_pos[i] = int(positions[-1]) + 1
        if pattern.content_based and not pattern.per_query:  # the block's summary comes from its queries
            cache.add_queries(q, positions)
        if int(positions[0]) == 0:  # prefill: the training kernel over the prompt
            out, lse, _ = attend(q, k, v, pattern, call.without_sinks(), self.backend)
            cache.add(k, v, positions, doc_ids)
        else:
            cache.add(k, v, positions, doc_ids)  # the query sees its own key
            k_all, v_all, k_pos, k_doc = cache.view()
            if pattern.content_based:  # select=query: the query itself ranks the blocks
                q_sel, pos_sel = (q, positions) if pattern.per_query else (cache.block_q, cache.block_pos)
                allowed = pattern.content_mask(q_sel, k_all, pos_sel, k_pos)[:, :, -1:]  # (B, H, 1, K)
            elif cache.sees_all and doc_ids is None:
                allowed = None  # every held key (the caches' sees_all)
            else:
                allowed = pattern.mask(positions, k_pos, seq_len).to(k.device)  # (1, K)
            if doc_ids is not None:  # packed documents: the same document, or a global key
                same = document_rule(pattern, positions[:, None], k_pos[None, :], doc_ids[:, :, None], k_doc[:, None, :])
                allowed = allowed & same[:, None]  # (B, H or 1, 1, K)
                allowed = allowed.expand(q.shape[0], q.shape[1], 1, k_pos.numel())
            apart = None
            if call.global_part and scores_apart(pattern):
                apart = apart_mask(pattern, positions, k_pos, seq_len, doc_ids, k_doc)  # (1, K) or (B, 1, K)
            out, lse = attend_one(q, k_all, v_all, allowed, call.q_global if apart is not None else None, apart,
                                  need_lse=call.sinks is not None)
        return AttnResult(*apply_sinks(out, lse, call.sinks))


@dataclass(frozen=True)
class Documents:
    """Packed documents as the model was trained with them (model.pattern.documents.document_positions): a
    ``separator`` token ends its document; ``mask``: a query sees only its document's keys (and the
    globals); ``reset_positions``: rotary positions restart at 0 after each separator."""

    separator: int
    mask: bool = False
    reset_positions: bool = False


class DecodeHead:
    """The LM head for decoding steps: logits = h · Wᵀ with Wᵀ [C, V] held contiguous. With one row
    per step the head is a matrix-vector product over the whole [V, C] weight; on CPU the product
    in the weight's own layout makes one short dot product per vocabulary row (measured for
    [1, 256] × [32000, 256], 2 threads: 5.4 ms against 2.3 ms over the transposed copy). The copy
    costs V·C elements (``nbytes``), made once per Decoder; on other devices the weight is used as is."""

    def __init__(self, weight: torch.Tensor):
        self.weight_t = weight.detach().t().contiguous() if weight.device.type == "cpu" else None
        self.weight = weight

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight_t if self.weight_t is not None else torch.nn.functional.linear(h, self.weight)

    def nbytes(self) -> int:
        return 0 if self.weight_t is None else _bytes(self.weight_t)


class Decoder:
    """Prefill a prompt, then one token at a time. ``max_len`` bounds prompt + generated tokens (it
    is the ``seq_len`` the patterns are asked about; for causal patterns it changes no mask)."""

    def __init__(self, model, max_len: int, backend: str = "auto", documents: Documents | None = None):
        for i, p in enumerate(model.patterns):
            if not p.causal:
                raise ValueError(f"attention.causal: layer {i} is bidirectional ({type(p).__name__}); generation "
                                 "decodes left to right and needs every layer causal")
        self.model, self.max_len, self.documents = model, max_len, documents
        self.attn = CachedAttention(list(model.patterns), backend)
        self.head = DecodeHead(model.lm_head.weight)
        self.pos = 0
        self.doc_state = None  # ([B], [B]): separators so far, and where the current document began

    def _doc_positions(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(doc ids, rotary positions in the document), each [B, T]: ``document_positions`` of the
        whole sequence so far, continued one chunk at a time from the counts of the prefix."""
        doc, rope, self.doc_state = document_positions(tokens, self.documents.separator, positions, self.doc_state)
        return doc, rope

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if int(positions[-1]) >= self.max_len:
            raise ValueError(f"max_len: position {int(positions[-1])} is past max_len={self.max_len}")
        extra = {}
        if self.documents is not None:
            doc, rope = self._doc_positions(tokens, positions)
            extra = {"doc_ids": doc} if self.documents.mask else {}
            if self.documents.reset_positions:
                extra["rope_positions"] = rope
        out = self.model(tokens, positions=positions, attention_fn=self.attn, seq_len=self.max_len,
                         logits_to_keep=1, head=self.head, **extra)
        self.pos = int(positions[-1]) + 1
        return out.logits[:, -1].float()  # (B, V)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, P] at positions 0..P-1 (the first n_learned_global are slots) -> next-token logits [B, V]."""
        g = self.model.cfg.n_learned_global
        if tokens.shape[1] <= g:
            raise ValueError(f"prompt: needs more than the {g} learned global slots (model.n_learned_global), got "
                             f"{tokens.shape[1]} tokens")
        return self._forward(tokens, torch.arange(tokens.shape[1], device=tokens.device))

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token [B] at the next position -> logits [B, V] for the one after it."""
        return self._forward(token[:, None], torch.tensor([self.pos], device=token.device))

    def cache_bytes(self) -> int:
        return sum(c.nbytes() for c in self.attn.caches)

    def allocated_bytes(self) -> int:
        return sum(c.allocated_bytes() for c in self.attn.caches)

    def describe(self) -> str:
        kinds = [c.describe() for c in self.attn.caches]
        groups = {kind: [str(i) for i, x in enumerate(kinds) if x == kind] for kind in kinds}
        return "; ".join(f"layer{'s' * (len(ids) > 1)} {', '.join(ids)}: {kind}" for kind, ids in groups.items())


# --- sampling ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0: all
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches top_p
    seed: int = 0

    def validate(self) -> Sampling:
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        return self


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] logits -> [B] tokens: argmax at temperature 0, else a draw from the filtered softmax."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= sampling.top_p  # the mass before a token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, P + N]: the prompt and the N generated tokens
    step_logits: torch.Tensor | None  # [B, N, V]: the logits each generated token was chosen from
    prefill_s: float
    decode_s: float  # the N − 1 single-token steps
    cache_bytes: int
    cache: str  # what each layer keeps (Decoder.describe)


@torch.no_grad()
def generate(model, tokens: torch.Tensor, max_new_tokens: int, sampling: Sampling = Sampling(),
             backend: str = "auto", keep_logits: bool = False, documents: Documents | None = None) -> Generation:
    """Continue ``tokens`` [B, P] (positions 0..P-1, learned global slots first) by ``max_new_tokens``."""
    sampling.validate()
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    dec = Decoder(model, tokens.shape[1] + max_new_tokens, backend, documents)
    gen = torch.Generator(device=tokens.device).manual_seed(sampling.seed)
    t0 = time.perf_counter()
    logits = dec.prefill(tokens)
    t1 = time.perf_counter()
    new, kept = [], []
    for n in range(max_new_tokens):
        new.append(next_token(logits, sampling, gen))
        if keep_logits:
            kept.append(logits)
        if n + 1 < max_new_tokens:
            logits = dec.step(new[-1])
    t2 = time.perf_counter()
    return Generation(torch.cat([tokens, torch.stack(new, 1)], 1), torch.stack(kept, 1) if keep_logits else None,
                      t1 - t0, t2 - t1, dec.cache_bytes(), dec.describe())
