"""Byte-level BPE (``data.tokenizer=bpe``), trained offline with the ``tokenizers`` library.

Every byte is representable, so there is no unknown token: the ByteLevel pre-tokenizer maps each of
the 256 bytes to a printable stand-in character (GPT-2's table) and all 256 are in the initial
alphabet. ``tokenizers`` takes ``str``, so input that is not valid UTF-8 is split into valid runs,
which are encoded, and invalid bytes, which become their single-byte tokens: any bytes round-trip.

Id 0 is the special token ``"\\x00"``: the NUL byte is the document separator ``DOC_SEP`` = 0, as
with byte tokens, and it stands for one byte. Ids the training left unused (a small corpus can run
out of pairs before ``vocab_size``) stand for no byte.

Long texts are cut into chunks for ``encode_batch`` only between ``X\\nY`` (X, Y printable ASCII):
GPT-2's pre-tokenizer regex ends a pre-token there in any case, so chunking changes no token.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np


class Document(Protocol):
    """What training reads of a document (``trainer.data.corpus.Document`` is one): its bytes."""

    def read(self) -> bytes: ...


SEP = "\x00"  # id 0
# Training reads at most the first 8 MiB of the training split (a deterministic sample): ~2 s on
# 2 cores for vocab 4096, however large the corpus. Encoding the whole corpus takes longer (~1 MB/s
# per core, once: the token cache keeps the result).
SAMPLE_BYTES = 8 << 20
_CHUNK_CHARS = 1 << 16
_CUT = re.compile(r"(?<=[!-~])\n(?=[!-~])")
_INVALID = re.compile("([\udc80-\udcff]+)")  # bytes that are not UTF-8, after surrogateescape


def byte_chars() -> dict[str, int]:
    """GPT-2's printable stand-in character -> byte (the ByteLevel pre-tokenizer's alphabet)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:  # control, space and the like move above U+00FF, in byte order
            chars[chr(256 + n)] = b
            n += 1
    return chars


def pieces(data: bytes) -> Iterator[str | bytes]:
    """``data`` as its valid UTF-8 runs (str) and the invalid bytes between them (bytes), in order."""
    for i, part in enumerate(_INVALID.split(data.decode("utf-8", errors="surrogateescape"))):
        if part:
            yield part if i % 2 == 0 else part.encode("utf-8", errors="surrogateescape")


def chunks(text: str) -> Iterator[str]:
    """``text`` cut into pieces of about _CHUNK_CHARS where the cut changes no pre-token."""
    start = 0
    while len(text) - start > _CHUNK_CHARS:
        cut = _CUT.search(text, start + _CHUNK_CHARS)
        if cut is None:
            break
        yield text[start: cut.end()]
        start = cut.end()
    yield text[start:]


def _stream_prefix(docs: list[Document], limit: int) -> Iterator[bytes]:
    """The first ``limit`` bytes of the token stream (each document followed by its 1-byte separator),
    one document at a time, separators left out."""
    for doc in docs:
        if limit <= 0:
            return
        data = doc.read()
        yield data[:limit]
        limit -= len(data) + 1


def sample_bytes(docs: list[Document], val_fraction: float) -> int:
    """How many leading bytes of the stream training reads: SAMPLE_BYTES, or fewer so as to stop where
    the validation split starts (trainer.data.corpus.split_point: after t - int(t·val_fraction) of the t bytes).
    That grows with t, so when it already exceeds the cap at the file sizes (a lower bound of t: headers
    only add), no file is read to find it."""
    def train_bytes(total: int) -> int:
        return total - int(total * val_fraction)

    bound = docs.size_bound() if hasattr(docs, "size_bound") else sum(f.stat().st_size + 1 for d in docs
                                                                      for f in d.files)
    if train_bytes(bound) >= SAMPLE_BYTES:
        return SAMPLE_BYTES
    return min(SAMPLE_BYTES, train_bytes(sum(len(d.read()) + 1 for d in docs)))


def train(docs: list[Document], val_fraction: float, vocab_size: int, dest: Path) -> None:
    """Train on the stream's first ``sample_bytes`` and save the tokenizer as ``dest`` (JSON).
    Deterministic: the trainer breaks ties between equally frequent pairs by token ids, and the ids
    follow from the data alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SEP], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = _stream_prefix(docs, sample_bytes(docs, val_fraction))
    tk.train_from_iterator((c for t in texts for p in pieces(t) if isinstance(p, str) for c in chunks(p)), trainer)
    tk.save(str(dest))


class BpeTokenizer:
    """A trained tokenizer.json behind ByteTokenizer's interface (encode -> np.ndarray, decode, vocab_size)."""

    name = "bpe"

    def __init__(self, path: Path, vocab_size: int):
        from tokenizers import Tokenizer

        self._tk = Tokenizer.from_file(str(path))
        if self._tk.token_to_id(SEP) != 0 or self._tk.get_vocab_size() > vocab_size:
            raise ValueError(f"{path}: not a byte-level BPE of at most {vocab_size} tokens with {SEP!r} as id 0")
        self.vocab_size = vocab_size  # ids are < vocab_size; the model's vocabulary is this size
        # Which tokenizer made a token cache: name, size and the trained merges themselves.
        self.identity = f"bpe-{vocab_size}-{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
        chars = byte_chars()
        self._bytes = [b""] * vocab_size  # id -> the bytes it stands for
        for tok, i in self._tk.get_vocab().items():
            self._bytes[i] = b"\x00" if i == 0 else bytes(chars[c] for c in tok)
        self.byte_lengths = np.array([len(b) for b in self._bytes], dtype=np.int64)  # [vocab_size]
        self._byte_id = np.array([self._tk.token_to_id(c) for c in sorted(chars, key=chars.get)], np.uint32)

    def encode(self, data: bytes | str) -> np.ndarray:
        return self.encode_many([data])[0]

    def encode_many(self, datas: list[bytes | str]) -> list[np.ndarray]:
        """``encode`` of each, the text chunks of all of them in one batch (the tokenizer's threads
        then have enough to share out: one document at a time left a core idle)."""
        outs, texts, slots = [], [], []  # slots: (document, index) where each text chunk's ids go
        for d, data in enumerate(datas):
            out = []
            for p in pieces(data.encode() if isinstance(data, str) else data):
                if isinstance(p, bytes):
                    out.append(self._byte_id[np.frombuffer(p, np.uint8)])
                    continue
                for c in chunks(p):
                    slots.append((d, len(out)))
                    out.append(None)
                    texts.append(c)
            outs.append(out)
        for (d, i), enc in zip(slots, self._tk.encode_batch_fast(texts, add_special_tokens=False)):
            outs[d][i] = np.array(enc.ids, np.uint32)
        return [np.concatenate(out) if out else np.zeros(0, np.uint32) for out in outs]

    def decode(self, ids) -> str:
        return b"".join(self._bytes[i] for i in np.asarray(ids).tolist()).decode("utf-8", errors="replace")
