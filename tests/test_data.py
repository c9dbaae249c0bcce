"""Data: default corpus, token cache, sampler determinism/resume/DP split, SP shards, settings errors,
synthetic tasks, the BPE tokenizer (round trip, determinism, caches, config rule, bits per byte)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from trainer.data import corpus as D
from trainer.data import sampling as S
from trainer.data import tasks as T

REPO = Path(__file__).resolve().parent.parent


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
    with pytest.raises(D.DataConfigError, match="data.bpe_vocab_size.*257"):
        D.get_tokenizer("bpe", bpe_vocab_size=100)
    with pytest.raises(D.DataConfigError, match="data.tokenizer.*bytes, bpe"):
        D.get_tokenizer("words")
    with pytest.raises(D.DataConfigError, match="data.val_fraction"):
        D.load_corpus(val_fraction=1.5)
    with pytest.raises(D.DataConfigError, match=r"^seq_len: .*\(batch_size=2"):  # real (top-level) keys
        S.LongDocSampler(np.zeros(100, np.uint8), seq_len=64, batch_size=2)
    from parallel.context import ParallelConfigError

    with pytest.raises(ParallelConfigError, match=r"^seq_len=10 must be a multiple of parallel.sequence_parallel_size=3"):
        S.shard_bounds(10, 0, 3)


TOKENS = np.arange(5000, dtype=np.int64) % 251  # short stream: epochs of ~39 windows of 128


def _take(sampler, n):
    return [next(sampler) for _ in range(n)]


def test_sampler_deterministic_and_windows_are_contiguous():
    a, b = (S.LongDocSampler(TOKENS, 128, 4, seed=7) for _ in range(2))
    for x, y in zip(_take(a, 25), _take(b, 25)):  # 25 steps cross two epoch boundaries
        assert torch.equal(x, y)
        assert x.shape == (4, 129)
        assert ((x[:, 1:] - x[:, :-1]) % 251 == 1).all()  # consecutive stream tokens
    other = S.LongDocSampler(TOKENS, 128, 4, seed=8)
    assert not torch.equal(next(other), next(S.LongDocSampler(TOKENS, 128, 4, seed=7)))


def test_sampler_exact_resume():
    s = S.LongDocSampler(TOKENS, 128, 4, seed=1)
    _take(s, 11)  # into the second epoch
    state = s.state_dict()
    expected = _take(s, 15)
    resumed = S.LongDocSampler(TOKENS, 128, 4, seed=1)
    resumed.load_state_dict(state)
    for x, y in zip(expected, _take(resumed, 15)):
        assert torch.equal(x, y)
    with pytest.raises(D.DataConfigError, match="batch_size"):
        S.LongDocSampler(TOKENS, 128, 2, seed=1).load_state_dict(state)


def test_dp_ranks_get_disjoint_windows():
    dp = 3
    samplers = [S.LongDocSampler(TOKENS, 64, 2, seed=0, rank_in_dp=r, dp_size=dp) for r in range(dp)]
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


def shard_of(batch: torch.Tensor, sp_rank: int, sp_size: int):
    """The oracle: windows [B, seq_len + 1] cut into this SP rank's (inputs, targets, positions)."""
    L = (batch.shape[1] - 1) // sp_size
    chunk = batch[:, sp_rank * L: (sp_rank + 1) * L + 1]  # one token more: the last input's target
    return chunk[:, :-1], chunk[:, 1:], torch.arange(sp_rank * L, (sp_rank + 1) * L)


