"""What learned sinks and document masking cost (or save) in the blocked kernel. A script, not a test.

    python -m benchmarks.sinks_docs --seq-len 16384 --json benchmarks/sinks_docs_cpu.json

Per pattern, variants of one attention call at B=1, H=8, D=64 fp32 (backend=blocked):
``none`` (plain), ``sinks`` (learned sink logits, joined from out/lse), ``docs=N`` (packed documents of N
tokens: the plan gathers only keys some query of a block may see), ``sinks+docs=N``. Every variant is
timed in the same process, interleaved round by round, and reported as a ratio to ``none`` (the
machine may be shared: ratios within one run are what to compare). Times are the minimum over rounds
after one warm-up call (plans and masks cached, as from the second layer of a training step on).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from kernels import sparse_attention
from model.pattern import Dense, Pattern, Window

PATTERNS: dict[str, Pattern] = {
    "sink_w512_g16": Window(causal=True, window_left=512, num_global=16),
    "dense_causal": Dense(causal=True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--doc-lens", default="1024,4096", help="comma-separated document lengths")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--patterns", default=",".join(PATTERNS), help=f"comma-separated subset of {','.join(PATTERNS)}")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def variants(n: int, doc_lens: list[int], heads: int) -> dict[str, dict]:
    """name -> sparse_attention keyword arguments."""
    sinks = torch.zeros(heads, requires_grad=True)
    out = {"none": {}, "sinks": {"sinks": sinks}}
    for d in doc_lens:
        docs = (torch.arange(n) // d)[None]  # (1, n): documents of d tokens
        out[f"docs={d}"] = {"q_doc": docs, "k_doc": docs}
    out[f"sinks+docs={doc_lens[0]}"] = {"sinks": sinks, **out[f"docs={doc_lens[0]}"]}
    return out


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_pattern(pattern: Pattern, args) -> list[dict]:
    n, H, D = args.seq_len, args.heads, args.head_dim
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, n, D, generator=g).requires_grad_() for _ in range(3))
    dout = torch.randn(1, H, n, D, generator=g)
    calls = variants(n, [int(x) for x in args.doc_lens.split(",")], H)

    def fwd(kw):
        with torch.no_grad():
            sparse_attention(q, k, v, pattern, backend="blocked", **kw)

    def fwd_bwd(kw):
        out, _ = sparse_attention(q, k, v, pattern, backend="blocked", **kw)
        out.backward(dout)

    best = {name: [float("inf"), float("inf")] for name in calls}
    for kw in calls.values():  # warm-up: plans and masks
        fwd_bwd(kw)
    for _ in range(args.rounds):
        for name, kw in calls.items():
            best[name][0] = min(best[name][0], timed(lambda kw=kw: fwd(kw)))
            best[name][1] = min(best[name][1], timed(lambda kw=kw: fwd_bwd(kw)))
    base = best["none"]
    return [{"variant": name, "fwd_s": f, "fwd_bwd_s": fb, "fwd_ratio": f / base[0], "fwd_bwd_ratio": fb / base[1]}
            for name, (f, fb) in best.items()]


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    results = {"seq_len": args.seq_len, "batch": 1, "heads": args.heads, "head_dim": args.head_dim,
               "dtype": "fp32", "backend": "blocked", "device": "cpu", "threads": torch.get_num_threads(),
               "rounds": args.rounds, "rows": {}}
    print(f"blocked backend, B=1 H={args.heads} D={args.head_dim} fp32, n={args.seq_len}, "
          f"{torch.get_num_threads()} threads, min of {args.rounds} rounds")
    print("| pattern | variant | fwd s | fwd+bwd s | fwd vs none | fwd+bwd vs none |\n|---|---|---|---|---|---|")
    for name in args.patterns.split(","):
        rows = run_pattern(PATTERNS[name], args)
        results["rows"][name] = rows
        for r in rows:
            print(f"| {name} | {r['variant']} | {r['fwd_s']:.3f} | {r['fwd_bwd_s']:.3f} | {r['fwd_ratio']:.2f}x | "
                  f"{r['fwd_bwd_ratio']:.2f}x |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
