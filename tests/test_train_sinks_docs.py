"""Training with learned sinks and packed documents: the data's document ids and rotary positions per
sequence shard, the config rule for globals, and SP=2 training equal to SP=1 with both features on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.train_utils import SMALL, _env, rows, train
from trainer.data.corpus import DOC_SEP
from trainer.data.sampling import LongDocSampler, document_positions

FEATURES = ["model.sink_logits=true", "data.document_mask=true", "model.n_learned_global=4", "attention.num_global=4"]


def test_document_positions_count_separators():
    tokens = torch.tensor([[5, 6, DOC_SEP, 7, 8, 9, DOC_SEP, DOC_SEP, 3]])
    doc_ids, rope = document_positions(tokens)
    assert doc_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 3]]  # a separator closes its document
    assert rope.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0]]


def test_shards_carry_the_whole_windows_ids():
    """Each SP rank's ids and positions are the slice of what one rank computes for the whole window,
    though a document may start on an earlier rank."""
    rng = np.random.default_rng(0)
    stream = rng.integers(1, 50, 5000).astype(np.uint8)
    stream[rng.choice(5000, 120, replace=False)] = DOC_SEP
    whole = LongDocSampler(stream, 96, 2, documents=True, reset_positions=True).next_shard(0, 1)
    for r in range(3):
        part = LongDocSampler(stream, 96, 2, documents=True, reset_positions=True).next_shard(r, 3)
        for a, b in zip(part, whole):
            expect = b[r * 32:(r + 1) * 32] if b.dim() == 1 else b[:, r * 32:(r + 1) * 32]
            assert torch.equal(a, expect)
    assert len(whole) == 5 and whole[3].max() > 0  # the window holds several documents


def test_document_mask_needs_learned_globals(tmp_path):
    proc = train(*SMALL, "steps=1", "data.document_mask=true", "attention.num_global=4", "model.n_learned_global=0",
                 f"hydra.run.dir={tmp_path}", check=False, env=_env(WANDB_MODE="disabled"))
    assert proc.returncode != 0
    assert "data.document_mask: needs the global tokens to be learned slots" in proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Many short documents, so every 512-token window holds several separators."""
    root = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "halo", "sink", "window", "token", "shard", "rank"]
    for i in range(300):
        text = " ".join(rng.choice(words, int(rng.integers(10, 60))))
        (root / f"doc{i:03d}.txt").write_text(text + "\n")
    return root


def test_sp2_equals_sp1_with_sinks_and_documents(corpus, tmp_path_factory):
    """Same tolerance argument as tests/test_train.py: sharding reorders fp32 sums only (LSE merges,
    the sinks' gradient summed over ranks by the all-reduce); ~1e-6 on the loss after 3 steps."""
    runs = tmp_path_factory.mktemp("train_docs")
    common = [*SMALL, *FEATURES, f"data.path={corpus}", "data.val_fraction=0.2", "steps=3", "eval_every=3",
              "logging.wandb=disabled"]
    train(*common, f"hydra.run.dir={runs / 'sp1'}", env=_env(WANDB_MODE="disabled"))
    train(*common, f"hydra.run.dir={runs / 'sp2'}", nproc=2, env=_env(WANDB_MODE="disabled"))
    a, b = rows(runs / "sp1"), rows(runs / "sp2")
    for step in range(1, 4):
        assert a[step]["train/loss"] == pytest.approx(b[step]["train/loss"], rel=1e-5, abs=1e-6), step
        assert a[step]["train/grad_norm"] == pytest.approx(b[step]["train/grad_norm"], rel=1e-5), step
    assert a[3]["eval/loss"] == pytest.approx(b[3]["eval/loss"], rel=1e-5)
    for key in ("attn/layer0/sink_mass", "attn/layer1/entropy_mean"):
        assert a[1][key] == pytest.approx(b[1][key], rel=1e-4), key  # stats include the sink, exact under SP
    assert 0 < a[1]["attn/layer0/sink_mass"] < 1
