"""Attention kernels: time, peak memory and useful GFLOP/s per (backend, seq_len). A script, not a test.

    python -m benchmarks.attention --seq-lens 4096,16384,65536 --json out.json

Backends: ``sdpa_dense`` (torch SDPA, dense causal: what you would run without sparsity),
``reference`` (naive masked oracle, seq_len <= 4096), ``blocked``, ``fused`` and ``flex`` (kernels.sparse_attention);
``fused_avx2`` / ``fused_avx512`` / ``fused_copies`` pin the fused kernel's build (``FUSED_ENV``).
Each (backend, seq_len) row runs in a fresh child process (``--one``) so that its peak memory is its own:
on CPU peak RSS (``ru_maxrss``) minus the RSS after the inputs were allocated, on CUDA
``max_memory_allocated`` minus the allocation after the inputs. Times are the min over ``--repeats``
after one warmup call. Useful FLOPs count only the pairs the pattern attends (the same count for every
backend, so dense SDPA's extra work is not "useful"), see ``FLOPS_CONVENTION``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

BACKENDS = ("sdpa_dense", "reference", "blocked", "blocked_compiled", "fused", "fused_avx2", "fused_avx512",
            "fused_copies", "flex")
SPARSE = ("blocked", "blocked_compiled", "fused", "fused_avx2", "fused_avx512", "fused_copies")  # measured against the targets
# The fused kernel with its build pinned (kernels.cpu.fused_choice's environment), so that builds compare
# in one run: ``fused`` is what this CPU runs by default; ``fused_copies`` runs bf16 inputs on the
# avx512 build's fp32 kernel (fp32 copies) instead of the native bf16 kernel.
FUSED_ENV = {"fused_avx2": {"HALOFORMER_FUSED_ISA": "avx2", "HALOFORMER_FUSED_BF16": "fp32"},
             "fused_avx512": {"HALOFORMER_FUSED_ISA": "avx512"},
             "fused_copies": {"HALOFORMER_FUSED_ISA": "avx512", "HALOFORMER_FUSED_BF16": "fp32"}}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BWD_FACTOR = 2.5  # backward ≈ 2.5 × forward FLOPs (FlashAttention convention: 5 matmuls vs 2, ×1.25 recompute)
FLOPS_CONVENTION = ("useful FLOPs = attended pairs (pattern.key_counts(n).sum() x B x H) x 4*D per pair forward "
                    "(QK^T and PV, 2 FLOPs per multiply-add); backward = 2.5 x forward (FlashAttention convention); "
                    "useful_gflops = 3.5 x forward FLOPs / fwd_bwd_s / 1e9")
TIME_LIMIT_S = 60.0  # skip a dense-cost row whose extrapolated time per call exceeds this
CPU_FLEX_BYTES = 4 << 30  # eager CPU flex materialises B·H·Q·K fp32 scores (and as much again for P)
REFERENCE_MAX = 4096
CONF = Path(__file__).resolve().parent.parent / "conf" / "attention"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {','.join(BACKENDS)}")
    p.add_argument("--seq-lens", default="4096,16384,65536")
    p.add_argument("--pattern", default="sink", help="name of a conf/attention/*.yaml")
    p.add_argument("--window-left", type=int, default=512)
    p.add_argument("--num-global", type=int, default=16)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="q/k/v dtype; the matmul peak is measured in the same dtype")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--time-limit", type=float, default=TIME_LIMIT_S,
                   help="skip dense-cost rows whose extrapolated seconds per call exceed this (a busy machine needs more)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = every core)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU time, which other processes time-slicing the cores barely change "
                        "(use with --threads 1 on a shared machine)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--one", nargs=2, metavar=("BACKEND", "SEQ_LEN"), help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)
    bad = sorted(set(args.backends.split(",")) - set(BACKENDS))
    if bad:
        p.error(f"--backends: unknown {bad}; allowed: {', '.join(BACKENDS)}")
    if not (CONF / f"{args.pattern}.yaml").exists():
        p.error(f"--pattern: no conf/attention/{args.pattern}.yaml; allowed: "
                + ", ".join(sorted(f.stem for f in CONF.glob("*.yaml"))))
    return args


def make_pattern(args):
    import yaml

    from model.pattern import from_config

    cfg = yaml.safe_load((CONF / f"{args.pattern}.yaml").read_text())
    cfg.update(window_left=args.window_left, num_global=args.num_global)
    return from_config(cfg)


def child_argv(args, backend, n):
    """The command line that measures one row in a fresh process."""
    flags = ["--pattern", args.pattern, "--window-left", args.window_left, "--num-global", args.num_global,
             "--heads", args.heads, "--head-dim", args.head_dim, "--batch", args.batch,
             "--device", args.device, "--dtype", args.dtype, "--repeats", args.repeats, "--threads", args.threads, "--clock", args.clock,
             "--one", backend, n]
    return [sys.executable, "-m", "benchmarks.attention", *map(str, flags)]


# --- child: one (backend, seq_len) ------------------------------------------------------------------

def attention_fn(backend, pattern):
    """fn(q, k, v) -> out for a backend; ImportError when the backend is not there yet."""
    from kernels import sparse_attention

    if backend == "sdpa_dense":
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=pattern.causal)
    if backend.startswith("fused"):
        os.environ.update(FUSED_ENV.get(backend, {}))  # this child's only (rows run in fresh processes)
        from kernels.cpu import fused_choice
        from kernels.fused import extension

        try:
            fused_choice()
        except ValueError as e:  # a build this CPU cannot run: the row says why
            raise ImportError(str(e)) from None
        if extension() is None:  # (build here, outside the timing; no silent fallback to blocked)
            raise ImportError("the fused extension could not be built")
        return lambda q, k, v: sparse_attention(q, k, v, pattern, backend="fused")[0]
    if backend in SPARSE:
        import kernels.blocked  # (fail here, as an ImportError, not inside the timing)

        kernels.blocked.set_compile(backend == "blocked_compiled")  # compile happens in the warm-up call
        backend = "blocked"
    return lambda q, k, v: sparse_attention(q, k, v, pattern, backend=backend)[0]


def best_time(fn, repeats, device, clock=time.perf_counter):
    fn()  # warmup: compilation, plan and mask caches
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()  # kernels are asynchronous: wait before reading the clock
        times.append(clock() - t)
    return min(times)


def set_threads(args):
    torch.set_num_threads(args.threads or os.cpu_count())
    return time.process_time if args.clock == "cpu" else time.perf_counter


def current_rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(args, backend, n):
    """One row, measured in this (fresh) process."""
    clock = set_threads(args)
    device = torch.device(args.device)
    row = {"backend": backend, "seq_len": n, "fwd_s": None, "fwd_bwd_s": None, "peak_mem_mb": None, "note": None}
    try:
        fn = attention_fn(backend, make_pattern(args))
    except ImportError as e:
        return {**row, "skipped": f"not importable: {e}"}
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.heads, n, args.head_dim, device=device, generator=g).to(DTYPES[args.dtype])
               for _ in range(3))
    dout = torch.randn_like(q)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = current_rss_mb()
    with torch.no_grad():
        row["fwd_s"] = best_time(lambda: fn(q, k, v), args.repeats, device, clock)
    if backend == "flex" and device.type == "cpu":
        row["note"] = "flex has no CPU backward: forward only"
    else:
        qg, kg, vg = (t.requires_grad_() for t in (q, k, v))
        row["fwd_bwd_s"] = best_time(lambda: fn(qg, kg, vg).backward(dout), args.repeats, device, clock)
    if device.type == "cuda":
        row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        row["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base  # KiB on Linux
    return {**row, "skipped": None}


# --- parent: the sweep ------------------------------------------------------------------------------

def matmul_gflops(device, n=4096, clock=time.perf_counter, dtype=torch.float32):
    """The n x n product's rate; n = 1024 where that one already takes over 0.5 s (bf16 without bf16
    hardware: 0.7 GFLOP/s measured on an AVX2-only EPYC, so 4096 would take minutes)."""
    small = (torch.randn(1024, 1024, device=device).to(dtype) for _ in range(2))
    a, b = small
    if best_time(lambda: a @ b, 1, device, clock) <= 0.5:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * a.shape[0] ** 3 / best_time(lambda: a @ b, 3, device, clock) / 1e9


def skip_reason(args, backend, n, prev):
    """(why a row is not run or None, extrapolated seconds per call or None); ``prev``: the last
    measured row of this backend. Dense-cost rows grow as n², so their time is extrapolated."""
    if backend == "reference" and n > REFERENCE_MAX:
        return f"reference builds the dense mask and scores; run only for seq_len <= {REFERENCE_MAX}", None
    dense_cost = backend == "sdpa_dense" or (backend == "flex" and args.device == "cpu")
    if backend == "flex" and args.device == "cpu" and 2 * 4 * args.batch * args.heads * n * n > CPU_FLEX_BYTES:
        return f"eager CPU flex materialises B*H*n^2 fp32 scores (> {CPU_FLEX_BYTES >> 30} GiB)", None
    if dense_cost and prev and prev.get("skipped") is None:
        t = prev["fwd_bwd_s"] or prev["fwd_s"]
        est = t * (n / prev["seq_len"]) ** 2
        if est > args.time_limit:
            return f"estimated {est:.0f} s per call (> {args.time_limit:.0f} s) from seq_len={prev['seq_len']}", est
    return None, None


def run_row(args, backend, n):
    proc = subprocess.run(child_argv(args, backend, n), capture_output=True, text=True)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"backend": backend, "seq_len": n, "skipped": f"failed (exit {proc.returncode}): {last}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratios(rows, mm):
    """The targets' ratios for each sparse backend: {backend: {ratio name: {seq_len: value}}}."""
    by = {(r["backend"], r["seq_len"]): r for r in rows}
    res = {}
    for name in SPARSE:
        mine = [r for r in rows if r["backend"] == name and r.get("fwd_bwd_s")]
        if not mine:
            continue
        out = {"speedup_fwd_bwd_vs_sdpa": {}, "pct_of_matmul": {}, "time_per_token_rel": {}, "mem_over_sdpa": {}}
        base = next((r for r in mine if r["seq_len"] == 4096), mine[0])
        for r in mine:
            n, dense = r["seq_len"], by.get(("sdpa_dense", r["seq_len"]), {})
            t_dense = dense.get("fwd_bwd_s") or dense.get("est_s")  # extrapolated when the row was skipped
            if t_dense:
                out["speedup_fwd_bwd_vs_sdpa"][n] = t_dense / r["fwd_bwd_s"]
            out["pct_of_matmul"][n] = 100 * r["useful_gflops"] / mm
            out["time_per_token_rel"][n] = (r["fwd_bwd_s"] / n) / (base["fwd_bwd_s"] / base["seq_len"])
            if dense.get("peak_mem_mb"):
                out["mem_over_sdpa"][n] = r["peak_mem_mb"] / dense["peak_mem_mb"]
        out["time_per_token_base_seq_len"] = base["seq_len"]
        res[name] = out
    return res


