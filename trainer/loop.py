"""The training loop. ``run`` reads top to bottom: groups, liveness, ``start`` (model, guard, engine, data,
resume, metrics), then ``one_step`` after another, each followed by the stop check, the checkpoint and the log."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from kernels.cpu import describe
from model.moe import aux_loss
from parallel.comm import CommCounter
from trainer import engine
from trainer.config.validate import TrainConfig
from trainer.data.batches import doc_kwargs, sampler_for
from trainer.data.corpus import corpus_of
from trainer.evaluate import evaluate
from trainer.metrics import Metrics, attention_metrics, comm_metrics, layer_kinds, peak_memory_gb
from trainer.state import checkpoint
from trainer.state.faults import (
    FaultInjection,
    Liveness,
    NonFiniteGuard,
    StopSignals,
    TrainingAborted,
    write_status,
)


@dataclass
class Session:
    """What every step of a run uses, built once by ``start``."""

    cfg: TrainConfig
    ctx: object  # parallel.context.ParallelContext
    ds: object  # the DeepSpeed engine
    reduce_group: object
    train_data: object  # LongDocSampler | MaskedLMSampler | TaskSampler
    val_tokens: np.ndarray
    byte_lengths: np.ndarray
    fwd: dict
    counter: CommCounter
    guard: NonFiniteGuard
    log: Metrics


def run(cfg: TrainConfig, resolved: dict, run_dir: Path, resume_from: Path | None) -> str:
    """Train; return the summary table (empty on ranks > 0). On SIGTERM/SIGUSR1/SIGINT every rank
    stops after the current step, a checkpoint is saved and the summary returned. Raises
    TrainingAborted (one line) when a peer raised or stopped answering, or the loss stays non-finite."""
    fault, signals = FaultInjection.from_env(), StopSignals()
    ctx = s = alive = None
    try:
        ctx = engine.init_distributed(cfg)
        alive = Liveness(ctx.rank, ctx.world_size, cfg.parallel.timeout_s)
        s, step = start(cfg, ctx, resolved, run_dir, resume_from)
        saved = stopped = None
        if cfg.steps == 0:  # model.init_from conversion: the imported model as a checkpoint, no step
            saved = checkpoint.save(s.ds, cfg, step, s.train_data, ctx.rank)
        while step < cfg.steps:
            row = one_step(s, step, fault)
            step += 1
            stop = signals.agreed(ctx.device)
            if stop or (cfg.trainer.ckpt_every and (step % cfg.trainer.ckpt_every == 0 or step == cfg.steps)):
                t_save = time.perf_counter()
                saved = checkpoint.save(s.ds, cfg, step, s.train_data, ctx.rank)
                row["perf/ckpt_save_s"] = time.perf_counter() - t_save
            s.log.log(step, row, cfg.logging.log_every)
            alive.completed(step)
            fault.after_step(step, ctx.rank)
            if stop:
                stopped = (f"step {step} of {cfg.steps} ({signals.received or 'a stop signal to another rank'}); "
                           "trainer.resume=auto continues")
                break
        write_status(run_dir, "stopped" if stopped else "finished", step=step, steps=cfg.steps)
        signals.restore()  # after an error they stay: the launcher's SIGTERM must not cut the error line short
        return s.log.finish(summary_extra(cfg, s, saved, run_dir, stopped))
    except RuntimeError as e:  # a failed collective: name the peer that raised or stopped answering, if one did
        lost = alive.diagnose(e) if alive is not None and not isinstance(e, TrainingAborted) else None
        if lost is not None:
            raise lost from e
        if alive is not None:  # this rank's own error: its peers will read it instead of blaming silence
            alive.report_error(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise
    except Exception as e:
        if alive is not None:
            alive.report_error(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
        raise
    finally:
        if alive is not None:
            alive.close()
        if s is not None:
            s.log.close(exit_code=1)  # a no-op after finish(); after an error, the W&B run is marked failed
        engine.teardown(ctx)


def start(cfg: TrainConfig, ctx, resolved: dict, run_dir: Path, resume_from: Path | None) -> tuple[Session, int]:
    """Model, its attention (checked by the startup guard), engine, data, resume, metrics."""
    counter = CommCounter()
    model = engine.build_model(cfg)
    engine.parallelize(model, ctx, cfg.parallel, counter)
    engine.check_startup(model, ctx, cfg.parallel, cfg.seq_len)
    ds, reduce_group = engine.build_engine(cfg, model, ctx)
    train_data, val_tokens, tokenizer = load_data(cfg, ctx)
    step = checkpoint.load(ds, resume_from, train_data) if resume_from else 0
    log = Metrics(cfg, resolved, run_dir, ctx.rank, step)
    if cfg.logging.mask_png and step == 0:
        log.mask_picture(model.patterns[0], cfg.seq_len)
    fwd = dict(seq_len=cfg.seq_len)
    guard = NonFiniteGuard(cfg.trainer.max_consecutive_nonfinite)
    return Session(cfg, ctx, ds, reduce_group, train_data, val_tokens, tokenizer.byte_lengths, fwd, counter, guard,
                   log), step


def one_step(s: Session, step: int, fault: FaultInjection) -> dict:
    """Step ``step + 1``: train, then throughput, communication, attention stats and (when due) the
    evaluation of the same step, as one metrics row."""
    cfg, ctx = s.cfg, s.ctx
    # stats on the first step and every stats_every-th (counted as completed steps, like the logs)
    with_stats = bool(cfg.logging.stats_every) and (step == 0 or (step + 1) % cfg.logging.stats_every == 0)
    batch = [t.to(ctx.device) for t in s.train_data.next_shard(ctx.sp_rank, ctx.sp_size)]
    s.counter.reset()
    t0 = time.perf_counter()
    row, stats = train_step(s.ds, batch, s.fwd, s.reduce_group, with_stats, s.guard, step + 1,
                            fault.poison(step + 1, ctx.rank), fault.poison_grad(step + 1, ctx.rank))
    dt = time.perf_counter() - t0
    tokens_per_step = cfg.seq_len * cfg.batch_size * ctx.dp_size
    row.update({"perf/step_time_s": dt, "perf/tokens_per_s": tokens_per_step / dt,
                "perf/peak_mem_gb": peak_memory_gb(),
                **comm_metrics(s.counter, s.reduce_group, ctx.device, layer_kinds(s.ds.module.patterns))})
    if stats is not None:
        row.update(attention_metrics(stats, s.reduce_group))
    if step + 1 == cfg.steps or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
        row.update(evaluate(s.ds, s.val_tokens, cfg, ctx, s.fwd, s.reduce_group, s.byte_lengths))
    return row


def summary_extra(cfg: TrainConfig, s: Session, saved: Path | None, run_dir: Path, stopped: str | None) -> dict:
    extra = {"objective": OBJECTIVE_NAMES[cfg.objective], "checkpoint": str(saved) if saved else
             "none (trainer.ckpt_every=0)", "run dir": str(run_dir),
             "skipped steps": f"{s.guard.skipped} (non-finite loss or gradient: {s.guard.skipped_grad})"}
    if not torch.cuda.is_available():  # CPU figures are only comparable on one machine: say which
        extra["cpu"] = describe().replace("\n", "; ")
    if stopped:
        extra["stopped at"] = stopped
    return extra


OBJECTIVE_NAMES = {"clm": "clm (next-token loss)", "mlm": "mlm (masked-token loss, trainer/data/mlm.py)"}


def load_data(cfg: TrainConfig, ctx):
    """(train sampler, validation tokens, tokenizer). Rank 0 trains the tokenizer (BPE) and builds the
    token cache; the others then read both."""
    d = cfg.data
    if ctx.rank == 0:
        corpus = corpus_of(d)
    dist.barrier()
    if ctx.rank != 0:
        corpus = corpus_of(d)
    return sampler_for(cfg, corpus.train, ctx), corpus.val, corpus.tokenizer


def backward_loss(out, group, group_size: int, aux_coef: float = 0.0):
    """(loss to backpropagate on this rank, global mean loss, router metrics).

    The global mean loss is Λ = Σ_r S_r / N, with S_r the sum of rank r's token losses and N the
    number of targets of the whole global batch (all ranks). DeepSpeed averages gradients over the
    G ranks of the reduce group: (1/G)·Σ_r ∇ℓ_r. With ℓ_r = S_r·G/N (N a constant, all-reduced and
    detached) that average is Σ_r ∇S_r / N = ∇Λ: the same gradient for any split into SP and DP ranks.

    Mixture of experts (``out.router``): the experts' token counts travel in the same all-reduce, so
    the load-balancing loss is the global batch's (``model.moe.aux_loss``: this rank's share, times G
    like ℓ_r) and ``aux_coef`` times it joins the loss; the metrics count tokens per expert per layer,
    and the dropped ones (none: routing is dropless; counted, not assumed).
    """
    loss_sum = out.loss * out.n_targets  # (B·L') token losses of this shard, summed
    parts = [loss_sum.detach()[None], out.n_targets.to(loss_sum.dtype)[None]]
    if out.router is not None:
        parts += [loss_sum.new_tensor([float(out.router.tokens)]), out.router.prob_sum.detach().to(loss_sum.dtype),
                  *(r.counts.to(loss_sum.dtype) for r in out.router_layers)]
    totals = torch.cat(parts)
    dist.all_reduce(totals, group=group)
    loss = loss_sum * (group_size / totals[1].clamp(min=1))
    global_loss = float(totals[0] / totals[1].clamp(min=1))
    if out.router is None:
        return loss, global_loss, {}
    E, layers = out.router.counts.shape[0], len(out.router_layers)
    tokens, prob_sum = float(totals[2]), totals[3:3 + E]
    counts = totals[3 + E:].view(layers, E)
    aux = E * float(((counts.sum(0) / tokens) * (prob_sum / tokens)).sum())  # model.moe.aux_loss over all ranks
    if aux_coef:
        loss = loss + aux_coef * group_size * aux_loss(out.router, counts.sum(0).to(out.router.prob_sum.dtype), tokens)
    k = round(float(counts[0].sum()) * layers / tokens)  # experts per token (each layer routes every token k times)
    metrics = {"train/aux_loss": aux, "moe/dropped_tokens": float(tokens * k - counts.sum())}
    for i in range(layers):
        metrics.update({f"moe/layer{i}/expert{e}_tokens": float(counts[i, e]) for e in range(E)})
        metrics[f"moe/layer{i}/max_load"] = float(counts[i].max() / counts[i].mean())  # 1.0 = perfectly balanced
    return loss, global_loss, metrics


def train_step(ds, batch, fwd: dict, group, with_stats: bool, guard: NonFiniteGuard, step: int,
               poison: bool = False, poison_grad: bool = False):
    """One optimizer step; (metrics row, per-layer stat sums or None). A non-finite global loss (the
    same value on every rank: it is all-reduced) skips backward and the optimizer step; so does a
    non-finite gradient (its norm, over the reduced gradients, is the same on every rank too)."""
    tokens, targets, positions, *docs = batch
    out = ds(tokens, positions=positions, targets=targets, return_stats=with_stats, **doc_kwargs(docs), **fwd)
    if poison:  # HALO_FAULT=nan@step
        out = out._replace(loss=out.loss * float("nan"))
    loss, global_loss, router_row = backward_loss(out, group, dist.get_world_size(group),
                                                  ds.module.cfg.router_aux_loss_coef)
    lr = ds.get_lr()[0]
    if guard.check(global_loss, step):
        return skipped_row(global_loss, lr, guard), None
    hook = next(ds.module.parameters()).register_hook(lambda g: g * float("nan")) if poison_grad else None
    ds.backward(loss)  # HALO_FAULT=nangrad@step: the hook above made one local gradient NaN
    if hook is not None:
        hook.remove()
    # ZeRO and bf16 optimizers report the (pre-clip) norm after step(); fp32 stage 0 does not, and
    # its reduced gradients (the same on every rank) are still on the parameters here.
    params = [p.grad for p in ds.module.parameters() if p.grad is not None]
    pre_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in params]))) \
        if params else float("nan")
    if params and ds.zero_optimization_stage() == 0 and guard.check(pre_norm, step, "gradient norm"):
        ds.zero_grad()  # stage 0: nothing else holds the gradients
        return skipped_row(global_loss, lr, guard), None
    skipped_before = ds.skipped_steps
    ds.step()  # ZeRO 1-3 find a non-finite norm themselves: they skip the update and clear the gradients
    norm = ds.get_global_grad_norm()
    norm = float(norm) if norm is not None else pre_norm
    if ds.skipped_steps > skipped_before and guard.check(float("nan") if math.isfinite(norm) else norm, step,
                                                         "gradient norm"):
        return skipped_row(global_loss, lr, guard), None
    row = {"train/loss": global_loss, "train/lr": lr, "train/grad_norm": norm,
           "train/skipped": 0.0, "train/skipped_total": float(guard.skipped), **router_row}
    return row, out.stats


def skipped_row(global_loss: float, lr: float, guard: NonFiniteGuard) -> dict:
    return {"train/loss": global_loss, "train/lr": lr, "train/skipped": 1.0,
            "train/skipped_total": float(guard.skipped), "train/skipped_grad_total": float(guard.skipped_grad)}


