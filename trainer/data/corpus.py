"""Token data: corpus -> memory-mapped token cache -> resumable window sampler -> sequence shards.

Corpus. Byte-level tokens by default (vocab 256); ``data.tokenizer=bpe`` is a byte-level BPE of
``data.bpe_vocab_size`` tokens (trainer/data/bpe.py) trained here on the training split. Without
``data.path`` the corpus is the Python standard library's own ``.py`` sources
(``sysconfig.get_paths()["stdlib"]``, site-packages and __pycache__ left out), so training works with
nothing downloaded. Files are taken in sorted path order; every top-level package (or single module)
of the stdlib becomes one long document, each of its files preceded by a header line
``# ==== <relative path> ====``. With ``data.path`` the documents are those of its files, directories,
globs or blend, in any format of ``trainer.data.formats`` (text: every non-hidden file under DIR,
recursively, sorted, is one document); the cache is built by ``trainer.data.cache``.

Document separator: every document is followed by the token ``DOC_SEP`` = 0, the NUL byte, which
text files do not contain. Windows are cut from the concatenated stream and may span a separator;
the model learns that what follows a NUL is unrelated to what precedes it.

Cache. The stream is written once to ``<cache_dir>/<key>.<dtype>.bin`` (uint8 when the vocabulary
fits in a byte, else uint16) and opened as a numpy memmap afterwards, so the second load reads no
source file. Its size and block checksums are recorded beside it (``trainer/data/integrity.py``); a cache
that no longer matches them (truncated, overwritten, zero-filled) is rebuilt, with a warning line.
The key hashes the tokenizer's identity (name, vocab size and, for BPE, the trained tokenizer.json),
the format, row keys and blend weights, and the list of (path, size, mtime) of the sources. A BPE tokenizer is cached too, as
``<cache_dir>/bpe-<key>/tokenizer.json``, keyed on the same listing, the vocab size and the split.

Validation split: the longest suffix of the stream that encodes at most ``int(bytes · val_fraction)``
bytes (with byte tokens: the last ``int(tokens · val_fraction)`` tokens); with record formats (jsonl,
parquet, arrow, megatron) it starts instead at the start of the document holding that point, so it
takes whole documents. The BPE tokenizer trains on bytes before the byte point only.

Sampling windows of the stream and cutting them into sequence shards is ``trainer.data.sampling``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.data import bpe, formats, hf_tokenizer, integrity
from trainer.data.cache import build_cache, token_dtype
from trainer.data.formats import Fields, Record
from trainer.data.stream import DOC_SEP, DataConfigError, ScoredStream

DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[2] / ".cache" / "tokens"
_CACHE_FORMAT = 1  # bump when the on-disk layout or the document convention changes


# --- tokenizer ------------------------------------------------------------------------------------

class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, nothing to train, every text round-trips."""

    name = identity = "bytes"
    vocab_size = 256
    byte_lengths = np.ones(256, dtype=np.int64)  # [vocab_size] bytes each id stands for

    def encode(self, data: bytes | str) -> np.ndarray:
        return np.frombuffer(data.encode() if isinstance(data, str) else data, dtype=np.uint8)

    def encode_many(self, datas: list[bytes | str]) -> list[np.ndarray]:
        return [self.encode(d) for d in datas]

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def tokenizer_vocab_size(name: str, bpe_vocab_size: int = 4096) -> int:
    """The vocabulary a tokenizer setting gives, known without training (config validation)."""
    if name == "bytes":
        return ByteTokenizer.vocab_size
    if hf_tokenizer.is_hf(name):
        try:
            return hf_tokenizer.load(hf_tokenizer.tokenizer_dir(name)).vocab_size
        except hf_tokenizer.HfTokenizerError as e:
            raise DataConfigError(str(e)) from None
    if name != "bpe":
        raise DataConfigError(f"data.tokenizer: unknown tokenizer {name!r}; allowed values: bytes, bpe, hf:DIR")
    if importlib.util.find_spec("tokenizers") is None:
        raise DataConfigError("data.tokenizer: 'bpe' needs the `tokenizers` package (a dependency in "
                              "pyproject.toml: `make setup`); allowed values without it: bytes")
    if not 257 <= bpe_vocab_size <= 65536:
        raise DataConfigError(f"data.bpe_vocab_size: must be in [257, 65536] (256 bytes + the document "
                              f"separator at least), got {bpe_vocab_size}")
    return bpe_vocab_size


