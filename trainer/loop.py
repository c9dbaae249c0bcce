"""The training loop. ``run`` reads top to bottom: groups, model, guard, engine, data, resume, steps."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from parallel.comm import CommCounter
from trainer import checkpoint, engine
from trainer.config import TrainConfig
from trainer.data import IGNORE_INDEX, LongDocSampler, load_corpus, passkey_batch, shard_bounds
from trainer.metrics import Metrics, attention_metrics, comm_metrics, peak_memory_gb


def run(cfg: TrainConfig, resolved: dict, run_dir: Path, resume_from: Path | None) -> str:
    """Train; return the summary table (empty on ranks > 0)."""
    ctx = log = None
    try:
        ctx = engine.init_distributed(cfg)
        counter = CommCounter()
        model = engine.build_model(cfg)
        attention_fn = engine.parallelize(model, ctx, cfg.parallel, counter)
        engine.check_startup(model, ctx, cfg.parallel)
        ds, reduce_group = engine.build_engine(cfg, model, ctx)
        train_data, val_tokens = load_data(cfg, ctx)
        step = checkpoint.load(ds, resume_from, train_data) if resume_from else 0
        log = Metrics(cfg, resolved, run_dir, ctx.rank, step)
        if cfg.logging.mask_png and step == 0:
            log.mask_picture(model.patterns[0], cfg.seq_len)
        fwd = dict(attention_fn=attention_fn, seq_len=cfg.seq_len)
        tokens_per_step = cfg.seq_len * cfg.batch_size * ctx.dp_size
        saved = None
        while step < cfg.steps:
            # stats on the first step and every stats_every-th (counted as completed steps, like the logs)
            with_stats = bool(cfg.logging.stats_every) and (step == 0 or (step + 1) % cfg.logging.stats_every == 0)
            batch = [t.to(ctx.device) for t in train_data.next_shard(ctx.sp_rank, ctx.sp_size)]
            counter.reset()
            t0 = time.perf_counter()
            row, stats = train_step(ds, batch, fwd, reduce_group, with_stats)
            dt = time.perf_counter() - t0
            step += 1
            row.update({"perf/step_time_s": dt, "perf/tokens_per_s": tokens_per_step / dt,
                        "perf/peak_mem_gb": peak_memory_gb(), **comm_metrics(counter, reduce_group, ctx.device)})
            if stats is not None:
                row.update(attention_metrics(stats, reduce_group))
            if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
                row.update(evaluate(ds, val_tokens, cfg, ctx, fwd, reduce_group))
            if cfg.trainer.ckpt_every and (step % cfg.trainer.ckpt_every == 0 or step == cfg.steps):
                saved = checkpoint.save(ds, cfg, step, train_data, ctx.rank)
            log.log(step, row, cfg.logging.log_every)
        return log.finish({"checkpoint": str(saved) if saved else "none (trainer.ckpt_every=0)",
                           "run dir": str(run_dir)})
    finally:
        if log is not None:
            log.close(exit_code=1)  # a no-op after finish(); after an error, the W&B run is marked failed
        engine.teardown(ctx)


def load_data(cfg: TrainConfig, ctx):
    """(train sampler, validation tokens). Rank 0 builds the token cache; the others then read it."""
    d = cfg.data
    if ctx.rank == 0:
        corpus = load_corpus(d.path, d.tokenizer, d.cache_dir, d.val_fraction)
    dist.barrier()
    if ctx.rank != 0:
        corpus = load_corpus(d.path, d.tokenizer, d.cache_dir, d.val_fraction)
    sampler = LongDocSampler(corpus.train, cfg.seq_len, cfg.batch_size, cfg.seed, ctx.dp_rank, ctx.dp_size)
    return sampler, corpus.val


def backward_loss(out, group, group_size: int):
    """(loss to backpropagate on this rank, global mean loss).

    The global mean loss is Λ = Σ_r S_r / N, with S_r the sum of rank r's token losses and N the
    number of targets of the whole global batch (all ranks). DeepSpeed averages gradients over the
    G ranks of the reduce group: (1/G)·Σ_r ∇ℓ_r. With ℓ_r = S_r·G/N (N a constant, all-reduced and
    detached) that average is Σ_r ∇S_r / N = ∇Λ: the same gradient for any split into SP and DP ranks.
    """
    loss_sum = out.loss * out.n_targets  # (B·L') token losses of this shard, summed
    totals = torch.stack([loss_sum.detach(), out.n_targets.to(loss_sum.dtype)])
    dist.all_reduce(totals, group=group)
    return loss_sum * (group_size / totals[1].clamp(min=1)), float(totals[0] / totals[1].clamp(min=1))


def train_step(ds, batch, fwd: dict, group, with_stats: bool):
    """One optimizer step; (metrics row, per-layer stat sums or None)."""
    tokens, targets, positions = batch
    out = ds(tokens, positions=positions, targets=targets, return_stats=with_stats, **fwd)
    loss, global_loss = backward_loss(out, group, dist.get_world_size(group))
    ds.backward(loss)
    lr = ds.get_lr()[0]
    # ZeRO and bf16 optimizers report the (pre-clip) norm after step(); fp32 stage 0 does not, and
    # its reduced gradients are still on the parameters here.
    params = [p.grad for p in ds.module.parameters() if p.grad is not None]
    pre_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in params]))) \
        if params else float("nan")
    ds.step()
    norm = ds.get_global_grad_norm()
    row = {"train/loss": global_loss, "train/lr": lr, "train/grad_norm": float(norm) if norm is not None else pre_norm}
    return row, out.stats


@torch.no_grad()
def evaluate(ds, val_tokens, cfg: TrainConfig, ctx, fwd: dict, group) -> dict:
    """Mean validation loss (nats/token) and bits per byte over the same eval_batches every time."""
    sampler = LongDocSampler(val_tokens, cfg.seq_len, cfg.batch_size, cfg.seed, ctx.dp_rank, ctx.dp_size)
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for _ in range(cfg.eval_batches):
        tokens, targets, positions = (t.to(ctx.device) for t in sampler.next_shard(ctx.sp_rank, ctx.sp_size))
        out = ds(tokens, positions=positions, targets=targets, **fwd)
        totals += torch.stack([out.loss.double() * out.n_targets, out.n_targets.double()])
    dist.all_reduce(totals, group=group)
    loss = float(totals[0] / totals[1])
    row = {"eval/loss": loss, "eval/bpb": loss / math.log(2)}  # byte tokens: bits per byte = nats / ln 2
    if "passkey" in cfg.eval_tasks:
        for depth in (0.1, 0.5, 0.9):
            row[f"eval/passkey_acc@{depth}"] = passkey_accuracy(ds, cfg, ctx, fwd, depth)
    return row


def passkey_accuracy(ds, cfg: TrainConfig, ctx, fwd: dict, depth: float, n: int = 4) -> float:
    """Exact-match rate of the 5 key digits; each SP rank checks the answer positions it holds."""
    task = passkey_batch(cfg.seq_len, depth, np.random.default_rng([cfg.seed, int(depth * 100)]), n)
    lo, L = shard_bounds(cfg.seq_len, ctx.sp_rank, ctx.sp_size)
    tokens, targets = task.inputs[:, lo: lo + L].to(ctx.device), task.targets[:, lo: lo + L].to(ctx.device)
    logits = ds(tokens, positions=torch.arange(lo, lo + L, device=ctx.device), **fwd).logits
    targets = targets[:, targets.shape[1] - logits.shape[1]:]  # learned global slots have no logits
    miss = ((logits.argmax(-1) != targets) & (targets != IGNORE_INDEX)).any(dim=1).float()  # (B,)
    dist.all_reduce(miss, op=dist.ReduceOp.MAX, group=ctx.sp_group)
    return float(1.0 - miss.mean())
