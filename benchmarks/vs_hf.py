"""Haloformer against Hugging Face transformers on the same Mistral weights. A script, not a test.

    python -m benchmarks.vs_hf --lengths 4096,16384,65536 --json out.json

A Mistral-shaped model (4 layers x 256, 4 heads of 64, 2 KV heads, window 1024, vocabulary 32,000)
is written once with ``save_pretrained``; each measurement then runs in a fresh process that loads
it — transformers with ``attn_implementation="sdpa"`` (its sliding-window mask is a dense [n, n]
tensor: SDPA visits every pair), Haloformer through ``model.init_from``'s import (a causal window,
window_left = 1023) — so that its peak RSS is its own. Systems:

- ``haloformer_sp1``: one process, ``--threads`` threads; ``haloformer_sp2``: two gloo ranks
  (``torch.multiprocessing`` spawn, ``world_context``, the trainer's ``engine.parallelize``), each
  holding half the sequence, ``--threads // 2`` threads each; ``hf_sdpa``: transformers.

Tasks, no activation checkpointing anywhere:

- ``train``: one forward + backward of a [1, n] sequence with the next-token loss (SP=2: plus the
  all-reduce of the gradients), after one untimed warm-up step at min(n, 1024) tokens. Haloformer
  runs with ``model.loss_chunk=--loss-chunk`` (0 = the unchunked head). Every row carries its loss:
  the three systems compute the same mean over the same n - 1 targets.
- ``decode_ab``: both systems' decoders in one process after the same n-token prompt, their steps
  interleaved and timed one by one (``measure_decode_ab``): the ratio under whatever load the
  machine has, falling on both alike.
- ``prefill`` and ``decode`` come from one generation: a prompt of n tokens, then ``--decode``
  greedy tokens (after an untimed one from a prompt of min(n, 1024): a cold process's first decode
  steps take ~10x a warm one's). Haloformer: ``model.decode.generate`` (the window's ring buffer); transformers:
  ``generate`` (its DynamicCache keeps a sliding window of 1023 keys too), timed by a streamer
  (prompt -> first token: prefill; the rest: decode). ``haloformer_sp2`` prefill is the sharded
  no-grad forward of the prompt (what prefill computes; ``model.decode`` is single-process, so
  there is no SP=2 decode row).

FLOPs per token (``flops_per_token``): 2 · the linear layers' weights a token passes through (the
LM head only where a system computes that row's logits: transformers' generate keeps only the last
one), plus the attention pairs each system computes x 4 · head_dim · heads (QKᵀ and PV;
transformers: all n² pairs, Haloformer: the window's ≈ n·1024); train x3 (backward = 2 x forward),
plus one more LM-head forward when the chunked loss recomputes it. ``predicted`` is the ratio of
those counts, printed beside the measured tokens/s ratio.

Every measurement process runs under ``--mem-cap-gib`` (a thread watching its RSS, the cap split
over the SP ranks, and RLIMIT_AS a little above as a backstop) and ``--timeout``; a process over the
cap (or failing to allocate) is ``oom``, one past the deadline ``timeout``. ``--chunk-loss VxN,...``
adds the LM head + loss (fwd+bwd) at vocabulary V and N tokens, unchunked and chunked, at width
``LOSS_WIDTH`` = 64: the memory is the [rows, V] logits and their gradient, whatever the width, and
at 256 the 128k x 64k case alone would take ~7 minutes of matmuls here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.data_prep import cpu_header
from launch.proc import run_process_group

REPO = Path(__file__).resolve().parent.parent
SHAPE = dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, sliding_window=1024, max_position_embeddings=131072)
OURS = ("haloformer_sp1", "haloformer_sp2")
HF = "hf_sdpa"
OOM_MARK = "vs_hf: RSS cap exceeded"
LOSS_WIDTH = 64


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="4096,16384,65536", help="sequence lengths, comma-separated")
    p.add_argument("--tasks", default="train,generate,decode_ab",
                   help="train, generate (= the prefill and decode rows), decode_ab (both decoders in one process)")
    p.add_argument("--systems", default="haloformer_sp1,haloformer_sp2,hf_sdpa")
    p.add_argument("--decode", type=int, default=128, help="greedy tokens generated after the prompt")
    p.add_argument("--threads", type=int, default=2, help="torch threads per system (SP=2: split over the ranks)")
    p.add_argument("--loss-chunk", type=int, default=1024, help="Haloformer's model.loss_chunk in train rows")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement process")
    p.add_argument("--mem-cap-gib", type=float, default=18.0, help="RSS cap per measurement (all its ranks)")
    p.add_argument("--chunk-loss", default="", help="VOCABxTOKENS,... for the chunked-loss rows, e.g. 131072x65536")
    p.add_argument("--json", default=None)
    p.add_argument("--one", nargs=4, metavar=("DIR", "SYSTEM", "TASK", "LEN"), help=argparse.SUPPRESS)
    p.add_argument("--rows", default=None, help=argparse.SUPPRESS)  # --one: append its rows here
    return p.parse_args(argv)


def flops_per_token(system: str, task: str, n: int, loss_chunk: int = 0) -> float:
    s = SHAPE
    d, hd, h, kv, L, V = (s[k] for k in ("hidden_size", "head_dim", "num_attention_heads", "num_key_value_heads",
                                         "num_hidden_layers", "vocab_size"))
    layers = L * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * s["intermediate_size"])
    w = s["sliding_window"]
    if task == "decode":  # one query over the window's keys: both caches keep the last 1023 (+ its own)
        return 2 * (layers + d * V) + L * min(n, w) * 4 * hd * h
    # query i sees min(i + 1, w) keys in the window; SDPA with an explicit mask computes every one of n² pairs
    pairs = n * n if system == HF else (n * (n + 1) // 2 if n <= w else w * (w + 1) // 2 + (n - w) * w)
    attn = L * pairs / n * 4 * hd * h
    head = d * V / n if (system == HF and task == "prefill") else d * V  # generate: logits_to_keep=1
    if task == "prefill":
        return 2 * (layers + head) + attn
    recompute = 2 * d * V if loss_chunk and system != HF else 0  # the chunk's logits, again in backward
    return 3 * (2 * (layers + head) + attn) + recompute


def load(system: str, root: str, loss_chunk: int = 0):
    if system == HF:
        import transformers

        return transformers.AutoModelForCausalLM.from_pretrained(root, attn_implementation="sdpa")
    from model.pattern import from_config
    from model.transformer import ModelConfig, Transformer
    from trainer.hf.config_map import hf_layer_attention, model_fields, read_hf_config
    from trainer.hf.weights import load_into

    hf = read_hf_config(root)
    patterns = [from_config(a) for a in hf_layer_attention(hf, 1 << 30)]  # 1 << 30: no window covers the sequence
    model = Transformer(ModelConfig(**model_fields(hf), loss_chunk=loss_chunk), patterns)
    load_into(model, root)
    return model


def cap_memory(cap_bytes: float, interval: float = 0.02) -> None:
    """Leave this process (the parent reads ``oom``) once its RSS passes ``cap_bytes``: polled every
    ``interval`` s by a daemon thread, which torch's kernels let run (they release the GIL). Not for
    decoding: there the thread's GIL hand-offs cost every small op (measured at 4k, 64 greedy steps,
    in-process with a 20 ms poll: Haloformer 81.4 -> 52.1 tokens/s, transformers 52.5 -> 47.5), so
    generate rows rely on the RLIMIT_AS backstop alone."""
    page = os.sysconf("SC_PAGE_SIZE")

    def watch():
        while True:
            rss = int(Path("/proc/self/statm").read_text().split()[1]) * page
            if rss > cap_bytes:
                os.write(2, f"{OOM_MARK}: {rss / 2**30:.1f} GiB > {cap_bytes / 2**30:.1f} GiB\n".encode())
                os._exit(3)
            time.sleep(interval)

    threading.Thread(target=watch, daemon=True).start()


def stamp() -> tuple[float, float]:
    """(wall, CPU) seconds. Process CPU time (all threads) barely moves when other processes take
    turns on the cores, so tokens per CPU-second is the steadier figure on a shared machine."""
    return time.perf_counter(), time.process_time()


def rates(n: int, t0: tuple[float, float], t1: tuple[float, float]) -> dict:
    return {"tokens_per_s": n / (t1[0] - t0[0]), "tokens_per_cpu_s": n / (t1[1] - t0[1]), "cpu_s": t1[1] - t0[1]}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def vm_peak_mib() -> float:
    """Peak virtual size: how close the process came to the RLIMIT_AS backstop."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmPeak"))
    return int(line.split()[1]) / 1024


def inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same tokens for every system, and their next-token targets (-100: the last has none)."""
    tokens = torch.randint(0, SHAPE["vocab_size"], (1, n), generator=torch.Generator().manual_seed(0))
    return tokens, torch.cat([tokens[:, 1:], torch.full((1, 1), -100)], 1)


def train_step(model, tokens, targets, hf: bool, **fwd) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = model(tokens, labels=tokens) if hf else model(tokens, targets=targets, **fwd)
    out.loss.backward()
    return out


def measure_train(root: str, system: str, n: int, loss_chunk: int) -> dict:
    model = load(system, root, loss_chunk).train()
    hf = system == HF
    warm = min(n, 1024)
    train_step(model, *inputs(warm), hf)  # first-call costs (allocator, kernel set-up), at a short length
    tokens, targets = inputs(n)
    t0 = stamp()
    out = train_step(model, tokens, targets, hf)
    t1 = stamp()
    return {**rates(n, t0, t1), "step_s": t1[0] - t0[0], "loss": float(out.loss), "peak_mib": peak_mib()}


class Stamps:
    """A ``generate`` streamer that only notes when each ``put`` (the prompt, then every token) came:
    (wall, CPU) stamps."""

    def __init__(self):
        self.t = []

    def put(self, value):
        self.t.append(stamp())

    def end(self):
        pass


def cache_bytes(cache) -> int:
    layers = getattr(cache, "layers", None) or []
    return sum(t.numel() * t.element_size() for layer in layers for t in (getattr(layer, "keys", None),
                                                                        getattr(layer, "values", None))
               if isinstance(t, torch.Tensor))


def measure_generate(root: str, system: str, n: int, steps: int):
    """Yield the prefill row, then the decode row, of one greedy generation of ``steps`` tokens."""
    model = load(system, root).eval()
    from model.decode import Decoder

    def run(tokens):  # (start, first token, last token) stamps and the cache's bytes
        if system == HF:
            st = Stamps()
            with torch.no_grad():
                out = model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=steps,
                                     min_new_tokens=steps, do_sample=False, streamer=st, pad_token_id=0,
                                     return_dict_in_generate=True)
            return st.t[0], st.t[1], st.t[-1], cache_bytes(out.past_key_values)
        dec = Decoder(model, tokens.shape[1] + steps)  # model.decode.generate's loop, greedy, with both clocks
        t0 = stamp()
        nxt = dec.prefill(tokens).argmax(-1)
        t1 = stamp()
        for _ in range(steps - 1):
            nxt = dec.step(nxt).argmax(-1)
        return t0, t1, stamp(), dec.cache_bytes()

    tokens, _ = inputs(n)
    base = peak_mib()  # the interpreter, torch (and transformers), the weights: what loading took
    run(tokens[:, :min(n, 1024)])  # first-call costs (a cold first decode step takes ~10x a warm one)
    t0, t1, t2, cache = run(tokens)
    yield "prefill", {**rates(n, t0, t1), "peak_mib": peak_mib(), "base_mib": base}
    yield "decode", {**rates(steps - 1, t1, t2), "cache_bytes": cache, "peak_mib": peak_mib(), "base_mib": base}


def measure_decode_ab(root: str, n: int, steps: int) -> dict:
    """Both systems in one process after an n-token prompt, their greedy decode steps interleaved
    (ours, HF, ours, ...), each step timed: a load that comes and goes falls on both alike. HF steps
    call the model's forward with its cache (no ``generate`` loop around it, which only adds to HF's
    time). ``ratio``: the median over step pairs of HF's step time / ours."""
    from model.decode import Decoder

    ours, hf = load("haloformer_sp1", root).eval(), load(HF, root).eval()
    tokens, _ = inputs(n)
    with torch.no_grad():
        dec = Decoder(ours, n + steps + 16)
        a = dec.prefill(tokens).argmax(-1)
        out = hf(tokens, use_cache=True, logits_to_keep=1)
        cache, b = out.past_key_values, out.logits[:, -1].argmax(-1)
        t_ours, t_hf = [], []
        for i in range(steps + 8):  # the first 8 pairs warm up, untimed
            t0 = time.perf_counter()
            a = dec.step(a).argmax(-1)
            t1 = time.perf_counter()
            out = hf(b[:, None], past_key_values=cache, use_cache=True, cache_position=torch.tensor([n + i]))
            cache, b = out.past_key_values, out.logits[:, -1].argmax(-1)
            t2 = time.perf_counter()
            if i >= 8:
                t_ours.append(t1 - t0)
                t_hf.append(t2 - t1)
    med = lambda xs: sorted(xs)[len(xs) // 2]
    return {"tokens_per_s": 1 / med(t_ours), "hf_tokens_per_s": 1 / med(t_hf),
            "ratio": med([h / o for o, h in zip(t_ours, t_hf)]), "steps": steps,
            "same_ids": bool(torch.equal(a, b)), "peak_mib": peak_mib()}


def _sp_worker(rank: int, P: int, store: str, root: str, task: str, n: int, args, out_dir: str) -> None:
    """One SP rank: its half of the sequence through the model, timed between barriers."""
    import torch.distributed as dist

    from parallel.comm import CommCounter
    from parallel.context import world_context
    from parallel.sharding import positions, shard
    from trainer.config.schema import ParallelSection
    from trainer.engine import parallelize

    cap_memory(args.mem_cap_gib * 2**30 / P)
    torch.set_num_threads(max(1, args.threads // P))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=P)
    ctx = world_context(timeout_s=args.timeout)
    model = load("haloformer_sp1", root, args.loss_chunk if task == "train" else 0)
    parallelize(model, ctx, ParallelSection(), CommCounter())  # the trainer's binding, once

    def run(m: int):
        tokens, targets = (shard(x, ctx, 1) for x in inputs(m))
        kw = dict(positions=positions(m, ctx), seq_len=m)
        if task != "train":
            with torch.no_grad():
                return model.eval()(tokens, **kw)
        out = train_step(model.train(), tokens, targets, False, **kw)
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        dist.all_reduce(flat)  # what DeepSpeed does after backward: SP ranks hold partial gradients
        return out

    run(min(n, 1024 * P))
    dist.barrier()
    t0 = stamp()
    out = run(n)
    dist.barrier()
    t1 = stamp()
    row = {**rates(n, t0, t1), "peak_mib": peak_mib(), "vm_peak_mib": vm_peak_mib()}
    if task == "train":
        sums = torch.stack([out.loss.detach() * out.n_targets, out.n_targets.double()]).double()
        dist.all_reduce(sums)
        row.update(step_s=t1[0] - t0[0], loss=float(sums[0] / sums[1]))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def measure_sp(root: str, task: str, n: int, args, P: int = 2) -> dict:
    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_sp_worker, args=(P, os.path.join(tmp, "store"), root, task, n, args, tmp), nprocs=P, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(P)]
    # peak_mib: the largest rank's (what one device must hold); peak_mib_ranks: all of them together
    cpu = sum(r["cpu_s"] for r in ranks)  # tokens per CPU-second of the ranks together
    return {**ranks[0], "cpu_s": cpu, "tokens_per_cpu_s": n / cpu, "peak_mib": max(r["peak_mib"] for r in ranks),
            "peak_mib_ranks": sum(r["peak_mib"] for r in ranks), "vm_peak_mib": max(r["vm_peak_mib"] for r in ranks)}


def measure_loss(vocab: int, n: int, chunk: int) -> dict:
    """LM head + loss, forward and backward, at [n, 64] x [vocab, 64]: peak RSS above what the inputs take."""
    from model.transformer import chunked_cross_entropy

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, LOSS_WIDTH, generator=gen).requires_grad_()
    w = (torch.randn(vocab, LOSS_WIDTH, generator=gen) * 0.02).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=gen)
    base = peak_mib()
    t0 = time.perf_counter()
    loss = chunked_cross_entropy(h, w, t, chunk) if chunk else \
        torch.nn.functional.cross_entropy(h @ w.t(), t, reduction="sum")
    loss.backward()
    return {"seconds": time.perf_counter() - t0, "peak_mib": peak_mib(), "loss_peak_mib": peak_mib() - base,
            "loss": float(loss) / n}


