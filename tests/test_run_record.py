"""A job refused by the run directory's lock leaves that directory byte for byte as it was: Hydra
writes nothing there before the trainer holds the lock (hydra.output_subdir: null; the trainer
writes ``.hydra/*.yaml`` itself once the lock is its own; the log file is created on its first record)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.train_utils import SMALL, _env, train
from trainer.state import preflight


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_refused_job_leaves_the_running_jobs_directory_untouched(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run / ".hydra" / name).write_text(f"# the running job's {name}\n")
    (run / "train_rank0.log").write_text("the running job's log\n")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the running job
    try:
        holder = {"job": "running-job", "host": preflight.job_identity()["host"], "pid": sleeper.pid, "since": "now"}
        (run / ".lock").write_text(json.dumps(holder))
        before = snapshot(run)
        proc = train(*SMALL, "steps=2", "seed=7", f"hydra.run.dir={run}", env=_env(WANDB_MODE="disabled"),
                     check=False, timeout=120)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"config error: hydra.run.dir: {run} is in use by another job (pid "
                                                f"{sleeper.pid} on {holder['host']}, since now); give this run its "
                                                "own directory (logging.run_name=NAME or hydra.run.dir=DIR) or wait "
                                                "for that job to end"]
    assert snapshot(run) == before


def test_the_trainer_writes_the_hydra_record_after_the_lock(tmp_path):
    """A job that holds the lock records its config as Hydra would (here one refused right after, by
    a config error: the record is written before validation)."""
    run = tmp_path / "run"
    proc = train(*SMALL, "optim.lr=-1", f"hydra.run.dir={run}", env=_env(WANDB_MODE="disabled"), check=False)
    assert proc.returncode == 2 and "config error: optim.lr: must be > 0" in proc.stderr
    assert yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())[-1] == "optim.lr=-1"
    assert yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["optim"]["lr"] == -1
    assert yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text())["hydra"]["run"]["dir"] == str(run)
    assert not (run / ".lock").exists()  # released on the way out
