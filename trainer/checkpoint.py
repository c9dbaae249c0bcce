"""Checkpoints: DeepSpeed's engine state plus the sampler, RNG and step, one directory per step.

    <trainer.ckpt_dir>/step_00000300/   DeepSpeed's files (model, optimizer, LR schedule, client state)
                                        + meta.json, written by rank 0 after every rank has saved

A directory without ``meta.json`` is incomplete (the run died while saving) and is never resumed
from. ``trainer.resume=auto`` takes the complete checkpoint with the highest step; ``PATH`` is one
checkpoint directory or a directory of them (its latest complete one).

Resuming with another sequence-parallel size. The model and optimizer state do not depend on how
a sequence is sharded, and the sampler's state is (epoch, step), so an SP=2 checkpoint resumes at
SP=1 and vice versa — within these limits, checked before any process group starts:

- the same ZeRO stage (DeepSpeed's file layout differs between stages);
- ZeRO stage >= 1 partitions the optimizer over the gradient-reduce group (data x sequence ranks),
  so its size (world / tensor-parallel size) must stay the same; stage 0 has no such limit;
- the same seq_len, batch_size and data-parallel size (the sampler's windows depend on them).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainer.config import ConfigError, TrainConfig

META = "meta.json"


def tag(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories under ``ckpt_dir``, oldest first."""
    root = Path(ckpt_dir)
    found = [p for p in root.glob("step_*") if (p / META).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: json.loads((p / META).read_text())["step"])


def read_meta(path: Path) -> dict:
    return json.loads((path / META).read_text())


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint ``trainer.resume`` asks for (None: start fresh); ConfigError if unusable."""
    resume = cfg.trainer.resume
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(cfg.trainer.ckpt_dir)
        path = found[-1] if found else None
    else:
        path = Path(resume) if (Path(resume) / META).is_file() else None
        if path is None:
            found = complete_checkpoints(resume)
            if not found:
                raise ConfigError(f"trainer.resume: {resume!r} is neither a complete checkpoint (with {META}) nor "
                                  "a directory holding one; allowed: none, auto, or such a path")
            path = found[-1]
    if path is not None:
        check_compatible(read_meta(path), cfg, path)
    return path


def run_meta(cfg: TrainConfig, step: int) -> dict:
    return {"step": step, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "dp_size": cfg.dp_size,
            "sp_size": cfg.sp_size, "world_size": cfg.world_size, "zero_stage": cfg.parallel.zero_stage,
            "reduce_size": cfg.world_size // cfg.parallel.tensor_parallel_size}


def check_compatible(saved: dict, cfg: TrainConfig, path: Path) -> None:
    now = run_meta(cfg, saved["step"])
    keys = [("zero_stage", "parallel.zero_stage"), ("seq_len", "seq_len"), ("batch_size", "batch_size"),
            ("dp_size", "data-parallel size (world / sequence_parallel_size)")]
    if cfg.parallel.zero_stage > 0:
        keys.append(("reduce_size", "world size / tensor_parallel_size (ZeRO >= 1 partitions over it)"))
    for key, name in keys:
        if saved[key] != now[key]:
            raise ConfigError(f"trainer.resume: {path} was saved with {name}={saved[key]}, this run has "
                              f"{now[key]}; resume needs the same value")
    if saved["step"] > cfg.steps:
        raise ConfigError(f"steps: {path} is at step {saved['step']}, beyond steps={cfg.steps}; raise steps")


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(engine, cfg: TrainConfig, step: int, sampler, rank: int) -> Path:
    """Every rank writes its DeepSpeed files; then rank 0 marks the directory complete."""
    path = Path(cfg.trainer.ckpt_dir) / tag(step)
    client = {"step": step, "sampler": sampler.state_dict(), "rng": rng_state()}
    engine.save_checkpoint(cfg.trainer.ckpt_dir, tag=tag(step), client_state=client, save_latest=False)
    dist.barrier()  # every rank's files are on disk before the marker says so
    if rank == 0:
        tmp = path / f"{META}.tmp"
        tmp.write_text(json.dumps(run_meta(cfg, step), indent=1))
        tmp.replace(path / META)
    dist.barrier()
    return path


def load(engine, path: Path, sampler) -> int:
    """Restore engine, sampler and RNG from ``path``; returns the step it was saved at."""
    load_path, client = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise RuntimeError(f"trainer.resume: DeepSpeed found no checkpoint in {path}")
    sampler.load_state_dict(client["sampler"])
    set_rng_state(client["rng"])
    return int(client["step"])
