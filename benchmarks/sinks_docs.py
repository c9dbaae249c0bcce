"""What learned sinks and document masking cost (or save) in the kernels. A script, not a test.

    python -m benchmarks.sinks_docs --seq-len 16384 --json benchmarks/sinks_docs_cpu.json

Per pattern, variants of one attention call at B=1, H=8, D=64 fp32 (``--backend``, blocked by default):
``none`` (plain), ``sinks`` (learned sink logits: joined from out/lse after blocked, inside the fused
kernel), ``docs=N`` (packed documents of N
tokens: the plan gathers only keys some query of a block may see), ``sinks+docs=N``. Every variant is
timed in the same process, interleaved round by round, and reported as a ratio to ``none`` (the
machine may be shared: ratios within one run are what to compare). Times are the minimum over rounds
after one warm-up call (plans and masks cached, as from the second layer of a training step on).

``--comm P``: the bytes one attention layer's forward moves per rank under the halo strategy with
document masking (P local gloo processes, the causal sink w=512, g=16, B=1, Hkv=8, D=64, fp32, a
stand-in kernel: only the exchanges are measured): K/V rows (halo + globals) next to the document ids
that ride along with them, at two sequence lengths (neither grows with n).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.attention import set_threads
from kernels import sparse_attention
from kernels.cpu import describe
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
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of the variants (none, sinks, docs=N, sinks+docs=N); default all")
    p.add_argument("--join-only", action="store_true",
                   help="time only the sinks' join (kernels.stats.apply_sinks, forward + backward) at this size")
    p.add_argument("--comm", type=int, default=0, metavar="P", help="measure the halo bytes on P gloo ranks instead")
    p.add_argument("--backend", default="blocked", choices=("blocked", "fused"),
                   help="the kernel (fused runs blocked for the document variants)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = every core)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU time, which other processes time-slicing the cores barely change")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _comm_worker(rank: int, P: int, store: str, ns: list[int], out_dir: str) -> None:
    from kernels.contract import AttnCall, AttnResult
    from parallel.comm import CommCounter
    from parallel.context import world_context
    from parallel.sp_attention import sp_attention

    dist.init_process_group("gloo", store=dist.FileStore(store, P), rank=rank, world_size=P,
                            timeout=timedelta(seconds=120))
    ctx, pattern, rows = world_context(120), Window(causal=True, window_left=512, num_global=16), {}

    def stand_in(q, k, v, pattern, call):  # the exchanges are measured, not the kernel
        return AttnResult(q * 0, q.new_zeros(q.shape[:3]), None)

    for n in ns:
        L, counter = n // P, CommCounter()
        q, k, v = torch.zeros(1, 8, L, 64), torch.zeros(1, 8, L, 64), torch.zeros(1, 8, L, 64)
        docs = ((torch.arange(L) + rank * L) // 1024)[None]
        with torch.no_grad():
            sp_attention(q, k, v, pattern, ctx, AttnCall(seq_len=n, sinks=torch.zeros(8), q_doc=docs), strategy="halo",
                         backend=stand_in, counter=counter)
        rows[n] = {"kv": counter.total("recv", kind=("halo", "global")), "doc_ids": counter.total("recv", kind="doc_ids")}
    torch.save(rows, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def comm_rows(P: int, ns: list[int]) -> list[dict]:
    """Largest per-rank forward receive per layer (an interior rank), by n."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_comm_worker, args=(P, os.path.join(tmp, "store"), ns, tmp), nprocs=P, join=True)
        per_rank = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(P)]
    return [{"P": P, "seq_len": n, "kv_bytes": max(r[n]["kv"] for r in per_rank),
             "doc_id_bytes": max(r[n]["doc_ids"] for r in per_rank)} for n in ns]


