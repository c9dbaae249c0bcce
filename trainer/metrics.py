"""Metrics: W&B (offline by default), a JSON-lines copy in the run directory, a tqdm bar, the summary.

Rank 0 only; every other rank gets a ``Metrics`` whose methods do nothing. The W&B mode is the
``WANDB_MODE`` environment variable when set, else ``logging.wandb``; the run's files live under the
Hydra run directory (``<run_dir>/wandb/``). ``metrics.jsonl`` holds the same rows, one per logged
step, so tests and scripts read them without wandb.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from kernels.stats import head_summary, reduce_head_sums
from parallel.comm import DIRECTIONS, CommCounter
from trainer.config.validate import wandb_mode


def peak_memory_gb() -> float:
    """Peak GPU memory allocated, or the process's peak resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def layer_kinds(patterns) -> list[str]:
    """Per layer, the kind its bytes are summed under: the pattern's name (window, dense, ...)."""
    return [type(p).__name__.lower() for p in patterns]


def comm_metrics(counter: CommCounter, group, device, kinds: list[str] | None = None) -> dict[str, float]:
    """Bytes received in the step per direction (forward / backward): summed over all ranks, and the
    largest single rank's (the one the step waits for); with ``kinds`` (``layer_kinds``) also per layer
    (``comm/layer{i}/{direction}_bytes``) and per layer kind (``comm/kind/{kind}/{direction}_bytes``),
    summed over all ranks, so a model of mixed layers shows where its bytes go."""
    kinds = kinds or []
    per = [float(counter.total("recv", direction=d)) for d in DIRECTIONS]
    per += [float(counter.total("recv", direction=d, layer=i)) for i in range(len(kinds)) for d in DIRECTIONS]
    recv = torch.tensor(per, dtype=torch.float64, device=device)  # nccl reduces only device tensors
    total, peak = recv.clone(), recv[:2].clone()
    dist.all_reduce(total, group=group)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    out = {**{f"comm/{d}_bytes": float(v) for d, v in zip(DIRECTIONS, total)},
           **{f"comm/{d}_bytes_max_rank": float(v) for d, v in zip(DIRECTIONS, peak)}}
    layers = total[2:].view(len(kinds), len(DIRECTIONS)) if kinds else total[:0]
    for i, kind in enumerate(kinds):
        for j, d in enumerate(DIRECTIONS):
            out[f"comm/layer{i}/{d}_bytes"] = float(layers[i, j])
            out[f"comm/kind/{kind}/{d}_bytes"] = out.get(f"comm/kind/{kind}/{d}_bytes", 0.0) + float(layers[i, j])
    return out


def attention_metrics(stats: list[dict[str, torch.Tensor]], group) -> dict[str, float]:
    """Per layer: entropy (mean and min over heads), max logit, global-token mass and, with learned
    sinks, the sinks' mass — over every query of the global batch (the per-rank sums are reduced over
    the gradient-reduce group); with sinks every statistic is over the keys plus the sink."""
    row = {}
    for i, sums in enumerate(stats):
        heads = head_summary(reduce_head_sums(sums, group))
        row[f"attn/layer{i}/entropy_mean"] = float(heads["entropy"].mean())
        row[f"attn/layer{i}/entropy_min"] = float(heads["entropy"].min())
        row[f"attn/layer{i}/max_logit"] = float(heads["max_logit"].max())
        row[f"attn/layer{i}/global_mass"] = float(heads["global_mass"].mean())
        if "sink_mass_sum" in sums:  # model.sink_logits: the learned sinks' share of the softmax
            row[f"attn/layer{i}/sink_mass"] = float(heads["sink_mass"].mean())
    return row


