"""Faults a cluster inflicts, on real trainer processes (torchrun, 2 CPU ranks, SP=2, gloo).

``HALO_FAULT=kind@step[:rank=R]`` (trainer/faults.py) makes one rank really SIGKILL, SIGSTOP or
signal itself after a step, so each scenario happens at a known step instead of a race. The
``baseline`` run is the uninterrupted reference: 6 steps, a checkpoint every 2. Every run has a
deadline that kills its whole process group, and collectives a short timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.train_utils import PY, REPO, SMALL, TORCHRUN, _env, rows, train
from trainer.state import checkpoint

RUN = [*SMALL, "steps=6", "eval_every=3", "trainer.ckpt_every=2", "logging.wandb=disabled", "logging.mask_png=false"]


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> train loss; a step logged twice (replayed after a restart) keeps its last value."""
    return {step: r["train/loss"] for step, r in rows(run_dir).items()}


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_losses(a: dict[int, float], b: dict[int, float], steps) -> None:
    """Same ranks, same data order and the same reduction order as the reference: a resumed or
    restarted run replays the identical float operations; rel 1e-6 leaves room for a few ulps of the
    fp32 loss's reduction, while another data order or state moves it by far more."""
    for step in steps:
        assert a[step] == pytest.approx(b[step], rel=1e-6), step


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def baseline(runs):
    out = runs / "baseline"
    train(*RUN, f"hydra.run.dir={out}", nproc=2, env=_env(WANDB_MODE="disabled"))
    return out


