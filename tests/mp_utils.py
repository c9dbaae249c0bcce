"""Run a function on N local gloo ranks and bring every rank's result (or traceback) back — never hang.

- ``fork`` start: the children inherit the parent's already-imported torch, megatron-core and
  DeepSpeed (importing megatron-core alone takes ~20 s on 2 cores; paying it per child would
  dominate the suite). Children use one intra-op thread (N ranks share 2 cores) and never touch the
  parent's OpenMP pool.
- Rendezvous through a ``FileStore`` in a temporary directory: no fixed ports, nothing to collide.
- Short timeouts everywhere: the process group's collective timeout (``collective_timeout_s``), an
  overall deadline after which every child is killed, and a short grace once any rank has failed.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import queue as queue_mod
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class WorkerError(AssertionError):
    """A rank raised, or did not report before the deadline."""


@functools.cache
def prepare_parent() -> None:
    """Import the heavy libraries (and build DeepSpeed's CPU comm op once) before forking."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import deepspeed.sequence.layer  # noqa: F401
    import megatron.core.parallel_state  # noqa: F401
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()  # compiled once into TORCH_EXTENSIONS_DIR (~1-2 min the very first time), then loaded


def _child(rank, world_size, store_path, collective_timeout_s, fn, args, results):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=collective_timeout_s))
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # report everything: the parent asserts on it
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn, world_size: int, *args, timeout_s: float = 180.0, collective_timeout_s: float = 60.0,
                grace_s: float = 10.0) -> list:
    """``[fn(rank, world_size, *args) for rank in ranks]``, each computed in its own process.

    Raises WorkerError with the tracebacks of failed ranks, or naming the ranks that did not report.
    """
    prepare_parent()
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_child, args=(r, world_size, store_path, collective_timeout_s, fn, args, results),
                             daemon=True) for r in range(world_size)]
        for p in procs:
            p.start()
        got, deadline = {}, time.monotonic() + timeout_s
        try:
            while len(got) < world_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    rank, ok, value = results.get(timeout=min(remaining, 1.0))
                except queue_mod.Empty:
                    continue
                got[rank] = (ok, value)
                if not ok:  # peers of a failed rank would only wait for their timeout
                    deadline = min(deadline, time.monotonic() + grace_s)
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
    failures = [f"rank {r}:\n{v}" for r, (ok, v) in sorted(got.items()) if not ok]
    missing = [r for r in range(world_size) if r not in got]
    if failures or missing:
        raise WorkerError("\n".join(failures + ([f"ranks {missing} did not report within the deadline"]
                                                if missing else [])))
    return [got[r][1] for r in range(world_size)]


def rank_failures(per_rank: list[dict], key: str) -> list[str]:
    """Every failure line the ranks reported under ``results[key]`` ({case: [lines]}), rank-prefixed:
    the assertion of the multi-process parity suites (empty when every case matched)."""
    return [f"rank {r}: {f}" for r, res in enumerate(per_rank) for fs in res[key].values() for f in fs]


def parity_suite(worker, sizes: list[int], timeout_s: float = 240.0):
    """A module-scoped fixture ``suite`` -> (P, per-rank results of ``worker``) for each P in ``sizes``:
    the multi-process parity suites run their worker once per world size and share the results."""
    import pytest

    @pytest.fixture(scope="module", params=sizes, ids=lambda p: f"P{p}")
    def suite(request):
        return request.param, run_workers(worker, request.param, timeout_s=timeout_s, collective_timeout_s=30)

    return suite


def assert_no_rank_failures(per_rank: list[dict], key: str) -> None:
    """The parity assertion: no rank reported a failure line under ``results[key]``."""
    failures = rank_failures(per_rank, key)
    assert not failures, "\n".join(failures)
