"""Generation with a KV cache: decoding speed and cache bytes as the generated text grows. A script, not a test.

    python -m benchmarks.generate --tokens 1024,4096,16384,65536 --json out.json

One greedy generation per pattern (``conf/attention/<name>.yaml`` as it is: sink = causal window 512
+ 16 globals, dense = causal, no globals) on the ``--preset`` model, from a 16-token prompt, out to
the largest ``--tokens``. At each mark N (tokens generated so far) a row records the cache's bytes
(keys, values and positions held, all layers; ``allocated_bytes``: what its buffers take, the full
cache doubling its capacity when full) and ``tokens_per_s``, the decode rate over the ``--window``
steps ending at N (``tokens_per_cpu_s``: the same over this process's CPU time, which other
processes on a shared machine disturb less; one torch thread by default). The weights are a seeded random init: neither speed nor cache size depends on
their values (a checkpoint would only change which tokens come out).

A second table (``--rounds``) measures the decode speed at each length side by side (a decoder
per context length, the context prefilled with the training kernel, steps taken in turn), so that a
busy spell of a shared machine slows every length alike; ``vs_first`` is the ratio to the shortest.

Targets (issue 14): sink's cache bytes constant from 1k to 64k and its tokens/s within ±25% over
that range; dense's cache grows linearly.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from kernels.cpu import describe
from model.decode import Decoder
from model.pattern import from_config
from model.transformer import Transformer, model_preset

CONF = Path(__file__).resolve().parent.parent / "conf" / "attention"
PROMPT = 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patterns", default="sink,dense", help="conf/attention names, comma-separated")
    p.add_argument("--tokens", default="1024,4096,16384,65536", help="marks: generated tokens, comma-separated")
    p.add_argument("--preset", default="tiny", help="model preset (model/transformer.py PRESETS)")
    p.add_argument("--window", type=int, default=512, help="steps the tokens/s at a mark is measured over")
    p.add_argument("--threads", type=int, default=1, help="torch threads (single-token steps are tiny ops)")
    p.add_argument("--sections", default="sequential,interleaved", help="which tables, comma-separated")
    p.add_argument("--rounds", type=int, default=20, help="interleaved section: rounds")
    p.add_argument("--round-steps", type=int, default=50, help="interleaved section: steps per decoder per round")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def run_pattern(name: str, preset: str, marks: list[int], window: int) -> list[dict]:
    """Generate max(marks) tokens greedily, each fed back; one row per mark."""
    pattern = from_config(yaml.safe_load((CONF / f"{name}.yaml").read_text()))
    torch.manual_seed(0)
    model = Transformer(model_preset(preset), pattern).eval()
    dec = Decoder(model, PROMPT + max(marks))
    logits = dec.prefill(torch.randint(0, model.cfg.vocab_size, (1, PROMPT)))
    stamps = [(time.perf_counter(), time.process_time())]  # [n]: n tokens generated and fed (cache: PROMPT + n)
    rows = []
    for n in range(1, max(marks) + 1):
        logits = dec.step(logits.argmax(-1))
        stamps.append((time.perf_counter(), time.process_time()))
        if n in marks:
            w = min(window, n)
            rows.append({"pattern": name, "tokens": n, "cache_bytes": dec.cache_bytes(),
                         "allocated_bytes": dec.allocated_bytes(), "tokens_per_s": w / (stamps[n][0] - stamps[n - w][0]),
                         "tokens_per_cpu_s": w / (stamps[n][1] - stamps[n - w][1]),
                         "cache": dec.describe()})
            print(_fmt(rows[-1]), flush=True)
    return rows


def interleaved(name: str, preset: str, contexts: list[int], rounds: int, steps: int) -> list[dict]:
    """Decode speed at each context length, measured side by side: one decoder per length (its
    context prefilled by the training kernel), ``steps`` steps each in turn for ``rounds`` rounds, so
    a slow spell of the shared machine hits every length alike; CPU time of this process."""
    pattern = from_config(yaml.safe_load((CONF / f"{name}.yaml").read_text()))
    torch.manual_seed(0)
    model = Transformer(model_preset(preset), pattern).eval()
    decs = []
    for n in contexts:
        dec = Decoder(model, n + rounds * steps)
        decs.append([dec, dec.prefill(torch.randint(0, model.cfg.vocab_size, (1, n))), 0.0])
    for _ in range(rounds):
        for st in decs:
            t0 = time.process_time()
            for _ in range(steps):
                st[1] = st[0].step(st[1].argmax(-1))
            st[2] += time.process_time() - t0
    rows = [{"pattern": name, "context": n, "cache_bytes": st[0].cache_bytes(), "tokens_per_cpu_s": rounds * steps / st[2]}
            for n, st in zip(contexts, decs)]
    for r in rows:
        r["vs_first"] = r["tokens_per_cpu_s"] / rows[0]["tokens_per_cpu_s"]
        print(f"{r['pattern']:>8} {r['context']:>7} {r['cache_bytes']:>14,} {r['tokens_per_cpu_s']:>14.1f} "
              f"{r['vs_first']:>9.2f}", flush=True)
    return rows


def _fmt(r: dict) -> str:
    return (f"{r['pattern']:>8} {r['tokens']:>7} {r['cache_bytes']:>14,} {r['allocated_bytes']:>14,} "
            f"{r['tokens_per_s']:>10.1f} {r['tokens_per_cpu_s']:>14.1f}")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    marks = sorted(int(x) for x in args.tokens.split(","))
    sections = args.sections.split(",")
    rows, inter = [], []
    cpu = describe()
    print("\n".join(f"# {line}" for line in cpu.splitlines()))
    if "sequential" in sections:
        print(f"{'pattern':>8} {'tokens':>7} {'cache_bytes':>14} {'allocated':>14} {'tokens/s':>10} {'tokens/cpu-s':>14}")
        with torch.no_grad():
            for name in args.patterns.split(","):
                rows += run_pattern(name, args.preset, marks, args.window)
    if "interleaved" in sections:
        print(f"\ninterleaved: context prefilled, then {args.rounds} rounds x {args.round_steps} steps per length")
        print(f"{'pattern':>8} {'context':>7} {'cache_bytes':>14} {'tokens/cpu-s':>14} {'vs_first':>9}")
        with torch.no_grad():
            for name in args.patterns.split(","):
                inter += interleaved(name, args.preset, marks, args.rounds, args.round_steps)
    result = {"cpu": cpu, "preset": args.preset, "prompt_tokens": PROMPT, "window": args.window, "threads": args.threads,
              "device": "cpu", "rows": rows, "interleaved": inter}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
