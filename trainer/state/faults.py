"""What clusters do to a training job, and how the loop answers.

- ``StopSignals``: SIGTERM / SIGUSR1 (preemption, SLURM's ``--signal``) set a flag; the loop agrees
  on it across ranks after every step (one one-element all-reduce), saves a checkpoint and exits 0.
  Any one rank receiving the signal is enough: the ranks never disagree on where they stop.
- ``Liveness``: a daemon thread per rank bumps a counter in the launcher's rendezvous store every
  second. When a collective fails (the process group's timeout, or a peer's socket closing), the
  survivor reads the counters twice; the ranks whose counter stood still are the ones that stopped
  answering, and the error names them with the last step they completed.
- ``NonFiniteGuard``: a NaN/inf loss skips the step (no backward, no optimizer step) and counts it;
  ``trainer.max_consecutive_nonfinite`` in a row abort with a message.
- ``FaultInjection``: ``HALO_FAULT=kind@step[:rank=R]`` makes a rank fail on purpose after a step,
  on the first attempt of a torchrun group only (``TORCHELASTIC_RESTART_COUNT=0``), so the tests
  (and anyone checking a cluster setup) can kill, freeze or poison a real run. Kinds: ``kill``
  (SIGKILL itself), ``freeze`` (SIGSTOP itself: alive but silent), ``nan`` (the loss of the step
  becomes NaN; ``nan@3-5`` for a range), ``nangrad`` (one gradient of the step becomes NaN, the loss stays finite), ``sigterm``/``sigusr1`` (signal itself).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


class TrainingAborted(RuntimeError):
    """The run cannot continue; the message is one line saying why and what to do."""


def write_status(run_dir: str | os.PathLike | None, state: str, **info) -> None:
    """``<run_dir>/status.json``: how the run ended, for schedulers (launch/slurm.sbatch requeues
    a ``stopped`` or ``aborted`` run, not a ``finished`` one or a ``config_error``). Rank 0 only."""
    if run_dir is None or int(os.environ.get("RANK", "0")) != 0:
        return
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "status.json"), "w") as f:
        json.dump({"state": state, **info}, f)


def config_error(message: str, run_dir: str | os.PathLike | None) -> None:
    """Say it once (every rank finds the same error), leave status.json, exit 2."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"config error: {message}", file=sys.stderr)
    write_status(run_dir, "config_error", error=message)
    sys.exit(2)


# --- preemption signals -----------------------------------------------------------------------------

class StopSignals:
    """SIGTERM/SIGUSR1/SIGINT handlers that only record the signal; ``agreed`` is collective.

    Ctrl-C (SIGINT, which a terminal sends to torchrun and every rank) stops like a preemption: the
    step finishes, a checkpoint is saved. A second Ctrl-C exits at once, without one."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._first_sigint: float | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)

    # torchrun forwards the SIGINT it gets to its workers, which also got the terminal's own: one
    # Ctrl-C arrives twice within milliseconds. A SIGINT this long after the first is a second one.
    REPEAT_S = 1.0

    def _handler(self, signum, _frame) -> None:
        if signum == signal.SIGINT:
            if self._first_sigint is not None and time.monotonic() - self._first_sigint > self.REPEAT_S:
                print(f"rank {os.environ.get('RANK', '0')}: interrupted again: exiting now, without a checkpoint",
                      file=sys.stderr, flush=True)
                os._exit(130)  # 128 + SIGINT, the shell's convention
            self._first_sigint = self._first_sigint or time.monotonic()
        if self.received is None:
            self.received = signal.Signals(signum).name

    def agreed(self, device) -> bool:
        """True on every rank when any rank received a stop signal (a collective: call on all ranks)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# --- liveness of the peers --------------------------------------------------------------------------

def _attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


