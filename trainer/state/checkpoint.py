"""Checkpoints: DeepSpeed's engine state plus the sampler, RNG and step, one directory per step.

    <trainer.ckpt_dir>/step_00000300/   DeepSpeed's files (model, optimizer, LR schedule, client state)
                                        + meta.json (run settings, model shape, every file's size)

Atomic: every rank writes into ``.step_00000300.tmp/``; after all have finished, rank 0 writes
``meta.json`` there and renames the directory to ``step_00000300`` (one rename: it is there whole
or not at all). A run killed while saving leaves only the ``.tmp`` directory, which is never
resumed from (and is replaced by the next save of that step). ``trainer.resume=auto`` takes the
newest checkpoint that checks out (``meta.json`` readable, every file present with its recorded
size); a corrupt newest one is skipped with a warning, falling back to the one before.
``PATH`` is one checkpoint directory or a directory of them (its newest good one).

After a torchrun restart (``--max-restarts``; ``TORCHELASTIC_RESTART_COUNT > 0``) ``resume=none``
acts as ``auto``: the restarted group continues from the run's own last checkpoint.

Resuming with another sequence-parallel size. The model and optimizer state do not depend on how
a sequence is sharded, and the sampler's state is (epoch, step), so an SP=2 checkpoint resumes at
SP=1 and vice versa — within these limits, checked before any process group starts:

- the same ZeRO stage (DeepSpeed's file layout differs between stages);
- ZeRO stage >= 1 partitions the optimizer over the gradient-reduce group (data x sequence ranks),
  so its size (world / tensor-parallel size) must stay the same; stage 0 has no such limit;
- the same seq_len, batch_size and data-parallel size (the sampler's windows depend on them);
- the same model shape (every model.* size; the attention pattern may change, it has no weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainer.config.validate import ConfigError, TrainConfig
from trainer.data import integrity
from trainer.state import safe_load
from trainer.state.faults import TrainingAborted

META = "meta.json"
SCHEMA = 2  # 1: files -> size; 2: files -> {size, sha256}
# The model settings that decide the weights' shapes (rope_theta, norm_eps, checkpointing may change).
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "multiple_of", "tie_embeddings",
              "n_learned_global")


def tag(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Checkpoint directories under ``ckpt_dir`` that have a ``meta.json``, oldest first (by name:
    the tag is the zero-padded step). Whether they are intact is ``problem``'s question."""
    root = Path(ckpt_dir)
    return sorted(p for p in root.glob("step_*") if (p / META).is_file()) if root.is_dir() else []


def read_meta(path: Path) -> dict:
    return json.loads((path / META).read_text())


def problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from (None: it checks out): ``meta.json``
    unreadable or not of this schema, a file missing, of another size or another sha256."""
    try:
        meta = read_meta(path)
        if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
            raise ValueError(f"not a checkpoint record: {str(meta)[:60]}")
        step, schema = int(meta["step"]), int(meta.get("schema", 1))
        if schema > SCHEMA:
            raise ValueError(f"schema {schema}, this trainer reads <= {SCHEMA}")
        files = {name: rec if isinstance(rec, dict) else {"size": rec} for name, rec in meta["files"].items()}
        sizes = {name: int(rec["size"]) for name, rec in files.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{META} is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if step != int(path.name.removeprefix("step_")):
        return f"{META} says step {step}, the directory name another"
    for name, size in sizes.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    for name, rec in files.items():  # schema 1 (before checksums) recorded sizes only
        if "sha256" in rec and integrity.sha256_file(path / name) != rec["sha256"]:
            return f"{name} has other bytes than were written (sha256 differs)"
    return None


def newest_intact(candidates: list[Path], warn: bool) -> Path | None:
    """The newest checkpoint of ``candidates`` (oldest first) without a problem; each corrupt one
    skipped on the way is reported on stderr (once per job: ``warn`` on rank 0 only)."""
    for path in reversed(candidates):
        why = problem(path)
        if why is None:
            return path
        if warn:
            print(f"warning: checkpoint {path} is corrupt ({why}); falling back to the one before it",
                  file=sys.stderr, flush=True)
    return None


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint ``trainer.resume`` asks for (None: start fresh); ConfigError if unusable."""
    resume = cfg.trainer.resume
    if resume == "none" and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        resume = "auto"  # a restarted torchrun group continues from its own last checkpoint
    if resume == "none":
        return None
    warn = int(os.environ.get("RANK", "0")) == 0
    if resume == "auto":
        found = complete_checkpoints(cfg.trainer.ckpt_dir)
        path = newest_intact(found, warn)
        if found and path is None:
            raise ConfigError(f"trainer.resume: every checkpoint in {cfg.trainer.ckpt_dir} is corrupt (see the "
                              "warnings); resume=none starts over")
    else:
        single = (Path(resume) / META).is_file()
        found = [Path(resume)] if single else complete_checkpoints(resume)
        if not found:
            raise ConfigError(f"trainer.resume: {resume!r} is neither a complete checkpoint (with {META}) nor "
                              "a directory holding one; allowed: none, auto, or such a path")
        path = newest_intact(found, warn and not single)
        if path is None:
            raise ConfigError(f"trainer.resume: {resume} is corrupt: {problem(found[-1])}")
    if path is not None:
        check_compatible(read_meta(path), cfg, path)
        safe_load.check_checkpoint(path)  # a file whose pickle would run code: refused before any process group
    return path


def run_meta(cfg: TrainConfig, step: int) -> dict:
    return {"step": step, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "dp_size": cfg.dp_size,
            "sp_size": cfg.sp_size, "world_size": cfg.world_size, "zero_stage": cfg.parallel.zero_stage,
            "reduce_size": cfg.world_size // cfg.parallel.tensor_parallel_size,
            "model": {k: v for k, v in dataclasses.asdict(cfg.model_config()).items() if k in SHAPE_KEYS}}


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
    if "model" in saved and saved["model"] != now["model"]:
        diff = [f"{k}={saved['model'][k]} (this run {now['model'].get(k)})" for k in saved["model"]
                if saved["model"][k] != now["model"].get(k)]
        raise ConfigError(f"trainer.resume: {path} holds a model of another shape: {', '.join(diff)}; resume needs "
                          "the same model.* sizes (the attention pattern may differ)")
    if saved["step"] > cfg.steps:
        raise ConfigError(f"steps: {path} is at step {saved['step']}, beyond steps={cfg.steps}; raise steps")


