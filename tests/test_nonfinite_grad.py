"""A non-finite gradient (finite loss) skips the step like a non-finite loss: counted, logged, and the
run continues exactly as if the loss had been non-finite (neither updates the weights or the
optimizer). The NaN is injected into one parameter's gradient during backward (HALO_FAULT=nangrad@2)."""

from __future__ import annotations

import math

import pytest

from tests.train_utils import _env, rows, train

TINY = ["seq_len=128", "batch_size=1", "eval_every=0", "eval_batches=1", "logging.wandb=disabled",
        "logging.mask_png=false", "attention.window_left=32", "attention.num_global=4", "steps=3",
        "trainer.ckpt_every=0", "optim.warmup_steps=1"]


@pytest.mark.parametrize("zero", [0, 2])
def test_a_nan_gradient_skips_the_step_like_a_nan_loss(zero, tmp_path):
    """ZeRO 0: the trainer finds the NaN in the reduced gradients; ZeRO 2: DeepSpeed's optimizer does
    (and skips), the trainer counts it. The comparison run (a NaN loss) only at stage 0, to save time."""
    runs = {}
    for fault in ("nangrad@2", "nan@2")[:2 if zero == 0 else 1]:
        out = tmp_path / fault.replace("@", "_")
        proc = train(*TINY, f"parallel.zero_stage={zero}", f"hydra.run.dir={out}", env=_env(HALO_FAULT=fault,
                                                                                          WANDB_MODE="disabled"))
        runs[fault] = (rows(out), proc.stdout)
    grad = runs["nangrad@2"][0]
    assert math.isfinite(grad[2]["train/loss"])  # the loss was fine; its gradient was not
    assert grad[2]["train/skipped"] == 1.0 and grad[2]["train/skipped_grad_total"] == 1.0
    assert grad[3]["train/skipped"] == 0.0 and math.isfinite(grad[3]["train/grad_norm"])
    assert "1 (non-finite loss or gradient: 1)" in runs["nangrad@2"][1]
    if zero:
        return
    loss = runs["nan@2"][0]
    assert loss[2]["train/skipped"] == 1.0 and loss[2]["train/skipped_grad_total"] == 0.0
    # Both skipped step 2 entirely: step 3 sees the same weights, optimizer state and batch.
    assert grad[3]["train/loss"] == loss[3]["train/loss"]
    assert grad[3]["train/grad_norm"] == pytest.approx(loss[3]["train/grad_norm"], rel=1e-12)
