"""Corpus formats (trainer/data/formats.py): the same documents as a text directory, jsonl (plain, gz,
zst), parquet, a saved Hugging Face dataset and a Megatron indexed file give one token stream and one
training run; blends by weight; prompt/completion scoring; every bad input is one line naming where."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.train_utils import SMALL, _env, rows, train
from trainer.data import corpus as D
from trainer.data import formats as F
from trainer.data.sampling import LongDocSampler
from trainer.data.stream import IGNORE_INDEX, ScoredStream

WORDS = "the pass key is green sky blue über 日本 🎉 grass sun yellow here we go there and back again".split()


def _docs(n: int = 40, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 120)))) + "\n" for _ in range(n)]


DOCS = _docs()


def write_text(root: Path, docs) -> Path:
    root.mkdir()
    for i, d in enumerate(docs):
        (root / f"doc{i:03d}.txt").write_text(d)
    return root


def write_jsonl(path: Path, rows_: list[dict]) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in rows_).encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def write_parquet(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=7)  # several row groups
    return path


def write_arrow(path: Path, columns: dict) -> Path:
    from datasets import Dataset

    Dataset.from_dict(columns).save_to_disk(str(path))
    return path


def write_megatron(prefix: Path, docs) -> Path:
    """What preprocess_data.py --append-eod writes with byte ids: each document's ids, then the EOS
    (the bytes tokenizer's separator, 0), through megatron-core's own builder."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for d in docs:
        ids = list(d.encode()) + [D.DOC_SEP]
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(f"{prefix}.idx")
    return prefix


def all_formats(tmp: Path, docs=DOCS) -> dict[str, Path]:
    rows_ = [{"id": i, "text": d} for i, d in enumerate(docs)]
    return {"text": write_text(tmp / "textdir", docs),
            "jsonl": write_jsonl(tmp / "c.jsonl", rows_),
            "jsonl.gz": write_jsonl(tmp / "c.jsonl.gz", rows_),
            "jsonl.zst": write_jsonl(tmp / "c.jsonl.zst", rows_),
            "parquet": write_parquet(tmp / "c.parquet", {"text": list(docs)}),
            "arrow": write_arrow(tmp / "ds", {"text": list(docs)}),
            "megatron": write_megatron(tmp / "mt", docs)}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    return all_formats(tmp_path_factory.mktemp("formats"))


def test_every_format_gives_the_same_token_stream(corpora, tmp_path):
    want = np.concatenate([np.append(np.frombuffer(d.encode(), np.uint8), 0) for d in DOCS])
    streams = {}
    for name, path in corpora.items():
        assert F.resolve(str(path))[0].fmt == name.split(".")[0]  # auto-detected
        c = D.load_corpus(path, cache_dir=tmp_path / name, val_fraction=0.1)
        assert c.n_documents == len(DOCS), name
        streams[name] = (np.asarray(c.train), np.asarray(c.val))
        assert np.array_equal(np.concatenate(streams[name]), want), name
    for name, (train_, _) in streams.items():  # record formats: the validation split is whole documents
        if name != "text":
            assert train_[-1] == D.DOC_SEP and np.array_equal(train_, streams["jsonl"][0]), name
    again = D.load_corpus(corpora["parquet"], cache_dir=tmp_path / "parquet", val_fraction=0.1)
    assert again.cache_hit and again.n_documents == len(DOCS)


def test_bpe_on_records_splits_at_whole_documents(corpora, tmp_path):
    c = D.load_corpus(corpora["parquet"], "bpe", tmp_path / "c", val_fraction=0.1, bpe_vocab_size=300)
    stream = np.concatenate([c.train, c.val])
    lengths = c.tokenizer.byte_lengths
    total = int(lengths[stream].sum())
    meta = json.loads(c.cache_path.with_name(c.cache_path.name.split(".")[0] + ".json").read_text())
    assert meta == {"documents": len(DOCS), "bytes": total} and total == sum(len(d.encode()) + 1 for d in DOCS)
    byte_rule = D.split_point(stream, lengths, 0.1)  # a full read of the stream, without the count
    assert len(c.train) == D.document_start(stream, byte_rule) <= byte_rule and c.train[-1] == D.DOC_SEP
    assert c.tokenizer.decode(c.val).split("\0")[:-1] == DOCS[-len(c.tokenizer.decode(c.val).split("\0")) + 1:]


def test_glob_list_and_explicit_format(corpora, tmp_path):
    paths = sorted(corpora["text"].glob("*.txt"))
    part = F.resolve_part(str(corpora["text"] / "doc00*.txt"))
    assert part.fmt == "text" and list(part.files) == paths[:10]
    a = D.load_corpus([str(paths[0]), str(paths[1])], cache_dir=tmp_path / "a", val_fraction=0.1)
    assert bytes(np.concatenate([a.train, a.val])) == (DOCS[0] + "\0" + DOCS[1] + "\0").encode()
    # data.format=text reads a jsonl file as one text document: no auto-detection then
    b = D.load_corpus(corpora["jsonl"], cache_dir=tmp_path / "b", val_fraction=0.1, fmt="text")
    assert b.n_documents == 1 and bytes(b.train[:7]) == b'{"id": '


def test_two_formats_train_to_identical_losses(corpora, tmp_path):
    runs = {}
    for name in ("jsonl.zst", "megatron"):
        run = tmp_path / name
        train(*SMALL, "seq_len=64", "attention.window_left=16", "steps=3", "eval_every=3", "logging.wandb=disabled",
              "trainer.ckpt_every=0", f"data.path={corpora[name]}", f"data.cache_dir={tmp_path / 'cache'}",
              "data.val_fraction=0.2", f"hydra.run.dir={run}", env=_env(WANDB_MODE="disabled"))
        runs[name] = rows(run)
    a, b = runs.values()
    assert [a[s]["train/loss"] for s in (1, 2, 3)] == [b[s]["train/loss"] for s in (1, 2, 3)]  # bit-identical
    assert a[3]["eval/loss"] == b[3]["eval/loss"]


def test_blend_takes_each_part_by_weight(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "a" * 99} for _ in range(300)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "b" * 99} for _ in range(300)])
    for spec in ([0.7, str(a), 0.3, str(b)], {str(a): 0.7, str(b): 0.3}):
        c = D.load_corpus(spec, cache_dir=tmp_path / "c", val_fraction=0.01)
        stream = np.concatenate([c.train, c.val])
        n_a, n_b = int((stream == ord("a")).sum()), int((stream == ord("b")).sum())
        # a runs out first (300 of its documents), b has given 3/7 as much, up to one document
        assert n_a == 300 * 99 and abs(n_b - n_a * 3 / 7) <= 100
        prefix = stream[: len(stream) // 2]  # proportional all along, not only at the end
        assert abs(int((prefix == ord("a")).sum()) / int((prefix != 0).sum()) - 0.7) < 0.01


def test_prompt_completion_scores_exactly_the_completion(tmp_path):
    rng = np.random.default_rng(1)
    upper, lower = "ABCDEFGHIJ", "klmnopqrst"  # prompts only upper case, completions only lower case
    rows_ = [{"prompt": "".join(rng.choice(list(upper), size=int(rng.integers(1, 40)))),
              "completion": "".join(rng.choice(list(lower), size=int(rng.integers(1, 20))))} for _ in range(200)]
    path = write_jsonl(tmp_path / "pc.jsonl", rows_)
    c = D.load_corpus(path, cache_dir=tmp_path / "c", val_fraction=0.1, fields=F.Fields(completion=True))
    assert isinstance(c.train, ScoredStream) and isinstance(c.val, ScoredStream)
    sampler = LongDocSampler(c.train, seq_len=64, batch_size=4, seed=0)
    n_scored = 0
    for _ in range(10):
        inputs, targets, _ = sampler.next_shard()
        nxt = torch.cat([inputs[:, 1:], targets[:, -1:]], dim=1)  # the true next token (targets may be masked)
        completion = torch.isin(nxt, torch.tensor([ord(ch) for ch in lower] + [D.DOC_SEP]))
        assert torch.equal(targets != IGNORE_INDEX, completion)  # scored = completion tokens and their EOS
        assert torch.equal(targets[completion], nxt[completion])
        n_scored += int(completion.sum())
    assert n_scored > 0
    # an SP shard holding no scored target: the model's loss is 0 over 0 targets, not NaN
    from model.pattern import Dense
    from model.transformer import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2), Dense(causal=True))
    out = model(torch.randint(0, 256, (2, 16)), positions=torch.arange(16),
                targets=torch.full((2, 16), IGNORE_INDEX))
    assert int(out.n_targets) == 0 and float(out.loss.detach()) == 0.0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _bad(tmp: Path, case: str):
    """(data.path, extra load_corpus settings, the message expected) of one bad input."""
    j = tmp / "bad.jsonl"
    good = [{"text": "fine"}, {"text": "also fine"}]
    if case == "malformed line":
        j.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken}\n')
        return j, {}, rf"^data.path: {j}:3: not valid JSON \(Expecting value at column 10\)$"
    if case == "missing key":
        write_jsonl(j, [*good, {"body": "x", "id": 3}])
        return j, {}, rf"^data.path: {j}:3: no key 'text' \(keys found: 'body', 'id'\); set data.text_key$"
    if case == "not a string":
        write_jsonl(j, [*good, {"text": 17}])
        return j, {}, rf"^data.path: {j}:3: 'text' holds int, not a string$"
    if case == "invalid utf-8":
        j.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
        return j, {}, rf"^data.path: {j}:2: invalid UTF-8 at byte 30 of the file; jsonl must be UTF-8$"
    if case == "parquet without the column":
        p = write_parquet(tmp / "bad.parquet", {"body": ["x"]})
        return p, {}, rf"^data.path: {p}: no column 'text' \(columns: body\); set data.text_key$"
    if case == "arrow without the column":
        p = write_arrow(tmp / "badds", {"body": ["x"]})
        return p, {}, rf"^data.path: {p}/data-00000-of-00001.arrow: no column 'text' \(columns: body\)"
    if case == "parquet null value":
        p = write_parquet(tmp / "null.parquet", {"text": ["x", None]})
        return p, {}, rf"^data.path: {p}: row 1: 'text' holds null, not a string$"
    if case == "empty corpus":
        write_jsonl(j, [])
        j.write_text("\n\n")
        return j, {}, r"^data.path: '.*bad.jsonl' holds no document \(the corpus is empty\)$"
    if case == "bin without idx":
        write_megatron(tmp / "m", DOCS[:2])
        (tmp / "m.idx").unlink()
        return tmp / "m.bin", {}, rf"^data.path: megatron file '{tmp}/m.bin' has no idx file '{tmp}/m.idx'"
    if case == "bin size contradicts the index":
        write_megatron(tmp / "m", DOCS[:2])
        with open(tmp / "m.bin", "ab") as f:
            f.write(b"\0\0")
        n = 2 * (len(DOCS[0].encode()) + len(DOCS[1].encode()) + 2)
        return tmp / "m", {}, rf"^data.path: {tmp}/m.bin has {n + 2} bytes, its index {tmp}/m.idx says {n} "
    if case == "megatron ids beyond the vocabulary":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
        builder = IndexedDatasetBuilder(f"{tmp}/v.bin", dtype=np.uint16)
        builder.add_document(torch.tensor([5, 300, 0]), [3])
        builder.finalize(f"{tmp}/v.idx")
        return tmp / "v", {}, rf"^data.path: {tmp}/v.bin: document 0: token id 300 is outside the tokenizer's"
    if case == "blend weight not positive":
        write_jsonl(j, good)
        return [0.5, str(j), -0.5, str(j)], {}, rf"^data.path: the blend weight of '{j}' must be a positive number"
    if case == "unknown format":
        write_jsonl(j, good)
        return j, {"fmt": "csv"}, r"^data.format: must be one of auto, text, jsonl, parquet, arrow, megatron; got"
    if case == "missing path":
        return tmp / "nope", {}, r"^data.path: '.*nope' does not exist; set it to a file"
    raise AssertionError(case)


