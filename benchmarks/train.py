"""Training-step throughput and memory, sparse vs dense, and the longest trainable sequence. A script.

    python -m benchmarks.train [--nproc 2] [--seq-lens 4096,16384,65536] [--patterns sink,dense]
                               [--search-max 1048576] [--timeout 300] [--json bench_train.json]

Every row is a real ``torchrun -m trainer.train`` job (tiny model, SP = nproc, fp32 on CPU) of
``--steps`` steps; tokens/s is the median over the steps after the first (which pays warm-up), peak
memory is rank 0's (CPU: peak RSS of the whole process, ~0.45 GiB of it libraries; GPU: peak
allocated). A row whose job fails or passes ``--timeout`` is reported as such, not retried.

The search trains ``--search-pattern`` with activation checkpointing at seq_len = --search-start,
doubling until a job fails (out of memory) or times out; the longest success is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launch.proc import run_process_group

REPO = Path(__file__).resolve().parent.parent


def run_job(nproc: int, seq_len: int, pattern: str, steps: int, timeout: float, extra: list[str]) -> dict:
    """One training job; its row: status, tokens/s, step time and peak memory."""
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"seq_len={seq_len}", f"attention={pattern}", f"steps={steps}", "eval_every=0", "eval_batches=1",
                     "logging.stats_every=0", "logging.mask_png=false", "logging.wandb=disabled",
                     "trainer.ckpt_every=0", "data.val_fraction=0.1", f"hydra.run.dir={tmp}", *extra]
        launcher = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={nproc}", "-m"]
        env = dict(os.environ, WANDB_MODE="disabled")
        env.setdefault("DS_ACCELERATOR", "cpu")
        row = {"seq_len": seq_len, "pattern": pattern, "nproc": nproc, "extra": " ".join(extra)}
        t0 = time.monotonic()
        try:  # a timeout kills torchrun's ranks too, or they would slow the rows after this one
            proc = run_process_group([*launcher, "trainer.train", *overrides], cwd=REPO, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**row, "status": f"timeout>{timeout:.0f}s"}
        row["wall_s"] = round(time.monotonic() - t0, 1)
        metrics = Path(tmp) / "metrics.jsonl"
        if proc.returncode != 0 or not metrics.exists():
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:160]
            return {**row, "status": f"failed (rc {proc.returncode}): {tail}"}
        steps_rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        timed = steps_rows[1:] or steps_rows
        return {**row, "status": "ok",
                "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in timed),
                "step_s": statistics.median(r["perf/step_time_s"] for r in timed),
                "peak_mem_gb": max(r["perf/peak_mem_gb"] for r in steps_rows)}


def print_rows(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'pattern':<10} {'seq_len':>9} {'tokens/s':>10} {'step s':>8} {'peak GiB':>9}  status")
    for r in rows:
        ok = r["status"] == "ok"
        cells = (f"{r['tokens_per_s']:,.0f}", f"{r['step_s']:.2f}", f"{r['peak_mem_gb']:.2f}") if ok else ("-",) * 3
        print(f"{r['pattern']:<10} {r['seq_len']:>9} {cells[0]:>10} {cells[1]:>8} {cells[2]:>9}  {r['status']}",
              flush=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2, help="ranks = sequence-parallel size")
    ap.add_argument("--seq-lens", default="4096,16384,65536")
    ap.add_argument("--patterns", default="sink,dense", help="conf/attention/*.yaml names")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per job")
    ap.add_argument("--search-pattern", default="sink")
    ap.add_argument("--search-start", type=int, default=16384)
    ap.add_argument("--search-max", type=int, default=0, help="0 = no longest-sequence search")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    from kernels.cpu import describe

    cpu = describe()
    print("\n".join(f"# {line}" for line in cpu.splitlines()), flush=True)

    grid = [run_job(args.nproc, n, p, args.steps, args.timeout, [])
            for p in args.patterns.split(",") for n in map(int, args.seq_lens.split(","))]
    print_rows(f"training step, tiny model, SP={args.nproc}", grid)
    search, longest = [], None
    n = args.search_start
    while args.search_max and n <= args.search_max:
        row = run_job(args.nproc, n, args.search_pattern, 2, args.timeout, ["model.activation_checkpointing=true"])
        search.append(row)
        print_rows(f"longest sequence search ({args.search_pattern}, activation checkpointing)", [row])
        if row["status"] != "ok":
            break
        longest, n = n, n * 2
    if args.search_max:
        print(f"\nlongest trained sequence: {longest} tokens (SP={args.nproc}, {args.search_pattern}, "
              f"limit {args.timeout:.0f} s per 2-step job)")
    result = {"cpu": cpu, "grid": grid, "search": search, "longest": longest}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
