"""Preparing a jsonl corpus for training: our token cache vs what a user would otherwise run.

A generated jsonl of ``--mb`` MB (documents of random words, 0.5-8 KB each) is tokenized with ONE
byte-level BPE tokenizer (trained here on the file's first 8 MB, ``data.tokenizer=bpe``; its
tokenizer.json is given to all three) by

- ours: ``trainer.data.corpus.load_corpus(path, "bpe")``: the streaming token cache (uint16 .bin),
- datasets: ``load_dataset("json")`` then ``.map(batched=True, num_proc=2)`` with
  ``tokenizers.Tokenizer.encode_batch``, written with ``save_to_disk`` (arrow),
- megatron: a ``preprocess_data.py``-style loop: json lines in batches of 1000, ``encode_batch``,
  ``IndexedDatasetBuilder.add_document`` (EOS appended), ``finalize``.

Each runs once, in its own fresh process; reported: input MB/s (wall clock) and peak RSS (the
process, and the largest of its children: datasets' workers). One run each: the numbers carry the
noise of a shared machine. Run: ``python -m benchmarks.data_prep [--mb 200] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = ("the of and to in is was for on that with as by at from his her an which or be are this had not "
         "but it were have one their all been has more when who will no would there can so out up into "
         "attention window global token sequence shard über naïve café 日本語 données 🎉").split()


def cpu_header() -> str:
    """The benchmark header's CPU lines (``kernels.cpu.describe``: model, cores, features, kernel path)."""
    from kernels.cpu import describe

    return describe()


def generate(path: Path, mb: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    target, size = mb * 1_000_000, 0
    with open(path, "w") as f:
        while size < target:
            n = int(rng.integers(80, 1300))
            line = json.dumps({"id": size, "text": " ".join(words[rng.integers(len(words), size=n)])}) + "\n"
            f.write(line)
            size += len(line.encode())
    return size


def run_ours(src: Path, work: Path) -> None:
    from trainer.data.corpus import load_corpus

    c = load_corpus(str(src), "bpe", work.parent / "cache", 0.01, 4096)  # the tokenizer trained by main()
    print(json.dumps({"tokens": len(c.train) + len(c.val), "documents": c.n_documents}))


def run_datasets(src: Path, work: Path, tok_json: str) -> None:
    from datasets import disable_progress_bars, load_dataset

    disable_progress_bars()

    def encode(batch):
        from tokenizers import Tokenizer

        tk = encode.tk = getattr(encode, "tk", None) or Tokenizer.from_file(tok_json)
        return {"input_ids": [e.ids + [0] for e in tk.encode_batch(batch["text"], add_special_tokens=False)]}

    ds = load_dataset("json", data_files=str(src), split="train", cache_dir=str(work / "hf"))
    out = ds.map(encode, batched=True, num_proc=2, remove_columns=ds.column_names)
    out.save_to_disk(str(work / "arrow"))
    print(json.dumps({"documents": len(out)}))


def run_megatron(src: Path, work: Path, tok_json: str) -> None:
    import warnings

    import torch
    from tokenizers import Tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    tk = Tokenizer.from_file(tok_json)
    builder = IndexedDatasetBuilder(str(work / "mt.bin"), dtype=np.uint16)
    n_docs = n_tokens = 0

    def flush(texts):
        nonlocal n_docs, n_tokens
        for enc in tk.encode_batch(texts, add_special_tokens=False):
            ids = enc.ids + [0]  # --append-eod
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            n_docs, n_tokens = n_docs + 1, n_tokens + len(ids)

    batch = []
    with open(src) as f:
        for line in f:
            batch.append(json.loads(line)["text"])
            if len(batch) == 1000:
                flush(batch)
                batch = []
    flush(batch)
    builder.finalize(str(work / "mt.idx"))
    print(json.dumps({"tokens": n_tokens, "documents": n_docs}))


def child(method: str, src: Path, work: Path, tok_json: str) -> None:
    t0 = time.perf_counter()
    {"ours": lambda: run_ours(src, work), "datasets": lambda: run_datasets(src, work, tok_json),
     "megatron": lambda: run_megatron(src, work, tok_json)}[method]()
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rss_mib": rss, "children_rss_mib": kids}))


def measure(method: str, src: Path, work: Path, tok_json: str) -> dict:
    work.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.data_prep", "--child", method, "--src", str(src),
                           "--work", str(work), "--tokenizer", tok_json], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    return {**lines[0], **lines[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=200, help="size of the generated jsonl (MB)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--methods", default="ours,datasets,megatron",
                    help="comma-separated subset of ours,datasets,megatron (ours alone: the memory bound at scale)")
    ap.add_argument("--dir", type=Path, help="working directory (default: a temporary one)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.src, args.work, args.tokenizer)
    print(cpu_header())
    root = Path(args.dir or tempfile.mkdtemp(prefix="data_prep-"))
    root.mkdir(parents=True, exist_ok=True)
    src = root / "corpus.jsonl"
    size = generate(src, args.mb)
    from trainer.data.corpus import Source, get_tokenizer

    t0 = time.perf_counter()
    tok = get_tokenizer("bpe", Source(str(src)), root / "ours" / "cache", 0.01, 4096)  # cached for "ours"
    tok_json = str(next((root / "ours" / "cache").glob("bpe-*/tokenizer.json")))
    print(f"corpus: {size / 1e6:.1f} MB jsonl; tokenizer: byte-level BPE, {tok.vocab_size} tokens "
          f"(trained in {time.perf_counter() - t0:.1f} s, not counted)")
    results = {}
    for method in args.methods.split(","):
        work = root / method if method != "ours" else root / "ours" / "run"
        results[method] = measure(method, src, work, tok_json)
    others = [r["seconds"] for m, r in results.items() if m != "ours"]
    best = min(others) if others else float("nan")
    print("\n| method | MB/s | peak RSS MiB (process) | peak RSS MiB (largest child) | documents | vs faster other |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, r in results.items():
        print(f"| {method} | {size / 1e6 / r['seconds']:.1f} | {r['rss_mib']:.0f} | {r['children_rss_mib']:.0f} | "
              f"{r['documents']:,} | {best / r['seconds']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_header(), "mb": size / 1e6, "results": results}, indent=1))


if __name__ == "__main__":
    main()
