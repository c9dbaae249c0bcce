"""Reliability, round two: what users do by mistake and what clusters do to runs.

Units (fast): checkpoint integrity (malformed meta, same-size garbage, sha256), the token cache's
block checksums, the run-directory lock, the data/resume checks, SIGINT handling.
Real processes: a full disk during a save (SP=2, a small tmpfs; needs root to mount, skipped
otherwise), a read-only checkpoint directory, Ctrl-C to a torchrun job, two jobs in one directory.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.train_utils import PY, REPO, SMALL, TORCHRUN, _env, rows, train
from trainer.config.validate import ConfigError
from trainer.data import integrity
from trainer.state import checkpoint, preflight

# --- checkpoint integrity -------------------------------------------------------------------------

def _fake_checkpoint(root: Path, step: int, payload: bytes = b"weights" * 100) -> Path:
    tmp = root / f".{checkpoint.tag(step)}.tmp"
    tmp.mkdir(parents=True)
    (tmp / "model.pt").write_bytes(payload)
    checkpoint._publish(tmp, root / checkpoint.tag(step), {"step": step})
    return root / checkpoint.tag(step)


@pytest.mark.parametrize("damage", ["meta_null", "meta_partial", "meta_list", "garbage_same_size", "schema_future"])
def test_a_damaged_newest_checkpoint_is_skipped_with_one_warning(tmp_path, capsys, damage):
    old, new = _fake_checkpoint(tmp_path, 10), _fake_checkpoint(tmp_path, 20)
    meta = json.loads((new / checkpoint.META).read_text())
    if damage == "meta_null":
        (new / checkpoint.META).write_text("null")
    elif damage == "meta_partial":
        (new / checkpoint.META).write_text(json.dumps({"step": 20}))
    elif damage == "meta_list":
        (new / checkpoint.META).write_text("[1, 2]")
    elif damage == "garbage_same_size":
        size = (new / "model.pt").stat().st_size
        (new / "model.pt").write_bytes(np.random.default_rng(0).bytes(size))
    else:
        (new / checkpoint.META).write_text(json.dumps({**meta, "schema": checkpoint.SCHEMA + 1}))
    assert checkpoint.problem(old) is None
    assert checkpoint.newest_intact([old, new], warn=True) == old
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: checkpoint {new} is corrupt"), err


def test_checkpoint_meta_records_schema_and_sha256(tmp_path):
    path = _fake_checkpoint(tmp_path, 3)
    meta = json.loads((path / checkpoint.META).read_text())
    assert meta["schema"] == checkpoint.SCHEMA
    assert meta["files"]["model.pt"] == {"size": 700, "sha256": integrity.sha256_file(path / "model.pt")}
    # schema 1 (sizes only, written before checksums) still resumes
    (path / checkpoint.META).write_text(json.dumps({"step": 3, "files": {"model.pt": 700}}))
    assert checkpoint.problem(path) is None


def test_keep_last_n_and_resume_with_other_data(tmp_path):
    from tests.test_train import _compose
    from trainer.config.validate import load_config

    cfg = load_config(_compose("seq_len=512", "attention.window_left=128"), 1)
    path = _fake_checkpoint(tmp_path, 5)
    meta = json.loads((path / checkpoint.META).read_text())
    (path / checkpoint.META).write_text(json.dumps({**meta, "data": {"n_tokens": 1000}}))
    checkpoint.check_data(path, cfg, 1000)  # the same data
    with pytest.raises(ConfigError, match="^trainer.resume: .* training split of 1,000 tokens, this run's data gives 999;"):
        checkpoint.check_data(path, cfg, 999)


# --- the token cache ------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "zeros", "flip_late_byte"])
def test_a_damaged_token_cache_is_rebuilt_with_one_line(tmp_path, capsys, damage, monkeypatch):
    from trainer.data.corpus import load_corpus

    src, cache = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    (src / "a.txt").write_bytes(b"haloformer " * 300_000)  # 3.3 MB: 4 blocks of 1 MiB
    monkeypatch.setattr(integrity, "MAX_BLOCKS", 3)  # sampled blocks, as for a large corpus
    first = load_corpus(src, cache_dir=cache)
    expected = np.asarray(first.train).copy()
    path = first.cache_path
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "zeros":
        data = bytearray(len(data))
    else:  # inside the last block, which is always sampled
        data[-10] ^= 0xFF
    del first
    path.write_bytes(bytes(data))
    capsys.readouterr()
    again = load_corpus(src, cache_dir=cache)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: token cache {path}:") and "rebuilding it" in err[0], err
    assert not again.cache_hit and np.array_equal(np.asarray(again.train), expected)
    assert integrity.block_sums_problem(path) is None


def test_block_sums_sample_first_and_last_blocks():
    assert integrity._block_offsets(3 * integrity.BLOCK) == [0, integrity.BLOCK, 2 * integrity.BLOCK]
    many = integrity._block_offsets(1000 * integrity.BLOCK)
    assert len(many) == integrity.MAX_BLOCKS and many[0] == 0 and many[-1] == 999 * integrity.BLOCK


# --- run directory lock ---------------------------------------------------------------------------

def test_run_dir_lock_refuses_a_live_job_and_breaks_a_dead_ones(tmp_path, monkeypatch, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {"job": "other-job", "host": preflight.job_identity()["host"], "pid": sleeper.pid, "since": "now"}
        (tmp_path / ".lock").write_text(json.dumps(holder))
        with pytest.raises(ConfigError, match=rf"^hydra.run.dir: {tmp_path} is in use by another job \(pid {sleeper.pid}"):
            preflight.RunDirLock(tmp_path, 0)
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = preflight.RunDirLock(tmp_path, 0)  # its process is gone: the lock is stale
    assert "breaking the stale lock of job other-job" in capsys.readouterr().err
    assert json.loads((tmp_path / ".lock").read_text())["job"] == preflight.job_identity()["job"]
    preflight.RunDirLock(tmp_path, 1)  # another rank of this job
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_two_jobs_never_share_a_run_directory(tmp_path):
    """A second trainer started on a running job's directory exits 2 with one line; the first one
    finishes untouched."""
    out = tmp_path / "run"
    first = subprocess.Popen([PY, "-m", "trainer.train", *SMALL, "steps=30", "eval_every=0", f"hydra.run.dir={out}",
                              "logging.mask_png=false"], cwd=REPO, env=_env(WANDB_MODE="disabled"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / ".lock").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first job never took its lock"
            time.sleep(0.2)
        second = train(*SMALL, "steps=2", f"hydra.run.dir={out}", env=_env(WANDB_MODE="disabled"), check=False,
                       timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"config error: hydra.run.dir: {out} is in use by another job")
        assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert max(rows(out)) == 30 and not (out / ".lock").exists()


def test_named_runs_have_a_stable_directory():
    from hydra import compose, initialize_config_dir

    import trainer.train  # noqa: F401  (registers the resolvers)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        named = compose(config_name="config", overrides=["logging.run_name=exp1"], return_hydra_config=True)
        stamped = compose(config_name="config", return_hydra_config=True)
    assert named.hydra.run.dir == "outputs/exp1"
    assert stamped.hydra.run.dir.endswith(f"-{os.getpid()}")  # two jobs in one second differ by pid


# --- data preparation ------------------------------------------------------------------------------

def test_data_preparation_waits_for_another_holder_of_its_lock(tmp_path, capsys):
    import fcntl
    import threading

    from tests.test_train import _compose
    from trainer.config.validate import load_config

    src, cache = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    cache.mkdir()
    (src / "a.txt").write_bytes(b"x" * 20_000)
    cfg = load_config(_compose("seq_len=1024", "attention.window_left=64", f"data.path={src}",
                               f"data.cache_dir={cache}", "data.val_fraction=0.2"), 1)
    held = open(cache / ".prepare.lock", "a")
    fcntl.flock(held, fcntl.LOCK_EX)
    result = {}
    worker = threading.Thread(target=lambda: result.update(facts=preflight.prepare_data(cfg, 0)))
    worker.start()
    time.sleep(1.0)
    assert worker.is_alive() and "facts" not in result  # waiting, with no timeout of its own
    fcntl.flock(held, fcntl.LOCK_UN)
    held.close()
    worker.join(timeout=60)
    assert result["facts"].n_train + result["facts"].n_val == 20_001
    assert "waiting for another process preparing" in capsys.readouterr().out


# --- signals --------------------------------------------------------------------------------------

def test_sigint_once_stops_like_sigterm_twice_exits(monkeypatch):
    from trainer.state import faults
    exits = []
    monkeypatch.setattr(faults.os, "_exit", exits.append)
    now = [100.0]
    monkeypatch.setattr(faults.time, "monotonic", lambda: now[0])
    signals = faults.StopSignals()
    try:
        signals._handler(signal.SIGINT, None)
        now[0] += 0.01
        signals._handler(signal.SIGINT, None)  # torchrun forwarding the same Ctrl-C
        signals._handler(signal.SIGTERM, None)  # and its shutdown signal
        assert signals.received == "SIGINT" and exits == []
        now[0] += 2.0
        signals._handler(signal.SIGINT, None)  # a second Ctrl-C
        assert exits == [130]
    finally:
        signals.restore()


def test_ctrl_c_to_a_torchrun_job_checkpoints_and_resumes(tmp_path):
    """SIGINT to the job's process group (what a terminal's Ctrl-C does): the ranks agree, save and
    say where they stopped; status.json says stopped; resume=auto continues from there."""
    out = tmp_path / "run"
    proc = subprocess.Popen([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "trainer.train", *SMALL,
                             "parallel=sp2", "steps=400", "eval_every=0", "logging.mask_png=false",
                             f"hydra.run.dir={out}"], cwd=REPO, env=_env(WANDB_MODE="disabled"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, "no step was logged"
            time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)
        text = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # torchrun's agent reports its own SignalException; the ranks must not die of KeyboardInterrupt
    assert "stopped at" in text and "KeyboardInterrupt" not in text, text[-3000:]
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "stopped"
    saved = checkpoint.complete_checkpoints(out / "checkpoints")
    assert len(saved) == 1 and checkpoint.problem(saved[0]) is None
    assert int(saved[0].name.removeprefix("step_")) == status["step"] < 400


# --- the checkpoint directory on a read-only or full filesystem -----------------------------------

def _mount_tmpfs(path: Path, size: str, readonly: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()[:200]}")


@pytest.fixture
def mounts():
    made = []
    yield made
    for m in made:
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def test_a_read_only_checkpoint_directory_is_refused_before_training(tmp_path, mounts):
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "1m", readonly=True)
    mounts.append(ro)
    proc = train(*SMALL, "steps=2", f"trainer.ckpt_dir={ro}/ckpts", f"hydra.run.dir={tmp_path / 'run'}",
                 env=_env(WANDB_MODE="disabled"), check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"config error: trainer.ckpt_dir: cannot write to {ro}/ckpts: [Errno 30] Read-only file system; it must be a "
        "writable directory (checkpoints and stop-signal saves go there)"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_full_disk_during_a_save_loses_nothing_and_blames_no_one(tmp_path, mounts):
    """SP=2; the disk holds one checkpoint (~1.4 MB) but not two: the save at step 4 fails. Every
    rank exits with one line (the writer: path and errno; its peer: that the writer failed, not that
    it stopped answering); no .tmp directory remains; step 2 stays intact and loadable."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "2200k")
    mounts.append(disk)
    out = tmp_path / "run"
    proc = train(*SMALL, "parallel=sp2", "steps=6", "eval_every=0", "trainer.ckpt_every=2",
                 f"trainer.ckpt_dir={disk}", "logging.mask_png=false", f"hydra.run.dir={out}", nproc=2,
                 env=_env(WANDB_MODE="disabled"), check=False, timeout=240)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, proc.stderr[-4000:]
    writer = [e for e in errors if re.match(r"error: rank \d: saving checkpoint step 4 failed", e)]
    assert len(writer) == 1 and ("ENOSPC" in writer[0] or "No space" in writer[0]), errors
    peer = [e for e in errors if e not in writer]
    assert "failed: rank" in peer[0] and "stopped answering" not in peer[0], errors
    assert [p.name for p in disk.iterdir()] == [checkpoint.tag(2)]  # no .tmp left holding the space
    assert checkpoint.problem(disk / checkpoint.tag(2)) is None
    assert json.loads((out / "status.json").read_text())["state"] == "aborted"


