"""Data: default corpus, token cache, sampler determinism/resume/DP split, SP shards, settings errors,
synthetic tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer import data as D


def _text_dir(tmp_path, n_files=3, size=2000):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_files):
        (src / f"doc{i}.txt").write_bytes(bytes(rng.integers(32, 127, size=size, dtype=np.uint8)))
    return src


def test_default_corpus_nonempty_and_deterministic(tmp_path):
    a = D.load_corpus(cache_dir=tmp_path / "a", val_fraction=0.01)
    b = D.load_corpus(cache_dir=tmp_path / "b", val_fraction=0.01)
    assert not a.cache_hit and not b.cache_hit  # both built from the sources
    assert len(a.train) > 1_000_000 and a.n_documents > 50  # the stdlib is tens of MB of Python
    assert a.cache_path.name == b.cache_path.name
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert bytes(a.train[:7]) == b"# ==== "  # first document starts with its file header
    all_tokens = np.concatenate([a.train, a.val])
    assert int((all_tokens == D.DOC_SEP).sum()) == a.n_documents  # one separator after each document
    assert all_tokens[-1] == D.DOC_SEP
    assert len(a.val) == int(len(all_tokens) * 0.01)


def test_cache_reused_and_invalidated(tmp_path, monkeypatch):
    src = _text_dir(tmp_path)
    first = D.load_corpus(src, cache_dir=tmp_path / "cache", val_fraction=0.1)
    assert not first.cache_hit
    mtime = first.cache_path.stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(D, "build_cache", no_rebuild)
    second = D.load_corpus(src, cache_dir=tmp_path / "cache", val_fraction=0.1)
    assert second.cache_hit and second.cache_path == first.cache_path
    assert first.cache_path.stat().st_mtime_ns == mtime
    assert np.array_equal(first.train, second.train)
    assert len(first.train) + len(first.val) == 3 * 2001  # 3 files of 2000 bytes + 1 separator each
    assert isinstance(second.train, np.memmap)

    (src / "doc1.txt").write_bytes(b"changed")  # another size: another key, so a rebuild
    with pytest.raises(AssertionError, match="reused"):
        D.load_corpus(src, cache_dir=tmp_path / "cache")


def test_bad_settings_name_the_setting(tmp_path):
    with pytest.raises(D.DataConfigError, match="data.path"):
        D.load_corpus(tmp_path / "missing", cache_dir=tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataConfigError, match="data.path"):
        D.load_corpus(tmp_path / "empty", cache_dir=tmp_path / "c")
    with pytest.raises(NotImplementedError, match="data.tokenizer.*bytes"):
        D.get_tokenizer("bpe")
    with pytest.raises(D.DataConfigError, match="data.tokenizer.*bytes"):
        D.get_tokenizer("words")
    with pytest.raises(D.DataConfigError, match="data.val_fraction"):
        D.load_corpus(val_fraction=1.5)
    with pytest.raises(D.DataConfigError, match="data.seq_len"):
        D.LongDocSampler(np.zeros(100, np.uint8), seq_len=64, batch_size=2)
    with pytest.raises(D.DataConfigError, match="data.seq_len"):
        D.shard_for_sp(torch.zeros(1, 11, dtype=torch.long), 0, 3)


TOKENS = np.arange(5000, dtype=np.int64) % 251  # short stream: epochs of ~39 windows of 128


def _take(sampler, n):
    return [next(sampler) for _ in range(n)]


def test_sampler_deterministic_and_windows_are_contiguous():
    a, b = (D.LongDocSampler(TOKENS, 128, 4, seed=7) for _ in range(2))
    for x, y in zip(_take(a, 25), _take(b, 25)):  # 25 steps cross two epoch boundaries
        assert torch.equal(x, y)
        assert x.shape == (4, 129)
        assert ((x[:, 1:] - x[:, :-1]) % 251 == 1).all()  # consecutive stream tokens
    other = D.LongDocSampler(TOKENS, 128, 4, seed=8)
    assert not torch.equal(next(other), next(D.LongDocSampler(TOKENS, 128, 4, seed=7)))


def test_sampler_exact_resume():
    s = D.LongDocSampler(TOKENS, 128, 4, seed=1)
    _take(s, 11)  # into the second epoch
    state = s.state_dict()
    expected = _take(s, 15)
    resumed = D.LongDocSampler(TOKENS, 128, 4, seed=1)
    resumed.load_state_dict(state)
    for x, y in zip(expected, _take(resumed, 15)):
        assert torch.equal(x, y)
    with pytest.raises(D.DataConfigError, match="batch_size"):
        D.LongDocSampler(TOKENS, 128, 2, seed=1).load_state_dict(state)


def test_dp_ranks_get_disjoint_windows():
    dp = 3
    samplers = [D.LongDocSampler(TOKENS, 64, 2, seed=0, rank_in_dp=r, dp_size=dp) for r in range(dp)]
    steps_per_epoch = ((len(TOKENS) - 64) // 64) // (2 * dp)  # a lower bound for every epoch offset
    seen = [s for _ in range(steps_per_epoch) for smp in samplers for s in smp.next_starts().tolist()]
    assert len(seen) == len(set(seen)) == steps_per_epoch * 2 * dp  # one epoch: no window twice
    assert all(smp.epoch == 0 for smp in samplers)


class SliceLog:
    """A token array that records which slices are read."""

    def __init__(self, tokens):
        self.tokens, self.reads = tokens, []

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, sl):
        self.reads.append((sl.start, sl.stop))
        return self.tokens[sl]


def test_sp_shards_concatenate_to_the_window():
    sp, seq = 4, 128
    full = next(D.LongDocSampler(TOKENS, seq, 3, seed=5))
    shards = []
    for r in range(sp):
        logged = SliceLog(TOKENS)
        inputs, targets, positions = D.LongDocSampler(logged, seq, 3, seed=5).next_shard(r, sp)
        assert all(stop - start == seq // sp + 1 for start, stop in logged.reads)  # only its own slice
        for mine, ref in zip((inputs, targets, positions), D.shard_for_sp(full, r, sp)):
            assert torch.equal(mine, ref)
        shards.append((inputs, targets, positions))
    assert torch.equal(torch.cat([s[0] for s in shards], 1), full[:, :-1])
    assert torch.equal(torch.cat([s[1] for s in shards], 1), full[:, 1:])
    assert torch.equal(torch.cat([s[2] for s in shards]), torch.arange(seq))


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.75, 1.0])
def test_passkey_at_requested_depth(depth):
    seq_len = 600
    batch = D.passkey_batch(seq_len, depth, np.random.default_rng(1), batch_size=2)
    tok = D.ByteTokenizer()
    assert batch.inputs.shape == batch.targets.shape == (2, seq_len)
    n_fill = seq_len + 1 - len(D.NEEDLE.format(key="00000")) - len(D.QUESTION) - 5
    # The needle starts at the sentence boundary nearest the depth; the longest filler sentence is 22.
    assert abs(batch.info["needle_pos"] - depth * n_fill) <= 22
    for b, key in enumerate(batch.info["keys"]):
        assert len(key) == 5 and key.isdigit()
        kp = batch.info["key_pos"]
        assert tok.decode(batch.inputs[b, kp: kp + 5]) == key
        assert tok.decode(batch.targets[b, -5:]) == key  # the answer: the last five targets
        assert tok.decode(batch.inputs[b, -len(D.QUESTION) - 4:]) == D.QUESTION + key[:4]
        assert (batch.targets[b, :-5] == D.IGNORE_INDEX).all()


def test_associative_recall_and_accuracy():
    batch = D.associative_recall_batch(64, 6, 32, np.random.default_rng(0), batch_size=4)
    x, y = batch.inputs, batch.targets
    for b, j in enumerate(batch.info["query_index"]):
        assert x[b, -1] == x[b, 2 * j] and y[b, -1] == x[b, 2 * j + 1]  # queried key -> its value
        assert len(set(x[b, 0:12:2].tolist())) == 6  # distinct keys
    assert (y[:, :-1] == D.IGNORE_INDEX).all()
    perfect = F.one_hot(y.clamp(min=0), 32).float()
    assert D.task_accuracy(perfect, batch) == 1.0
    wrong = perfect.clone()
    wrong[0, -1] = wrong[0, -1].roll(1)
    assert D.task_accuracy(wrong, batch) == 0.75
    assert D.task_accuracy(perfect[:, 2:], batch) == 1.0  # logits without the learned global rows
