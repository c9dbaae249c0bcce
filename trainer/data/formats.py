"""Corpus formats: which documents ``data.path`` names, read one at a time (generators, so memory stays
O(document) whatever the corpus size). Tokenization and the token cache are ``trainer.data.corpus``.

``data.path`` is a file, a directory, a glob, a list of them, or a weighted blend: ``[0.7, A, 0.3, B]``
(Megatron's ``--data-path`` convention) or a mapping ``{A: 0.7, B: 0.3}``. Each part's format is
``data.format`` or, with ``auto``, found from the path:

- ``megatron``: ``X.bin`` + ``X.idx`` (the path is the prefix X, or either file): megatron-core's
  ``IndexedDataset``; a document is the sequences of one entry of its document index, token ids already.
- ``arrow``: a directory holding ``state.json`` and ``*.arrow`` (``datasets.Dataset.save_to_disk``),
  read with pyarrow (``datasets`` is not needed).
- ``jsonl``: ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``; one JSON object per line (blank lines skipped).
- ``parquet``: ``.parquet``.
- ``text``: any other file: the whole file is one document (``data.path=DIR``: every non-hidden file).
A directory whose files all have one record suffix is read in that format, in sorted path order.

Rows (jsonl, parquet, arrow) give ``data.text_key``; with ``data.loss_on=completion`` they give
``data.prompt_key`` and ``data.completion_key`` instead, and the completion is what is scored.
Every problem is a ``DataConfigError`` of one line naming the file and the line, row or column.

Blend: the next document is taken from the part that has given the fewest bytes (token ids for
megatron) relative to its weight, so each part's share of the stream is its weight up to one
document; the stream ends when a part runs out, so no document repeats and the cache is never
larger than its sources.
"""

from __future__ import annotations

import glob as globlib
import gzip
import io
import json
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.data.stream import DataConfigError

FORMATS = ("auto", "text", "jsonl", "parquet", "arrow", "megatron")
RECORD_SUFFIXES = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".jsonl.zst": "jsonl", ".parquet": "parquet"}
LOSS_ON = ("all", "completion")
_BATCH_ROWS = 1024
_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")  # as data.path=DIR always skipped them  # parquet / arrow rows decoded at a time


@dataclass(frozen=True)
class Fields:
    """Which row fields make a document (``data.text_key``, ...)."""

    text_key: str = "text"
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    completion: bool = False  # data.loss_on=completion: rows are (prompt, completion), the completion scored

    def keys(self) -> tuple[str, ...]:
        return (self.prompt_key, self.completion_key) if self.completion else (self.text_key,)

    def hint(self) -> str:
        return "data.prompt_key / data.completion_key" if self.completion else "data.text_key"


@dataclass
class Record:
    """One document: UTF-8 bytes, or token ids (megatron). ``prompt``: the unscored prefix of a
    prompt/completion row (``data`` is then the completion)."""

    data: bytes | np.ndarray
    prompt: bytes | None = None
    where: str = ""  # megatron: the file and document, for messages

    def size(self) -> int:
        return len(self.data) + (len(self.prompt) if self.prompt is not None else 0)


def _suffix_format(path: Path) -> str | None:
    name = path.name.lower()
    return next((f for s, f in RECORD_SUFFIXES.items() if name.endswith(s)), None)


def _walk(root: Path) -> list[Path]:
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x not in _SKIP_DIRS]
        out += [Path(d) / f for f in files if not f.startswith(".")]
    return sorted(f for f in out if f.is_file())


def _is_arrow_dir(p: Path) -> bool:
    return p.is_dir() and (p / "state.json").is_file()


def _megatron_prefix(spec: str) -> str | None:
    """The prefix X when ``spec`` names X.bin, X.idx, or X with either beside it."""
    for suffix in (".bin", ".idx"):
        if spec.endswith(suffix):
            return spec[: -len(suffix)]
    return spec if (os.path.exists(spec + ".bin") or os.path.exists(spec + ".idx")) and not os.path.exists(spec) \
        else None


# --- parts: one path of data.path, its format and files ---------------------------------------------