def test_sp_shards_concatenate_to_the_window():
    sp, seq = 4, 128
    full = next(S.LongDocSampler(TOKENS, seq, 3, seed=5))
    shards = []
    for r in range(sp):
        logged = SliceLog(TOKENS)
        inputs, targets, positions = S.LongDocSampler(logged, seq, 3, seed=5).next_shard(r, sp)
        assert all(stop - start == seq // sp + 1 for start, stop in logged.reads)  # only its own slice
        for mine, ref in zip((inputs, targets, positions), shard_of(full, r, sp)):
            assert torch.equal(mine, ref)
        shards.append((inputs, targets, positions))
    assert torch.equal(torch.cat([s[0] for s in shards], 1), full[:, :-1])
    assert torch.equal(torch.cat([s[1] for s in shards], 1), full[:, 1:])
    assert torch.equal(torch.cat([s[2] for s in shards]), torch.arange(seq))


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.75, 1.0])
def test_passkey_at_requested_depth(depth):
    seq_len = 600
    batch = T.passkey_batch(seq_len, depth, np.random.default_rng(1), batch_size=2)
    tok = D.ByteTokenizer()
    assert batch.inputs.shape == batch.targets.shape == (2, seq_len)
    n_fill = seq_len + 1 - len(T.PROBE_NEEDLE.format(key="00000")) - len(T.PROBE_QUESTION) - 5
    # The needle starts at the sentence boundary nearest the depth; the longest filler sentence is 22.
    assert abs(batch.info["needle_pos"] - depth * n_fill) <= 22
    for b, key in enumerate(batch.info["keys"]):
        assert len(key) == 5 and key.isdigit()
        kp = batch.info["key_pos"]
        assert tok.decode(batch.inputs[b, kp: kp + 5]) == key
        assert tok.decode(batch.targets[b, -5:]) == key  # the answer: the last five targets
        assert tok.decode(batch.inputs[b, -len(T.PROBE_QUESTION) - 4:]) == T.PROBE_QUESTION + key[:4]
        assert (batch.targets[b, :-5] == T.IGNORE_INDEX).all()


# --- the BPE tokenizer ----------------------------------------------------------------------------

WORDS = ("the pass key is green blue sky sun grass here we go there and back again def return class "
         "import self value lambda yield über naïve 日本 🎉").split()