def test_kill9_of_a_rank_restarts_the_group_and_resumes_identically(baseline, runs):
    """Rank 1 SIGKILLs itself after step 3; torchrun --max-restarts=1 restarts both ranks; with
    resume=none a restarted group resumes from its own last checkpoint (step 2) and replays step 3."""
    out = runs / "killed"
    proc = run_torchrun(*RUN, f"hydra.run.dir={out}", fault="kill@3:rank=1", max_restarts=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 1 sends itself SIGKILL after step 3" in proc.stdout
    assert steps_logged(out) == [1, 2, 3, 3, 4, 5, 6]  # step 3 ran twice: before the kill and after the restart
    assert_same_losses(losses(out), losses(baseline), range(1, 7))
    assert checkpoint.problem(out / "checkpoints" / checkpoint.tag(6)) is None


def test_stop_signal_on_one_rank_checkpoints_everywhere_and_exits_cleanly(baseline, runs):
    """SIGUSR1 reaches rank 1 only (as ``scancel --signal`` may), during step 3 (it is sent right
    after step 2): the ranks agree at the end of step 3, save a checkpoint off the ckpt_every grid,
    exit 0; resume=auto finishes the run."""
    out = runs / "usr1"
    proc = run_torchrun(*RUN, f"hydra.run.dir={out}", fault="sigusr1@2:rank=1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "stopped at        step 3 of 6 (a stop signal to another rank)" in proc.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [checkpoint.tag(2), checkpoint.tag(3)]
    assert steps_logged(out) == [1, 2, 3]
    proc = run_torchrun(*RUN, f"hydra.run.dir={out}", "trainer.resume=auto")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]
    assert_same_losses(losses(out), losses(baseline), range(1, 7))


def test_sigterm_to_torchrun_checkpoints_before_the_ranks_exit(runs):
    """Preemption as a scheduler does it: SIGTERM to the launcher, which forwards it to its ranks."""
    out = runs / "term"
    proc = subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "trainer.train",
                             *SMALL, "steps=500", "eval_every=0", "trainer.ckpt_every=0", "logging.wandb=disabled",
                             f"hydra.run.dir={out}"], cwd=REPO, env=_env(WANDB_MODE="disabled"), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while not ((out / "metrics.jsonl").exists() and len(steps_logged(out)) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "the run never reached step 2"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    last = steps_logged(out)[-1]
    assert 2 <= last < 500
    assert checkpoint.complete_checkpoints(out / "checkpoints") == [out / "checkpoints" / checkpoint.tag(last)]
    assert checkpoint.problem(out / "checkpoints" / checkpoint.tag(last)) is None
    assert f"stopped at        step {last} of 500 (SIGTERM)" in stdout, stderr[-3000:]


def test_a_frozen_peer_is_named_within_the_collective_timeout(runs):
    """Rank 1 SIGSTOPs itself after step 2 (alive to the OS, silent to its peers). Rank 0 must not
    hang: its next collective times out after parallel.timeout_s and it exits, naming rank 1.
    Plain processes with env:// rendezvous (no torchrun, which would wait 30 s to SIGKILL the
    stopped rank after rank 0 exits)."""
    out = runs / "frozen"
    timeout_s = 8
    env = _env(WANDB_MODE="disabled", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               LOCAL_WORLD_SIZE="2", HALO_FAULT="freeze@2:rank=1")
    argv = [PY, "-m", "trainer.train", *RUN, f"parallel.timeout_s={timeout_s}", f"hydra.run.dir={out}"]
    procs = [subprocess.Popen(argv, cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
             for r in range(2)]
    try:
        while not (out / "metrics.jsonl").exists() or len(steps_logged(out)) < 2:
            assert procs[0].poll() is None, procs[0].communicate()[1][-3000:]
            time.sleep(0.1)
        # rank 1 freezes right after logging step 2. Deadline: the collective timeout, ~3 s of
        # heartbeat reading and teardown fit well inside timeout_s + 90; a hang fails here, by name.
        try:
            _, err = procs[0].communicate(timeout=timeout_s + 90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 did not give up on its frozen peer within parallel.timeout_s={timeout_s} + 90 s")
        assert procs[1].poll() is None  # still frozen: rank 0 left on its own
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    assert procs[0].returncode == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert "rank 0: rank 1 (last completed step 2) stopped answering" in errors[0]


def test_nonfinite_losses_are_skipped_then_abort(runs):
    """Steps 2-3 NaN with K=3: skipped and counted, the run finishes. Steps 2-4 NaN: the third in a
    row stops it with one line."""
    base = [*SMALL, "steps=5", "eval_every=0", "logging.wandb=disabled", "logging.mask_png=false",
            "trainer.max_consecutive_nonfinite=3"]
    ok = runs / "nan_ok"
    train(*base, f"hydra.run.dir={ok}", env=_env(WANDB_MODE="disabled", HALO_FAULT="nan@2-3"))
    by_step = rows(ok)
    assert [by_step[s]["train/skipped"] for s in range(1, 6)] == [0, 1, 1, 0, 0]
    assert by_step[5]["train/skipped_total"] == 2
    assert by_step[5]["train/loss"] == by_step[5]["train/loss"]  # finite again: the weights were never poisoned

    bad = runs / "nan_abort"
    proc = train(*base, f"hydra.run.dir={bad}", env=_env(WANDB_MODE="disabled", HALO_FAULT="nan@2-4"), check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the loss was nan for 3 steps in a row (steps 2-4" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(baseline, runs):
    """The newest checkpoint truncated, a half-written one beside it: resume=auto warns, takes the
    one before, and the run continues exactly as the uninterrupted one."""
    ckpts = runs / "corrupt_ckpts"
    shutil.copytree(baseline / "checkpoints", ckpts)
    shutil.rmtree(ckpts / checkpoint.tag(6))
    model_file = ckpts / checkpoint.tag(4) / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])  # the disk filled up mid-write
    half = ckpts / f".{checkpoint.tag(6)}.tmp"  # a save of step 6 killed before its rename
    half.mkdir()
    (half / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    out = runs / "fallback"
    proc = run_torchrun(*RUN, "trainer.resume=auto", f"trainer.ckpt_dir={ckpts}", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1 and checkpoint.tag(4) in warnings[0] and "mp_rank_00_model_states.pt has 1000 bytes" \
        in warnings[0], proc.stderr[-3000:]
    assert steps_logged(out) == [3, 4, 5, 6]
    assert_same_losses(losses(out), losses(baseline), range(3, 7))
    assert checkpoint.problem(ckpts / checkpoint.tag(4)) is None  # re-saved whole, replacing the corrupt one
    assert not half.exists()


def test_resume_candidates_skip_incomplete_and_corrupt(tmp_path, capsys):
    """Unit level: which directory ``resume=auto`` takes, without any process."""
    def make(step: int, files: dict[str, int], meta: str | None = None):
        d = tmp_path / checkpoint.tag(step)
        d.mkdir()
        for name, size in files.items():
            (d / name).write_bytes(b"x" * size)
        (d / checkpoint.META).write_text(meta if meta is not None else json.dumps({"step": step, "files": files}))
        return d

    two = make(2, {"a.pt": 10})
    make(4, {"a.pt": 10}, meta="{truncated")
    four_missing = make(6, {"a.pt": 10, "b.pt": 3})
    (four_missing / "b.pt").unlink()
    (tmp_path / f".{checkpoint.tag(8)}.tmp").mkdir()  # never a candidate: not published
    found = checkpoint.complete_checkpoints(tmp_path)
    assert [p.name for p in found] == [checkpoint.tag(s) for s in (2, 4, 6)]
    assert checkpoint.newest_intact(found, warn=True) == two
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "b.pt is missing" in err[0] and "meta.json is unreadable" in err[1]


def run_torchrun(*overrides: str, fault: str | None = None, max_restarts: int = 0):
    extra = {"HALO_FAULT": fault} if fault else {}
    return train(*overrides, nproc=2, check=False, env=_env(WANDB_MODE="disabled", **extra),
                 torchrun_args=(f"--max-restarts={max_restarts}",))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