@dataclass(frozen=True)
class Part:
    spec: str  # as the user wrote it
    fmt: str  # resolved: text | jsonl | parquet | arrow | megatron
    files: tuple[Path, ...]  # what is read (the content key lists their sizes and mtimes)
    weight: float | None = None

    def records(self, fields: Fields) -> Iterator[Record]:
        if self.fmt == "megatron":
            yield from _megatron_records(self.files[0].with_suffix(""))
        elif self.fmt == "arrow":
            yield from _table_records(self.files, fields, _arrow_batches)
        else:
            read = {"text": _text_records, "jsonl": _jsonl_records, "parquet": _parquet_records}[self.fmt]
            for f in self.files:
                yield from read(f, fields)

    def check(self, fields: Fields) -> None:
        """What is cheap to know without reading the data: index sizes, columns, non-empty files."""
        if self.fmt == "megatron":
            _open_megatron(self.files[0].with_suffix(""))
        elif self.fmt in ("parquet", "arrow"):
            for f in self.files:
                _check_columns(f, _schema(f, self.fmt).names, fields)
        elif all(f.stat().st_size == 0 for f in self.files):
            raise _empty(self.spec)


def resolve_part(spec: str, fmt: str = "auto", weight: float | None = None) -> Part:
    """The Part of one path (file, directory, glob, megatron prefix); DataConfigError when it is not one."""
    if fmt not in FORMATS:
        raise DataConfigError(f"data.format: must be one of {', '.join(FORMATS)}; got {fmt!r}")
    path = os.path.expanduser(spec)
    if fmt == "megatron" or (fmt == "auto" and _megatron_prefix(path) is not None):
        prefix = _megatron_prefix(path) or path
        bin_, idx = Path(prefix + ".bin"), Path(prefix + ".idx")
        for have, need in ((bin_, idx), (idx, bin_)):
            if not need.is_file():
                raise DataConfigError(f"data.path: megatron file {str(have)!r} has no {need.suffix[1:]} file "
                                      f"{str(need)!r} beside it; a megatron corpus is a .bin/.idx pair")
        return Part(spec, "megatron", (bin_, idx), weight)
    if any(c in path for c in "*?["):
        files = tuple(Path(f) for f in sorted(globlib.glob(path, recursive=True)) if os.path.isfile(f))
        if not files:
            raise DataConfigError(f"data.path: the glob {spec!r} matches no file")
        return Part(spec, _files_format(spec, files, fmt), files, weight)
    p = Path(path)
    if not p.exists():
        raise DataConfigError(f"data.path: {spec!r} does not exist; set it to a file, a directory, a glob or a "
                              "blend, or leave it empty for the built-in stdlib corpus")
    if fmt == "arrow" or (fmt == "auto" and _is_arrow_dir(p)):
        return Part(spec, "arrow", _arrow_files(p, spec), weight)
    files = tuple(_walk(p)) if p.is_dir() else (p,)
    if not files:
        raise _empty(spec)
    return Part(spec, _files_format(spec, files, fmt), files, weight)


def _empty(spec: str) -> DataConfigError:
    return DataConfigError(f"data.path: {spec!r} holds no non-empty (non-hidden) file; it must hold documents, or "
                           "be null for the built-in stdlib corpus")


def _files_format(spec: str, files: tuple[Path, ...], fmt: str) -> str:
    if fmt != "auto":
        return fmt
    found = {_suffix_format(f) for f in files}
    if len(found) == 1:
        return found.pop() or "text"
    if None in found:  # some files have no record suffix: plain text, as data.path=DIR always was
        return "text"
    raise DataConfigError(f"data.path: {spec!r} mixes {' and '.join(sorted(found))} files; set data.format or "
                          "name each in a list")