def check_data(path: Path, cfg: TrainConfig, n_train: int) -> None:
    """The sampler's state counts windows of this training split: resuming on other data would
    continue with other windows (and break at load, after the setup). Checked in the preflight."""
    saved = (read_meta(path).get("data") or {}).get("n_tokens")
    if saved is not None and getattr(cfg.data, "task", "text") == "text" and saved != n_train:
        raise ConfigError(f"trainer.resume: {path} was trained on a training split of {saved:,} tokens, this run's "
                          f"data gives {n_train:,}; resume needs the same data (data.path, data.tokenizer, "
                          "data.val_fraction)")


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(engine, cfg: TrainConfig, step: int, sampler, rank: int) -> Path:
    """Every rank writes its DeepSpeed files into ``.step_N.tmp``; rank 0 then adds ``meta.json``
    and renames the directory into place (``ckpt_dir`` must be on storage every node shares).

    A rank whose write fails (disk full, I/O error) removes the temporary directory and raises
    TrainingAborted naming the path and the error; the published checkpoints are not touched. Its
    peers learn of it through the failed collective that follows (``faults.Liveness``)."""
    root = Path(cfg.trainer.ckpt_dir)
    final, tmp = root / tag(step), root / f".{tag(step)}.tmp"
    try:
        if rank == 0 and tmp.exists():
            shutil.rmtree(tmp)  # left by a run that died while saving this step
        dist.barrier()
        client = {"step": step, "sampler": sampler.state_dict(), "rng": rng_state()}
        engine.save_checkpoint(str(root), tag=tmp.name, client_state=client, save_latest=False)
        dist.barrier()  # every rank's files are on disk before the directory is published
        if rank == 0:
            _publish(tmp, final, {**run_meta(cfg, step), "data": {"n_tokens": client["sampler"].get("n_tokens")}})
        dist.barrier()
    except BaseException as e:
        # Not published: whatever this rank finds in .tmp is garbage. Every rank removes it (a slower
        # peer may have created the directory again after the failing rank removed it).
        why = _describe_write_error(e, root) if _is_write_error(e) else None  # before the removal frees space
        shutil.rmtree(tmp, ignore_errors=True)
        if why is None:
            raise  # e.g. a collective that failed because a peer's write did: the loop diagnoses it
        kept = complete_checkpoints(root)
        raise TrainingAborted(f"rank {rank}: saving checkpoint step {step} failed: {why}; "
                              f"removed {tmp}; the published checkpoints are untouched (newest: "
                              f"{kept[-1] if kept else 'none'})") from None
    if rank == 0 and cfg.trainer.keep_last:
        for old in complete_checkpoints(root)[:-cfg.trainer.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


# torch.save's zip writer reports a failed write as a RuntimeError without an errno.
_WRITER_ERRORS = ("PytorchStreamWriter", "file write failed", "inline_container", "iostream error")


def _is_write_error(e: BaseException) -> bool:
    return isinstance(e, OSError) or any(marker in str(e) for marker in _WRITER_ERRORS)


def _describe_write_error(e: BaseException, root: Path) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        return f"[Errno {e.errno}] {errno.errorcode.get(e.errno, '?')}: {e.strerror} ({e.filename or root})"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    free = _free_bytes(root)
    # Less room left than one write buffer: the writer ran out of space (what errno 28 would say).
    full = f"; [Errno {errno.ENOSPC}] ENOSPC: {free} bytes free on {root}" if free is not None and free < 1 << 16 else ""
    return f"writing into {root} failed: {first}{full}"


def check_writable(cfg: TrainConfig, model_params: int) -> None:
    """Before any process group: ``trainer.ckpt_dir`` can be created and written, and has room for
    one checkpoint (weights + Adam's two moments: 12 bytes per fp32 parameter, a lower bound)."""
    root = Path(cfg.trainer.ckpt_dir)
    probe = root / f".write_probe.{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ConfigError(f"trainer.ckpt_dir: cannot write to {root}: [Errno {e.errno}] {e.strerror}; it must be a "
                          "writable directory (checkpoints and stop-signal saves go there)") from None
    finally:
        with contextlib.suppress(OSError):  # nothing to remove when the write failed
            probe.unlink()
    need, free = 12 * model_params, _free_bytes(root)
    if free is not None and free < need:
        raise ConfigError(f"trainer.ckpt_dir: {root} has {free / 2**20:.1f} MiB free, one checkpoint of this model "
                          f"needs at least {need / 2**20:.1f} MiB; free some space or point trainer.ckpt_dir elsewhere")


def _publish(tmp: Path, final: Path, meta: dict) -> None:
    meta["schema"] = SCHEMA
    meta["files"] = {str(f.relative_to(tmp)): {"size": f.stat().st_size, "sha256": integrity.sha256_file(f)}
                     for f in sorted(tmp.rglob("*")) if f.is_file()}
    with open(tmp / META, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    old = final.with_name(f".{final.name}.old")
    if final.exists():  # a corrupt checkpoint of this step, skipped at resume: replaced
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load(engine, path: Path, sampler) -> int:
    """Restore engine, sampler and RNG from ``path``; returns the step it was saved at. Every file
    is read with ``weights_only=True`` (safe_load: a crafted pickle is refused, never run)."""
    safe_load.install(engine)
    load_path, client = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise RuntimeError(f"trainer.resume: DeepSpeed found no checkpoint in {path}")
    sampler.load_state_dict(client["sampler"])
    set_rng_state(client["rng"])
    return int(client["step"])