def get_tokenizer(name: str = "bytes", docs: Source | list[Document] | None = None, cache_dir: str | Path | None = None,
                  val_fraction: float = 0.01, bpe_vocab_size: int = 4096) -> ByteTokenizer | bpe.BpeTokenizer:
    """The tokenizer of ``data.tokenizer``. BPE is trained on the training split of ``docs`` (default:
    the stdlib corpus) unless the cache under ``cache_dir`` already holds it."""
    vocab = tokenizer_vocab_size(name, bpe_vocab_size)
    if name == "bytes":
        return ByteTokenizer()
    if hf_tokenizer.is_hf(name):
        return hf_tokenizer.load(hf_tokenizer.tokenizer_dir(name))
    docs = as_source(documents(None) if docs is None else docs)
    tokenizers_version = importlib.metadata.version("tokenizers")
    key = cache_key(docs, f"bpe-{vocab}-{val_fraction!r}-{bpe.SAMPLE_BYTES}-tokenizers{tokenizers_version}")
    dest = _cache_dir(cache_dir) / f"bpe-{key}" / "tokenizer.json"
    if not dest.exists():
        dest.parent.mkdir(exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
        bpe.train(docs, val_fraction, vocab, tmp)
        os.replace(tmp, dest)  # never a half-written tokenizer under the final name
    return bpe.BpeTokenizer(dest, vocab)


# --- sources: which files, grouped into which documents -------------------------------------------

@dataclass
class Document:
    files: list[Path]
    root: Path
    headers: bool  # precede each file by a header line naming it (multi-file documents)

    def read(self) -> bytes:
        parts = []
        for f in self.files:
            if self.headers:
                parts.append(f"# ==== {f.relative_to(self.root).as_posix()} ====\n".encode())
            data = f.read_bytes()
            parts.append(data if data.endswith(b"\n") or not self.headers else data + b"\n")
        return b"".join(parts)


def _walk(root: Path, keep) -> list[Path]:
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x not in ("site-packages", "dist-packages",
                                                                          "__pycache__")]
        out += [Path(d) / f for f in files if not f.startswith(".") and keep(f)]
    return sorted(out)


def stdlib_documents() -> list[Document]:
    """The default corpus: stdlib .py files, one document per top-level package or module."""
    root = Path(sysconfig.get_paths()["stdlib"])
    groups: dict[str, list[Path]] = {}
    for f in _walk(root, lambda name: name.endswith(".py")):
        groups.setdefault(f.relative_to(root).parts[0], []).append(f)
    return [Document(groups[k], root, headers=True) for k in sorted(groups)]