def _arrow_files(p: Path, spec: str) -> tuple[Path, ...]:
    if not _is_arrow_dir(p):
        raise DataConfigError(f"data.path: {spec!r} is not a saved dataset (data.format=arrow needs the "
                              "directory Dataset.save_to_disk writes: state.json and *.arrow)")
    try:
        state = json.loads((p / "state.json").read_text())
        files = tuple(p / f["filename"] for f in state["_data_files"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataConfigError(f"data.path: {str(p / 'state.json')!r} is not a datasets state file ({e})") from None
    for f in files:
        if not f.is_file():
            raise DataConfigError(f"data.path: {str(p / 'state.json')!r} lists {f.name!r}, which is missing")
    return files


# --- data.path: parts and blends ----------------------------------------------------------------------

def parse_path(path) -> list[tuple[str, float | None]]:
    """(path, weight or None) of each part of ``data.path``: a string, a list of strings, a Megatron
    blend list ``[w1, p1, w2, p2, ...]`` or a mapping {path: weight}."""
    if isinstance(path, (str, os.PathLike)):
        return [(os.fspath(path), None)]
    if isinstance(path, dict):
        pairs = [(p, w) for p, w in path.items()]
    elif isinstance(path, (list, tuple)) and path and all(isinstance(p, str) for p in path):
        return [(p, None) for p in path]
    elif isinstance(path, (list, tuple)) and len(path) % 2 == 0 and path:
        pairs = [(path[i + 1], path[i]) for i in range(0, len(path), 2)]
    else:
        raise DataConfigError(f"data.path: must be a path, a list of paths, a blend [w1, path1, w2, path2, ...] "
                              f"or a mapping {{path: weight}}; got {path!r}")
    for p, w in pairs:
        if not isinstance(p, str) or isinstance(w, bool) or not isinstance(w, (int, float)):
            raise DataConfigError(f"data.path: a blend pairs a number with a path ([0.7, A, 0.3, B] or {{A: 0.7}}); "
                                  f"got {w!r} for {p!r}")
        if not (math.isfinite(w) and w > 0):
            raise DataConfigError(f"data.path: the blend weight of {p!r} must be a positive number, got {w!r}")
    return [(p, float(w)) for p, w in pairs]


def resolve(path, fmt: str = "auto") -> list[Part]:
    return [resolve_part(p, fmt, w) for p, w in parse_path(path)]


def blend(parts: list[Part], fields: Fields) -> Iterator[Record]:
    """The documents of the parts in order, or interleaved by weight (module docstring)."""
    if all(p.weight is None for p in parts):
        for p in parts:
            yield from p.records(fields)
        return
    streams = [p.records(fields) for p in parts]
    given = [0] * len(parts)
    while True:
        i = min(range(len(parts)), key=lambda j: (given[j] / parts[j].weight, j))
        record = next(streams[i], None)
        if record is None:
            return
        given[i] += record.size()
        yield record


# --- readers --------------------------------------------------------------------------------------------

def _text_records(f: Path, fields: Fields) -> Iterator[Record]:
    if fields.completion:
        raise DataConfigError(f"data.loss_on: completion needs rows with {fields.prompt_key!r} and "
                              f"{fields.completion_key!r} (jsonl, parquet, arrow); {str(f)!r} is a text file")
    data = f.read_bytes()
    if data:  # an empty file is no document; its bytes as they are (data.path=DIR always took any bytes)
        yield Record(data)


def _open_lines(f: Path):
    name = f.name.lower()
    if name.endswith(".gz"):
        return gzip.open(f, "rb")
    if name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(f, "rb"), closefd=True))
    return open(f, "rb")


def _field(value, where: str, key: str) -> bytes:
    if not isinstance(value, str):
        raise DataConfigError(f"data.path: {where}: {key!r} holds {type(value).__name__ if value is not None else 'null'}"
                              ", not a string")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate from a \\ud800 escape
        raise DataConfigError(f"data.path: {where}: {key!r} is not valid Unicode (a lone surrogate at character "
                              f"{e.start})") from None


def _row_record(row: dict, where: str, fields: Fields) -> Record:
    for key in fields.keys():
        if key not in row:
            found = ", ".join(map(repr, list(row)[:20])) or "none"
            raise DataConfigError(f"data.path: {where}: no key {key!r} (keys found: {found}); set {fields.hint()}"
                                  + (" or data.loss_on=completion" if not fields.completion and
                                     {"prompt", "completion"} <= set(row) else ""))
    if fields.completion:
        return Record(_field(row[fields.completion_key], where, fields.completion_key),
                      _field(row[fields.prompt_key], where, fields.prompt_key))
    return Record(_field(row[fields.text_key], where, fields.text_key))