def _words_dir(tmp_path, n_files=4, n_words=3000, seed=0):
    """Word-like text (BPE has pairs to merge), with a little non-ASCII and one non-UTF-8 byte."""
    src = tmp_path / "words"
    src.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n_files):
        lines = [" ".join(rng.choice(WORDS, size=12)) for _ in range(n_words // 12)]
        (src / f"doc{i}.txt").write_bytes("\n".join(lines).encode() + b"\n\xff latin-1 \xe9t\xe9\n")
    return src


@pytest.fixture(scope="module")
def bpe_corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bpe")
    return D.load_corpus(_words_dir(tmp), "bpe", tmp / "cache", val_fraction=0.1, bpe_vocab_size=300)


@given(data=st.binary(max_size=200) | st.text(max_size=100).map(str.encode))
def test_bpe_round_trips_any_bytes(bpe_corpus, data):
    tok = bpe_corpus.tokenizer
    ids = tok.encode(data)
    assert ids.dtype == np.uint32 and (ids < tok.vocab_size).all()
    assert int(tok.byte_lengths[ids].sum()) == len(data)  # every byte in exactly one token
    assert tok.decode(ids) == data.decode("utf-8", errors="replace")
    text = data.decode("utf-8", errors="replace")
    assert np.array_equal(tok.encode(text), tok.encode(text.encode()))


def test_bpe_compresses_and_keeps_the_separator(bpe_corpus):
    tok = bpe_corpus.tokenizer
    text = "the pass key is green\nthe sky is blue über 日本 🎉"
    ids = tok.encode(text)
    assert len(ids) < 0.7 * len(text.encode()) and tok.decode(ids) == text
    assert tok.encode("a\x00b")[1] == D.DOC_SEP and tok.decode([D.DOC_SEP]) == "\x00"
    assert bpe_corpus.train.dtype == np.uint16 and bpe_corpus.vocab_size == 300
    stream = np.concatenate([bpe_corpus.train, bpe_corpus.val])
    assert int((stream == D.DOC_SEP).sum()) == bpe_corpus.n_documents  # one separator per document


def test_bpe_trains_deterministically_on_the_train_split_only(tmp_path, bpe_corpus):
    src = _words_dir(tmp_path)
    a, b = (D.load_corpus(src, "bpe", tmp_path / name, 0.1, 300) for name in ("a", "b"))
    assert (a.tokenizer.identity == b.tokenizer.identity == bpe_corpus.tokenizer.identity)
    (ja,), (jb,) = ((tmp_path / n).glob("bpe-*/tokenizer.json") for n in ("a", "b"))
    assert ja.read_bytes() == jb.read_bytes()
    assert np.array_equal(a.val, b.val)
    # The validation split: the longest suffix of at most int(total · val_fraction) bytes.
    lengths = a.tokenizer.byte_lengths
    total = int(lengths[np.concatenate([a.train, a.val])].sum())
    val_bytes = int(lengths[a.val].sum())
    assert val_bytes <= int(total * 0.1) < val_bytes + lengths[a.train[-1]]
    # The tokenizer saw only bytes before it.
    docs = D.documents(src)
    assert D.bpe.sample_bytes(docs, 0.1) == total - int(total * 0.1) <= total - val_bytes


def test_bpe_cache_reused_and_invalidated(tmp_path, monkeypatch):
    src, cache = _words_dir(tmp_path, n_files=2), tmp_path / "cache"
    first = D.load_corpus(src, "bpe", cache, 0.1, 300)
    (tok_json,) = cache.glob("bpe-*/tokenizer.json")
    mtime = tok_json.stat().st_mtime_ns

    def no_retrain(*args, **kwargs):
        raise AssertionError("the tokenizer should have been reused")

    monkeypatch.setattr(D.bpe, "train", no_retrain)
    second = D.load_corpus(src, "bpe", cache, 0.1, 300)
    assert second.cache_hit and second.cache_path == first.cache_path
    assert tok_json.stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="reused"):  # another vocabulary: another tokenizer
        D.load_corpus(src, "bpe", cache, 0.1, 400)
    (src / "doc1.txt").write_bytes(b"changed")
    with pytest.raises(AssertionError, match="reused"):  # a changed source: retrained
        D.load_corpus(src, "bpe", cache, 0.1, 300)


def test_bytes_and_bpe_caches_do_not_collide(tmp_path):
    src, cache = _words_dir(tmp_path, n_files=2), tmp_path / "cache"
    paths = {D.load_corpus(src, name, cache, 0.1, vocab).cache_path
             for name, vocab in (("bytes", 300), ("bpe", 300), ("bpe", 320))}
    assert len(paths) == 3
    again = D.load_corpus(src, "bytes", cache, 0.1)
    assert again.cache_hit and again.vocab_size == 256 and again.train.dtype == np.uint8


def _config(*overrides: str):
    from hydra import compose, initialize_config_dir

    import trainer.train  # noqa: F401  (registers the launch_stamp resolver)
    from trainer.config.validate import load_config

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        node = compose(config_name="config", overrides=[*overrides, "seq_len=512", "attention.window_left=128",
                                                          "trainer.ckpt_dir=unused"])
    return load_config(node, 1)


def test_model_vocab_follows_the_tokenizer(monkeypatch):
    from trainer.config.validate import ConfigError

    monkeypatch.setattr(D.bpe, "train", lambda *a: pytest.fail("validation must not train the tokenizer"))
    assert _config().model_config().vocab_size == 256
    assert _config("model=125m", "model.n_layers=1").model_config().vocab_size == 256  # not the preset's 50304
    assert _config("data.tokenizer=bpe", "data.bpe_vocab_size=512").model_config().vocab_size == 512
    assert _config("data.tokenizer=bpe", "model.vocab_size=5000").model_config().vocab_size == 5000
    with pytest.raises(ConfigError) as e:
        _config("data.tokenizer=bpe", "model.vocab_size=256")
    assert str(e.value) == ("model.vocab_size: must be >= the tokenizer's 4096 (data.tokenizer=bpe, "
                            "data.bpe_vocab_size=4096), got 256")
    with pytest.raises(ConfigError, match=r"^model.vocab_size: must be >= the tokenizer's 256 "
                                          r"\(data.tokenizer=bytes\), got 100$"):
        _config("model.vocab_size=100")
    with pytest.raises(ConfigError, match="^data.bpe_vocab_size: must be in"):
        _config("data.tokenizer=bpe", "data.bpe_vocab_size=100")
    with pytest.raises(ConfigError, match="^eval_tasks: passkey .* data.tokenizer=bytes"):
        _config("data.tokenizer=bpe", "eval_tasks=[passkey]")


def test_bits_per_byte_counts_the_bytes_of_the_scored_targets(monkeypatch):
    """A model with loss c nats on every token: bpb = c · n_targets / ln 2 / the targets' bytes, with the
    learned global slots (positions < 2) scored neither in the loss nor in the bytes."""
    from types import SimpleNamespace

    from trainer import evaluate
    lengths = np.array([1, 2, 3, 4])  # bytes of token ids 0..3
    monkeypatch.setattr(evaluate.dist, "all_reduce", lambda *a, **k: None)  # one rank: the sum is itself

    def ds(tokens, positions, targets, **_):
        n = (targets[:, positions >= 2] != T.IGNORE_INDEX).sum()
        return SimpleNamespace(loss=torch.tensor(0.7, dtype=torch.float64), n_targets=n)

    val = np.random.default_rng(0).integers(0, 4, size=2000)
    from tests.test_train import _compose
    from trainer.config.validate import load_config

    cfg = load_config(_compose("seq_len=64", "attention.window_left=16", "batch_size=2", "seed=3", "eval_batches=3",
                               "model.n_learned_global=2"), 1)
    ctx = SimpleNamespace(device="cpu", dp_rank=0, dp_size=1, sp_rank=0, sp_size=1)
    row = evaluate.evaluate(ds, val, cfg, ctx, {}, None, lengths)
    sampler = S.LongDocSampler(val, 64, 2, seed=3)
    scored = np.concatenate([val[s + 3: s + 65] for _ in range(3) for s in sampler.next_starts()])
    assert row["eval/loss"] == pytest.approx(0.7)
    assert row["eval/bpb"] == pytest.approx(0.7 * len(scored) / math.log(2) / lengths[scored].sum(), rel=1e-12)


def test_train_with_bpe_end_to_end(tmp_path):
    """``data.tokenizer=bpe`` trains and evaluates; eval/bpb is the eval loss per byte of its targets."""
    from tests.train_utils import _env, rows, train

    src, cache, out = _words_dir(tmp_path, n_files=3, n_words=8000), tmp_path / "cache", tmp_path / "run"
    data = ["data.tokenizer=bpe", "data.bpe_vocab_size=512", f"data.path={src}", f"data.cache_dir={cache}",
            "data.val_fraction=0.1"]
    train(*data, "seq_len=256", "attention.window_left=64", "steps=2", "eval_batches=1", "logging.wandb=disabled", "logging.mask_png=false",
          f"hydra.run.dir={out}", env=_env(WANDB_MODE="disabled"))
    last = rows(out)[2]
    corpus = D.load_corpus(src, "bpe", cache, 0.1, 512)
    assert corpus.cache_hit  # the run built it
    _, targets, _ = S.LongDocSampler(corpus.val, 256, 1, seed=0).next_shard()  # the run's one eval batch
    bytes_per_token = corpus.tokenizer.byte_lengths[targets.numpy()].mean()
    assert bytes_per_token > 2  # BPE tokens of words: several bytes each
    assert last["eval/bpb"] == pytest.approx(last["eval/loss"] / math.log(2) / bytes_per_token, rel=1e-6)


def test_passkey_probe_scores_whole_keys(monkeypatch):
    """The eval_tasks=[passkey] probe through the one evaluation loop: a model that gets every key digit
    scores 1.0, one that misses a single digit of one row of 4 scores 0.75 (a row counts only whole)."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from trainer import evaluate as E

    monkeypatch.setattr(E.dist, "all_reduce", lambda *a, **k: None)  # one rank: the sum is itself
    cfg = SimpleNamespace(seq_len=256, seed=3)
    ctx = SimpleNamespace(device="cpu", sp_rank=0, sp_size=1, sp_group=None)
    (batch,) = E.passkey_batches(cfg, ctx, 0.5)
    for wrong_rows, want in (((), 1.0), ((2,), 0.75)):
        guess = torch.where(batch.targets == T.IGNORE_INDEX, 0, batch.targets).clone()
        for r in wrong_rows:
            guess[r, -1] += 1  # the last key digit of row r

        def ds(tokens, positions, targets=None, guess=guess):
            assert targets is None  # the probe asks for logits only
            return SimpleNamespace(logits=F.one_hot(guess, 256).float())

        row = E.run_eval(ds, E.passkey_batches(cfg, ctx, 0.5), E.PasskeyScorer(ctx, 0.5), {}, None)
        assert row == {"eval/passkey_acc@0.5": want}
