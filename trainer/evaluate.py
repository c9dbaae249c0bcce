"""Evaluation: one loop over fixed batches, and scorers that say what each batch adds up to.

    evaluate(ds, val_tokens, cfg, ctx, fwd, group, byte_lengths) -> the eval row

- text, clm: ``eval/loss`` (nats per target) and ``eval/bpb`` (summed nats / ln 2 / the bytes the scored
  targets encode: comparable across tokenizers); with ``eval_tasks=[passkey]`` also
  ``eval/passkey_acc@{0.1,0.5,0.9}`` (the natural-language probe, ``trainer.data.tasks.passkey_batch``).
- mlm: ``eval/mlm_loss`` and ``eval/mlm_acc`` of the masked-token predictions (bits per byte would mean
  nothing: only the chosen positions are scored, each given both of its neighbours).
- ``data.task != text``: ``eval/loss`` (the answers, plus every target of mix's text rows),
  ``eval/task_acc`` (task rows whose every answer is the argmax), ``eval/task_token_acc`` and
  ``eval/task_acc@D`` per fifth D of the sequence where the needle / pairs start.

Every batch is the same every time (the same masks too, under mlm). A scorer maps (model output,
batch) to named float64 sums; ``run_eval`` adds them over the batches and reduces them over ``group``
(every rank) in one all-reduce, and the scorer turns the totals into the row. Exact under SP: each rank
scores the positions it holds; a row's verdict (every answer right) is OR-ed over the SP group (MAX)
and counted once, on SP rank 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from trainer.data.batches import doc_kwargs, sampler_for
from trainer.data.stream import IGNORE_INDEX
from trainer.data.tasks import (
    DEPTH_BINS,
    EVAL_STREAM,
    TaskSampler,
    depth_bin,
    passkey_batch,
    shard,
    task_params,
)

PASSKEY_DEPTHS = (0.1, 0.5, 0.9)


@dataclass
class EvalBatch:
    tokens: torch.Tensor  # [B, L] this rank's shard
    targets: torch.Tensor  # [B, L], IGNORE_INDEX where nothing is scored
    positions: torch.Tensor  # [L]
    model_kwargs: dict = field(default_factory=dict)  # rope_positions / doc_ids of packed documents
    loss: bool = True  # the model computes the loss (False: logits only)
    start: np.ndarray | None = None  # [B] task rows: where the needle / pairs start, -1 for a text row


def run_eval(ds, batches: Iterable[EvalBatch], scorer, fwd: dict, group) -> dict:
    """The one evaluation loop: the scorer's sums over ``batches``, reduced over ``group``, as its row."""
    totals: dict[str, torch.Tensor] = {}
    for b in batches:
        out = ds(b.tokens, positions=b.positions, targets=b.targets if b.loss else None, **b.model_kwargs, **fwd)
        for name, value in scorer.score(out, b).items():
            totals[name] = totals.get(name, 0) + value.double().reshape(-1)
    names = list(totals)
    flat = torch.cat([totals[n] for n in names])
    dist.all_reduce(flat, group=group)
    return scorer.row(dict(zip(names, flat.split([totals[n].numel() for n in names]), strict=True)))


def _scored_logits(out, targets: torch.Tensor) -> torch.Tensor:
    """The targets that have logits: the learned global slots (a prefix) have none."""
    return targets[:, targets.shape[1] - out.logits.shape[1]:]


def row_misses(out, targets: torch.Tensor, scored: torch.Tensor, sp_group) -> torch.Tensor:
    """[B] 1.0 where a row has a wrong scored target on any SP rank (the verdict every rank then holds)."""
    miss = (scored & (out.logits.argmax(-1) != targets)).any(dim=1).double()
    dist.all_reduce(miss, op=dist.ReduceOp.MAX, group=sp_group)
    return miss


class LossScorer:
    """clm: nats, targets and the bytes they encode; mlm: nats, targets and argmax hits."""

    def __init__(self, mlm: bool, byte_lengths: np.ndarray, n_learned_global: int, device):
        self.mlm, self.g = mlm, n_learned_global
        self.nbytes = torch.from_numpy(byte_lengths).to(device)

    def score(self, out, b: EvalBatch) -> dict:
        scored = b.targets[:, b.positions >= self.g]  # learned global slots carry no loss
        sums = {"nats": out.loss.double() * out.n_targets, "targets": out.n_targets.double()}
        if self.mlm:
            sums["hits"] = ((out.logits.argmax(-1) == scored) & (scored != IGNORE_INDEX)).sum()
        else:
            sums["bytes"] = self.nbytes[scored[scored != IGNORE_INDEX]].sum()  # completion data: its targets only
        return sums

    def row(self, t: dict) -> dict:
        n = t["targets"].clamp(min=1)
        loss = float(t["nats"] / n)
        if self.mlm:
            return {"eval/mlm_loss": loss, "eval/mlm_acc": float(t["hits"] / n)}
        return {"eval/loss": loss, "eval/bpb": float(t["nats"] / t["bytes"]) / math.log(2)}


