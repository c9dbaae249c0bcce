"""Attention sinks as StreamingLLM tested them: a model evaluated beyond its window with the window
alone, the window plus the first 4 tokens, and dense attention.

    python -m benchmarks.longctx_stream [--quick] [--steps 150] [--lengths 512,1024,2048,4096,8192,16384]
                                        [--run-root .cache/longctx_stream/DIR] [--json benchmarks/longctx_stream.json]
                                        [--report benchmarks/LONGCTX.md] [--figure benchmarks/longctx/streaming.png]

Issue 26, experiment 2 (``streaming``). Literature (StreamingLLM, Xiao et al. 2023): a model trained
with dense attention puts much of its attention on the first tokens, whatever they are; evaluated
with a sliding window (a) it degrades as soon as those tokens leave the window, while the window plus
the first 4 tokens as global keys (b) stays near dense attention (c).

1. train: for each trained pattern (dense; window; window + 4 sink tokens), ``torchrun
   --nproc_per_node 2 -m trainer.train parallel=sp2`` on the trainer's default text corpus (the
   Python standard library's sources, bytes) with the study's tiny model (2 layers, d_model 64),
   seq_len 4096, batch 2 (benchmarks/longctx.py's stability and cost experiments use the same data
   and model). The sink tokens are the sequence's own first 4 tokens (``attention=sink
   attention.num_global=4``, ``model.n_learned_global=0``: no learned global embeddings). A
   checkpoint already under ``--run-root`` is reused.
2. eval: every checkpoint under each eval pattern at each length, eval only, SP=2 (one ``torchrun``
   of this module with ``--eval`` per checkpoint): the model rebuilt with the eval pattern in every
   layer, the validation windows of the trainer's own sampler at that seq_len (the same windows for
   every pattern and checkpoint), the loss in nats/token (bytes: nats/byte) and its perplexity
   exp(loss), and per layer the attention entropy (nats, mean over heads and queries) and the
   attention mass on the first 4 tokens (``global_mass``; the dense eval marks them as globals,
   which changes no key set of a causal dense pattern, only what the statistics count).

Rows {experiment: "streaming", pattern (trained), eval (window | window+4 | dense), metric
(loss | ppl | entropy | first4_mass), value, eval_len, layer (entropy, first4_mass)} go to ``--json``;
the Markdown section goes at the very end of ``--report`` between markers; the figure is perplexity
against eval length.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.longctx_report import holds_over_seeds
from benchmarks.longctx_rope import (
    cell_text,
    checkpoint_of,
    deadline_arg,
    env,
    eval_start,
    header,
    label_of,
    labelled,
    lengths_arg,
    positive_args,
    seed_of,
    seeds_arg,
)

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
WINDOW, SINKS, TRAIN_LEN = 256, 4, 4096
TRAIN = ["parallel=sp2", "logging.wandb=disabled", "logging.mask_png=false", "parallel.timeout_s=300",
         f"seq_len={TRAIN_LEN}", "batch_size=2", "eval_every=0", "eval_batches=8", "logging.stats_every=50"]
TRAINED = {
    "dense": ["attention=dense"],
    "window": ["attention=window", f"attention.window_left={WINDOW}", "attention.num_global=0"],
    "sink": ["attention=sink", f"attention.window_left={WINDOW}", f"attention.num_global={SINKS}"],
}
EVALS = {  # the attention node each layer gets at eval time
    "window": {"name": "window", "causal": True, "window_left": WINDOW, "window_right": 0, "num_global": 0},
    "window+4": {"name": "sink", "causal": True, "window_left": WINDOW, "window_right": 0, "num_global": SINKS},
    "dense": {"name": "dense", "causal": True, "num_global": SINKS},  # globals: only what the stats count
}
SEEDS = (0, 1, 2)  # each trained pattern once per seed; --quick: the first
TOKENS_PER_LEN = 65536  # eval tokens per (checkpoint, eval pattern, length) up to 4k: 64 windows of 1k; 2 of 16k
DEADLINE = [math.inf]  # time.monotonic() by which every job must have ended (--deadline)
BEGIN, END = "<!-- longctx_stream: begin -->", "<!-- longctx_stream: end -->"


def eval_shape(n: int, tokens: int) -> tuple[int, int]:
    """(batch, batches) for ``tokens`` eval tokens of windows of ``n`` (half as many beyond the training
    length: dense costs n per token there): batches of at most 8k tokens."""
    tokens = tokens if n <= TRAIN_LEN else tokens // 2
    batch = max(1, 8192 // n)
    return batch, max(1, tokens // (n * batch))


def budget(timeout: float) -> float:
    """A job's timeout: ``timeout``, or less where --deadline comes first."""
    return max(1.0, min(timeout, DEADLINE[0] - time.monotonic()))


