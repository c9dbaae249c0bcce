"""Building the token cache: a corpus's documents (``trainer.data.corpus.Source``) tokenized into a
flat file of ids, each document followed by DOC_SEP, streaming in bounded memory: the texts of
about BATCH_BYTES of documents are encoded in one tokenizer call (its threads share them out), the
ids are written FLUSH_TOKENS at a time, so memory is O(those + one document) whatever the corpus size.
Prompt/completion rows also give a file of scored flags, one uint8 per token."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from trainer.data.formats import Record
from trainer.data.stream import DOC_SEP, DataConfigError


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32)



def encode_records(recs: list[Record], tok, dtype: np.dtype) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(token ids ending with DOC_SEP, scored flags or None) of each record, the texts encoded in one
    batch. A prompt/completion row scores its completion and the separator after it (target t is
    token t + 1: scored where token t + 1 is)."""
    texts = [r.data for r in recs if not isinstance(r.data, np.ndarray)]
    texts += [r.prompt for r in recs if r.prompt is not None]
    encoded = iter(tok.encode_many(texts))
    sep = getattr(tok, "doc_sep", DOC_SEP)  # the model's EOS for a Hugging Face tokenizer
    ids_of = [None if isinstance(r.data, np.ndarray) else next(encoded) for r in recs]
    out = []
    for rec, ids in zip(recs, ids_of):
        if ids is None:  # megatron: ids already
            out.append((_given_ids(rec, tok, dtype), None))
        elif rec.prompt is None:
            out.append((np.append(ids.astype(dtype), dtype.type(sep)), None))
        else:
            prompt = next(encoded)
            both = np.concatenate([prompt, ids, [sep]]).astype(dtype)
            out.append((both, (np.arange(len(both)) >= len(prompt)).astype(np.uint8)))
    return out


def _given_ids(rec: Record, tok, dtype: np.dtype) -> np.ndarray:
    if len(rec.data) and int(rec.data.max()) >= tok.vocab_size:
        raise DataConfigError(f"data.path: {rec.where}: token id {int(rec.data.max())} is outside the "
                              f"tokenizer's vocabulary of {tok.vocab_size} ({tok.name}); use the tokenizer "
                              "that wrote the file")
    ids = rec.data.astype(dtype)
    sep = getattr(tok, "doc_sep", DOC_SEP)  # --append-eod wrote the tokenizer's EOS
    return ids if len(ids) and ids[-1] == sep else np.append(ids, dtype.type(sep))


FLUSH_TOKENS = 1 << 22  # tokens buffered before a write: memory stays O(this + one batch)
BATCH_BYTES = 1 << 20  # text encoded per tokenizer call (its encodings take ~30x that, briefly)


def _batches(records: Iterator[Record]) -> Iterator[list[Record]]:
    batch, size = [], 0
    for r in records:
        batch.append(r)
        size += r.size()
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def build_cache(source, tok, dest: Path, scored_dest: Path | None = None) -> tuple[int, int]:
    """Tokenize the documents into ``dest`` (and their scored flags into ``scored_dest``), streaming:
    written to temporary names, then renamed, so a crash, a bad row or a concurrent writer never
    leaves a half-written cache under the final name. Returns (documents, bytes the tokens stand for)."""
    dtype, n_docs, n_bytes = token_dtype(tok.vocab_size), 0, 0
    tmps = [p.with_name(f"{p.name}.tmp{os.getpid()}") for p in (dest, scored_dest) if p is not None]
    try:
        with open(tmps[0], "wb") as f, open(tmps[-1] if scored_dest else os.devnull, "wb") as g:
            ids_buf, scored_buf, pending = [], [], 0
            progress = _Progress(source)
            for batch in _batches(source.records()):
                size = sum(r.size() for r in batch if not isinstance(r.data, np.ndarray))
                progress.update(size)
                encoded = encode_records(batch, tok, dtype)
                n_bytes += size + sum(int(tok.byte_lengths[ids].sum()) if isinstance(r.data, np.ndarray) else 1
                                      for r, (ids, _) in zip(batch, encoded))  # text: its bytes + the separator
                for ids, scored in encoded:
                    ids_buf.append(ids)
                    if scored_dest is not None:
                        scored_buf.append(scored if scored is not None else np.ones(len(ids), np.uint8))
                    pending, n_docs = pending + len(ids), n_docs + 1
                if pending >= FLUSH_TOKENS:
                    _flush(f, g, ids_buf, scored_buf, scored_dest)
                    pending = 0
            _flush(f, g, ids_buf, scored_buf, scored_dest)
        if n_docs == 0:
            raise DataConfigError(f"data.path: {', '.join(p.spec for p in source.parts)!r} holds no document "
                                  "(the corpus is empty)")
    except BaseException:
        for t in tmps:
            t.unlink(missing_ok=True)
        raise
    for t, p in zip(tmps, (dest, scored_dest)):
        os.replace(t, p)
    return n_docs, n_bytes


class _Progress:
    """A line on stdout every PROGRESS_S seconds while a cache is built: MB/s and, when the sources
    are uncompressed text or jsonl, the ETA (from their size: for jsonl an overestimate, its keys and
    escapes are not document bytes)."""

    PROGRESS_S = 10.0

    def __init__(self, source):
        self.t0 = self.last = time.perf_counter()
        self.done = 0
        plain = all(p.fmt == "text" or (p.fmt == "jsonl" and p.files[0].suffix == ".jsonl") for p in source.parts)
        self.total = source.size_bound() if plain else None

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if now - self.last < self.PROGRESS_S:
            return
        self.last, rate = now, self.done / (now - self.t0)
        eta = f", ETA {max(self.total - self.done, 0) / rate:.0f} s" if self.total else ""
        of = f" of {self.total / 1e6:,.0f}" if self.total else ""
        print(f"data: tokenized {self.done / 1e6:,.0f}{of} MB ({rate / 1e6:.1f} MB/s{eta})", flush=True)


def _flush(f, g, ids_buf: list, scored_buf: list, scored: bool) -> None:
    if ids_buf:
        f.write(np.concatenate(ids_buf).tobytes())
        if scored:
            g.write(np.concatenate(scored_buf).tobytes())
    ids_buf.clear()
    scored_buf.clear()
