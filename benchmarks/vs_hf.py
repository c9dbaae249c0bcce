"""Haloformer against Hugging Face transformers on the same Mistral weights. A script, not a test.

    python -m benchmarks.vs_hf --lengths 4096,16384,65536 --json out.json

A Mistral-shaped model (4 layers x 256, 4 heads of 64, 2 KV heads, window 1024, vocabulary 32,000)
is written once with ``save_pretrained``; each measurement then runs in a fresh process (so its
peak RSS is its own) that loads it — transformers with ``attn_implementation="sdpa"`` (its
sliding-window mask is a dense [n, n] tensor: SDPA visits every pair), Haloformer through
``model.init_from``'s import (a causal window, window_left = 1023) — and times:

- ``train``: one forward + backward of a [1, n] sequence with the next-token loss, no activation
  checkpointing (one untimed warm-up step first);
- ``prefill``: a no-grad forward that fills the KV cache; ``decode``: ``--decode`` single-token steps
  after it (transformers: its DynamicCache, keeping every key; Haloformer: the window's ring buffer).

FLOPs per token are counted for each system (``flops_per_token``): the linear layers' 2·params per
token (x3 for forward + backward), plus the attention pairs each one computes x 4·head_dim·heads
(QKᵀ and PV; transformers: all n² pairs, Haloformer: the window's ≈ n·1024). ``predicted`` is the
ratio of those counts, printed beside the measured tokens/s ratio. A process past ``--timeout`` is
``timeout``; one killed for memory, or raising MemoryError, is ``oom``. ``--chunk-loss`` adds the
chunked loss's peak memory (model.loss_chunk) at its vocabulary and length, before and after.
SP=2 rows (``haloformer_sp2``) are not measured by this script yet.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPE = dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, sliding_window=1024, max_position_embeddings=131072)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="4096,16384,65536", help="sequence lengths, comma-separated")
    p.add_argument("--tasks", default="train,prefill,decode")
    p.add_argument("--systems", default="haloformer_sp1,hf_sdpa")
    p.add_argument("--decode", type=int, default=64, help="decode steps after the prefill")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement")
    p.add_argument("--chunk-loss", default="", help="VOCAB,TOKENS for the chunked-loss memory rows, e.g. 131072,65536")
    p.add_argument("--json", default=None)
    p.add_argument("--one", nargs=4, metavar=("DIR", "SYSTEM", "TASK", "LEN"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def flops_per_token(system: str, task: str, n: int) -> float:
    s = SHAPE
    d, hd, h, kv, L = s["hidden_size"], s["head_dim"], s["num_attention_heads"], s["num_key_value_heads"], \
        s["num_hidden_layers"]
    linear = L * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * s["intermediate_size"]) + d * s["vocab_size"]
    w = s["sliding_window"]
    # query i sees min(i + 1, w) keys in the window; SDPA with an explicit mask computes every one of n² pairs
    pairs = n * n if system == "hf_sdpa" else (n * (n + 1) // 2 if n <= w else w * (w + 1) // 2 + (n - w) * w)
    attn = L * pairs / n * 4 * hd * h
    if task == "decode":  # one query over the keys kept: all n for transformers, the window for us
        attn = L * (n if system == "hf_sdpa" else min(n, w)) * 4 * hd * h
    return (2 * linear + attn) * (3 if task == "train" else 1)


def load(system: str, root: str):
    if system == "hf_sdpa":
        import transformers

        return transformers.AutoModelForCausalLM.from_pretrained(root, attn_implementation="sdpa")
    from model.pattern import from_config
    from model.transformer import ModelConfig, Transformer
    from trainer.hf.config_map import hf_layer_attention, model_fields, read_hf_config
    from trainer.hf.weights import load_into

    hf = read_hf_config(root)
    model = Transformer(ModelConfig(**model_fields(hf)), [from_config(a) for a in hf_layer_attention(hf, 1 << 30)])
    load_into(model, root)
    return model


def cache_bytes(cache) -> int:
    layers = getattr(cache, "layers", None) or []
    return sum(t.numel() * t.element_size() for layer in layers for t in (getattr(layer, "keys", None),
                                                                        getattr(layer, "values", None))
               if isinstance(t, torch.Tensor))


def measure(root: str, system: str, task: str, n: int, decode_steps: int) -> dict:
    """One row, in this process."""
    model = load(system, root)
    tokens = torch.randint(0, SHAPE["vocab_size"], (1, n), generator=torch.Generator().manual_seed(0))
    hf = system == "hf_sdpa"
    row = {"system": system, "task": task, "seq_len": n}
    if task == "train":
        model.train()

        def step():
            out = model(tokens, labels=tokens) if hf else model(tokens, targets=tokens.roll(-1, 1))
            out.loss.backward()

        step()
        t0 = time.perf_counter()
        step()
        row["tokens_per_s"] = n / (time.perf_counter() - t0)
    else:
        model.eval()
        with torch.no_grad():
            t0 = time.perf_counter()
            if hf:
                out = model(tokens, use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            else:
                from model.decode import Decoder

                dec = Decoder(model, n + decode_steps + 1)
                nxt = dec.prefill(tokens).argmax(-1)
            t1 = time.perf_counter()
            if task == "prefill":
                row["tokens_per_s"] = n / (t1 - t0)
            else:
                for _ in range(decode_steps):
                    if hf:
                        out = model(nxt.view(1, 1), past_key_values=cache, use_cache=True)
                        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
                    else:
                        nxt = dec.step(nxt.view(1)).argmax(-1)
                row["tokens_per_s"] = decode_steps / (time.perf_counter() - t1)
                row["cache_bytes"] = cache_bytes(cache) if hf else dec.cache_bytes()
    row["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    row["flops_per_token"] = flops_per_token(system, task, n)
    row["status"] = "ok"
    return row


def chunk_rows(vocab: int, n: int) -> list[dict]:
    """Peak bytes held for backward by the LM head + loss at [n, vocab], unchunked and chunked (4096 rows)."""
    from model.transformer import chunked_cross_entropy

    rows = []
    for chunk in (0, 4096):
        h = torch.randn(n, 64, requires_grad=True)
        w = torch.randn(vocab, 64, requires_grad=True) * 0.02
        t = torch.randint(0, vocab, (n,))
        saved: list[int] = []

        def pack(x, saved=saved):
            saved.append(x.numel() * x.element_size())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            if chunk:
                loss = chunked_cross_entropy(h, w, t, chunk)
            else:
                loss = torch.nn.functional.cross_entropy(h @ w.t(), t, reduction="sum")
        rows.append({"system": "haloformer_sp1", "task": f"loss_chunk={chunk}", "seq_len": n, "vocab": vocab,
                     "saved_mib": sum(saved) / 2**20, "status": "ok"})
        del loss, saved
    return rows


def run_one(args, root: str, system: str, task: str, n: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.vs_hf", "--threads", str(args.threads), "--decode", str(args.decode),
           "--one", root, system, task, str(n)]
    base = {"system": system, "task": task, "seq_len": n, "tokens_per_s": None, "peak_mib": None}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**base, "status": "timeout"}
    if proc.returncode != 0:
        oom = proc.returncode in (-9, 137) or "MemoryError" in proc.stderr or "out of memory" in proc.stderr
        return {**base, "status": "oom" if oom else f"error: {proc.stderr.strip().splitlines()[-1][:100]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        root, system, task, n = args.one
        print(json.dumps(measure(root, system, task, int(n), args.decode)))
        return
    import transformers

    root = tempfile.mkdtemp(prefix="vs_hf_")
    torch.manual_seed(0)
    transformers.MistralForCausalLM(transformers.MistralConfig(**SHAPE)).save_pretrained(root)
    rows = []
    for n in map(int, args.lengths.split(",")):
        for task in args.tasks.split(","):
            got = {s: run_one(args, root, s, task, n) for s in args.systems.split(",")}
            rows += got.values()
            ours, hf = got.get("haloformer_sp1"), got.get("hf_sdpa")
            for r in got.values():
                print(f"{r['system']:>15} {task:>8} {n:>6}  {r['status']:>8}  tokens/s "
                      f"{r['tokens_per_s'] or float('nan'):>10,.1f}  peak {r['peak_mib'] or float('nan'):>9,.0f} MiB"
                      + (f"  cache {r['cache_bytes']:,} B" if r.get("cache_bytes") is not None else ""), flush=True)
            if ours and hf and ours["status"] == hf["status"] == "ok":
                measured = ours["tokens_per_s"] / hf["tokens_per_s"]
                predicted = hf["flops_per_token"] / ours["flops_per_token"]
                print(f"{'ratio':>15} {task:>8} {n:>6}  tokens/s x{measured:.2f} (FLOP counts predict x{predicted:.2f}, "
                      f"{measured / predicted:.2f} of it); peak memory x{ours['peak_mib'] / hf['peak_mib']:.2f}",
                      flush=True)
    if args.chunk_loss:
        vocab, n = map(int, args.chunk_loss.split(","))
        for r in chunk_rows(vocab, n):
            rows.append(r)
            print(f"{'chunked loss':>15} {r['task']:>14} vocab {vocab} x {n} tokens: {r['saved_mib']:,.0f} MiB saved "
                  "for backward", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
