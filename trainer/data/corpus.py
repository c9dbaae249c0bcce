"""Token data: corpus -> memory-mapped token cache -> resumable window sampler -> sequence shards.

Corpus. Byte-level tokens by default (vocab 256); ``data.tokenizer=bpe`` is a byte-level BPE of
``data.bpe_vocab_size`` tokens (trainer/bpe.py) trained here on the training split. Without
``data.path`` the corpus is the Python standard library's own ``.py`` sources
(``sysconfig.get_paths()["stdlib"]``, site-packages and __pycache__ left out), so training works with
nothing downloaded. Files are taken in sorted path order; every top-level package (or single module)
of the stdlib becomes one long document, each of its files preceded by a header line
``# ==== <relative path> ====``. With ``data.path=DIR`` every non-hidden file under DIR (recursively,
sorted) is one document.

Document separator: every document is followed by the token ``DOC_SEP`` = 0, the NUL byte, which
text files do not contain. Windows are cut from the concatenated stream and may span a separator;
the model learns that what follows a NUL is unrelated to what precedes it.

Cache. The stream is written once to ``<cache_dir>/<key>.<dtype>.bin`` (uint8 when the vocabulary
fits in a byte, else uint16) and opened as a numpy memmap afterwards, so the second load reads no
source file. Its size and block checksums are recorded beside it (``trainer/integrity.py``); a cache
that no longer matches them (truncated, overwritten, zero-filled) is rebuilt, with a warning line. The key hashes the tokenizer's identity (name, vocab size and, for BPE, the trained
tokenizer.json) and the list of (path, size, mtime) of the sources. A BPE tokenizer is cached too, as
``<cache_dir>/bpe-<key>/tokenizer.json``, keyed on the same listing, the vocab size and the split.

Validation split: the longest suffix of the stream that encodes at most ``int(bytes · val_fraction)``
bytes (with byte tokens: the last ``int(tokens · val_fraction)`` tokens). The BPE tokenizer trains on
bytes before that point only, so it has never seen the validation text.

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trainer.data import bpe, hf_tokenizer
from trainer.state import integrity

DOC_SEP = 0
IGNORE_INDEX = -100  # targets with this value carry no loss (F.cross_entropy's ignore_index)
DEFAULT_CACHE_DIR = Path(__file__).resolve().parents[2] / ".cache" / "tokens"
_CACHE_FORMAT = 1  # bump when the on-disk layout or the document convention changes


class DataConfigError(ValueError):
    """A bad data setting; the message names the setting and the allowed values."""


# --- tokenizer ------------------------------------------------------------------------------------

class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, nothing to train, every text round-trips."""

    name = identity = "bytes"
    vocab_size = 256
    byte_lengths = np.ones(256, dtype=np.int64)  # [vocab_size] bytes each id stands for

    def encode(self, data: bytes | str) -> np.ndarray:
        return np.frombuffer(data.encode() if isinstance(data, str) else data, dtype=np.uint8)

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


def get_tokenizer(name: str = "bytes", docs: list[Document] | None = None, cache_dir: str | Path | None = None,
                  val_fraction: float = 0.01, bpe_vocab_size: int = 4096) -> ByteTokenizer | bpe.BpeTokenizer:
    """The tokenizer of ``data.tokenizer``. BPE is trained on the training split of ``docs`` (default:
    the stdlib corpus) unless the cache under ``cache_dir`` already holds it."""
    vocab = tokenizer_vocab_size(name, bpe_vocab_size)
    if name == "bytes":
        return ByteTokenizer()
    if hf_tokenizer.is_hf(name):
        return hf_tokenizer.load(hf_tokenizer.tokenizer_dir(name))
    docs = documents(None) if docs is None else docs
    tokenizers_version = importlib.metadata.version("tokenizers")
    key = cache_key(docs, f"bpe-{vocab}-{val_fraction!r}-{bpe.SAMPLE_BYTES}-tokenizers{tokenizers_version}")
    dest = _cache_dir(cache_dir) / f"bpe-{key}" / "tokenizer.json"
    if not dest.exists():
        dest.parent.mkdir(exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
        bpe.train(docs, val_fraction, vocab, tmp)
        os.replace(tmp, dest)  # never a half-written tokenizer under the final name
    return bpe.BpeTokenizer(dest, vocab)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32)


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

