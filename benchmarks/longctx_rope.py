"""Length generalisation of retrieval from the global tokens: model.global_rope=position vs fixed.

    python -m benchmarks.longctx_rope [--lengths 4096,16384,65536,262144,1048576] [--steps 600]
                                      [--run-root .cache/longctx_rope/DIR] [--json benchmarks/longctx_rope.json]
                                      [--report benchmarks/LONGCTX.md]

Issue 26: a model trained at 4k tokens with the sink pattern (window 32 + 16 global tokens) keeps
the passkey in its global prefix (data.passkey.first_positions = 16), yet with ordinary rotary a
query at position i scores the global keys at distance i − j, never seen beyond 4k in training.
``model.global_rope=fixed`` scores them at a fixed distance whatever i is (kernels.global_part).

1. train: for each arm, ``torchrun --nproc_per_node 2 -m trainer.train parallel=sp2
   experiment=passkey_global seq_len=4096`` (the study's tiny model and passkey settings,
   benchmarks/longctx.py experiment 1), batch 8; an arm whose checkpoint is already under
   ``--run-root`` is not trained again.
2. eval: every checkpoint at every length, eval only, batch 1, SP=2 (``torchrun`` of this module
   with ``--eval``): the trainer's own task evaluation (``trainer.data.tasks.evaluate_task``: answer
   loss, exact-match accuracy) on the eval stream at that seq_len, through the trainer's sequence-
   parallel attention function.

Rows {experiment: "length_generalisation", pattern, metric (acc | loss), value, eval_len, global_rope,
rows, eval_s} go to ``--json``; the table goes into ``--report`` between markers (the rest of the
file is left as it is).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
ARMS = ("position", "fixed")
TRAIN = ["parallel=sp2", "logging.wandb=disabled", "logging.mask_png=false", "parallel.timeout_s=300",
         "experiment=passkey_global", "seq_len=4096", "batch_size=8", "eval_every=0", "eval_batches=8"]
ROWS = {4096: 64, 16384: 32, 65536: 16, 262144: 8, 1048576: 4}  # eval sequences per length (batch 1)
BEGIN, END = "<!-- longctx_rope: begin -->", "<!-- longctx_rope: end -->"


def header() -> str:
    import torch

    from benchmarks.data_prep import cpu_header

    return (f"{cpu_header()}\nload average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
            f"torch {torch.__version__}, python {platform.python_version()}")


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled", HYDRA_FULL_ERROR="0",
             TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HALO_RUN_DIR"):
        e.pop(key, None)
    return e


def checkpoint_of(run_dir: Path, steps: int) -> Path:
    return run_dir / "checkpoints" / f"step_{steps:08d}"


def train(arm: str, run_dir: Path, steps: int, timeout: float) -> Path:
    """The arm's checkpoint after ``steps`` (trained now unless it exists; resume=auto continues a stopped run)."""
    from launch.proc import run_process_group

    ckpt = checkpoint_of(run_dir, steps)
    if ckpt.is_dir():
        print(f"{arm}: reusing {ckpt}", flush=True)
        return ckpt
    over = [*TRAIN, f"steps={steps}", f"trainer.ckpt_every={steps}", f"logging.run_name=longctx_rope-{arm}",
            f"hydra.run.dir={run_dir}", "trainer.resume=auto"] + (["model.global_rope=fixed"] if arm == "fixed" else [])
    print(f"[{time.strftime('%H:%M:%S')}] train {arm}: {' '.join(over)}", flush=True)
    proc = run_process_group([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "trainer.train", *over],
                             cwd=REPO, env=env(), timeout=timeout)
    if proc.returncode != 0 or not ckpt.is_dir():
        raise RuntimeError(f"train {arm}: rc {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return ckpt


def evaluate(ckpt: Path, seq_len: int, rows: int, timeout: float, batch: int = 1, tries: int = 2) -> dict:
    """One eval-only job (torchrun, SP=2): the metrics row rank 0 prints. A failed job is run once
    more (``tries``; the row says ``tries``): a shared machine's concurrent builds can fail a start."""
    from launch.proc import run_process_group

    argv = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "benchmarks.longctx_rope", "--eval", str(ckpt),
            "--seq-len", str(seq_len), "--rows", str(rows), "--batch", str(batch)]
    for attempt in range(1, tries + 1):
        t0 = time.monotonic()
        proc = run_process_group(argv, cwd=REPO, env=env(), timeout=timeout)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("{")), None)
        if proc.returncode == 0 and line is not None:
            return {**json.loads(line), "eval_s": round(time.monotonic() - t0, 1), "tries": attempt}
        why = [x for x in proc.stderr.strip().splitlines() if x.strip() and not set(x.strip()) <= set("=-")]
        print(f"  eval failed (rc {proc.returncode}): {(why or ['?'])[-1][:300]}", flush=True)
    return {"status": f"failed {tries}x (rc {proc.returncode}): {(why or ['?'])[-1][:200]}"}


