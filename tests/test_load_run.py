"""``trainer.state.run.load_run`` on checkpoints the real trainer wrote: every ZeRO stage read through
``safe_load`` (weights_only) equals DeepSpeed's own unrestricted reader; strict keys; resuming a
ZeRO-3 checkpoint through the safe checkpoint engine continues exactly; coverage and generation on
a checkpoint with learned sinks."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess

import pytest
import torch

from tests.train_utils import PY, REPO, _env, rows, train
from trainer.config.validate import ConfigError
from trainer.state import checkpoint, safe_load
from trainer.state.run import load_run, load_state_dict, load_weights, resolve_checkpoint

TINY = ["seq_len=128", "batch_size=1", "eval_every=0", "eval_batches=1", "logging.wandb=disabled",
        "logging.mask_png=false", "attention.window_left=32", "attention.num_global=4", "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def z3(tmp_path_factory):
    """ZeRO 3, 2 steps, checkpoints at 1 and 2."""
    run = tmp_path_factory.mktemp("z3") / "run"
    train(*TINY, "steps=2", "trainer.ckpt_every=1", "parallel.zero_stage=3", f"hydra.run.dir={run}", timeout=240)
    return run


@pytest.fixture(scope="module")
def sinks(tmp_path_factory):
    """ZeRO 2, learned sink logits and packed documents (the 4 globals as learned slots), 1 step."""
    run = tmp_path_factory.mktemp("sinks") / "run"
    train(*TINY, "steps=1", "trainer.ckpt_every=1", "parallel.zero_stage=2", "model.sink_logits=true",
          "data.document_mask=true", "model.n_learned_global=4", f"hydra.run.dir={run}", timeout=240)
    return run


@pytest.mark.parametrize("fixture", ["z3", "sinks"])
def test_safe_reading_equals_deepspeeds_own_reader(fixture, request):
    """zero_to_fp32 with its torch.load(weights_only=False) is the oracle on genuine files."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = resolve_checkpoint(request.getfixturevalue(fixture))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        want = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    got = load_state_dict(ckpt, checkpoint.read_meta(ckpt)["zero_stage"])
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k].float()), k  # the same bytes, read two ways
    for f in ckpt.rglob("*.pt"):  # every file DeepSpeed wrote passes the allowlist
        safe_load.check(f)
    cfg, model, tok = load_run(ckpt)
    assert not model.training and tok.decode(tok.encode("ab")) == "ab"
    for k, v in model.state_dict().items():
        assert torch.equal(v, got.get(k, got.get("wte.weight"))), k


def test_missing_and_unexpected_weights_are_one_line(z3):
    ckpt = resolve_checkpoint(z3)
    cfg, model, _ = load_run(ckpt)
    state = dict(model.state_dict())
    del state["blocks.0.attn.wq.weight"]
    with pytest.raises(ConfigError, match=r"lacks 1 weight\(s\) \(blocks.0.attn.wq.weight\)") as e:
        load_weights(model, state, ckpt)
    assert "\n" not in str(e.value)
    state = {**model.state_dict(), "extra.weight": torch.zeros(1)}
    with pytest.raises(ConfigError, match=r"has unexpected 1 weight\(s\) \(extra.weight\)"):
        load_weights(model, state, ckpt)


def test_zero3_resume_through_the_safe_engine_continues_exactly(z3, tmp_path):
    """Step 2 after resuming step 1's ZeRO-3 checkpoint equals step 2 of the straight run: same
    process, same reduction order, so equal to a few fp32 ulps (rel 1e-6)."""
    ckpts = tmp_path / "ckpts"
    shutil.copytree(z3 / "checkpoints" / checkpoint.tag(1), ckpts / checkpoint.tag(1))
    out = tmp_path / "resumed"
    train(*TINY, "steps=2", "trainer.ckpt_every=1", "parallel.zero_stage=3", "trainer.resume=auto",
          f"trainer.ckpt_dir={ckpts}", f"hydra.run.dir={out}", timeout=240)
    a, b = rows(z3), rows(out)
    assert sorted(b) == [2]
    assert b[2]["train/loss"] == pytest.approx(a[2]["train/loss"], rel=1e-6)


def test_generate_on_a_zero3_checkpoint(z3):
    proc = subprocess.run([PY, "-m", "trainer.generate", f"trainer.resume={z3}", "prompt=ab", "max_new_tokens=4"],
                          cwd=REPO, env=_env(), capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert proc.stdout.decode().startswith("ab") and "tokens/s decoding" in proc.stderr.decode()


def test_coverage_on_a_checkpoint_with_learned_sinks_and_documents(sinks, tmp_path):
    """The recorder passes the layer's sinks and document ids on, and the eval batches are the
    trainer's (packed documents, per-document positions): its loss with the trained pattern is the
    trainer's own eval loss (its last eval row); a narrower window keeps part of the mass."""
    from trainer.tools.coverage import eval_batches, main, run_config

    ckpt = resolve_checkpoint(sinks)
    # tokens, targets, positions, rope positions, document ids: the trainer's packed-document batches
    assert len(eval_batches(run_config(ckpt, []))[0]) == 5
    out = tmp_path / "cov.json"
    res = main([f"trainer.resume={ckpt}", "candidates=[sink]", "candidate.window_left=8",
                "candidate.num_global=4", "eval_batches=1", f"json={out}"])
    assert json.loads(out.read_text()) == res
    logged = rows(sinks)[1]["eval/loss"]
    # fp32, the same batch and weights; kernels may differ in summation order
    assert res["eval_loss_trained"] == pytest.approx(logged, abs=1e-5)
    for layer in res["coverage"]["sink"]:  # window 8 (of the trained 32), the same 4 globals
        assert 0.0 < layer["min_head"] <= layer["mean"] < 1.0
    assert res["eval_loss"]["sink"] != pytest.approx(res["eval_loss_trained"], abs=1e-6)
    _, model, _ = load_run(ckpt)
    for b in model.blocks:  # the sinks were learned (one step moved them off their initial value) and loaded
        assert not torch.equal(b.attn.sinks, torch.full_like(b.attn.sinks, b.attn.SINK_INIT))