def measure(args) -> None:
    """``--one``: this process's rows, appended to ``--rows`` one JSON line each as they are measured
    (a generation's prefill row survives a decode that runs out of time)."""
    root, system, task, n = args.one

    def emit(name: str, row: dict) -> None:
        with open(args.rows, "a") as f:
            f.write(json.dumps({"task": name, **row, "vm_peak_mib": row.get("vm_peak_mib", vm_peak_mib())}) + "\n")

    torch.set_num_threads(args.threads)
    if system == "haloformer_sp2":
        emit(task if task == "train" else "prefill", measure_sp(root, task, int(n), args))
        return
    if task != "generate":  # generate: RLIMIT_AS only (cap_memory's docstring)
        cap_memory(args.mem_cap_gib * 2**30)
    if task == "train":
        emit(task, measure_train(root, system, int(n), 0 if system == HF else args.loss_chunk))
    elif task == "generate":
        for name, row in measure_generate(root, system, int(n), args.decode):
            emit(name, row)
    elif task == "decode_ab":
        emit(task, measure_decode_ab(root, int(n), args.decode))
    else:  # loss_chunk=C at n = VOCABxTOKENS
        vocab, tokens = map(int, n.split("x"))
        emit(task, measure_loss(vocab, tokens, int(task.split("=")[1])))


