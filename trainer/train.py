"""Entry point: ``python -m trainer.train [overrides]`` or ``torchrun --nproc_per_node N -m trainer.train``.

Hydra composes ``conf/config.yaml``; ``--cfg job`` prints it, ``-m attention=window,longformer``
sweeps. The config is converted and validated (trainer/config.py) and the checkpoint to resume
is found before any process group starts: a bad setting exits with one line naming it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf


def launch_stamp() -> str:
    """``YYYY-MM-DD/HH-MM-SS``: under torchrun the launcher's start time (every rank of the job has
    the same parent process), so all ranks resolve the same run directory; otherwise now."""
    t = time.time()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        import psutil

        t = psutil.Process(os.getppid()).create_time()
    return time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(t))


OmegaConf.register_new_resolver("launch_stamp", launch_stamp, replace=True)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    from trainer import checkpoint, engine, loop
    from trainer.config import ConfigError, load_config

    engine.set_environment()
    try:
        cfg = load_config(dcfg)
        resume_from = checkpoint.resolve_resume(cfg)
    except ConfigError as e:
        if int(os.environ.get("RANK", 0)) == 0:  # every rank finds the same error; say it once
            print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    resolved = OmegaConf.to_container(dcfg, resolve=True)
    if int(os.environ.get("RANK", 0)) == 0:
        OmegaConf.save(resolved, run_dir / "config.yaml")
    summary = loop.run(cfg, resolved, run_dir, resume_from)
    if summary:
        print(summary, flush=True)


if __name__ == "__main__":
    main()