def variants(n: int, doc_lens: list[int], heads: int) -> dict[str, dict]:
    """name -> sparse_attention keyword arguments."""
    sinks = torch.zeros(heads, requires_grad=True)
    out = {"none": {}, "sinks": {"sinks": sinks}}
    for d in doc_lens:
        docs = (torch.arange(n) // d)[None]  # (1, n): documents of d tokens
        out[f"docs={d}"] = {"q_doc": docs, "k_doc": docs}
    out[f"sinks+docs={doc_lens[0]}"] = {"sinks": sinks, **out[f"docs={doc_lens[0]}"]}
    return out


def join_time(args) -> tuple[float, float]:
    """(forward s, forward + backward s) of joining the sinks to (out, lse) alone: what ``sinks`` adds to
    any backend, since the kernel itself runs unchanged; min over 5 rounds."""
    from kernels.stats import apply_sinks

    n, H, D = args.seq_len, args.heads, args.head_dim
    out, lse = torch.randn(1, H, n, D, requires_grad=True), torch.randn(1, H, n, requires_grad=True)
    sinks, dout = torch.zeros(H, requires_grad=True), torch.randn(1, H, n, D)

    def both():
        apply_sinks(out, lse, sinks)[0].backward(dout)

    with torch.no_grad():
        f = min(timed(lambda: apply_sinks(out, lse, sinks)) for _ in range(5))
    return f, min(timed(both) for _ in range(5))


CLOCK = [time.perf_counter]  # set once by main (--clock)


def timed(fn) -> float:
    t = CLOCK[0]()
    fn()
    return CLOCK[0]() - t


def run_pattern(pattern: Pattern, args) -> list[dict]:
    n, H, D = args.seq_len, args.heads, args.head_dim
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, n, D, generator=g).requires_grad_() for _ in range(3))
    dout = torch.randn(1, H, n, D, generator=g)
    calls = variants(n, [int(x) for x in args.doc_lens.split(",")], H)
    if args.variants:  # "none" always runs: it is what the ratios are taken against
        calls = {name: kw for name, kw in calls.items() if name in args.variants.split(",") or name == "none"}

    def fwd(kw):
        with torch.no_grad():
            sparse_attention(q, k, v, pattern, backend=args.backend, **kw)

    def fwd_bwd(kw):
        out, _, _ = sparse_attention(q, k, v, pattern, backend=args.backend, **kw)
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
    known = variants(1, [int(x) for x in args.doc_lens.split(",")], 1)
    unknown = [v for v in (args.variants or "").split(",") if v and v not in known]
    if unknown:
        raise SystemExit(f"--variants: {unknown[0]!r} is not one of {', '.join(known)}")
    cpu = describe()
    print("\n".join(f"# {line}" for line in cpu.splitlines()))
    if args.comm:
        rows = comm_rows(args.comm, [args.seq_len, 4 * args.seq_len])
        print("| P | seq_len | K/V halo+global bytes | doc_ids bytes | doc_ids / K/V |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['P']} | {r['seq_len']} | {r['kv_bytes']} | {r['doc_id_bytes']} | "
                  f"{r['doc_id_bytes'] / r['kv_bytes']:.4f} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"cpu": cpu, "comm": rows}, f, indent=2)
        return
    CLOCK[0] = set_threads(args)
    if args.join_only:
        f, fb = join_time(args)
        print(f"sinks join alone at n={args.seq_len}, H={args.heads}, D={args.head_dim}: fwd {f * 1e3:.1f} ms, "
              f"fwd+bwd {fb * 1e3:.1f} ms")
        return
    results = {"cpu": cpu, "seq_len": args.seq_len, "batch": 1, "heads": args.heads, "head_dim": args.head_dim,
               "dtype": "fp32", "backend": args.backend, "device": "cpu", "threads": torch.get_num_threads(),
               "clock": args.clock, "rounds": args.rounds, "rows": {}}
    print(f"{args.backend} backend, B=1 H={args.heads} D={args.head_dim} fp32, n={args.seq_len}, "
          f"{torch.get_num_threads()} threads, {args.clock} clock, min of {args.rounds} rounds")
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