BAD = ["malformed line", "missing key", "not a string", "invalid utf-8", "parquet without the column",
       "arrow without the column", "parquet null value", "empty corpus", "bin without idx",
       "bin size contradicts the index", "megatron ids beyond the vocabulary", "blend weight not positive",
       "unknown format", "missing path"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_naming_where(case, tmp_path):
    path, extra, message = _bad(tmp_path, case)
    cache = tmp_path / "cache"
    with pytest.raises(D.DataConfigError, match=message) as e:
        D.load_corpus(path, cache_dir=cache, val_fraction=0.1, **extra)
    assert "\n" not in str(e.value)
    assert not any(cache.glob("*.bin*"))  # nothing written: no cache, no temporary file left


def test_completion_rows_need_loss_on_completion(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(D.DataConfigError, match="no key 'text' .* set data.text_key or data.loss_on=completion"):
        D.load_corpus(path, cache_dir=tmp_path / "c")
    with pytest.raises(D.DataConfigError, match=r"data.loss_on: completion needs rows .* is a text file"):
        D.load_corpus(write_text(tmp_path / "t", ["x"]), cache_dir=tmp_path / "c", fields=F.Fields(completion=True))


def test_config_validation_refuses_bad_sources_up_front(tmp_path):
    from tests.test_data import _config
    from trainer.config.validate import ConfigError

    p = write_parquet(tmp_path / "c.parquet", {"body": ["x"]})
    with pytest.raises(ConfigError, match=rf"^data.path: {p}: no column 'text'"):
        _config(f"data.path={p}")
    with pytest.raises(ConfigError, match="^data.format: must be one of"):
        _config("data.format=csv")
    with pytest.raises(ConfigError, match="^data.path: the blend weight of 'x' must be a positive number, got 0"):
        _config("data.path={x: 0}")
    with pytest.raises(ConfigError, match="^data.loss_on: completion needs"):
        _config("data.loss_on=completion")
    mt = write_megatron(tmp_path / "mt", DOCS[:3])
    with pytest.raises(ConfigError, match="^data.tokenizer: a megatron corpus holds token ids already"):
        _config(f"data.path={mt}", "data.tokenizer=bpe")
    assert _config(f"data.path=[1,{p},2,{p}]", "data.text_key=body").data.path == [1.0, str(p), 2.0, str(p)]


def test_malformed_row_exits_2_before_any_process_group(tmp_path):
    j = tmp_path / "c.jsonl"
    j.write_text('{"text": "fine"}\n[1, 2]\n')
    proc = train(f"data.path={j}", f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
                 check=False, env=_env(WANDB_MODE="disabled", RANK="0"))  # no MASTER_ADDR: a group would fail
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"config error: data.path: {j}:2: a JSON object per line is "
                                                "needed, got list"]


@pytest.mark.slow
def test_completion_sp2_trains_like_sp1_with_unscored_shards(tmp_path):
    """Prompts of 40-60 tokens, completions of 2-6: some SP shards of the first steps hold no scored
    target (checked below), and still SP=2 follows SP=1. Tolerance as tests/test_train_sinks_docs.py:
    sharding reorders fp32 sums only, ~1e-6 on the loss after 3 steps."""
    rng = np.random.default_rng(2)
    rows_ = [{"prompt": "".join(rng.choice(list("ABCDEFGHIJ"), size=int(rng.integers(40, 60)))),
              "completion": "".join(rng.choice(list("klmnop"), size=int(rng.integers(2, 6))))} for _ in range(300)]
    path, cache = write_jsonl(tmp_path / "pc.jsonl", rows_), tmp_path / "cache"
    common = [*SMALL, "seq_len=64", "attention.window_left=16", "steps=3", "eval_every=3", "logging.wandb=disabled",
              "trainer.ckpt_every=0", f"data.path={path}", f"data.cache_dir={cache}", "data.val_fraction=0.2",
              "data.loss_on=completion"]
    c = D.load_corpus(path, cache_dir=cache, val_fraction=0.2, fields=F.Fields(completion=True))
    s0, s1 = (LongDocSampler(c.train, seq_len=64, batch_size=1, seed=0) for _ in range(2))  # as SP ranks 0, 1
    counts = [int((s.next_shard(r, 2)[1] != IGNORE_INDEX).sum()) for _ in range(3) for s, r in ((s0, 0), (s1, 1))]
    assert 0 in counts and max(counts) > 0, counts  # some SP shard has nothing to score
    train(*common, f"hydra.run.dir={tmp_path / 'sp1'}", env=_env(WANDB_MODE="disabled"))
    train(*common, f"hydra.run.dir={tmp_path / 'sp2'}", nproc=2, env=_env(WANDB_MODE="disabled"))
    a, b = rows(tmp_path / "sp1"), rows(tmp_path / "sp2")
    for step in (1, 2, 3):
        assert np.isfinite(a[step]["train/loss"]) and np.isfinite(b[step]["train/loss"])
        assert a[step]["train/loss"] == pytest.approx(b[step]["train/loss"], rel=1e-5, abs=1e-6), step
    assert a[3]["eval/loss"] == pytest.approx(b[3]["eval/loss"], rel=1e-5)