def same_as_trainer(ckpt: Path, run_dir: Path, timeout: float) -> dict:
    """The position checkpoint evaluated here exactly as the trainer's final evaluation (seq_len 4096,
    batch 8, 8 batches) against the eval/loss the trainer logged: this tree's code with the default
    global_rope=position, against the run that trained it (the same code, or an older commit's)."""
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want = next(r["eval/loss"] for r in reversed(logged) if "eval/loss" in r)
    got = evaluate(ckpt, 4096, 8, timeout, batch=8)
    out = {"trainer_eval_loss": want, "here_eval_loss": got.get("loss"), "equal": got.get("loss") == want}
    print(f"position checkpoint, the trainer's eval recomputed here: {out}", flush=True)
    return out


# --- the eval-only job (each torchrun rank) ---------------------------------------------------------

def eval_job(ckpt: Path, seq_len: int, rows: int, batch: int = 1) -> None:
    """The checkpoint's model, evaluated by the trainer's task evaluation at ``seq_len`` on 2 SP ranks."""
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from parallel.comm import CommCounter
    from parallel.context import world_context
    from trainer.config.validate import load_config
    from trainer.data.tasks import evaluate_task
    from trainer.engine import ShardedAttention
    from trainer.state.run import config_file, load_run

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    dist.init_process_group("gloo")
    ctx = world_context(timeout_s=600)
    node = OmegaConf.load(config_file(ckpt))
    node.pop("hydra", None)
    node.trainer.ckpt_dir = str(ckpt.parent)  # the run's own value names a Hydra directory
    node.seq_len, node.batch_size, node.eval_batches = seq_len, batch, rows
    cfg = load_config(node, world_size=ctx.world_size)
    _, model, _ = load_run(ckpt, "cpu", cfg)
    fwd = dict(attention_fn=ShardedAttention(ctx, cfg.parallel, CommCounter()), seq_len=seq_len)
    t0 = time.perf_counter()
    with torch.no_grad():
        row = evaluate_task(model, None, cfg, ctx, fwd, None)
    if ctx.rank == 0:
        print(json.dumps({"loss": row["eval/loss"], "acc": row["eval/task_acc"], "token_acc": row["eval/task_token_acc"],
                          "forward_s": round(time.perf_counter() - t0, 1),
                          "global_rope": cfg.model.global_rope}), flush=True)
    dist.destroy_process_group()


# --- the report -------------------------------------------------------------------------------------

def table(rows: list[dict]) -> list[str]:
    lengths = sorted({r["eval_len"] for r in rows})
    out = ["| global_rope | metric | " + " | ".join(f"{n // 1024}k" for n in lengths) + " |",
           "|---|---|" + "---|" * len(lengths)]
    for arm in ARMS:
        for metric in ("acc", "loss"):
            cells = {r["eval_len"]: r["value"] for r in rows if r["global_rope"] == arm and r["metric"] == metric}
            if cells:
                out.append(f"| {arm} | {metric} | " + " | ".join(f"{cells[n]:.4g}" if n in cells else "—"
                                                                 for n in lengths) + " |")
    return out


def write_report(result: dict, path: Path) -> None:
    rows = result["rows"]
    section = [BEGIN, "## 6. length_generalisation (benchmarks/longctx_rope.py)", "",
               "Claim (issue 26): a model trained at 4k with global tokens fails to retrieve a key held in them at "
               "longer lengths, because the rotary distances to the global keys were never seen beyond 4k; "
               "model.global_rope=fixed (every query scores the keys it sees only as globals at a fixed rotary "
               "distance, D = 1 to the last one) removes the failure.", "",
               f"Setup: `{result['command']}` — {result['setup']}. Wall time {result['wall_s']:.0f} s on this "
               "shared 2-core CPU machine (times are not benchmarks).", "",
               "The position checkpoint's final evaluation recomputed by this script (global_rope=position, the "
               f"default): eval loss {result['identity']['here_eval_loss']!r} vs the trainer's logged "
               f"{result['identity']['trainer_eval_loss']!r} ({'bit-identical' if result['identity']['equal'] else 'DIFFERENT'}).",
               "",
               "Training (from each run's metrics.jsonl; a checkpoint already under the run root is reused, not "
               "retrained): " + "; ".join(f"{arm}: {t['steps']} steps, {t['train_s']:.0f} s of steps, final train loss "
                                          f"{t['final_train_loss']:.3g}, trainer's 4k eval loss {t['eval_loss_4k']:.3g}, "
                                          f"acc {t['eval_acc_4k']:.3g}" for arm, t in result["training"].items()) + ".",
               "",
               *table(rows), "",
               "acc: exact match of the key digit (chance 0.10); loss: nats on the answer token. Rows per length: "
               + ", ".join(f"{int(n) // 1024}k: {r}" for n, r in sorted(result["rows_per_len"].items(), key=lambda x: int(x[0]))) + ".",
               *(["", f"Missing: {result['missing']}"] if result.get("missing") else []), END]
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + "\n".join(section) + rest.split(END, 1)[1]
    elif "\n## What was tried" in text:  # after the study's own experiments, before its notes
        head, rest = text.split("\n## What was tried", 1)
        text = head.rstrip("\n") + "\n\n" + "\n".join(section) + "\n\n## What was tried" + rest
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(section) + "\n"
    path.write_text(text)