class TaskScorer:
    """Answer loss, token and row accuracy, and row accuracy per depth bin of the needle's start."""

    def __init__(self, ctx, seq_len: int):
        self.ctx, self.seq_len = ctx, seq_len

    def score(self, out, b: EvalBatch) -> dict:
        device = b.targets.device
        targets = _scored_logits(out, b.targets)
        is_task = torch.from_numpy(b.start >= 0).to(device).double()  # (B,) mix's text rows are not task rows
        scored = (targets != IGNORE_INDEX) & is_task.bool()[:, None]
        once = float(self.ctx.sp_rank == 0)  # every SP rank holds the same row verdicts
        row_hit = (1.0 - row_misses(out, targets, scored, self.ctx.sp_group)) * is_task * once
        bins = torch.from_numpy(depth_bin(np.maximum(b.start, 0), self.seq_len)).to(device)
        return {"nats": out.loss.double() * out.n_targets, "targets": out.n_targets.double(),
                "answer_hits": ((out.logits.argmax(-1) == targets) & scored).sum(), "answers": scored.sum(),
                "row_hits": row_hit.sum(), "rows": is_task.sum() * once,
                "bin_hits": torch.bincount(bins, weights=row_hit, minlength=DEPTH_BINS),
                "bin_rows": torch.bincount(bins, weights=is_task * once, minlength=DEPTH_BINS)}

    def row(self, t: dict) -> dict:
        row = {"eval/loss": float(t["nats"] / t["targets"].clamp(min=1)),
               "eval/task_token_acc": float(t["answer_hits"] / t["answers"].clamp(min=1)),
               "eval/task_acc": float(t["row_hits"] / t["rows"].clamp(min=1))}
        for b in range(DEPTH_BINS):
            if t["bin_rows"][b]:
                row[f"eval/task_acc@{b / DEPTH_BINS:.1f}"] = float(t["bin_hits"][b] / t["bin_rows"][b])
        return row


class PasskeyScorer:
    """Exact-match rate of the probe's 5 key digits (a row is right when every digit is the argmax)."""

    def __init__(self, ctx, depth: float):
        self.ctx, self.depth = ctx, depth

    def score(self, out, b: EvalBatch) -> dict:
        targets = _scored_logits(out, b.targets)
        once = float(self.ctx.sp_rank == 0)
        miss = row_misses(out, targets, targets != IGNORE_INDEX, self.ctx.sp_group)
        return {"row_hits": (1.0 - miss).sum() * once, "rows": torch.tensor(float(len(miss))) * once}

    def row(self, t: dict) -> dict:
        return {f"eval/passkey_acc@{self.depth}": float(t["row_hits"] / t["rows"].clamp(min=1))}


# --- the batches ------------------------------------------------------------------------------------

def text_batches(sampler, cfg, ctx) -> Iterable[EvalBatch]:
    """``eval_batches`` shards of the validation sampler (clm windows or their mlm corruption)."""
    for _ in range(cfg.eval_batches):
        tokens, targets, positions, *docs = (t.to(ctx.device) for t in sampler.next_shard(ctx.sp_rank, ctx.sp_size))
        yield EvalBatch(tokens, targets, positions, doc_kwargs(docs))


def task_batches(cfg, ctx, val_tokens: np.ndarray | None) -> Iterable[EvalBatch]:
    """``eval_batches`` batches of the task's eval stream (never the training one)."""
    sampler = TaskSampler(task_params(cfg.data), cfg.seq_len, cfg.batch_size, cfg.seed, ctx.dp_rank, ctx.dp_size,
                          reserved=cfg.model.n_learned_global, text_tokens=val_tokens, stream=EVAL_STREAM)
    for i in range(cfg.eval_batches):
        text_rows = next(sampler.text).numpy() if sampler.text is not None else None
        full, answers, start = sampler.batch(i, text_rows)
        tokens, targets, positions = (t.to(ctx.device) for t in shard(full, answers, ctx.sp_rank, ctx.sp_size))
        yield EvalBatch(tokens, targets, positions, start=start)


def passkey_batches(cfg, ctx, depth: float, n: int = 4) -> Iterable[EvalBatch]:
    """One batch of ``n`` probes with the needle at ``depth``, this SP rank's shard (logits only)."""
    task = passkey_batch(cfg.seq_len, depth, np.random.default_rng([cfg.seed, int(depth * 100)]), n)
    full = torch.cat([task.inputs, task.targets[:, -1:]], dim=1).numpy()  # the key's last digit ends the window
    tokens, targets, positions = shard(full, (task.targets != IGNORE_INDEX).numpy(), ctx.sp_rank, ctx.sp_size)
    yield EvalBatch(tokens.to(ctx.device), targets.to(ctx.device), positions.to(ctx.device), loss=False)


@torch.no_grad()
def evaluate(ds, val_tokens, cfg, ctx, fwd: dict, group, byte_lengths: np.ndarray) -> dict:
    """The eval row of ``cfg`` (see the module docstring). ``byte_lengths``: [vocab] the bytes each token
    id stands for (the tokenizer's)."""
    if cfg.data.task != "text":
        return run_eval(ds, task_batches(cfg, ctx, val_tokens), TaskScorer(ctx, cfg.seq_len), fwd, group)
    scorer = LossScorer(cfg.objective == "mlm", byte_lengths, cfg.model.n_learned_global, ctx.device)
    row = run_eval(ds, text_batches(sampler_for(cfg, val_tokens, ctx), cfg, ctx), scorer, fwd, group)
    if cfg.objective != "mlm" and "passkey" in cfg.eval_tasks:
        for depth in PASSKEY_DEPTHS:
            row.update(run_eval(ds, passkey_batches(cfg, ctx, depth), PasskeyScorer(ctx, depth), fwd, group))
    return row