class Liveness:
    """Per-rank heartbeat counters in the rendezvous store (the launcher's TCPStore at
    MASTER_ADDR:MASTER_PORT: torchrun's agent hosts it, so it outlives a dead rank). Keys carry the
    torchrun attempt, so a restarted group never reads its predecessor's counters."""

    INTERVAL_S = 1.0

    def __init__(self, rank: int, world_size: int, timeout_s: float):
        self.rank, self.world_size = rank, world_size
        self.prefix = f"haloformer/liveness/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{_attempt()}"
        self.store = None
        self._stop = threading.Event()
        if world_size > 1 and "MASTER_ADDR" in os.environ:
            self.store = self._connect(min(timeout_s, 30.0))
            self.store.set(self._key("step", rank), "0")
            threading.Thread(target=self._beat, name="haloformer-liveness", daemon=True).start()

    @staticmethod
    def _connect(timeout_s: float):
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=timeout_s), wait_for_workers=False)

    def _key(self, what: str, rank: int) -> str:
        return f"{self.prefix}/{what}/{rank}"

    def _beat(self) -> None:
        key = self._key("beat", self.rank)
        while not self._stop.is_set():
            try:
                self.store.add(key, 1)
            except Exception:  # the store is gone (its host died): nothing left to tell anyone
                return
            self._stop.wait(self.INTERVAL_S)

    def completed(self, step: int) -> None:
        if self.store is not None:
            self.store.set(self._key("step", self.rank), str(step))

    def _counters(self, store) -> dict[int, int | None]:
        keys = [self._key("beat", r) for r in range(self.world_size)]
        return {r: (store.add(k, 0) if store.check([k]) else None) for r, k in enumerate(keys)}

    def silent_ranks(self) -> tuple[list[int], dict[int, str]]:
        """(ranks whose heartbeat stood still over ~3 intervals, last completed step per rank).
        Raises OSError/RuntimeError when the store itself cannot be reached."""
        store = self._connect(10.0)  # a fresh connection: the old one may be stuck in a failed call
        before = self._counters(store)
        time.sleep(3 * self.INTERVAL_S)
        after = self._counters(store)
        silent = [r for r in range(self.world_size)
                  if r != self.rank and (after[r] is None or after[r] == before[r])]
        steps = {}
        for r in silent:
            k = self._key("step", r)
            steps[r] = store.get(k).decode() if store.check([k]) else "none"
        return silent, steps

    def report_error(self, line: str) -> None:
        """Leave this rank's one-line error in the store, so that a peer whose next collective fails
        because of it says this rank raised, not that it stopped answering."""
        if self.store is not None:
            try:
                self.store.set(self._key("error", self.rank), line[:500])
            except Exception:  # noqa: BLE001 - the store is gone: the peers will say so themselves
                pass

    def peer_errors(self, store) -> dict[int, str]:
        keys = {r: self._key("error", r) for r in range(self.world_size) if r != self.rank}
        return {r: store.get(k).decode() for r, k in keys.items() if store.check([k])}

    def diagnose(self, error: BaseException) -> TrainingAborted | None:
        """The one-line error naming the peers that raised (their own line) or stopped answering, or
        None when every peer is alive and well (then ``error`` was something else and is re-raised)."""
        if self.store is None:
            return None
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        try:
            raised = self.peer_errors(self._connect(10.0))
        except Exception:  # noqa: BLE001 - unreachable store: handled below
            raised = {}
        if raised:
            who = "; ".join(f"rank {r} failed: {line}" for r, line in sorted(raised.items()))
            return TrainingAborted(f"rank {self.rank}: {who}")
        try:
            silent, steps = self.silent_ranks()
        except Exception:  # noqa: BLE001 - the store is unreachable: its host (torchrun's node 0) is gone
            addr = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            return TrainingAborted(f"rank {self.rank}: a collective failed ({first}) and the rendezvous store at "
                                   f"{addr} does not answer: the node hosting it (rank 0's) stopped answering")
        if not silent:
            return None
        who = ", ".join(f"rank {r} (last completed step {steps[r]})" for r in silent)
        return TrainingAborted(f"rank {self.rank}: {who} stopped answering; a collective failed after at most "
                               f"parallel.timeout_s: {first}")

    def close(self) -> None:
        self._stop.set()


# --- non-finite losses and gradients ---------------------------------------------------------------------------

@dataclass
class NonFiniteGuard:
    max_consecutive: int
    skipped: int = 0  # steps skipped in all, for either reason
    skipped_grad: int = 0  # of them: a finite loss whose gradient was not finite
    in_a_row: int = 0

    def check(self, loss: float, step: int, what: str = "loss") -> bool:
        """True: the step must be skipped (``loss`` is the value of ``what``: the global loss, or the
        global gradient norm). Raises TrainingAborted after max_consecutive in a row."""
        if math.isfinite(loss):
            self.in_a_row = 0
            return False
        self.skipped += 1
        self.skipped_grad += what != "loss"
        self.in_a_row += 1
        if self.in_a_row >= self.max_consecutive:
            raise TrainingAborted(
                f"the {what} was {loss} for {self.in_a_row} steps in a row (steps {step - self.in_a_row + 1}-{step}; "
                f"trainer.max_consecutive_nonfinite={self.max_consecutive}); stopping. Resume from the last "
                "checkpoint with a lower optim.lr or more optim.warmup_steps")
        return True


# --- fault injection (tests, cluster drills) -------------------------------------------------------

@dataclass
class FaultInjection:
    kind: str | None = None
    first: int = 0
    last: int = 0
    rank: int | None = None

    KINDS = ("kill", "freeze", "nan", "nangrad", "sigterm", "sigusr1")

    @classmethod
    def from_env(cls, value: str | None = None) -> FaultInjection:
        """Parse ``HALO_FAULT`` (``kind@step[-last][:rank=R]``); disabled after a torchrun restart."""
        value = os.environ.get("HALO_FAULT", "") if value is None else value
        if not value or _attempt() > 0:
            return cls()
        try:
            head, *opts = value.split(":")
            kind, steps = head.split("@")
            first, _, last = steps.partition("-")
            rank = None
            for opt in opts:
                k, v = opt.split("=")
                if k != "rank":
                    raise ValueError(k)
                rank = int(v)
            if kind not in cls.KINDS:
                raise ValueError(kind)
            return cls(kind, int(first), int(last or first), rank)
        except ValueError:
            raise TrainingAborted(f"HALO_FAULT: expected kind@step[-last][:rank=R] with kind one of "
                                  f"{', '.join(cls.KINDS)}; got {value!r}") from None

    def _hits(self, step: int, rank: int) -> bool:
        return self.kind is not None and self.first <= step <= self.last and self.rank in (None, rank)

    def poison(self, step: int, rank: int) -> bool:
        """True when this step's loss must become NaN on this rank."""
        return self.kind == "nan" and self._hits(step, rank)

    def poison_grad(self, step: int, rank: int) -> bool:
        """True when one gradient of this step must become NaN on this rank (the loss stays finite)."""
        return self.kind == "nangrad" and self._hits(step, rank)

    def after_step(self, step: int, rank: int) -> None:
        if self.kind in ("nan", "nangrad") or not self._hits(step, rank):
            return
        sig = {"kill": signal.SIGKILL, "freeze": signal.SIGSTOP, "sigterm": signal.SIGTERM,
               "sigusr1": signal.SIGUSR1}[self.kind]
        print(f"HALO_FAULT: rank {rank} sends itself {sig.name} after step {step}", flush=True)
        os.kill(os.getpid(), sig)