def training(run_dir: Path) -> dict:
    """What the arm's training logged: steps, summed step time, final train and eval loss (4k)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = lambda key: next(r[key] for r in reversed(rows) if key in r)  # noqa: E731
    return {"steps": rows[-1]["step"], "train_s": round(sum(r["perf/step_time_s"] for r in rows), 1),
            "final_train_loss": last("train/loss"), "eval_loss_4k": last("eval/loss"), "eval_acc_4k": last("eval/task_acc")}


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,16384,65536,262144,1048576")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--run-root", default=None, help="run directories (default .cache/longctx_rope/<stamp>)")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "longctx_rope.json"))
    ap.add_argument("--report", default=str(REPO / "benchmarks" / "LONGCTX.md"))
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per job")
    ap.add_argument("--report-only", action="store_true", help="rewrite --report from --json; run nothing")
    ap.add_argument("--eval", default=None, help=argparse.SUPPRESS)  # the eval-only job, under torchrun
    ap.add_argument("--seq-len", type=int, default=4096, help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=8, help=argparse.SUPPRESS)  # eval batches
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.eval:
        return eval_job(Path(args.eval), args.seq_len, args.rows, args.batch)
    if args.report_only:  # the report of an earlier --json, nothing run
        result = json.loads(Path(args.json).read_text())
        result.setdefault("training", {arm: training(Path(result["run_root"]) / arm) for arm in ARMS})
        Path(args.json).write_text(json.dumps(result, indent=1))
        write_report(result, Path(args.report))
        return result
    print(header(), flush=True)
    root = Path(args.run_root) if args.run_root else REPO / ".cache" / "longctx_rope" / time.strftime("%Y%m%d-%H%M%S")
    lengths = [int(x) for x in args.lengths.split(",")]
    t0, rows, missing = time.monotonic(), [], []
    ckpts = {arm: train(arm, root / arm, args.steps, args.timeout) for arm in ARMS}
    identity = same_as_trainer(ckpts["position"], root / "position", args.timeout)
    for n in lengths:
        for arm in ARMS:
            got = evaluate(ckpts[arm], n, ROWS.get(n, 4), args.timeout)
            print(f"[{time.strftime('%H:%M:%S')}] {arm} @ {n}: {got}", flush=True)
            if "status" in got:
                missing.append(f"{arm} at {n}: {got['status']}")
                continue
            for metric in ("acc", "loss"):
                rows.append({"experiment": "length_generalisation", "pattern": "sink", "metric": metric,
                             "value": got[metric], "eval_len": n, "global_rope": arm, "rows": ROWS.get(n, 4),
                             "token_acc": got["token_acc"], "eval_s": got["eval_s"], "forward_s": got["forward_s"]})
    command = " ".join(["python -m benchmarks.longctx_rope", *(sys.argv[1:] if argv is None else argv)])
    result = {"rows": rows, "wall_s": round(time.monotonic() - t0, 1), "command": command, "run_root": str(root),
              "identity": identity, "training": {arm: training(root / arm) for arm in ARMS},
              "header": header(), "rows_per_len": {n: ROWS.get(n, 4) for n in lengths}, "missing": "; ".join(missing),
              "setup": (f"train {args.steps} steps at seq_len 4096, batch 8, SP=2 ({' '.join(TRAIN)}), arms "
                        "position (no override) and fixed (model.global_rope=fixed, distance 1); eval only, batch 1, "
                        "SP=2, the task's eval stream")}
    Path(args.json).write_text(json.dumps(result, indent=1))
    write_report(result, Path(args.report))
    print("\n".join(table(rows)))
    print(f"wrote {args.json}, {args.report} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
