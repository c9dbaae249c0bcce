"""Nothing a file contains runs as code: a checkpoint whose DeepSpeed model file is a pickle with a
payload (``__reduce__`` -> ``os.system`` creating a marker file), shipped with a matching sha256
manifest as a crafted checkpoint would, is refused by resume, generate, coverage and export: exit 2, one
line naming the file, and the marker never exists."""

from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path

import pytest
import torch

from tests.train_utils import PY, REPO, Payload, _env, train
from trainer.config.validate import ConfigError
from trainer.data import integrity
from trainer.state import checkpoint, safe_load

TINY = ["seq_len=128", "batch_size=1", "eval_every=0", "eval_batches=1", "logging.wandb=disabled",
        "logging.mask_png=false", "attention.window_left=32", "attention.num_global=4"]
MODEL_FILE = "mp_rank_00_model_states.pt"
SECRET = "hf_s3cr3t-t0ken-value"


def reseal(ckpt: Path) -> None:
    """Rewrite meta.json's manifest for the files as they are now: the manifest is no defence."""
    meta = checkpoint.read_meta(ckpt)
    meta["files"] = {name: {"size": (ckpt / name).stat().st_size, "sha256": integrity.sha256_file(ckpt / name)}
                     for name in meta["files"]}
    (ckpt / checkpoint.META).write_text(json.dumps(meta))
    assert checkpoint.problem(ckpt) is None


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """(run dir, checkpoint, marker path): a genuine 1-step ZeRO-0 run whose model file is replaced."""
    run = tmp_path_factory.mktemp("crafted") / "run"
    train(*TINY, "steps=1", "trainer.ckpt_every=1", f"hydra.run.dir={run}", "logging.entity=${oc.env:HALO_SECRET}",
          timeout=240, env=_env(HALO_SECRET=SECRET, WANDB_MODE="disabled"))
    ckpt = run / "checkpoints" / checkpoint.tag(1)
    marker = run.parent / "PAYLOAD_RAN"
    genuine = torch.load(ckpt / MODEL_FILE, map_location="cpu", weights_only=False)  # our own file: trusted
    torch.save({**genuine, "module": Payload(marker)}, ckpt / MODEL_FILE)
    reseal(ckpt)
    return run, ckpt, marker


def _refused(proc: subprocess.CompletedProcess, ckpt: Path, marker: Path) -> None:
    err = proc.stderr.decode() if isinstance(proc.stderr, bytes) else proc.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert f"{ckpt / MODEL_FILE}: refused to load: its pickle calls posix.system" in lines[0]
    assert not marker.exists()


def test_safe_load_refuses_the_payload_and_runs_nothing(crafted, tmp_path):
    _, ckpt, marker = crafted
    with pytest.raises(ConfigError, match=r"refused to load: its pickle calls posix.system") as e:
        safe_load.load(ckpt / MODEL_FILE)
    assert str(ckpt / MODEL_FILE) in str(e.value) and "\n" not in str(e.value)
    raw = tmp_path / "raw.pt"  # a plain pickle, not torch's zip format: refused as well
    raw.write_bytes(pickle.dumps({"module": Payload(marker)}))
    with pytest.raises(ConfigError, match=r"raw.pt: refused to load"):
        safe_load.load(raw)
    with pytest.raises(ConfigError, match=r"refused to load"):
        safe_load.check_checkpoint(ckpt)
    assert not marker.exists()


def test_resume_refuses_the_payload_before_any_process_group(crafted, tmp_path):
    _, ckpt, marker = crafted
    proc = train(*TINY, "steps=2", f"trainer.resume={ckpt}", f"trainer.ckpt_dir={tmp_path / 'c'}",
                 f"hydra.run.dir={tmp_path / 'run'}", check=False)
    _refused(proc, ckpt, marker)


def test_generate_refuses_the_payload(crafted):
    _, ckpt, marker = crafted
    proc = subprocess.run([PY, "-m", "trainer.generate", f"trainer.resume={ckpt}", "max_new_tokens=2"], cwd=REPO,
                          env=_env(HALO_SECRET=SECRET), capture_output=True, timeout=120)
    _refused(proc, ckpt, marker)


def test_coverage_refuses_the_payload(crafted):
    _, ckpt, marker = crafted
    proc = subprocess.run([PY, "-m", "trainer.coverage", f"trainer.resume={ckpt}", "candidates=[sink]",
                           "candidate.window_left=8", "candidate.num_global=4"], cwd=REPO, env=_env(HALO_SECRET=SECRET),
                          capture_output=True, timeout=120)
    _refused(proc, ckpt, marker)


def test_export_refuses_the_payload(crafted, tmp_path):
    _, ckpt, marker = crafted
    proc = subprocess.run([PY, "-m", "trainer.export", f"trainer.resume={ckpt}", f"out={tmp_path / 'hf'}"], cwd=REPO,
                          env=_env(HALO_SECRET=SECRET), capture_output=True, timeout=120)
    _refused(proc, ckpt, marker)
    assert not (tmp_path / "hf").exists()  # nothing written


def test_the_safe_engine_loads_through_safe_load(crafted):
    """What DeepSpeed's load_checkpoint calls (engine.checkpoint_engine.load) after ``install``."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    _, ckpt, marker = crafted

    class Engine:
        checkpoint_engine = TorchCheckpointEngine()

    engine = Engine()
    safe_load.install(engine)
    assert isinstance(engine.checkpoint_engine, TorchCheckpointEngine)
    with pytest.raises(ConfigError, match="refused to load"):
        engine.checkpoint_engine.load(str(ckpt / MODEL_FILE), map_location="cpu")
    assert not marker.exists()


# --- nothing secret in the logged config -------------------------------------------------------------

def test_config_yaml_records_the_env_expression_not_its_value(crafted):
    run, _, _ = crafted
    text = (run / "config.yaml").read_text()
    assert SECRET not in text and "${oc.env:HALO_SECRET}" in text
    for f in run.rglob("*"):  # nothing the run wrote holds it (.hydra/ records the override as typed)
        if f.is_file() and f.suffix in (".yaml", ".json", ".jsonl", ".txt"):
            assert SECRET not in f.read_text(errors="replace"), f


def test_loggable_redacts_credential_keys_and_env_values(monkeypatch):
    from omegaconf import OmegaConf

    from trainer.config.redact import REDACTED, loggable, secret_name

    monkeypatch.setenv("HALO_SECRET", SECRET)
    cfg = OmegaConf.create({"data": {"path": "${oc.env:HALO_SECRET}", "tokenizer": "bytes", "bpe_vocab_size": 8},
                            "logging": {"wandb_api_key": "abc123", "hf-token": ["t1"], "password": None},
                            "attention": {"secret": "x", "window_left": 4, "key_len": 5}, "seq_len": 8, "max_new_tokens": 3,
                            "copy": "${data.tokenizer}"})
    out = loggable(cfg)
    assert out["data"] == {"path": "${oc.env:HALO_SECRET}", "tokenizer": "bytes", "bpe_vocab_size": 8}
    assert out["logging"] == {"wandb_api_key": REDACTED, "hf-token": [REDACTED], "password": None}
    assert out["attention"] == {"secret": REDACTED, "window_left": 4, "key_len": 5}
    assert out["seq_len"] == 8 and out["max_new_tokens"] == 3 and out["copy"] == "bytes"
    assert SECRET not in str(out)
    assert not any(map(secret_name, ["tokenizer", "max_new_tokens", "keep_last", "monkey"]))
