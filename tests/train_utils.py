"""Running the trainer as real processes (python -m / torchrun) in tests: environment, deadline, metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.proc import run_process_group

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
TORCHRUN = str(Path(PY).with_name("torchrun"))
# A window narrower than the sequence (a wider one is refused as dense attention in disguise).
SMALL = ["seq_len=512", "attention.window_left=128", "batch_size=1", "eval_batches=1", "logging.stats_every=2",
         "parallel.timeout_s=30",
         "optim.warmup_steps=2"]


def _env(**extra) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), HYDRA_FULL_ERROR="0")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HALO_RUN_DIR"):
        env.pop(key, None)
    env.update(extra)
    return env


def train(*overrides: str, nproc: int = 1, timeout: float = 180, env: dict | None = None, check: bool = True,
          torchrun_args: tuple[str, ...] = ()):
    """Run the trainer (torchrun when nproc > 1); the CompletedProcess, stdout and stderr as text."""
    launcher = ([TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *torchrun_args, "-m"] if nproc > 1
                else [PY, "-m"])
    try:
        proc = run_process_group([*launcher, "trainer.train", *overrides], cwd=REPO, env=env or _env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"trainer did not finish within {timeout} s; its process group was killed")
    if check and proc.returncode != 0:
        pytest.fail(f"trainer exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def rows(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl of a run, by step."""
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


class Payload:
    """Unpickling this runs ``touch MARKER`` (what any crafted checkpoint could do instead)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)