def _jsonl_records(f: Path, fields: Fields) -> Iterator[Record]:
    offset = 0
    with _open_lines(f) as lines:
        for n, raw in enumerate(lines, start=1):
            where, base = f"{f}:{n}", offset
            offset += len(raw)
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataConfigError(f"data.path: {where}: invalid UTF-8 at byte {base + e.start} of the "
                                      f"{'decompressed ' if _suffix_format(f) and f.suffix != '.jsonl' else ''}"
                                      "file; jsonl must be UTF-8") from None
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataConfigError(f"data.path: {where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataConfigError(f"data.path: {where}: a JSON object per line is needed, got "
                                      f"{type(row).__name__}")
            yield _row_record(row, where, fields)


def _schema(f: Path, fmt: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            return pq.read_schema(f)
        with pa.memory_map(str(f)) as src:
            return pa.ipc.open_stream(src).schema
    except (pa.ArrowException, OSError) as e:
        raise DataConfigError(f"data.path: {str(f)!r} is not a readable {fmt} file ({str(e).splitlines()[0]})") \
            from None


def _check_columns(f: Path, names: list[str], fields: Fields) -> None:
    for key in fields.keys():
        if key not in names:
            raise DataConfigError(f"data.path: {f}: no column {key!r} (columns: {', '.join(names) or 'none'}); "
                                  f"set {fields.hint()}")


def _parquet_batches(f: Path, columns: list[str]):
    import pyarrow.parquet as pq

    yield from pq.ParquetFile(f).iter_batches(batch_size=_BATCH_ROWS, columns=columns)


def _arrow_batches(f: Path, columns: list[str]):
    import pyarrow as pa

    with pa.memory_map(str(f)) as src:
        for batch in pa.ipc.open_stream(src):
            yield batch.select(columns)


def _parquet_records(f: Path, fields: Fields) -> Iterator[Record]:
    yield from _table_records((f,), fields, _parquet_batches)


def _table_records(files, fields: Fields, batches) -> Iterator[Record]:
    """Rows of parquet or arrow files, column by column as Python strings."""
    import pyarrow as pa

    keys = list(fields.keys())
    for f in files:
        fmt = "parquet" if batches is _parquet_batches else "arrow"
        schema = _schema(f, fmt)
        _check_columns(f, schema.names, fields)
        for key in keys:
            t = schema.field(key).type
            if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
                raise DataConfigError(f"data.path: {f}: column {key!r} holds {t}, not strings")
        row = 0
        for batch in batches(f, keys):
            cols = [batch.column(k).to_pylist() for k in keys]
            for i, values in enumerate(zip(*cols)):
                where = f"{f}: row {row + i}"
                enc = [_field(v, where, k) for v, k in zip(values, keys)]
                yield Record(enc[1], enc[0]) if fields.completion else Record(enc[0])
            row += batch.num_rows


def _open_megatron(prefix: Path):
    """megatron-core's IndexedDataset of ``prefix``, after checking the .bin size its index implies."""
    with warnings.catch_warnings():  # megatron-core warns at import about optional GPU packages
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    bin_ = f"{prefix}.bin"
    try:
        ds = IndexedDataset(str(prefix), multimodal=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - a corrupt index fails in numpy/struct/assert: say which file
        raise DataConfigError(f"data.path: {prefix}.idx is not a megatron index ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    index = ds.index
    n = len(index.sequence_lengths)
    want = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype().itemsize if n else 0
    have = os.path.getsize(bin_)
    if have != want:
        raise DataConfigError(f"data.path: {bin_} has {have} bytes, its index {prefix}.idx says {want} "
                              f"({n} sequences of {np.dtype(index.dtype).name}); the pair does not match")
    return ds


def _megatron_records(prefix: Path) -> Iterator[Record]:
    ds = _open_megatron(prefix)
    bounds = ds.document_indices  # document d is sequences [bounds[d], bounds[d+1])
    for d in range(len(bounds) - 1):
        lo, hi = int(bounds[d]), int(bounds[d + 1])
        ids = np.concatenate([ds[i] for i in range(lo, hi)]) if hi > lo else np.zeros(0, np.int64)
        if len(ids):
            yield Record(ids, where=f"{prefix}.bin: document {d}")
