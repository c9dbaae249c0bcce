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
    from trainer.state import checkpoint, preflight
    from trainer.state.faults import TrainingAborted, write_status

    engine.set_environment()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    rank = int(os.environ.get("RANK", 0))
    try:  # before anything of this run is written there: the directory may be another job's
        lock = preflight.RunDirLock(run_dir, rank)
    except ConfigError as e:
        config_error(str(e), None)
    for handler in logging.getLogger().handlers:  # the per-rank log file (delay: true), now that it is ours
        if isinstance(handler, logging.FileHandler):
            Path(handler.baseFilename).touch()
    if rank == 0:
        write_hydra_record(dcfg, run_dir)
    try:
        cfg = load_config(dcfg)
    except ConfigError as e:
        lock.release() if rank == 0 else None
        config_error(str(e), run_dir)
    try:
        resume_from = checkpoint.resolve_resume(cfg)
        facts = preflight.prepare_data(cfg, rank)
        checkpoint.check_writable(cfg, engine.count_params(cfg))
        if resume_from is not None:
            checkpoint.check_data(resume_from, cfg, facts.n_train)
    except ConfigError as e:
        lock.release() if rank == 0 else None
        config_error(str(e), run_dir)
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


def config_error(message: str, run_dir: str | Path | None) -> None:
    """Say it once (every rank finds the same error), leave status.json, exit 2."""
    from trainer.state.faults import write_status

    if int(os.environ.get("RANK", 0)) == 0:
        print(f"config error: {message}", file=sys.stderr)
    write_status(run_dir, "config_error", error=message)
    sys.exit(2)


# Hydra flags that take a value (the value is not an override).
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"}


def preflight(argv: list[str]) -> str | None:
    """Compose the config with the command line's overrides as Hydra is about to, and turn a
    composition error (an unknown option of a group, a key that is not in the config, an override
    that does not parse) into one line; None when it composes. Hydra's own report of these is
    several lines with a hint about HYDRA_FULL_ERROR. Sweeps (-m) and custom config paths are left
    to Hydra."""
    overrides, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _VALUE_FLAGS:
            skip = True
        elif arg in ("-m", "--multirun") or arg.startswith(("--config", "-cp", "-cn", "-cd")):
            return None
        elif not arg.startswith("-") and not arg.lstrip("+~").startswith("hydra."):
            overrides.append(arg)
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException

    try:
        with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
            compose(config_name="config", overrides=overrides)
    except MissingConfigException as e:  # attention=foo / model=huge
        return _missing_option(e)
    except Exception as e:  # noqa: BLE001 - any composition error is reported, in one line
        return _composition_error(e, overrides)
    return None


def _missing_option(e) -> str:
    import re

    m = re.search(r"Could not find '([^']+)'", str(e))
    group, _, option = (m.group(1) if m else "").rpartition("/")
    allowed = ", ".join(o for o in (e.options or []) if not o.startswith("_"))
    if group:
        return f"{group}={option}: unknown {group} option; allowed: {allowed}"
    return str(e).strip().splitlines()[0]


def _composition_error(e: Exception, overrides: list[str]) -> str:
    import difflib
    import re

    text = str(e).strip()
    m = re.match(r"Could not override '([^']+)'", text)
    if not m:  # a syntax error: Hydra's message names no override, so name them
        return f"{' '.join(overrides)}: {' '.join(text.split())[:300]}"
    key = m.group(1)
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        base = OmegaConf.to_container(compose(config_name="config"), resolve=False)

    def flat(node, prefix=""):
        for k, v in node.items():
            yield f"{prefix}{k}"
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")

    close = difflib.get_close_matches(key, list(flat(base)), n=1)
    return f"{key}: not a key of the config" + (f"; did you mean {close[0]}?" if close else "")


if __name__ == "__main__":
    if (problem := preflight(sys.argv[1:])) is not None:
        config_error(problem, os.environ.get("HALO_RUN_DIR"))  # no Hydra run dir yet: the launcher's, if any
    main()
