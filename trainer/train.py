"""Entry point: ``python -m trainer.train [overrides]`` or ``torchrun --nproc_per_node N -m trainer.train``.

Hydra composes ``conf/config.yaml``; ``--cfg job`` prints it, ``-m attention=window,longformer``
sweeps. The config is converted and validated (trainer/config/validate.py) and the checkpoint to resume
is found before any process group starts: a bad setting exits with one line naming it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf


def launch_stamp() -> str:
    """``YYYY-MM-DD/HH-MM-SS-PID``: under a launcher (torchrun, the deepspeed launcher: it sets RANK)
    the start time and pid of the parent process, which every local rank shares, so they resolve the
    same run directory; otherwise now and this process. The pid keeps two jobs started in the same
    second apart. Ranks on other nodes have other parents: multi-node launches set HALO_RUN_DIR
    (launch/*.sh)."""
    t, pid = time.time(), os.getpid()
    if "RANK" in os.environ:
        import psutil

        pid = os.getppid()
        t = psutil.Process(pid).create_time()
    return time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(t)) + f"-{pid}"


def run_dir_of(run_name: str | None) -> str:
    """The default run directory: ``outputs/<logging.run_name>`` when the run is named (one stable
    folder, so ``trainer.resume=auto`` with the same name continues it), else ``outputs/<stamp>``."""
    return f"outputs/{run_name}" if run_name else f"outputs/{launch_stamp()}"


OmegaConf.register_new_resolver("launch_stamp", launch_stamp, replace=True)
OmegaConf.register_new_resolver("run_dir_of", run_dir_of, replace=True)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    from trainer import engine, loop
    from trainer.config.redact import loggable
    from trainer.config.validate import ConfigError, load_config
    from trainer.state import checkpoint, faults, preflight
    from trainer.state.faults import TrainingAborted, write_status

    engine.set_environment()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    rank = int(os.environ.get("RANK", 0))
    try:  # before anything of this run is written there: the directory may be another job's
        lock = preflight.RunDirLock(run_dir, rank)
    except ConfigError as e:
        faults.config_error(str(e), None)
    for handler in logging.getLogger().handlers:  # the per-rank log file (delay: true), now that it is ours
        if isinstance(handler, logging.FileHandler):
            Path(handler.baseFilename).touch()
    if rank == 0:
        write_hydra_record(dcfg, run_dir)
    try:
        cfg = load_config(dcfg)
    except ConfigError as e:
        lock.release() if rank == 0 else None
        faults.config_error(str(e), run_dir)
    try:
        resume_from = checkpoint.resolve_resume(cfg)
        facts = preflight.prepare_data(cfg, rank)
        checkpoint.check_writable(cfg, engine.count_params(cfg))
        if resume_from is not None:
            checkpoint.check_data(resume_from, cfg, facts.n_train)
    except ConfigError as e:
        lock.release() if rank == 0 else None
        faults.config_error(str(e), run_dir)
    if rank == 0 and cfg.trainer.resume != "none":
        print(f"resuming from {resume_from} (step {checkpoint.read_meta(resume_from)['step']})" if resume_from else
              f"trainer.resume={cfg.trainer.resume}: no checkpoint in {cfg.trainer.ckpt_dir}; starting at step 0",
              file=sys.stderr, flush=True)
    resolved = loggable(dcfg)  # what config.yaml and W&B get: nothing read from the environment, no secret
    if rank == 0:
        OmegaConf.save(resolved, run_dir / "config.yaml")
    try:
        summary = loop.run(cfg, resolved, run_dir, resume_from)
    except TrainingAborted as e:  # every rank that sees it says it: the rank is in the message
        print(f"error: {e}", file=sys.stderr, flush=True)
        write_status(run_dir, "aborted", error=str(e))
        sys.exit(1)
    finally:
        if rank == 0:
            lock.release()
    if summary:
        print(summary, flush=True)


def write_hydra_record(dcfg: DictConfig, run_dir: Path) -> None:
    """``.hydra/config.yaml`` (as composed, interpolations kept; credential-like keys redacted),
    ``hydra.yaml`` and ``overrides.yaml``: what Hydra writes itself before the job, written here once
    the run directory's lock is this job's (conf/config.yaml sets hydra.output_subdir: null)."""
    from trainer.config.redact import unresolved

    record = run_dir / ".hydra"
    record.mkdir(parents=True, exist_ok=True)
    hydra_cfg = HydraConfig.get()
    OmegaConf.save(unresolved(dcfg), record / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), record / "hydra.yaml")
    OmegaConf.save(hydra_cfg.overrides.task, record / "overrides.yaml")


def preflight(argv: list[str]) -> str | None:
    """The command line's composition error in one line (``trainer.config.compose``); None if it composes."""
    from trainer.config.compose import composition_error

    return composition_error(argv, "config")


if __name__ == "__main__":
    if (problem := preflight(sys.argv[1:])) is not None:
        from trainer.state import faults

        faults.config_error(problem, os.environ.get("HALO_RUN_DIR"))  # no Hydra run dir yet: the launcher's, if any
    main()
