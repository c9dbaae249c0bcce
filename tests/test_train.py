"""End-to-end training: real ``python -m trainer.train`` / ``torchrun`` processes on 1 and 2 CPU ranks.

Module-scoped runs are shared between tests (each launch pays ~10-20 s of imports):

- ``sp2``: torchrun, 2 ranks, SP=2, 6 steps, checkpoints at steps 3 and 6, W&B offline;
- ``sp1``: one process, SP=1, the same seed and data, 4 steps;
- ``resumed``: SP=2 again, from sp2's step-3 checkpoint (trainer.resume=auto) to step 6;
- ``cross``: one process (SP=1) resuming sp2's step-3 checkpoint by path.

Every subprocess has a deadline and every collective a 30 s timeout, so a failure never hangs.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import yaml

from tests.train_utils import PY, REPO, SMALL, TORCHRUN, _env, rows, train  # noqa: F401


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def sp2(runs):
    out = runs / "sp2"
    proc = train(*SMALL, "steps=6", "eval_every=3", "trainer.ckpt_every=3", f"hydra.run.dir={out}", nproc=2)
    return out, proc


@pytest.fixture(scope="module")
def sp1(runs):
    out = runs / "sp1"
    train(*SMALL, "steps=4", "eval_every=3", "logging.wandb=disabled", f"hydra.run.dir={out}",
          env=_env(WANDB_MODE="disabled"))
    return out


def test_sp1_and_sp2_train_identically(sp1, sp2):
    """Sequence sharding only reorders fp32 sums (LSE merges, the gradient all-reduce): a few ulps per
    op, ~1e-6 on the loss after 4 Adam steps. A wrong reduction is far outside 1e-5: unreduced SP
    gradients let the ranks' weights diverge (loss off by ~1e-2 at step 2), and a wrong scale shows
    in the pre-clip gradient norm (x2 for averaging instead of summing) even where Adam hides it."""
    a, b = rows(sp1), rows(sp2[0])
    for step in range(1, 5):
        assert a[step]["train/loss"] == pytest.approx(b[step]["train/loss"], rel=1e-5, abs=1e-6), step
        assert a[step]["train/grad_norm"] == pytest.approx(b[step]["train/grad_norm"], rel=1e-5), step
    assert a[3]["eval/loss"] == pytest.approx(b[3]["eval/loss"], rel=1e-5)
    assert a[4]["train/loss"] < a[1]["train/loss"] - 0.1  # it learns
    for key in ("attn/layer0/entropy_mean", "attn/layer1/global_mass", "attn/layer1/max_logit"):
        assert a[1][key] == pytest.approx(b[1][key], rel=1e-4), key  # stats are exact under sharding too


def test_resume_auto_continues_exactly(sp2, runs):
    """6 steps straight == 3 steps, then resume=auto from the step-3 checkpoint, then 3 more.
    Same ranks, same reduction order: equal to rel 1e-6 (a few fp32 ulps of the reduced loss; a
    resume with other state or data moves it by far more)."""
    straight, _ = sp2
    ckpts = runs / "resume_ckpts"
    shutil.copytree(straight / "checkpoints" / "step_00000003", ckpts / "step_00000003")
    out = runs / "resumed"
    train(*SMALL, "steps=6", "eval_every=3", "trainer.resume=auto", f"trainer.ckpt_dir={ckpts}",
          f"hydra.run.dir={out}", nproc=2, env=_env(WANDB_MODE="disabled"))
    a, b = rows(straight), rows(out)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-6), step
        assert b[step]["train/lr"] == pytest.approx(a[step]["train/lr"], rel=1e-12), step
    assert b[6]["eval/loss"] == pytest.approx(a[6]["eval/loss"], rel=1e-6)
    assert (ckpts / "step_00000006" / "meta.json").is_file()


def test_sp2_checkpoint_resumes_at_sp1(sp2, runs):
    """ZeRO stage 0: the state does not depend on the SP size; SP=1 continues an SP=2 run."""
    straight, _ = sp2
    out = runs / "cross"
    train(*SMALL, "steps=6", "eval_every=3", f"trainer.resume={straight / 'checkpoints' / 'step_00000003'}",
          f"trainer.ckpt_dir={runs / 'cross_ckpts'}", f"hydra.run.dir={out}", env=_env(WANDB_MODE="disabled"))
    a, b = rows(straight), rows(out)
    for step in (4, 5, 6):  # same tolerance argument as the SP1-vs-SP2 test
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-5), step


def test_run_directory_and_summary(sp2):
    out, proc = sp2
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["seq_len"] == 512 and resolved["attention"]["name"] == "sink"
    assert "${" not in (out / "config.yaml").read_text()  # resolved, interpolations expanded
    assert resolved["trainer"]["ckpt_dir"] == str(out / "checkpoints")
    assert (out / "train_rank0.log").is_file() and (out / "train_rank1.log").is_file()  # one per rank
    assert (out / "mask.png").stat().st_size > 1000
    for line in ("final train loss", "eval bits/byte", "tokens/s (mean)", "comm bytes/step", "entropy layer 1"):
        assert line in proc.stdout, line
    assert re.search(rf"^checkpoint +{re.escape(str(out / 'checkpoints' / 'step_00000006'))}$", proc.stdout, re.M)
    assert re.search(rf"^W&B sync +wandb sync {re.escape(str(out / 'wandb'))}/offline-run-", proc.stdout, re.M)
    assert proc.stdout.count("final train loss") == 1  # rank 0 only


def _wandb_records(path: Path):
    """Records of a .wandb file: W&B's LevelDB-style log (7-byte file header, 32 KiB blocks, records
    of crc32 + length + type chunks) holding protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        buf += data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def test_wandb_offline_run_has_the_metrics(sp2):
    out, _ = sp2
    (wandb_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = [], {}
    for rec in _wandb_records(wandb_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "run":  # the run record carries the config given to wandb.init
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
    keys = set().union(*history)
    for key in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/step_time_s",
                "perf/peak_mem_gb", "comm/forward_bytes", "comm/backward_bytes", "eval/loss", "eval/bpb",
                "attention/mask/_type", *(f"attn/layer{i}/{s}" for i in (0, 1)
                                    for s in ("entropy_mean", "entropy_min", "max_logit", "global_mass"))):
        assert key in keys, key
    steps = [h for h in history if "train/loss" in h]
    assert [h["_step"] for h in steps] == [1, 2, 3, 4, 5, 6]
    assert all(h["comm/forward_bytes"] > 0 and h["comm/backward_bytes"] > 0 for h in steps)  # halo + globals
    assert sum("attn/layer0/entropy_mean" in h for h in steps) == 4  # steps 1, 2, 4, 6 (stats_every=2)
    assert next(h for h in history if "attention/mask/_type" in h)["attention/mask/_type"] == "image-file"
    assert config["seq_len"] == 512


def test_hydra_override_and_cfg_job():
    proc = train("--cfg", "job", "attention=window", "model=small", "optim.lr=0.01", timeout=60)
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["attention"]["name"] == "window" and cfg["model"]["preset"] == "small"
    assert cfg["optim"]["lr"] == 0.01 and cfg["parallel"]["zero_stage"] == 0


def test_multirun_sweeps_attention(runs):
    sweep = runs / "multi"
    train("-m", "attention=window,sink", "seq_len=512", "attention.window_left=64", "steps=2", "eval_batches=1", "logging.mask_png=false",
          f"hydra.sweep.dir={sweep}", env=_env(WANDB_MODE="disabled"), timeout=240)
    names = [yaml.safe_load((sweep / str(i) / "config.yaml").read_text())["attention"]["name"] for i in (0, 1)]
    assert names == ["window", "sink"]
    assert all(len(rows(sweep / str(i))) == 2 for i in (0, 1))


@pytest.mark.parametrize("overrides, world, key", [
    (["+optim.lrr=1"], 1, "optim.lrr: unknown key; allowed keys: lr,"),
    (["seq_len=4097"], 2, "seq_len=4097 must be a multiple of parallel.sequence_parallel_size=2"),
    (["parallel.sequence_parallel_size=3"], 2, "parallel.sequence_parallel_size=3"),
    (["parallel.zero_stage=5"], 1, "parallel.zero_stage: must be one of 0, 1, 2, 3; got 5"),
    (["attention.window_left=-1"], 1, "attention.window_left: must be >= 0"),
    (["batch_size=two"], 1, "batch_size: must be int"),
])
def test_config_errors_exit_before_any_process_group(overrides, world, key, tmp_path):
    """WORLD_SIZE=2 without a launcher: had the trainer reached init_process_group, it would fail on
    the missing rendezvous (MASTER_ADDR) instead of printing the config error."""
    env = _env(WORLD_SIZE=str(world), RANK="0", WANDB_MODE="disabled")
    proc = train(*overrides, f"hydra.run.dir={tmp_path}", env=env, check=False, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and key in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_preflight_reports_composition_errors_and_leaves_the_rest_to_hydra():
    """The command-line check before Hydra: one line for a composition error; sweeps, hydra.* keys
    and flags with values are not mistaken for overrides."""
    from trainer.train import preflight

    assert preflight(["seq_len=1024", "hydra.run.dir=/tmp/x", "--cfg", "job"]) is None
    assert preflight(["-m", "attention=nope,window"]) is None  # a sweep: Hydra reports per job
    assert preflight(["--cfg", "job", "model=huge"]).startswith("model=huge: unknown model option; allowed: 125m,")
    assert preflight(["optim.lrr=1"]) == "optim.lrr: not a key of the config; did you mean optim.lr?"


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    import trainer.train  # noqa: F401  (registers the launch_stamp resolver)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, "trainer.ckpt_dir=unused"])


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    from trainer.config.validate import load_config
    from trainer.engine import lr_at

    cfg = load_config(_compose("steps=100", "optim.warmup_steps=10", "optim.lr=1e-3", "optim.min_lr=1e-4"), 1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear: (s + 1) / warmup
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))  # cosine: strictly decreasing after warmup
    assert lr_at(100, cfg) == pytest.approx(1e-4)  # min_lr at the end


def test_resume_auto_takes_the_latest_complete_checkpoint(tmp_path):
    from trainer.config.validate import ConfigError, load_config
    from trainer.state import checkpoint

    cfg = load_config(_compose("seq_len=512", "attention.window_left=128", "steps=10", "trainer.resume=auto"), 1)
    cfg.trainer.ckpt_dir = str(tmp_path)
    assert checkpoint.resolve_resume(cfg) is None  # nothing saved yet: start fresh
    for step in (3, 6, 9):
        (tmp_path / checkpoint.tag(step)).mkdir()
    for step in (3, 6):  # step 9 has no meta.json: the run died while saving it
        (tmp_path / checkpoint.tag(step) / checkpoint.META).write_text(json.dumps({**checkpoint.run_meta(cfg, step), "files": {}}))
    assert checkpoint.resolve_resume(cfg) == tmp_path / checkpoint.tag(6)
    cfg.seq_len = 1024  # the sampler's windows would differ: refused before any process group
    with pytest.raises(ConfigError, match="trainer.resume: .* seq_len=512, this run has 1024"):
        checkpoint.resolve_resume(cfg)
