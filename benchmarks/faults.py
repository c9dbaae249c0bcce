"""What each fault costs a real run, in seconds. A script.

    python -m benchmarks.faults [--seq-len 8192] [--timeout-s 30] [--json faults.json]

Every scenario is a ``torchrun -m trainer.train`` job (2 CPU ranks, SP=2, tiny model, a checkpoint
every 4 steps); the fault is inflicted from outside, as a cluster would, once a given step shows up
in ``metrics.jsonl`` (polled every 20 ms):

- ``save``:    the checkpoint save time (median of perf/ckpt_save_s) against the step time;
- ``preempt``: SIGTERM to torchrun after step 3 -> seconds until torchrun has exited, and the step
               of the checkpoint it left;
- ``kill9``:   SIGKILL of rank 1 after step 6, ``--max-restarts 1`` -> seconds from the kill until
               the first replayed step is logged (detection, restart, imports, rendezvous, loading),
               and how many steps were replayed;
- ``freeze``:  SIGSTOP of rank 1 after step 3 -> seconds until rank 0 has exited with its message,
               against ``parallel.timeout_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


class Job:
    """A torchrun job in its own session; ``rows`` reads its metrics as they appear."""

    def __init__(self, run_dir: Path, overrides: list[str], restarts: int = 0):
        self.run_dir = run_dir
        env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
        env.setdefault("DS_ACCELERATOR", "cpu")
        self.proc = subprocess.Popen(
            [TORCHRUN, "--standalone", "--nproc_per_node=2", f"--max-restarts={restarts}", "-m", "trainer.train",
             *overrides, "logging.wandb=disabled", "logging.mask_png=false", f"hydra.run.dir={run_dir}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def rows(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines if line.endswith("}")]

    def wait_rows(self, n: int, deadline_s: float = 300) -> float:
        """Block until ``n`` rows are logged; the monotonic time it saw them."""
        end = time.monotonic() + deadline_s
        while len(self.rows()) < n:
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"job ended or stalled before row {n}: {self.proc.stderr.read()[-2000:]}")
            time.sleep(0.02)
        return time.monotonic()

    def rank_process(self, rank: int) -> psutil.Process:
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank):
                    return child
            except psutil.Error:
                continue
        raise RuntimeError(f"no process of rank {rank}")

    def finish(self, timeout: float = 300) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.communicate()
        return self.proc.returncode, out, err


def scenario_save(tmp: Path, base: list[str]) -> dict:
    job = Job(tmp / "save", [*base, "steps=12"])
    rc, _, err = job.finish()
    rows = job.rows()
    assert rc == 0, err[-2000:]
    saves = [r["perf/ckpt_save_s"] for r in rows if "perf/ckpt_save_s" in r]
    return {"scenario": "save", "seconds": statistics.median(saves),
            "detail": f"median of {len(saves)} saves; step {statistics.median(r['perf/step_time_s'] for r in rows[1:]):.3f} s"}


def scenario_preempt(tmp: Path, base: list[str]) -> dict:
    job = Job(tmp / "preempt", [*base, "steps=1000"])
    job.wait_rows(3)
    t0 = time.monotonic()
    job.proc.send_signal(signal.SIGTERM)
    rc, out, _ = job.finish()
    dt = time.monotonic() - t0
    ckpts = sorted(p.name for p in (tmp / "preempt" / "checkpoints").glob("step_*"))
    stopped = "stopped at" in out
    return {"scenario": "preempt", "seconds": dt,
            "detail": f"torchrun rc {rc}; ranks reported 'stopped at': {stopped}; checkpoints {ckpts}"}


def scenario_kill9(tmp: Path, base: list[str]) -> dict:
    job = Job(tmp / "kill9", [*base, "steps=10"], restarts=1)
    job.wait_rows(6)
    victim = job.rank_process(1)
    t0 = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    n_before = len(job.rows())
    t1 = job.wait_rows(n_before + 1)
    rc, _, err = job.finish()
    steps = [r["step"] for r in job.rows()]
    replayed = len(steps) - len(set(steps))
    assert rc == 0, err[-2000:]
    return {"scenario": "kill9", "seconds": t1 - t0,
            "detail": f"kill -> first step logged after the restart; {replayed} step(s) replayed; rc {rc}"}


def scenario_freeze(tmp: Path, base: list[str], timeout_s: float) -> dict:
    job = Job(tmp / "freeze", [*base, "steps=1000", f"parallel.timeout_s={timeout_s}"])
    job.wait_rows(3)
    survivor, victim = job.rank_process(0), job.rank_process(1)
    t0 = time.monotonic()
    victim.send_signal(signal.SIGSTOP)
    survivor.wait(timeout=timeout_s + 120)
    dt = time.monotonic() - t0
    _, _, err = job.finish()
    named = next((line for line in err.splitlines() if line.startswith("error:")), "")
    return {"scenario": "freeze", "seconds": dt,
            "detail": f"parallel.timeout_s={timeout_s:g}; rank 0 said: {named[:90]}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--timeout-s", type=float, default=30.0, help="parallel.timeout_s of the freeze scenario")
    ap.add_argument("--scenarios", default="save,preempt,kill9,freeze")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    base = [f"seq_len={args.seq_len}", "eval_every=0", "eval_batches=1", "logging.stats_every=0",
            "trainer.ckpt_every=4", "data.val_fraction=0.1"]
    from kernels.cpu import describe

    cpu = describe()
    print("\n".join(f"# {line}" for line in cpu.splitlines()), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scenarios.split(","):
            fn = {"save": scenario_save, "preempt": scenario_preempt, "kill9": scenario_kill9,
                  "freeze": lambda t, b: scenario_freeze(t, b, args.timeout_s)}[name]
            rows.append(fn(Path(tmp), base))
            print(f"{rows[-1]['scenario']:<8} {rows[-1]['seconds']:8.2f} s  {rows[-1]['detail']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "seq_len": args.seq_len, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