def train(label: str, run_dir: Path, steps: int, timeout: float, extra: list[str], seed: int = 0) -> Path:
    """The trained pattern's checkpoint after ``steps`` (trained now unless it exists)."""
    from launch.proc import run_process_group

    ckpt = checkpoint_of(run_dir, steps)
    if ckpt.is_dir():
        print(f"{label}: reusing {ckpt}", flush=True)
        return ckpt
    over = [*TRAIN, *extra, *TRAINED[label], f"steps={steps}", f"seed={seed}", f"trainer.ckpt_every={steps}",
            f"logging.run_name=longctx_stream-{label_of(label, seed)}", f"hydra.run.dir={run_dir}", "trainer.resume=auto"]
    print(f"[{time.strftime('%H:%M:%S')}] train {label}: {' '.join(over)}", flush=True)
    proc = run_process_group([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "trainer.train", *over],
                             cwd=REPO, env=env(), timeout=budget(timeout))
    if proc.returncode != 0 or not ckpt.is_dir():
        raise RuntimeError(f"train {label}: rc {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return ckpt


def evaluate(ckpt: Path, lengths: list[int], evals: list[str], tokens: int, dense_max: int, timeout: float) -> list[dict]:
    """One eval-only job (torchrun, SP=2) for every (eval pattern, length): the rows rank 0 prints."""
    from launch.proc import run_process_group

    argv = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "benchmarks.longctx_stream", "--eval", str(ckpt),
            "--lengths", ",".join(map(str, lengths)), "--evals", ",".join(evals), "--tokens", str(tokens),
            "--dense-max", str(dense_max)]
    try:
        proc = run_process_group(argv, cwd=REPO, env=env(), timeout=budget(timeout))
    except subprocess.TimeoutExpired as exc:  # the deadline: what it printed before is kept
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        print(f"  eval job stopped at its timeout ({exc.timeout:.0f} s)", flush=True)
        return [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    got = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0:
        why = [x for x in proc.stderr.strip().splitlines() if x.strip() and not set(x.strip()) <= set("=-")]
        print(f"  eval job rc {proc.returncode} after {len(got)} results: {(why or ['?'])[-1][:300]}", flush=True)
    return got


# --- the eval-only job (each torchrun rank) ---------------------------------------------------------

def eval_job(ckpt: Path, lengths: list[int], evals: list[str], tokens: int, dense_max: int) -> None:
    """The checkpoint's model under each eval pattern at each length, on 2 SP ranks; one JSON line each."""
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from kernels.stats import head_summary, reduce_head_sums
    from parallel.comm import CommCounter
    from trainer.config.validate import load_config
    from trainer.data.batches import doc_kwargs, sampler_for
    from trainer.data.corpus import corpus_of
    from trainer.engine import ShardedAttention
    from trainer.state.run import load_run

    ctx, base = eval_start(ckpt)
    corpus = None
    for n in lengths:
        for name in evals:
            if name == "dense" and n > dense_max:
                continue
            node = copy.deepcopy(base)
            batch, batches = eval_shape(n, tokens)
            node.seq_len, node.batch_size, node.eval_batches = n, batch, batches
            node.attention = OmegaConf.create(EVALS[name])
            cfg = load_config(node, world_size=ctx.world_size)
            if corpus is None:  # rank 0 first: it builds the token cache if absent (trainer.loop.load_data)
                if ctx.rank == 0:
                    corpus = corpus_of(cfg.data)
                dist.barrier()
                if corpus is None:
                    corpus = corpus_of(cfg.data)
            _, model, _ = load_run(ckpt, "cpu", cfg)
            fwd = dict(attention_fn=ShardedAttention(ctx, cfg.parallel, CommCounter()), seq_len=n)
            sampler = sampler_for(cfg, corpus.val, ctx)
            nats = torch.zeros((), dtype=torch.float64)
            count = torch.zeros((), dtype=torch.float64)
            sums: list[dict] = []
            t0 = time.perf_counter()
            with torch.no_grad():
                for _ in range(batches):
                    tok, tgt, pos, *docs = sampler.next_shard(ctx.sp_rank, ctx.sp_size)
                    out = model(tok, positions=pos, targets=tgt, return_stats=True, **doc_kwargs(docs), **fwd)
                    nats += out.loss.double() * out.n_targets
                    count += out.n_targets.double()
                    for i, st in enumerate(out.stats):
                        if i == len(sums):
                            sums.append({k: v.double().clone() for k, v in st.items()})
                        else:
                            acc = sums[i]
                            for k, v in st.items():
                                acc[k] = torch.maximum(acc[k], v.double()) if k == "max_logit" else acc[k] + v.double()
            totals = torch.stack([nats, count])
            dist.all_reduce(totals)
            heads = [head_summary(reduce_head_sums(s)) for s in sums]
            if ctx.rank == 0:
                loss = float(totals[0] / totals[1])
                print(json.dumps({"eval": name, "eval_len": n, "loss": loss, "ppl": math.exp(loss),
                                  "targets": int(totals[1]), "rows": batch * batches,
                                  "entropy": [float(h["entropy"].mean()) for h in heads],
                                  "first4_mass": [float(h["global_mass"].mean()) for h in heads],
                                  "forward_s": round(time.perf_counter() - t0, 1)}), flush=True)
    dist.barrier()  # no rank tears the group down while the other is still in it (a SIGABRT at exit, seen)
    dist.destroy_process_group()


# --- the report -------------------------------------------------------------------------------------

def cell_seeds(rows: list[dict], pattern: str, ev: str, metric: str, n: int, layer: int | None = None) -> dict[int, float]:
    """{seed: value} of one cell."""
    return {seed_of(r): r["value"] for r in rows if r["pattern"] == pattern and r["eval"] == ev
            and r["metric"] == metric and r["eval_len"] == n and r.get("layer") == layer}


def cell(rows: list[dict], pattern: str, ev: str, metric: str, n: int, layer: int | None = None, seed: int | None = None):
    """One cell's value: that seed's, or the median over the seeds measured (None: not measured)."""
    vals = cell_seeds(rows, pattern, ev, metric, n, layer)
    if seed is not None:
        return vals.get(seed)
    return statistics.median(vals.values()) if vals else None


def tables(rows: list[dict]) -> list[str]:
    lengths = sorted({r["eval_len"] for r in rows})
    layers = sorted({r["layer"] for r in rows if r.get("layer") is not None})
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    head = " | ".join(f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths)
    out = ["Perplexity (exp of the eval loss in nats/byte; over several seeds the median, each seed's value in "
           "parentheses):", "", f"| trained | eval | {head} |",
           "|---|---|" + "---|" * len(lengths)]
    for p in TRAINED:
        for ev in EVALS:
            if any(r["pattern"] == p and r["eval"] == ev for r in rows):
                out.append(f"| {p} | {ev} | " + " | ".join(
                    cell_text(c, ".3f", ".3f") if (c := cell_seeds(rows, p, ev, "ppl", n)) else "—" for n in lengths) + " |")
    out += ["", "Attention entropy (nats, mean over heads and queries) / mass on the first 4 tokens, per layer "
            "(medians over seeds):", "",
            f"| trained | eval | layer | {head} |", "|---|---|---|" + "---|" * len(lengths)]
    for p in TRAINED:
        for ev in EVALS:
            for layer in layers:
                if any(r["pattern"] == p and r["eval"] == ev and r.get("layer") == layer for r in rows):
                    out.append(f"| {p} | {ev} | {layer} | " + " | ".join(
                        f"{fmt(cell(rows, p, ev, 'entropy', n, layer), '.2f')} / "
                        f"{fmt(cell(rows, p, ev, 'first4_mass', n, layer), '.3f')}" for n in lengths) + " |")
    return out


def verdicts(rows: list[dict], at: int) -> list[dict]:
    """Per trained pattern at eval length ``at``: (b) within 10% of (c)'s perplexity, (a) >= 2x (c)'s, each
    for the medians over seeds and for more than half of the seeds (a seed: its own a, b, c)."""
    out = []
    for p in TRAINED:
        if not any(r["pattern"] == p for r in rows):  # not run (--quick: dense only)
            continue
        a, b, c = (cell_seeds(rows, p, ev, "ppl", at) for ev in ("window", "window+4", "dense"))
        seeds = sorted(set(a) & set(b) & set(c))
        if not seeds:
            out.append({"pattern": p, "eval_len": at, "status": "missing"})
            continue
        bc = {s: b[s] / c[s] for s in seeds}
        ac = {s: a[s] / c[s] for s in seeds}
        med = lambda d: statistics.median(d.values())  # noqa: E731
        out.append({"pattern": p, "eval_len": at, "seeds": seeds, "b_over_c": med(bc), "a_over_c": med(ac),
                    "b_over_c_per_seed": [bc[s] for s in seeds], "a_over_c_per_seed": [ac[s] for s in seeds],
                    "b_within_10pct": holds_over_seeds(abs(med(bc) - 1) <= 0.10, [abs(x - 1) <= 0.10 for x in bc.values()]),
                    "a_at_least_2x": holds_over_seeds(med(ac) >= 2.0, [x >= 2.0 for x in ac.values()])})
    return out


def verdict_text(result: dict) -> str:
    """The claim's verdict from the dense-trained model at 4x the window (the literature's setting)."""
    dense = next((x for x in result["verdicts"] if x["pattern"] == "dense" and not x.get("status")), None)
    return ("not measured" if dense is None else "reproduced" if dense["b_within_10pct"] and dense["a_at_least_2x"]
            else "partly reproduced ((b) near (c), (a) not 2x worse)" if dense["b_within_10pct"]
            else "not reproduced")


def _per_seed(v: dict, key: str) -> str:
    """`` (x / y / z, seeds 0 1 2)`` of a verdict's ratio over several seeds, else nothing."""
    if len(v.get("seeds", [])) < 2:
        return ""
    return f" ({' / '.join(f'{x:.3f}' for x in v[key + '_per_seed'])}, seeds {' '.join(map(str, v['seeds']))})"


def write_report(result: dict, path: Path) -> None:
    rows = result["rows"]
    v = result["verdicts"]
    lines = []
    for x in v:
        if x.get("status"):
            lines.append(f"- trained {x['pattern']}: missing at {x['eval_len']}")
            continue
        lines.append(f"- trained {x['pattern']}, at {x['eval_len']} tokens: (b)/(c) = {x['b_over_c']:.3f}"
                     f"{_per_seed(x, 'b_over_c')} ({'within' if x['b_within_10pct'] else 'NOT within'} 10%), (a)/(c) = "
                     f"{x['a_over_c']:.3f}{_per_seed(x, 'a_over_c')} ({'>=' if x['a_at_least_2x'] else 'below'} 2x)")
    repro = verdict_text(result)
    train_line = "; ".join(f"{p}: {t['steps']} steps, {t['train_s']:.0f} s of steps, final train loss "
                           f"{t['final_train_loss']:.3f}, trainer's 4k eval loss {t['eval_loss_4k']:.3f} nats/byte"
                           for p, t in result["training"].items())
    section = [BEGIN, "## streaming (issue 26, experiment 2; benchmarks/longctx_stream.py)", "",
               "Claim (StreamingLLM): a model trained with dense attention, evaluated beyond its window, (a) with a "
               "sliding window alone degrades once the first tokens leave the window; (b) the window plus the first "
               "4 tokens as global keys stays near (c) dense attention. Targets, at 4x the eval window: (b) within "
               "10% of (c)'s perplexity, (a) at least 2x it.", "",
               f"Setup: `{result['command']}` — {result['setup']}. Wall time {result['wall_s']:.0f} s on a shared "
               "2-core CPU machine (times are not benchmarks)."
               + "".join(f" The runs {', '.join(e['runs'])} are from an earlier invocation, `{e['command']}` "
                         f"({e['wall_s']:.0f} s)." for e in result.get("earlier", [])), "", "```", result["header"], "```", "",
               f"Training (each run's metrics.jsonl): {train_line}.", "",
               *([f"Check: the dense-trained model's dense eval at {TRAIN_LEN} here (first 4 tokens marked global, "
                  f"only for the statistics) gives {result['identity']['here_eval_loss']!r} nats vs the trainer's "
                  f"logged final eval {result['identity']['trainer_eval_loss']!r} on the same windows "
                  f"(|diff| {result['identity']['abs_diff']:.2g}).", ""] if result.get("identity") else []),
               *tables(rows), "",
               f"Verdict at {result['at']} tokens (4x the window of {WINDOW}), the dense-trained model: **{repro}** "
               "(each target for the median over seeds and for more than half of the seeds).",
               *lines, "",
               "Beyond 4k every eval length is past the training length: dense and window+4 then also meet rotary "
               "distances never seen in training (to the first tokens), the window alone never does (distances "
               f"<= {WINDOW}).",
               *(["", f"Missing: {result['missing']}"] if result.get("missing") else []),
               *(["", f"![streaming]({result['figure']})"] if result.get("figure") else []), END]
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head.rstrip("\n") + "\n\n" + rest.split(END, 1)[1].strip("\n")
    path.write_text(text.rstrip("\n") + "\n\n" + "\n".join(section) + "\n")  # always the file's last section


def plot(rows: list[dict], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    present = [p for p in TRAINED if any(r["pattern"] == p for r in rows)]  # --quick: dense only
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 4), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, p in zip(axes, present, strict=True):
        for ev, style in zip(EVALS, ("o-", "s-", "^--"), strict=True):
            lengths = sorted({r["eval_len"] for r in rows if r["pattern"] == p and r["eval"] == ev})
            pts = [(n, cell(rows, p, ev, "ppl", n)) for n in lengths]  # medians over seeds
            pts = [pt for pt in pts if pt[1] is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=ev)
        ax.axvline(TRAIN_LEN, color="grey", lw=0.8, ls=":")
        ax.axvline(4 * WINDOW, color="grey", lw=0.8, ls="-.")
        ax.set(xscale="log", yscale="log", xlabel="eval length (tokens)", title=f"trained {p}")
        ax.set_xticks(sorted({r["eval_len"] for r in rows}), [f"{n // 1024}k" if n >= 1024 else str(n)
                                                               for n in sorted({r["eval_len"] for r in rows})])
        ax.legend()
    axes[0].set_ylabel("perplexity (per byte)")
    fig.suptitle(f"streaming: eval window {WINDOW}; dotted: training length, dash-dot: 4x window")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path.relative_to(REPO / "benchmarks")) if path.is_relative_to(REPO / "benchmarks") else str(path)