# --- the startup guard probes the run's own geometry ------------------------------------------------

def _guard_accepts(rank, world_size, cases):
    from parallel.context import init_parallel
    from parallel.guard import check_sp_attention

    ctx = init_parallel(sequence_parallel_size=world_size, timeout_s=30)
    failures = []
    try:
        for overrides, patterns, seq_len, heads, strategy in cases:
            for p in patterns:
                try:
                    check_sp_attention(p, ctx, strategy=strategy, seq_len=seq_len, heads=heads)
                except Exception as e:  # noqa: BLE001 - collected, asserted in the parent
                    failures.append(f"{overrides}: {str(e).splitlines()[0]}")
    finally:
        ctx.destroy()
    return failures


def test_the_guard_never_refuses_a_config_the_trainer_accepts():
    """The issue's example (64 globals at seq_len 1024: the old 32·P-token probe refused it) and
    random accepted SP=2 configs, short (the run's exact geometry) and long (a reduced probe)."""
    from tests.mp_utils import run_workers
    from tests.test_train import _compose
    from trainer.config.validate import load_config

    rng = np.random.default_rng(0)
    candidates = [["seq_len=1024", "attention.num_global=64"]]
    for _ in range(16):
        name = str(rng.choice(["sink", "window", "longformer", "dilated", "bigbird", "topk", "strided"]))
        seq_len = int(rng.choice([256, 1024, 2048, 16384]))
        over = [f"attention={name}", f"seq_len={seq_len}", f"attention.num_global={int(rng.choice([0, 4, 64, 200]))}"]
        if name in ("sink", "window", "longformer", "dilated", "bigbird"):
            over.append(f"attention.window_left={int(rng.choice([16, 100, 300, 600]))}")
        if name == "longformer":
            over += [f"attention.window_right={int(rng.choice([8, 300]))}", "objective=mlm"]
        if name in ("topk", "bigbird"):
            over.append(f"attention.block_size={int(rng.choice([16, 64]))}")
        candidates.append(over)
    cases = []
    for over in candidates:
        try:
            cfg = load_config(_compose("parallel=sp2", *over), 2)
        except ConfigError:
            continue
        m = cfg.model_config()
        cases.append((over, list(dict.fromkeys(cfg.patterns())), cfg.seq_len, (m.n_heads, m.n_kv_heads),
                      cfg.parallel.strategy))
    assert len(cases) >= 8 and cases[0][0] == candidates[0]
    results = run_workers(_guard_accepts, 2, cases, timeout_s=600, collective_timeout_s=60)
    assert results == [[], []]