def fmt(x, spec):
    return format("-", ">" + spec.split(".")[0]) if x is None else format(x, spec)


def print_report(res):
    c = res["config"]
    print("\n".join(f"# {line}" for line in res["cpu"].splitlines()))
    print(f"# attention: pattern={c['pattern']} B={c['batch']} H={c['heads']} D={c['head_dim']} "
          f"device={c['device']} dtype={c['dtype']} threads={c['threads']} clock={c['clock']}; "
          f"matmul {res['matmul_gflops']:.1f} GFLOP/s ({c['dtype']})")
    print(f"# {res['flops_convention']}")
    print(f"{'backend':<16} {'seq_len':>8} {'fwd s':>9} {'fwd+bwd s':>10} {'peak MB':>9} {'useful GFLOP/s':>15}  note")
    for r in res["rows"]:
        note = r.get("skipped") or r.get("note") or ""
        print(f"{r['backend']:<16} {r['seq_len']:>8} {fmt(r.get('fwd_s'), '9.4f')} {fmt(r.get('fwd_bwd_s'), '10.4f')} "
              f"{fmt(r.get('peak_mem_mb'), '9.1f')} {fmt(r.get('useful_gflops'), '15.2f')}  {note}")
    est = {r["seq_len"] for r in res["rows"] if r["backend"] == "sdpa_dense" and r.get("est_s")}
    for name, rt in res["ratios"].items():
        print(f"\n{name} vs targets:")
        print(f"{'seq_len':>8} {'speedup vs sdpa (fwd+bwd)':>26} {'% of matmul':>12} "
              f"{'time/token vs ' + str(rt['time_per_token_base_seq_len']):>20} {'mem / sdpa mem':>15}")
        for n in rt["pct_of_matmul"]:
            sp = rt["speedup_fwd_bwd_vs_sdpa"].get(n)
            sp_s = "-" if sp is None else f"{sp:.2f}x" + (" (sdpa est.)" if n in est else "")
            print(f"{n:>8} {sp_s:>26} {rt['pct_of_matmul'][n]:>11.1f}% "
                  f"{rt['time_per_token_rel'][n]:>20.2f} {fmt(rt['mem_over_sdpa'].get(n), '15.3f')}")


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure(args, args.one[0], int(args.one[1]))))
        return
    clock = set_threads(args)
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    pattern = make_pattern(args)
    rows = []
    for backend in args.backends.split(","):
        prev = None
        for n in seq_lens:
            pairs = int(pattern.key_counts(n).sum()) * args.batch * args.heads
            why, est = skip_reason(args, backend, n, prev)
            row = {"backend": backend, "seq_len": n, "skipped": why, "est_s": est} if why else run_row(args, backend, n)
            fwd_flops = 4 * args.head_dim * pairs
            row["pairs"] = pairs
            row["useful_gflops"] = (1 + BWD_FACTOR) * fwd_flops / row["fwd_bwd_s"] / 1e9 if row.get("fwd_bwd_s") else None
            rows.append(row)
            prev = row if not row.get("skipped") else prev
            print(f"  {backend} n={n}: {row.get('skipped') or 'done'}", file=sys.stderr)
    mm = matmul_gflops(torch.device(args.device), clock=clock, dtype=DTYPES[args.dtype])
    config = {k: v for k, v in vars(args).items() if k not in ("one", "json")} | {"threads": torch.get_num_threads()}
    from kernels.cpu import describe

    res = {"cpu": describe(), "config": config, "flops_convention": FLOPS_CONVENTION, "matmul_gflops": mm, "rows": rows,
           "ratios": ratios(rows, mm)}
    print_report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