def training(run_dir: Path) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = lambda key: next((r[key] for r in reversed(rows) if key in r), float("nan"))  # noqa: E731
    return {"steps": rows[-1]["step"] if rows else 0, "train_s": round(sum(r["perf/step_time_s"] for r in rows), 1),
            "final_train_loss": last("train/loss"), "eval_loss_4k": last("eval/loss")}


def finish(args, rows: list[dict], missing: list[str], root: Path, command: str, t0: float, todo: list[str],
           old: dict | None = None, labels: list[str] = ()) -> dict:
    """The result so far, written to --json, --report and --figure; ``old`` (an earlier --json): its rows and
    training of the runs (pattern, seed) not in ``labels`` are kept, and its command listed."""
    from benchmarks.data_prep import cpu_header

    old = old or {}
    kept = [r for r in old.get("rows", []) if label_of(r["pattern"], seed_of(r)) not in labels]
    rows = kept + rows
    trained = {labelled(k): t for k, t in old.get("training", {}).items() if labelled(k) not in labels}
    trained.update({lab: training(root / lab) for lab in labels if (root / lab / "metrics.jsonl").exists()})
    earlier = [c for c in old.get("earlier", []) + ([{"command": old["command"], "wall_s": old["wall_s"],
                                                       "runs": sorted({label_of(r["pattern"], seed_of(r)) for r in kept})}]
                                                     if kept and old.get("command") else []) if c["runs"]]
    at = 4 * WINDOW
    result = {"cpu": cpu_header(), "rows": rows, "wall_s": round(time.monotonic() - t0, 1), "command": command, "run_root": str(root),
              "quick": args.quick, "header": header(), "at": at, "verdicts": verdicts(rows, at),
              "training": trained, **({"earlier": earlier} if earlier else {}),
              "missing": ", ".join([*missing, *(f"{p} (not yet evaluated)" for p in todo)]),
              "setup": (f"train {args.steps} steps at seq_len {TRAIN_LEN}, batch 2, SP=2, tiny model, default text "
                        f"corpus (bytes); trained patterns dense, window {WINDOW}, window {WINDOW} + first {SINKS} "
                        f"tokens (attention=sink num_global={SINKS}, no learned globals); eval only, SP=2, eval "
                        f"window {WINDOW}, {args.tokens} validation tokens per cell up to {TRAIN_LEN} and half as "
                        f"many beyond (batches of <= 8k tokens), dense up to {args.dense_max}")}
    here = cell(rows, "dense", "dense", "loss", TRAIN_LEN, seed=0)
    trained_loss = trained.get(label_of("dense", 0), {}).get("eval_loss_4k", math.nan)
    if old.get("identity") and label_of("dense", 0) not in labels:
        result["identity"] = old["identity"]
    elif here is not None and math.isfinite(trained_loss) and eval_shape(TRAIN_LEN, args.tokens) == (2, 8):
        # the trainer's eval: batch 2, 8 batches
        result["identity"] = {"trainer_eval_loss": trained_loss, "here_eval_loss": here,
                              "abs_diff": abs(here - trained_loss)}
    result["figure"] = plot(rows, Path(args.figure))
    Path(args.json).write_text(json.dumps(result, indent=1))
    write_report(result, Path(args.report))
    return result


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the dense-trained model only (the claim's), lengths 512-4k, "
                    "half the eval tokens; outputs under the run root unless given")
    ap.add_argument("--report-only", action="store_true", help="rewrite --report and --figure from --json; run nothing")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lengths", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--patterns", default=",".join(TRAINED), help="the trained patterns to run (dense,window,sink)")
    ap.add_argument("--seeds", default=None, help="comma-separated: each pattern trained once per seed (default "
                    f"{','.join(map(str, SEEDS))}; --quick: {SEEDS[0]}); rows of other (pattern, seed) runs in --json are kept")
    ap.add_argument("--tokens", type=int, default=TOKENS_PER_LEN, help="eval tokens per (model, pattern, length)")
    ap.add_argument("--dense-max", type=int, default=16384, help="the longest dense eval")
    ap.add_argument("--run-root", default=None, help="run directories (default .cache/longctx_stream/<stamp>)")
    ap.add_argument("--json", default=None, help="default benchmarks/longctx_stream.json (--quick: RUN_ROOT/stream.json)")
    ap.add_argument("--report", default=None, help="default benchmarks/LONGCTX.md (--quick: RUN_ROOT/LONGCTX.md)")
    ap.add_argument("--figure", default=None, help="default benchmarks/longctx/streaming.png (--quick: RUN_ROOT/streaming.png)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per job")
    ap.add_argument("--deadline", default=None, help="HH:MM UTC: every job ends by then (killed at it)")
    ap.add_argument("--eval", default=None, help=argparse.SUPPRESS)  # the eval-only job, under torchrun
    ap.add_argument("--evals", default=",".join(EVALS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:  # the verdict's model and length (1024 = 4x the window) at half the eval tokens
        args.patterns, args.lengths, args.tokens = "dense", "512,1024,2048,4096", TOKENS_PER_LEN // 2
    lengths = lengths_arg(ap, args.lengths)
    root = Path(args.run_root) if args.run_root else REPO / ".cache" / "longctx_stream" / time.strftime("%Y%m%d-%H%M%S")
    out = (root, "stream.json", "streaming.png") if args.quick else (REPO / "benchmarks", "longctx_stream.json",
                                                                     "longctx/streaming.png")
    args.json = args.json or str(out[0] / out[1])
    args.report = args.report or str(out[0] / "LONGCTX.md")
    args.figure = args.figure or str(out[0] / out[2])
    if args.eval:
        return eval_job(Path(args.eval), lengths, args.evals.split(","), args.tokens, args.dense_max)
    if args.report_only:
        if not Path(args.json).is_file():
            ap.error(f"--report-only: no --json file {args.json}")
        result = json.loads(Path(args.json).read_text())
        result["verdicts"] = verdicts(result["rows"], result["at"])
        result["figure"] = plot(result["rows"], Path(args.figure))
        Path(args.json).write_text(json.dumps(result, indent=1))
        write_report(result, Path(args.report))
        return result
    seeds = seeds_arg(ap, args.seeds) if args.seeds else SEEDS[:1] if args.quick else SEEDS
    positive_args(ap, steps=args.steps, tokens=args.tokens, dense_max=args.dense_max, timeout=args.timeout)
    DEADLINE[0] = deadline_arg(ap, args.deadline)
    wanted = [p for p in args.patterns.split(",") if p]
    if not wanted or any(p not in TRAINED for p in wanted):
        ap.error(f"--patterns: comma-separated, each one of {', '.join(TRAINED)}; got {args.patterns!r}")
    print(header(), flush=True)
    t0, rows, missing = time.monotonic(), [], []
    command = " ".join(["python -m benchmarks.longctx_stream", *(sys.argv[1:] if argv is None else argv)])
    runs = [(p, seed) for p in TRAINED if p in wanted for seed in seeds]
    labels = [label_of(p, seed) for p, seed in runs]
    old = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else None
    for i, (p, seed) in enumerate(runs):  # trained then evaluated one after the other: dense, the claim's model, first
        label = label_of(p, seed)
        todo = labels[i + 1:]
        try:
            ckpt = train(p, root / label, args.steps, args.timeout, [], seed)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"  {label}: not trained: {str(exc)[:200]}", flush=True)
            missing.append(f"{label}: training did not finish ({str(exc)[:120]})")
            result = finish(args, rows, missing, root, command, t0, todo, old, labels)
            continue
        print(f"[{time.strftime('%H:%M:%S')}] eval {label}", flush=True)
        got = evaluate(ckpt, lengths, list(EVALS), args.tokens, args.dense_max, args.timeout)
        for g in got:
            print(f"  {g['eval']:>8} @ {g['eval_len']:>6}: loss {g['loss']:.4f} ppl {g['ppl']:.3f} entropy "
                  f"{[round(e, 2) for e in g['entropy']]} first4 {[round(m, 3) for m in g['first4_mass']]} "
                  f"({g['forward_s']} s)", flush=True)
            common = {"experiment": "streaming", "pattern": p, "seed": seed, "eval": g["eval"], "eval_len": g["eval_len"],
                      "rows": g["rows"], "targets": g["targets"], "forward_s": g["forward_s"]}
            rows.append({**common, "metric": "loss", "value": g["loss"], "unit": "nats/token (bytes)"})
            rows.append({**common, "metric": "ppl", "value": g["ppl"]})
            for layer, (e, m) in enumerate(zip(g["entropy"], g["first4_mass"], strict=True)):
                rows.append({**common, "metric": "entropy", "value": e, "layer": layer, "unit": "nats"})
                rows.append({**common, "metric": "first4_mass", "value": m, "layer": layer})
        for n in lengths:
            for ev in EVALS:
                if not (ev == "dense" and n > args.dense_max) and not any(
                        g["eval"] == ev and g["eval_len"] == n for g in got):
                    missing.append(f"{label}/{ev} at {n}")
        # written after every checkpoint's evaluation: an interrupted run still leaves what it measured
        result = finish(args, rows, missing, root, command, t0, todo, old, labels)
    print("\n".join(tables(result["rows"])))
    print(json.dumps(result["verdicts"], indent=1))
    print(f"wrote {args.json}, {args.report}, {result['figure']} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
