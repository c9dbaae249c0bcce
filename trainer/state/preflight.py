"""What is checked after the config and before any process group: the data, the run directory, the
checkpoint directory. Each failure is one ``ConfigError`` line (exit 2) before any compute.

- ``prepare_data``: the tokenizer and token cache are built here, before the process group's short
  collective timeout applies, under a file lock in the cache directory: the first process (of this
  job or another) builds, the others wait for it as long as it takes, and progress is printed. Then
  the split sizes are checked: enough windows of ``seq_len + 1`` tokens for one global batch
  (``batch_size`` × data-parallel size) in the training split and in the validation split.
- ``RunDirLock``: one job per run directory. ``<run_dir>/.lock`` names the job (torchrun's run id,
  or the process), its host and pid; another job finds it and is refused. A lock whose process is
  gone (same host) is stale and broken with a warning line.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.config.validate import ConfigError, TrainConfig
from trainer.data.corpus import DEFAULT_CACHE_DIR, DataConfigError, corpus_of
from trainer.data.sampling import min_windows


@dataclass(frozen=True)
class DataFacts:
    n_train: int  # tokens of the training split
    n_val: int


def _say(rank: int, line: str, stream=None) -> None:
    if rank == 0:
        print(line, file=stream or sys.stderr, flush=True)


def prepare_data(cfg: TrainConfig, rank: int) -> DataFacts:
    """Build or verify the token cache (see the module docstring); the split sizes."""
    d = cfg.data
    cache_dir = Path(d.cache_dir) if d.cache_dir is not None else DEFAULT_CACHE_DIR
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = open(cache_dir / ".prepare.lock", "a")
    except OSError as e:
        raise ConfigError(f"data.cache_dir: cannot write to {cache_dir}: [Errno {e.errno}] {e.strerror}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"rank {rank}: data: waiting for another process preparing {cache_dir}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        t0 = time.perf_counter()
        try:
            corpus = corpus_of(d)
        except DataConfigError as e:
            raise ConfigError(str(e)) from None
        if not corpus.cache_hit:
            _say(rank, f"data: tokenized {corpus.n_documents} documents into {corpus.cache_path} "
                       f"({len(corpus.train) + len(corpus.val):,} tokens) in {time.perf_counter() - t0:.1f} s",
                 sys.stdout)  # progress, not a problem: stderr stays for errors and warnings
    facts = DataFacts(len(corpus.train), len(corpus.val))
    if getattr(d, "task", "text") == "text":
        check_windows(cfg, facts)
    return facts


def check_windows(cfg: TrainConfig, facts: DataFacts) -> None:
    """The rule of ``LongDocSampler``: the epoch offset may cost up to seq_len tokens, and every
    window holds seq_len + 1 of them."""
    need = cfg.batch_size * cfg.dp_size
    for split, n, fix in (("training", facts.n_train, "a smaller batch_size or seq_len, or more data (data.path)"),
                          ("validation", facts.n_val, "a larger data.val_fraction, or more data")):
        windows = min_windows(n, cfg.seq_len)
        if windows < need:
            key = "data.val_fraction" if split == "validation" else "batch_size" if windows else "data.path"
            raise ConfigError(f"{key}: the {split} split has {n:,} tokens: {windows} windows of seq_len={cfg.seq_len} "
                              f"+ 1, fewer than one global batch of {need} (batch_size={cfg.batch_size} x "
                              f"data-parallel size {cfg.dp_size}); use {fix}")


# --- one job per run directory ----------------------------------------------------------------------

def job_identity() -> dict:
    """Who this job is: torchrun's run id (shared by every rank, node and restart of one job), its
    launcher's pid on this host; without a launcher, this process."""
    launched = "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ
    pid = os.getppid() if launched else os.getpid()
    job = os.environ.get("TORCHELASTIC_RUN_ID") or f"{socket.gethostname()}:{pid}"
    return {"job": job, "host": socket.gethostname(), "pid": pid, "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunDirLock:
    """``<run_dir>/.lock``; see the module docstring. ``release`` removes it if it is this job's."""

    def __init__(self, run_dir: Path, rank: int):
        self.path, self.me = Path(run_dir) / ".lock", job_identity()
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock broken by another process at the same moment: look again
            if self._try_create():
                return
            holder = self._read()
            if holder is None:  # removed meanwhile
                continue
            if not holder.get("job"):  # not a lock this trainer wrote (half-written by a crash, edited)
                _say(rank, f"warning: {self.path} is unreadable; breaking it")
                self.path.unlink(missing_ok=True)
                continue
            if holder.get("job") == self.me["job"]:
                return  # another rank of this job, or this job after a torchrun restart
            if holder.get("host") == self.me["host"] and not _alive(int(holder.get("pid", -1))):
                _say(rank, f"warning: {self.path}: breaking the stale lock of job {holder.get('job')} (pid "
                           f"{holder.get('pid')} on {holder.get('host')} is gone)")
                self.path.unlink(missing_ok=True)
                continue
            raise ConfigError(f"hydra.run.dir: {self.path.parent} is in use by another job (pid {holder.get('pid')} on "
                              f"{holder.get('host')}, since {holder.get('since')}); give this run its own directory "
                              "(logging.run_name=NAME or hydra.run.dir=DIR) or wait for that job to end")
        raise ConfigError(f"hydra.run.dir: could not take the lock {self.path}; remove it if no job uses the directory")

    def _try_create(self) -> bool:
        """Atomic create-if-absent of a complete file: written aside, then hard-linked into place."""
        tmp = self.path.with_name(f".lock.{os.getpid()}")
        tmp.write_text(json.dumps(self.me))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def release(self) -> None:
        holder = self._read()
        if holder is not None and holder.get("job") == self.me["job"]:
            self.path.unlink(missing_ok=True)
