"""How deep the training step's call to the fused C++ kernel is: the Python frames between the
trainer's ``train_step`` (trainer/loop.py) and ``FusedAttention.forward``, counted in a real run of
the trainer (one step). A script, not a test (issue 20's "frames from the training step to the kernel").

    python -m benchmarks.frames [--sp 1|2] [trainer overrides ...]

The worker (this module under ``torchrun`` for ``--sp 2``) wraps ``FusedAttention.forward``, runs
``trainer.train`` for one step in a temporary run directory, and prints rank 0's first chain: one
line per frame, ``file:function``. The default pattern is ``attention=sink`` (a band: the fused
kernel runs it under SP=1 and under the halo exchange).
"""

from __future__ import annotations

import argparse
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN = ["steps=1", "seq_len=2048", "batch_size=1", "attention=sink", "eval_every=0", "trainer.ckpt_every=0",
       "logging.wandb=disabled", "logging.mask_png=false"]


def chain(stack: list[traceback.FrameSummary]) -> list[str] | None:
    """``file:function`` of the frames after the innermost ``train_step`` of trainer/loop.py; None for
    a call from elsewhere (the SP startup guard runs the kernel before the first step)."""
    starts = [i for i, f in enumerate(stack) if f.name == "train_step" and f.filename.endswith("trainer/loop.py")]
    return [f"{os.path.relpath(f.filename, REPO)}:{f.name}" for f in stack[starts[-1] + 1:]] if starts else None


def worker(overrides: list[str], out: str) -> None:
    from kernels import fused

    inner = fused.FusedAttention.forward
    seen: list[list[str]] = []

    def forward(ctx, *args):
        if not seen and (frames := chain(traceback.extract_stack()[:-1])):  # [:-1]: this wrapper is forward
            seen.append(frames)
        return inner(ctx, *args)

    fused.FusedAttention.forward = staticmethod(forward)
    sys.argv = ["trainer.train", *overrides]
    try:  # as ``python -m trainer.train`` runs it (Hydra finds conf/ from the main module's file)
        runpy.run_module("trainer.train", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code:
            raise
    if int(os.environ.get("RANK", 0)) == 0:
        if not seen:
            raise RuntimeError("frames: the fused kernel never ran (is the extension built? the pattern a band?)")
        Path(out).write_text("\n".join(seen[0]) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sp", type=int, default=1, choices=(1, 2))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # the output file
    args, overrides = p.parse_known_args(argv)
    if args.worker:
        return worker(overrides, args.worker)
    from kernels.cpu import describe

    print("\n".join(f"# {line}" for line in describe().splitlines()))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "chain.txt")
        run = [*RUN, f"hydra.run.dir={tmp}/run", *(["parallel=sp2"] if args.sp == 2 else []), *overrides]
        launcher = ([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2"]
                    if args.sp == 2 else [sys.executable])
        subprocess.run([*launcher, "-m", "benchmarks.frames", "--worker", out, *run], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
        frames = Path(out).read_text().split()
    ours = sum(not f.startswith(".venv") and "site-packages" not in f for f in frames)
    print(f"SP={args.sp}: {len(frames)} Python frames from trainer/loop.py:train_step to the fused kernel "
          f"({ours} of this repository, {len(frames) - ours} of torch and DeepSpeed)")
    for i, f in enumerate(frames, 1):
        print(f"{i:>3}  {f}")


if __name__ == "__main__":
    main()