def run_one(args, root: str, system: str, task: str, n: int | str) -> list[dict]:
    """Run one measurement process; its rows, or rows saying why there are none."""
    cmd = [sys.executable, "-m", "benchmarks.vs_hf", "--threads", str(args.threads), "--decode", str(args.decode),
           "--loss-chunk", str(args.loss_chunk), "--timeout", str(args.timeout), "--mem-cap-gib",
           str(args.mem_cap_gib), "--one", root, system, task, str(n), "--rows", ""]
    limit = int((args.mem_cap_gib + 6) * 2**30)  # backstop only: virtual size runs a few GiB above RSS

    def rlimit():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    names = {"generate": ["prefill", "decode"]}.get(task, [task])
    if system == "haloformer_sp2" and task == "generate":
        names = ["prefill"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd[-1] = rows_file = os.path.join(tmp, "rows.jsonl")
        try:
            proc = run_process_group(cmd, timeout=args.timeout, cwd=REPO, preexec_fn=rlimit)
            status, err = None, proc.stderr
            if proc.returncode != 0:
                oom = OOM_MARK in err or "MemoryError" in err or "can't allocate memory" in err \
                    or proc.returncode in (-9, 137)
                status = "oom" if oom else f"error: {(err.strip().splitlines() or ['?'])[-1][:120]}"
        except subprocess.TimeoutExpired:
            status = "timeout"
        lines = Path(rows_file).read_text().splitlines() if os.path.exists(rows_file) else []
    got = {r["task"]: r for r in map(json.loads, lines)}
    base = {"system": system, "seq_len": n, "tokens_per_s": None, "peak_mib": None}
    rows = [{**base, **got[t], "status": "ok"} if t in got else {**base, "task": t, "status": status or "missing"}
            for t in names]
    for r in rows:
        r["load_avg"] = os.getloadavg()[0]  # the 1-minute load as it ended: other processes share these cores
        if isinstance(n, int):
            r["flops_per_token"] = flops_per_token(system, r["task"], n, 0 if system == HF else args.loss_chunk)
    return rows


def fmt(r: dict) -> str:
    def cell(key, spec):
        return format(r[key], spec) if r.get(key) is not None else "-"

    return (f"{r['system']:>15} {r['task']:>8} {r['seq_len']:>6} {r['status']:>8} {cell('tokens_per_s', ',.1f'):>10} "
            f"{cell('tokens_per_cpu_s', ',.1f'):>10} "
            f"{cell('step_s', '.1f'):>7} {cell('peak_mib', ',.0f'):>9} {cell('loss', '.4f'):>7} "
            f"{cell('cache_bytes', ','):>11} {cell('flops_per_token', '.3g'):>10} {cell('load_avg', '.1f'):>5}")


def ratios(rows: list[dict]) -> list[dict]:
    """Each Haloformer row against transformers' at the same task and length, where both ran."""
    hf = {(r["task"], r["seq_len"]): r for r in rows if r["system"] == HF and r["status"] == "ok"}
    out = []
    for r in rows:
        h = hf.get((r["task"], r["seq_len"]))
        if r["system"] in OURS and r["status"] == "ok" and h:
            out.append({"system": r["system"], "task": r["task"], "seq_len": r["seq_len"],
                        "measured": r["tokens_per_s"] / h["tokens_per_s"],
                        "cpu": r["tokens_per_cpu_s"] / h["tokens_per_cpu_s"],
                        "predicted": h["flops_per_token"] / r["flops_per_token"],
                        "memory": r["peak_mib"] / h["peak_mib"],
                        # generate rows: the peak above what loading took (interpreter, libraries, weights)
                        "work_memory": (r["peak_mib"] - r["base_mib"]) / (h["peak_mib"] - h["base_mib"])
                        if "base_mib" in r and "base_mib" in h else None})
    return out


def targets(rows: list[dict], rat: list[dict], at: int = 16384) -> list[tuple[str, str, str]]:
    """(target, met/missed/not run, the numbers) for each of issue 24's targets."""
    res = []

    def add(name, ok, detail):
        res.append((name, "not run" if ok is None else ("met" if ok else "missed"), detail))

    for s in OURS:
        r = next((x for x in rat if x["system"] == s and x["task"] == "train" and x["seq_len"] == at), None)
        add(f"{s} train {at // 1024}k tokens/s >= 3x HF", r and r["measured"] >= 3,
            r and f"x{r['measured']:.2f} (per CPU-second: x{r['cpu']:.2f})")
        add(f"{s} train {at // 1024}k >= 0.8x predicted ratio", r and r["measured"] >= 0.8 * r["predicted"],
            r and f"x{r['measured']:.2f} of predicted x{r['predicted']:.2f} = {r['measured'] / r['predicted']:.2f} "
                  f"(per CPU-second: {r['cpu'] / r['predicted']:.2f})")
        mine = [x for x in rat if x["system"] == s]
        worst = max(mine, key=lambda x: x["memory"], default=None)
        add(f"{s} peak memory <= 0.5x HF wherever both run", worst and all(x["memory"] <= 0.5 for x in mine),
            worst and "; ".join(f"{x['task']} {x['seq_len']}: x{x['memory']:.2f}" for x in mine))
        work = [x for x in mine if x["work_memory"] is not None]
        if work:
            add(f"{s} generate peak memory above loading <= 0.5x HF's", all(x["work_memory"] <= 0.5 for x in work),
                "; ".join(f"{x['task']} {x['seq_len']}: x{x['work_memory']:.2f}" for x in work))
    status = {(r["system"], r["task"], r["seq_len"]): r["status"] for r in rows}
    won = [f"{t} {n}: HF {st}" for (s, t, n), st in status.items()
           if s == HF and st != "ok" and any(status.get((o, t, n)) == "ok" for o in OURS)]
    add("a length where HF runs out of memory/time and Haloformer does not", bool(won), "; ".join(won) or "none")
    dec = []
    for (s, t, n), st in status.items():
        if s == "haloformer_sp1" and t == "decode":
            r = next(x for x in rat if x["task"] == "decode" and x["seq_len"] == n) if st == "ok" and \
                status.get((HF, t, n)) == "ok" else None
            dec.append((n, r["measured"] >= 1 if r else st == "ok",
                        f"{n}: x{r['measured']:.2f} (CPU x{r['cpu']:.2f})" if r else f"{n}: ours {st}, HF {status.get((HF, t, n))}"))
    add("decode tokens/s >= HF at every length", all(ok for _, ok, _ in dec) if dec else None,
        "; ".join(d for _, _, d in dec))
    ab = [r for r in rows if r["task"] == "decode_ab"]
    if ab:
        add("decode tokens/s >= HF at every length (interleaved in one process)",
            all(r["status"] == "ok" and r["ratio"] >= 1 for r in ab),
            "; ".join(f"{r['seq_len']}: x{r['ratio']:.2f}" if r["status"] == "ok" else f"{r['seq_len']}: {r['status']}"
                      for r in ab))
    return res


def main(argv=None):
    args = parse_args(argv)
    if args.one:
        return measure(args)
    import transformers

    print(cpu_header())
    print(f"load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}, transformers {transformers.__version__};"
          f" {args.threads} threads per system; Haloformer loss_chunk={args.loss_chunk}; cap "
          f"{args.mem_cap_gib:g} GiB RSS and {args.timeout:.0f} s per measurement", flush=True)
    root = tempfile.mkdtemp(prefix="vs_hf_")
    torch.manual_seed(0)
    transformers.MistralForCausalLM(transformers.MistralConfig(**SHAPE)).save_pretrained(root)
    print(f"\n{'system':>15} {'task':>8} {'seq_len':>6} {'status':>8} {'tokens/s':>10} {'tok/CPU-s':>10} {'step s':>7} "
          f"{'peak MiB':>9} {'loss':>7} {'cache B':>11} {'FLOP/tok':>10} {'load':>5}")
    rows = []

    def keep(r: dict) -> None:  # the JSON is rewritten after every row: a run cut short keeps what it measured
        rows.append(r)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")

    for n in map(int, filter(None, args.lengths.split(","))):
        for task in args.tasks.split(","):
            if task == "decode_ab":  # one process holds both systems
                for r in run_one(args, root, "haloformer_sp1", task, n):
                    keep(r)
                    print(f"{'both':>15} {'dec. a/b':>8} {n:>6} {r['status']:>8}  ours {r.get('tokens_per_s') or 0:.1f} "
                          f"tok/s, HF {r.get('hf_tokens_per_s') or 0:.1f} tok/s, median step ratio "
                          f"x{r.get('ratio') or float('nan'):.2f}", flush=True)
                continue
            for s in args.systems.split(","):
                for r in run_one(args, root, s, task, n):
                    keep(r)
                    print(fmt(r), flush=True)
    rat = ratios(rows)
    print(f"\nagainst {HF}: tokens/s ratio measured (wall, and per CPU-second), as the FLOP counts predict, "
          "the measured share of it; peak memory ratio")
    print(f"{'system':>15} {'task':>8} {'seq_len':>6} {'measured':>9} {'per CPU-s':>9} {'predicted':>9} {'of pred.':>8} "
          f"{'memory':>7}")
    for r in rat:
        print(f"{r['system']:>15} {r['task']:>8} {r['seq_len']:>6} {r['measured']:>9.2f} {r['cpu']:>9.2f} "
              f"{r['predicted']:>9.2f} {r['measured'] / r['predicted']:>8.2f} {r['memory']:>7.2f}")
    print("\ntargets (issue 24)")
    for name, verdict, detail in targets(rows, rat):
        print(f"  {verdict:>7}  {name}: {detail}")
    for spec in filter(None, args.chunk_loss.split(",")):
        vocab, n = map(int, spec.split("x"))
        print(f"\nchunked loss: LM head + loss fwd+bwd, vocabulary {vocab:,} x {n:,} tokens, width "
              f"{LOSS_WIDTH} (the logits alone: {n * vocab * 4 / 2**30:.1f} GiB fp32)")
        for chunk in (0, args.loss_chunk or 4096):
            for r in run_one(args, root, "haloformer_sp1", f"loss_chunk={chunk}", spec):
                keep(r)
                print(f"  loss_chunk={chunk:<5} {r['status']:>8}  peak RSS {r['peak_mib'] or float('nan'):>9,.0f} MiB"
                      f" (the loss: {r.get('loss_peak_mib', float('nan')):>9,.0f} MiB)  "
                      f"{r.get('seconds', float('nan')):.1f} s", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