def cache_key(docs: list[Document], tokenizer: str) -> str:
    listing = [[[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in d.files] for d in docs]
    blob = json.dumps([_CACHE_FORMAT, tokenizer, [d.headers for d in docs], listing])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _cache_dir(cache_dir: str | Path | None) -> Path:
    path = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_cache(docs: list[Document], tok: ByteTokenizer | bpe.BpeTokenizer, dest: Path) -> int:
    """Tokenize the documents into ``dest`` (written to a temporary name, then renamed, so a crash
    or a concurrent writer never leaves a half-written cache under the final name). Returns the
    token count."""
    dtype, n = token_dtype(tok.vocab_size), 0
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        for doc in docs:  # one document at a time: memory stays O(document)
            ids = np.append(tok.encode(doc.read()).astype(dtype), dtype.type(getattr(tok, "doc_sep", DOC_SEP)))
            f.write(ids.tobytes())
            n += len(ids)
    os.replace(tmp, dest)
    return n


@dataclass
class Corpus:
    train: np.ndarray  # memmap views: slicing reads only the pages touched
    val: np.ndarray
    vocab_size: int
    cache_path: Path
    cache_hit: bool  # True when the cache existed: no source file was read
    n_documents: int
    tokenizer: ByteTokenizer | bpe.BpeTokenizer


def load_corpus(path: str | Path | None = None, tokenizer: str = "bytes", cache_dir: str | Path | None = None,
                val_fraction: float = 0.01, bpe_vocab_size: int = 4096) -> Corpus:
    """Tokens of ``data.path`` (or the stdlib corpus), cached; the last ``val_fraction`` of the bytes is
    validation. A BPE tokenizer is trained here first when not cached, so the launcher's ordering
    (rank 0 loads, then the others) covers it too."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataConfigError(f"data.val_fraction: must be in [0, 1), got {val_fraction}")
    docs = documents(path)
    tok = get_tokenizer(tokenizer, docs, cache_dir, val_fraction, bpe_vocab_size)
    dtype = token_dtype(tok.vocab_size)
    dest = _cache_dir(cache_dir) / f"{cache_key(docs, tok.identity)}.{dtype.name}.bin"
    hit = dest.exists()
    if hit and (why := integrity.block_sums_problem(dest)) is not None:
        print(f"warning: token cache {dest}: {why}; rebuilding it", file=sys.stderr, flush=True)
        hit = False
    if not hit:
        build_cache(docs, tok, dest)
        integrity.write_block_sums(dest)
    tokens = np.memmap(dest, dtype=dtype, mode="r")
    n_train = split_point(tokens, tok.byte_lengths, val_fraction)
    return Corpus(tokens[:n_train], tokens[n_train:], tok.vocab_size, dest, hit, len(docs), tok)


def split_point(tokens: np.ndarray, byte_lengths: np.ndarray, val_fraction: float) -> int:
    """Index of the first validation token: the validation split is the longest suffix of ``tokens``
    that encodes at most int(total bytes · val_fraction) bytes."""
    if (byte_lengths == 1).all():
        total = len(tokens)
    else:  # in slices: the stream is a memmap, possibly larger than memory
        total = sum(int(byte_lengths[tokens[i: i + (1 << 24)]].sum()) for i in range(0, len(tokens), 1 << 24))
    n_val_bytes = int(total * val_fraction)
    tail = np.asarray(tokens[len(tokens) - min(len(tokens), n_val_bytes):])  # every token is >= 1 byte
    spans = np.cumsum(byte_lengths[tail[::-1]])  # bytes of the last 1, 2, ... tokens
    return len(tokens) - int(np.searchsorted(spans, n_val_bytes, side="right"))


# --- synthetic long-range tasks -------------------------------------------------------------------

@dataclass
class TaskBatch:
    inputs: torch.Tensor  # [B, seq_len]
    targets: torch.Tensor  # [B, seq_len], IGNORE_INDEX except the answer tokens
    info: dict = field(default_factory=dict)


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is "


def passkey_batch(seq_len: int, depth: float, rng: np.random.Generator | int, batch_size: int = 1) -> TaskBatch:
    """Passkey retrieval (Mohtashami & Jaggi 2023), byte tokens: a random 5-digit key in a needle
    sentence starting at relative ``depth`` of the filler, the question at the end, the key as the
    last 5 targets. ``info``: keys, needle_pos (start of the needle), key_pos (first key digit)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth: must be in [0, 1], got {depth}")
    rng = np.random.default_rng(rng)
    n_fill = seq_len + 1 - len(NEEDLE.format(key="00000")) - len(QUESTION) - 5
    if n_fill < 0:
        raise DataConfigError(f"seq_len: passkey needs at least {seq_len - n_fill}, got {seq_len}")
    hay = (FILLER * (n_fill // len(FILLER) + 1))[:n_fill]
    hay = hay[: hay.rfind(". ") + 2 if ". " in hay else 0].ljust(n_fill)  # whole sentences, space-padded
    # The needle goes at the sentence boundary nearest to the requested depth.
    starts = [0, n_fill] + [i + 2 for i in range(len(hay) - 1) if hay[i: i + 2] == ". "]
    pos = min(starts, key=lambda i: abs(i - depth * n_fill))
    keys = [f"{int(k):05d}" for k in rng.integers(10000, 100000, size=batch_size)]
    ids = np.stack([ByteTokenizer().encode(hay[:pos] + NEEDLE.format(key=k) + hay[pos:] + QUESTION + k)
                    for k in keys]).astype(np.int64)  # (B, seq_len + 1)
    targets = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
    targets[:, -5:] = torch.from_numpy(ids[:, -5:])
    info = {"keys": keys, "needle_pos": pos, "key_pos": pos + NEEDLE.index("{key}")}
    return TaskBatch(torch.from_numpy(ids[:, :-1]), targets, info)


def associative_recall_batch(seq_len: int, n_pairs: int, vocab: int, rng: np.random.Generator | int,
                             batch_size: int = 1) -> TaskBatch:
    """Associative recall: ``k1 v1 … kn vn`` at the start (keys distinct, from [1, vocab/2); values
    from [vocab/2, vocab)), padding 0 up to the last token, which repeats one key; the target there
    is its value. ``info["query_index"]`` says which pair is asked."""
    half = vocab // 2
    if not 1 <= n_pairs <= half - 1:
        raise DataConfigError(f"n_pairs: must be in [1, vocab/2 - 1 = {half - 1}], got {n_pairs}")
    if 2 * n_pairs + 1 > seq_len:
        raise DataConfigError(f"seq_len: must be >= 2·n_pairs + 1 = {2 * n_pairs + 1}, got {seq_len}")
    rng = np.random.default_rng(rng)
    inputs = np.zeros((batch_size, seq_len), dtype=np.int64)
    targets = np.full((batch_size, seq_len), IGNORE_INDEX, dtype=np.int64)
    which = rng.integers(n_pairs, size=batch_size)
    for b in range(batch_size):
        keys = rng.choice(np.arange(1, half), size=n_pairs, replace=False)
        values = rng.integers(half, vocab, size=n_pairs)
        inputs[b, 0: 2 * n_pairs: 2], inputs[b, 1: 2 * n_pairs: 2] = keys, values
        inputs[b, -1], targets[b, -1] = keys[which[b]], values[which[b]]
    return TaskBatch(torch.from_numpy(inputs), torch.from_numpy(targets), {"query_index": which.tolist()})


def task_accuracy(logits: torch.Tensor, batch: TaskBatch) -> float:
    """Exact match per example: every answer target equals the argmax. ``logits`` [B, T', V] may lack
    leading rows (learned global slots): rows are aligned from the end."""
    targets = batch.targets[:, -logits.shape[1]:]
    answer = targets != IGNORE_INDEX
    hit = (logits.argmax(-1) == targets) | ~answer
    return float(hit.all(dim=1).float().mean())
