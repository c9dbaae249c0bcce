"""Synthetic task data: deterministic from (seed, step), resumable, SP/DP slices of one global batch,
answers exactly where the layout says, and one-line errors for impossible settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.data.stream import IGNORE_INDEX, DataConfigError
from trainer.data.tasks import (
    DIGITS,
    MARK,
    UPPER,
    MixParams,
    PasskeyParams,
    RecallParams,
    TaskParams,
    TaskSampler,
    check,
    passkey_sequence,
    recall_sequence,
)

SEQ = 96


def _params(task="passkey", **kw) -> TaskParams:
    return TaskParams(task=task, passkey=kw.get("passkey", PasskeyParams()), recall=kw.get("recall", RecallParams()),
                      mix=kw.get("mix", MixParams()))


def _shards(sampler, n, sp_rank=0, sp_size=1):
    return [sampler.next_shard(sp_rank, sp_size) for _ in range(n)]


@pytest.mark.parametrize("task", ["passkey", "recall", "mix"])
def test_same_seed_same_batches_and_resume_continues_exactly(task):
    text = np.arange(5000, dtype=np.uint8) % 97 + 30
    make = lambda: TaskSampler(_params(task), SEQ, 3, seed=7, text_tokens=text)  # noqa: E731
    a, b = make(), make()
    first = _shards(a, 5)
    assert all(torch.equal(x, y) for s, t in zip(first, _shards(b, 5)) for x, y in zip(s, t))
    assert not torch.equal(first[0][0], first[1][0])  # steps differ
    resumed = make()
    c = make()
    _shards(c, 3)
    resumed.load_state_dict(c.state_dict())
    for s, t in zip(first[3:], _shards(resumed, 2)):
        assert all(torch.equal(x, y) for x, y in zip(s, t))


@pytest.mark.parametrize("task", ["passkey", "recall"])
def test_sp_shards_concatenate_to_the_single_device_batch(task):
    one = TaskSampler(_params(task), SEQ, 2, seed=3).next_shard(0, 1)
    parts = [TaskSampler(_params(task), SEQ, 2, seed=3).next_shard(r, 4) for r in range(4)]
    for i in range(3):  # inputs, targets, positions
        assert torch.equal(torch.cat([p[i] for p in parts], dim=-1), one[i])


def test_dp_ranks_take_disjoint_rows_of_one_global_batch():
    whole = TaskSampler(_params(), SEQ, 4, seed=1).next_shard()
    for r in range(2):
        part = TaskSampler(_params(), SEQ, 2, seed=1, rank_in_dp=r, dp_size=2).next_shard()
        assert torch.equal(part[0], whole[0][2 * r: 2 * r + 2]) and torch.equal(part[1], whole[1][2 * r: 2 * r + 2])


def test_resume_refuses_another_setting():
    state = TaskSampler(_params(), SEQ, 2, seed=1).state_dict()
    with pytest.raises(DataConfigError, match="seed=1.*seed=2"):
        TaskSampler(_params(), SEQ, 2, seed=2).load_state_dict(state)


@pytest.mark.parametrize("depth", [(0.0, 0.0), (0.4, 0.6), (1.0, 1.0)])
def test_passkey_needle_where_said_and_answers_are_the_key(depth):
    K = 3
    for seed in range(20):
        full, answers, start = passkey_sequence(np.random.default_rng(seed), SEQ, PasskeyParams(K, depth), reserved=2)
        last = SEQ + 1 - 2 * (K + 1)  # the last start that leaves the question its K + 1 tokens
        lo, hi = (2 + round(d * (last - 2)) for d in depth)
        assert lo <= start <= hi
        assert full[start] == MARK and list(np.flatnonzero(full == MARK)) == [start, SEQ - K]
        key = full[start + 1: start + K + 1]
        assert len(set(key)) == K and np.isin(key, DIGITS).all()
        assert np.isin(full, DIGITS).sum() == 2 * K  # digits only in the needle and the answer
        assert np.array_equal(np.flatnonzero(answers), np.arange(SEQ - K, SEQ))
        assert np.array_equal(full[1:][answers], key)  # targets[t] = full[t + 1]


def test_passkey_inside_the_first_positions():
    p = PasskeyParams(key_len=2, first_positions=8)
    starts = {passkey_sequence(np.random.default_rng(s), SEQ, p, reserved=1)[2] for s in range(200)}
    assert starts == set(range(1, 6))  # needle [start, start+2] inside [1, 8): every such start occurs


def test_recall_answers_are_the_values_of_the_asked_keys():
    r = RecallParams(pairs=5, queries=3, distance=[10, 20])
    for seed in range(20):
        full, answers, start = recall_sequence(np.random.default_rng(seed), SEQ, r)
        pairs = dict(zip(full[start: start + 10: 2].tolist(), full[start + 1: start + 10: 2].tolist()))
        assert len(pairs) == 5 and np.isin(list(pairs), UPPER).all()
        q0 = SEQ + 1 - 6
        assert 10 <= q0 - (start + 10) <= 20  # the gap between the pairs and the questions
        asked = np.flatnonzero(answers)
        assert list(asked) == [q0, q0 + 2, q0 + 4]
        assert [full[t + 1] for t in asked] == [pairs[full[t]] for t in asked]
        assert len(set(full[asked].tolist())) == 3


def test_recall_without_distance_starts_at_the_first_free_position():
    full, _, start = recall_sequence(np.random.default_rng(0), SEQ, RecallParams(pairs=4, queries=2), reserved=3)
    assert start == 3 and full[3] in UPPER


def test_mix_rows_are_text_windows_or_task_rows():
    text = np.random.default_rng(0).integers(32, 127, size=20000).astype(np.uint8)
    s = TaskSampler(_params("mix", mix=MixParams("passkey", 0.5)), SEQ, 8, seed=0, text_tokens=text)
    kinds = []
    for _ in range(6):
        x, y, _ = s.next_shard()
        for row_x, row_y in zip(x, y):
            scored = int((row_y != IGNORE_INDEX).sum())
            kinds.append(scored)
            if scored == SEQ:  # a text window: next-token targets everywhere
                assert torch.equal(row_y[:-1], row_x[1:])
            else:
                assert scored == PasskeyParams().key_len
    assert 0 < kinds.count(SEQ) < len(kinds)  # both kinds occur (48 rows at probability 1/2)


@pytest.mark.parametrize("params,seq,match", [
    (_params("nope"), SEQ, r"^data\.task: must be one of text, passkey, recall, mix"),
    (_params(passkey=PasskeyParams(key_len=11)), SEQ, r"^data\.passkey\.key_len:"),
    (_params(passkey=PasskeyParams(depth=(0.6, 0.2))), SEQ, r"^data\.passkey\.depth:"),
    (_params(passkey=PasskeyParams(first_positions=3)), SEQ, r"^data\.passkey\.first_positions:"),
    (_params("recall", recall=RecallParams(pairs=4, queries=5)), SEQ, r"^data\.recall\.queries:"),
    (_params("recall", recall=RecallParams(distance=[5, 500])), SEQ, r"^data\.recall\.distance:"),
    (_params("recall", recall=RecallParams(pairs=20, queries=20)), 64, r"^seq_len: recall"),
    (_params("mix", mix=MixParams("text")), SEQ, r"^data\.mix\.task:"),
])
def test_bad_settings_give_one_line(params, seq, match):
    with pytest.raises(DataConfigError, match=match) as e:
        check(params, seq)
    assert "\n" not in str(e.value)


def test_tasks_need_byte_tokens():
    with pytest.raises(DataConfigError, match="^data.tokenizer: task 'passkey'"):
        check(_params(), SEQ, tokenizer="bpe")


def _eval_on_rank(rank, world, wrong):
    """The task evaluation (trainer.evaluate) on SP rank ``rank`` of ``world`` with an oracle model that
    predicts every target except those at the (row, position) pairs in ``wrong``."""
    from types import SimpleNamespace

    import torch.distributed as dist
    import torch.nn.functional as F

    from trainer.evaluate import evaluate

    seq, K = 24, 8
    cfg = SimpleNamespace(data=SimpleNamespace(task="passkey", passkey=PasskeyParams(key_len=K), recall=RecallParams(),
                                               mix=MixParams()),
                          seq_len=seq, batch_size=4, seed=5, eval_batches=2, model=SimpleNamespace(n_learned_global=0))
    ctx = SimpleNamespace(sp_rank=rank, sp_size=world, sp_group=dist.group.WORLD, dp_rank=0, dp_size=1,
                          device=torch.device("cpu"))
    calls = []

    def oracle(tokens, positions, targets):
        guess = torch.where(targets == IGNORE_INDEX, 0, targets).clone()  # (B, L) the right answers
        batch = len(calls)
        calls.append(1)
        for b, p, step in wrong:
            if step == batch and p in positions.tolist():
                guess[b, positions.tolist().index(p)] += 1
        logits = F.one_hot(guess, 256).float() * 10  # (B, L, V)
        loss = F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        n = (targets != IGNORE_INDEX).sum()
        return SimpleNamespace(logits=logits, loss=loss / n.clamp(min=1), n_targets=n)

    return evaluate(oracle, None, cfg, ctx, {}, dist.group.WORLD, None)


def test_task_eval_is_exact_under_sequence_parallelism():
    from tests.mp_utils import run_workers

    # row 0 of batch 0 misses one answer on each of SP ranks 2 and 3 (positions 17 and 23): one row;
    # row 2 of batch 1 misses one answer at position 22 (rank 3).
    wrong = [(0, 17, 0), (0, 23, 0), (2, 22, 1)]
    one = run_workers(_eval_on_rank, 1, wrong, timeout_s=120)[0]
    four = run_workers(_eval_on_rank, 4, wrong, timeout_s=120)
    assert one["eval/task_acc"] == 6 / 8  # 8 rows, two of them with a miss
    assert one["eval/task_token_acc"] == 1 - 3 / 64  # 8 rows x 8 answers, 3 wrong
    for r in four:  # every rank reports the single-device numbers; sums of exact integers: equal exactly
        assert {k: v for k, v in r.items() if k != "eval/loss"} == {k: v for k, v in one.items() if k != "eval/loss"}
        assert r["eval/loss"] == pytest.approx(one["eval/loss"], rel=1e-6)  # fp32 per-shard cross-entropy sums


@pytest.mark.parametrize("overrides,match", [
    (["data.task=passkey", "objective=mlm", "attention=longformer"], r"^data\.task: passkey scores next-token answers"),
    (["data.task=recall", "data.recall.queries=9"], r"^data\.recall\.queries: must be in \[1, data\.recall\.pairs=8\]"),
    (["data.task=passkey", "data.passkey.depth=[0.5]"], r"^data\.passkey\.depth: must be a list of 2 values"),
    (["data.task=passkey", "data.tokenizer=bpe"], r"^data\.tokenizer: task 'passkey' is written in byte tokens"),
    (["data.task=copy"], r"^data\.task: must be one of text, passkey, recall, mix"),
])
def test_the_trainer_config_refuses_bad_task_settings_in_one_line(overrides, match):
    from hydra import compose, initialize_config_dir

    from tests.conftest import REPO_ROOT
    from trainer.config.validate import ConfigError, load_config

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        dcfg = compose(config_name="config", overrides=["seq_len=1024", "trainer.ckpt_dir=/tmp", *overrides])
    with pytest.raises(ConfigError, match=match) as e:
        load_config(dcfg, world_size=1)
    assert "\n" not in str(e.value)


def test_the_presets_compose_and_validate():
    from hydra import compose, initialize_config_dir

    from tests.conftest import REPO_ROOT
    from trainer.config.validate import load_config

    for preset in ("passkey_global", "passkey_middle", "recall"):
        with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
            cfg = load_config(compose(config_name="config", overrides=[f"experiment={preset}", "trainer.ckpt_dir=/tmp"]),
                              world_size=2)
        assert cfg.data.task in ("passkey", "recall") and cfg.seq_len % 2 == 0