class Metrics:
    def __init__(self, cfg, resolved: dict, run_dir: Path, rank: int, start_step: int):
        self.active, self.run_dir, self.run = rank == 0, run_dir, None
        self.rows: list[dict] = []
        self.bar = None
        if not self.active:
            return
        from tqdm import tqdm

        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        self.bar = tqdm(total=cfg.steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stderr)
        mode = wandb_mode(cfg)
        if mode != "disabled":
            import wandb

            self.run = wandb.init(project=cfg.logging.project, entity=cfg.logging.entity, mode=mode,
                                  name=cfg.logging.run_name or run_dir.name, dir=str(run_dir), config=resolved,
                                  settings=wandb.Settings(quiet=True))  # the summary below says where it is

    def mask_picture(self, pattern, seq_len: int) -> None:
        if not self.active:
            return
        from model.pattern.draw import draw

        path = self.run_dir / "mask.png"
        draw(pattern, seq_len, block=64, path=str(path))
        if self.run is not None:
            import wandb

            self.run.log({"attention/mask": wandb.Image(str(path))}, step=0)

    def log(self, step: int, row: dict, every: int = 1) -> None:
        if not self.active:
            return
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{row['train/loss']:.3f}", tok_s=f"{row['perf/tokens_per_s']:.0f}")
        self.rows.append({"step": step, **row})
        if step % every and not any(k.startswith("eval/") for k in row):
            return
        self.jsonl.write(json.dumps({"step": step, **row}) + "\n")
        self.jsonl.flush()
        if self.run is not None:
            self.run.log(row, step=step)

    def finish(self, extra: dict) -> str:
        """Close the bar and the W&B run; return the summary table (empty on ranks > 0)."""
        if not self.active:
            return ""
        extra = dict(extra)
        if self.run is not None:
            wandb_dir = Path(self.run.dir).parent  # .../wandb/offline-run-<time>-<id>
            extra["W&B run"] = f"{'/'.join(str(x) for x in (self.run.entity, self.run.project, self.run.id) if x)}"
            extra["W&B sync"] = f"wandb sync {wandb_dir}"  # uploads an offline run; a no-op for an online one
        self.close()
        return summary_table(self.rows, extra)

    def close(self, exit_code: int = 0) -> None:
        """Finish the W&B run (its wandb-core child exits) and close the files; safe to call twice."""
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
        if self.active:
            self.bar.close()
            self.jsonl.close()


def _last(rows: list[dict], key: str):
    return next((r[key] for r in reversed(rows) if key in r), None)


def summary_table(rows: list[dict], extra: dict) -> str:
    """Final loss, eval loss / bits per byte (clm) or masked-token loss / accuracy (mlm), throughput,
    and attention entropy per layer. Rows of the other objective's metrics are left out."""
    timed = [r["perf/tokens_per_s"] for r in rows[1:]] or [r["perf/tokens_per_s"] for r in rows]
    evals = [("final eval loss", "eval/loss"), ("eval bits/byte", "eval/bpb"), ("eval mlm loss", "eval/mlm_loss"),
             ("eval mlm accuracy", "eval/mlm_acc")]
    extra = dict(extra)
    lines = [
        *([("objective", extra.pop("objective"))] if "objective" in extra else []),  # says what the losses are
        ("final train loss", _last(rows, "train/loss")),
        *((name, _last(rows, key)) for name, key in evals if _last(rows, key) is not None),
        ("tokens/s (mean)", f"{sum(timed) / len(timed):,.0f}" if timed else None),
        ("peak memory GiB", _last(rows, "perf/peak_mem_gb")),
        ("comm bytes/step", f"forward {_last(rows, 'comm/forward_bytes'):,.0f}, backward "
                            f"{_last(rows, 'comm/backward_bytes'):,.0f} (all ranks)" if rows else None),
    ]
    last = rows[-1] if rows else {}
    kinds = sorted({k.split("/")[2] for k in last if k.startswith("comm/kind/")})
    if len(kinds) > 1:  # mixed layers: where the bytes go
        lines.append(("comm bytes/step by kind", ", ".join(
            f"{kind} {last[f'comm/kind/{kind}/forward_bytes'] + last[f'comm/kind/{kind}/backward_bytes']:,.0f}"
            for kind in kinds) + " (forward + backward, all ranks)"))
    if "train/aux_loss" in last:
        lines.append(("router aux loss", last["train/aux_loss"]))
        lines.append(("dropped tokens", last["moe/dropped_tokens"]))
    lines += [(k.replace("eval/", "eval "), v) for k, v in last.items() if k.startswith("eval/passkey")]
    layer = 0
    while _last(rows, f"attn/layer{layer}/entropy_mean") is not None:
        lines.append((f"entropy layer {layer}", f"{_last(rows, f'attn/layer{layer}/entropy_mean'):.3f} (min head "
                      f"{_last(rows, f'attn/layer{layer}/entropy_min'):.3f}, global mass "
                      f"{_last(rows, f'attn/layer{layer}/global_mass'):.3f})"))
        layer += 1
    lines += list(extra.items())
    width = max(len(k) for k, _ in lines)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) and not math.isnan(v) else str(v)  # noqa: E731
    bar = "-" * (width + 30)
    return "\n".join([bar, *(f"{k:<{width}}  {fmt(v)}" for k, v in lines), bar])