def directory_documents(path: str | Path) -> list[Document]:
    """``data.path``: every non-hidden file under the directory is one document."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataConfigError(f"data.path: {str(path)!r} is not an existing directory; set data.path to a "
                              "directory of text files, or leave it empty for the built-in stdlib corpus")
    files = [f for f in _walk(root, lambda name: True) if f.is_file() and f.stat().st_size > 0]
    if not files:
        raise DataConfigError(f"data.path: no non-empty files under {str(path)!r}; it must hold text files")
    return [Document([f], root, headers=False) for f in files]


def documents(path: str | Path | None) -> list[Document]:
    """The corpus of ``data.path``: the stdlib when it is null or empty."""
    return stdlib_documents() if path in (None, "") else directory_documents(path)


# --- the memory-mapped cache ----------------------------------------------------------------------

class Source:
    """What a corpus is read from: the stdlib documents (``data.path`` empty), a list of Documents, or
    the parts of ``data.path`` (trainer.data.formats), with the fields its rows give."""

    def __init__(self, path=None, fmt: str = "auto", fields: Fields | None = None,
                 docs: list[Document] | None = None):
        self.fields = fields or Fields()
        self.parts: list[formats.Part] = []
        self.docs = docs
        if docs is None and path in (None, "", []):
            self.docs = stdlib_documents()
        elif docs is None:
            self.parts = formats.resolve(path, fmt)

    @property
    def whole_documents(self) -> bool:
        """Split train / validation at a document boundary (record formats). Text keeps its byte rule."""
        return any(p.fmt != "text" for p in self.parts)

    @property
    def token_ids(self) -> bool:
        """Some part holds token ids already (megatron): the tokenizer must be the one that wrote them."""
        return any(p.fmt == "megatron" for p in self.parts)

    def check(self, tokenizer: str = "bytes") -> None:
        """What is known without reading the documents (trainer.data.formats.Part.check), and that
        token ids come with the tokenizer that wrote them."""
        for p in self.parts:
            p.check(self.fields)
        if self.token_ids and tokenizer == "bpe":
            raise DataConfigError("data.tokenizer: a megatron corpus holds token ids already; bpe would be trained "
                                  "here and not match them; use the tokenizer that wrote it (bytes)")

    def records(self) -> Iterator[Record]:
        if self.docs is not None:
            return (Record(d.read()) for d in self.docs)
        return formats.blend(self.parts, self.fields)

    def __iter__(self):  # what bpe.train reads: objects with read() -> the document's bytes
        for r in self.records():
            yield _Text((r.prompt or b"") + r.data)

    def size_bound(self) -> int:
        """Bytes of the sources (+1 a document for legacy lists): with compression, not a bound."""
        if self.docs is not None:
            return sum(f.stat().st_size + 1 for d in self.docs for f in d.files)
        return sum(f.stat().st_size for p in self.parts for f in p.files)

    def listing(self) -> list:
        if self.docs is not None:
            return [[d.headers for d in self.docs],
                    [[[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in d.files] for d in self.docs]]
        return [list(vars(self.fields).values()),
                [[p.fmt, p.weight, [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in p.files]]
                 for p in self.parts]]


@dataclass
class _Text:
    data: bytes

    def read(self) -> bytes:
        return self.data


def as_source(docs: Source | list[Document] | None) -> Source:
    return docs if isinstance(docs, Source) else Source(docs=docs)


def cache_key(docs: Source | list[Document], tokenizer: str) -> str:
    blob = json.dumps([_CACHE_FORMAT, tokenizer, as_source(docs).listing()])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _cache_dir(cache_dir: str | Path | None) -> Path:
    path = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Corpus:
    train: np.ndarray | ScoredStream  # memmap views: slicing reads only the pages touched
    val: np.ndarray | ScoredStream  # ScoredStream: prompt/completion data, only completions scored
    vocab_size: int
    cache_path: Path
    cache_hit: bool  # True when the cache existed: no source file was read
    n_documents: int
    tokenizer: ByteTokenizer | bpe.BpeTokenizer


def fields_of(data) -> Fields:
    """The row fields of a config's ``data`` section."""
    return Fields(data.text_key, data.prompt_key, data.completion_key, data.loss_on == "completion")


def corpus_of(data) -> Corpus:
    """``load_corpus`` with every setting of a config's ``data`` section."""
    return load_corpus(data.path, data.tokenizer, data.cache_dir, data.val_fraction, data.bpe_vocab_size,
                       fmt=data.format, fields=fields_of(data))


def _cached(dest: Path) -> bool:
    if not dest.exists():
        return False
    if (why := integrity.block_sums_problem(dest)) is not None:
        print(f"warning: token cache {dest}: {why}; rebuilding it", file=sys.stderr, flush=True)
        return False
    return True


def load_corpus(path=None, tokenizer: str = "bytes", cache_dir: str | Path | None = None,
                val_fraction: float = 0.01, bpe_vocab_size: int = 4096, fmt: str = "auto",
                fields: Fields | None = None) -> Corpus:
    """Tokens of ``data.path`` (or the stdlib corpus), cached; the last ``val_fraction`` of the bytes is
    validation (record formats: whole documents). A BPE tokenizer is trained here first when not
    cached, so the launcher's ordering (rank 0 loads, then the others) covers it too."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataConfigError(f"data.val_fraction: must be in [0, 1), got {val_fraction}")
    source = Source(path, fmt, fields)
    source.check(tokenizer)
    tok = get_tokenizer(tokenizer, source, cache_dir, val_fraction, bpe_vocab_size)
    dtype = token_dtype(tok.vocab_size)
    key = cache_key(source, tok.identity)
    dest = _cache_dir(cache_dir) / f"{key}.{dtype.name}.bin"
    scored_dest = dest.with_name(f"{key}.scored.bin") if source.fields.completion else None
    meta = dest.with_name(f"{key}.json")
    hit = all(_cached(p) for p in (dest, scored_dest) if p is not None) and (source.docs is not None or meta.exists())
    facts = json.loads(meta.read_text()) if hit and meta.exists() else {}
    if not hit:
        n_docs, n_bytes = build_cache(source, tok, dest, scored_dest)
        for p in (dest, scored_dest):
            if p is not None:
                integrity.write_block_sums(p)
        facts = {"documents": n_docs, "bytes": n_bytes}
        tmp = meta.with_name(f"{meta.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(facts))
        os.replace(tmp, meta)
    n_docs = len(source.docs) if source.docs is not None else facts["documents"]
    tokens = np.memmap(dest, dtype=dtype, mode="r")
    n_train = split_point(tokens, tok.byte_lengths, val_fraction, facts.get("bytes"))
    if source.whole_documents:
        n_train = document_start(tokens, n_train)
    if scored_dest is None:
        train, val = tokens[:n_train], tokens[n_train:]
    else:
        scored = np.memmap(scored_dest, dtype=np.uint8, mode="r")
        train, val = ScoredStream(tokens[:n_train], scored[:n_train]), ScoredStream(tokens[n_train:], scored[n_train:])
    return Corpus(train, val, tok.vocab_size, dest, hit, n_docs, tok)


def document_start(tokens: np.ndarray, i: int, chunk: int = 1 << 20) -> int:
    """The start of the document holding token ``i`` (i itself when it starts one): one past the last
    DOC_SEP before it, searched backwards a chunk at a time (the stream is a memmap)."""
    hi = i
    while hi > 0:
        lo = max(0, hi - chunk)
        seps = np.flatnonzero(np.asarray(tokens[lo:hi]) == DOC_SEP)
        if len(seps):
            return lo + int(seps[-1]) + 1
        hi = lo
    return 0


def split_point(tokens: np.ndarray, byte_lengths: np.ndarray, val_fraction: float,
                total: int | None = None) -> int:
    """Index of the first validation token: the validation split is the longest suffix of ``tokens``
    that encodes at most int(total bytes · val_fraction) bytes (``total``: known from the build,
    so the stream need not be read)."""
    if (byte_lengths == 1).all():
        total = len(tokens)
    elif total is None:  # in slices: the stream is a memmap, possibly larger than memory
        total = sum(int(byte_lengths[tokens[i: i + (1 << 22)]].sum()) for i in range(0, len(tokens), 1 << 22))
    n_val_bytes = int(total * val_fraction)
    tail = np.asarray(tokens[len(tokens) - min(len(tokens), n_val_bytes):])  # every token is >= 1 byte
    spans = np.cumsum(byte_lengths[tail[::-1]])  # bytes of the last 1, 2, ... tokens
    return len(tokens) - int(np.searchsorted(spans, n_val_bytes, side="right"))
