"""gpt-oss under sequence parallelism (issue 22): per-layer strategies vs Ulysses on every layer. A script.

    python -m benchmarks.gpt_oss [--seq-lens 4096,16384,65536] [--steps 3,3,1] [--json benchmarks/gpt_oss_cpu.json]

The model is a small gpt-oss built from scratch through the import mapping (``trainer.hf.config_map``,
no transformers needed): a ``GptOssForCausalLM`` config of 4 layers alternating sliding (window 128,
our causal ``window_left=127``) and full (dense causal) attention, hidden 256, 4 query heads and 2 KV
heads of 64, learned sinks, q/k/v/o biases, YaRN rope, 4 experts top-2 of hidden 256 (dropless),
the load-balancing loss at 0.01; fp32. Variants, on SP=2 local gloo processes (``mp.spawn``, one
thread each):

- ``mixed``: ``parallel.strategy=auto``: sliding layers exchange a halo, full layers go to Ulysses,
- ``ulysses``: ``parallel.strategy=ulysses``: every layer all-to-all over heads.

Each sequence length runs in one fresh pair of processes holding both variants (the same initial
weights, each its own AdamW); after one warm-up step each (kernel plans, first-touch allocations), the
timed steps alternate (A B, B A, ...); ``--steps`` per length (default 1 at 64k, where full attention
makes a step minutes long on 2 cores).
A step is the trainer's: forward with the loss, ``trainer.loop.backward_loss`` (the loss and router
counts all-reduced), backward, one flat all-reduce of the gradients (DeepSpeed's bucketed reduce in
the trainer), AdamW. Reported per variant, median over the timed steps:

- tokens/s = n / step time (the slower rank's); beside it the process CPU time per step (mean over
  ranks), which time-slicing by other processes on a shared machine barely changes,
- peak RSS: max over ranks and timed steps of the process's resident high-water mark during the step
  (reset before each step: ``malloc_trim`` then ``/proc/self/clear_refs`` 5); both variants live in the
  same process, so it includes the other variant's weights and optimizer state (a few tens of MB),
- bytes received per step per layer kind, summed over ranks (``trainer.metrics.comm_metrics``, the
  ``CommCounter``): what every rank together sent,
- where the time goes, mean over ranks, wall clock: attention per kind (the attention function, forward
  and backward: the kernel plus its exchanges; not the q/k/v/o projections), experts (the MoE block:
  router and experts, forward and backward), communication inside attention (time spent posting and
  waiting in ``P2PExchange`` and in DeepSpeed's all-to-all, wrapped here; overlap with compute is not
  counted, waiting for a slower peer is), the gradient all-reduce, and the rest (embedding, projections,
  norms, LM head, loss, optimizer). Backward regions are bounded by identity autograd functions at the
  region's inputs and outputs (the engine runs one region at a time here: its inputs' gradients need
  the whole region).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.data_prep import cpu_header

GPT_OSS_SMALL = dict(
    architectures=["GptOssForCausalLM"], vocab_size=1024, hidden_size=256, intermediate_size=256,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=4,
    num_experts_per_tok=2, sliding_window=128, max_position_embeddings=131072, tie_word_embeddings=False,
    rms_norm_eps=1e-5, layer_types=["sliding_attention", "full_attention"] * 2,
    rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
                         truncate=False, original_max_position_embeddings=4096))
VARIANTS = {"mixed": "auto", "ulysses": "ulysses"}  # variant -> parallel.strategy
KIND_NAMES = {"window": "sliding", "dense": "full"}  # trainer.metrics.layer_kinds -> gpt-oss's names
AUX_COEF = 0.01


def build_model(n: int):
    """(model, layer kinds) of GPT_OSS_SMALL at sequence length n, as ``model.init_from`` would map it."""
    from model.pattern import from_config
    from model.transformer import ModelConfig, Transformer
    from trainer.hf.config_map import hf_layer_attention, model_fields

    cfg = ModelConfig(**model_fields(GPT_OSS_SMALL), router_aux_loss_coef=AUX_COEF)
    torch.manual_seed(0)
    model = Transformer(cfg, [from_config(a) for a in hf_layer_attention(GPT_OSS_SMALL, n)])
    return model


class Clock:
    """Seconds per named region within one step; ``active`` is the attention kind being run (for comm)."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}
        self.begun: dict[str, float] = {}
        self.active: str | None = None

    def add(self, key: str, dt: float) -> None:
        self.s[key] = self.s.get(key, 0.0) + dt

    def begin(self, key: str) -> None:
        self.begun[key] = time.perf_counter()
        if key.startswith("attn_bwd/"):
            self.active = key.split("/")[1]

    def end(self, key: str) -> None:
        self.add(key, time.perf_counter() - self.begun.pop(key))
        if key.startswith("attn_bwd/"):
            self.active = None


class _Mark(torch.autograd.Function):
    """Identity; its backward calls ``clock.begin`` (placed at a region's output: the region's backward
    starts) or ``clock.end`` (at its inputs: the region's backward is done)."""

    @staticmethod
    def forward(fctx, clock, key, edge, *xs):
        fctx.meta = (clock, key, edge)
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(fctx, *grads):
        clock, key, edge = fctx.meta
        clock.begin(key) if edge == "out" else clock.end(key)
        return (None, None, None, *grads)


class TimedAttention:
    """The trainer's ``ShardedAttention`` with its forward and backward timed per layer kind."""

    def __init__(self, inner, kinds: list[str], clock: Clock):
        self.inner, self.kinds, self.clock = inner, kinds, clock

    def __call__(self, q, k, v, pattern, call):
        kind, clock = self.kinds[call.layer], self.clock
        q, k, v = _Mark.apply(clock, f"attn_bwd/{kind}", "in", q, k, v)
        t0, clock.active = time.perf_counter(), kind
        res = self.inner(q, k, v, pattern, call)
        clock.active = None
        clock.add(f"attn_fwd/{kind}", time.perf_counter() - t0)
        (out,) = _Mark.apply(clock, f"attn_bwd/{kind}", "out", res.out)
        return res._replace(out=out)


def time_experts(model, clock: Clock) -> None:
    """Forward hooks on every MoE block timing its forward, and marks timing its backward."""
    for block in model.blocks:
        def pre(module, args):
            module._t0 = time.perf_counter()
            return _Mark.apply(clock, "moe_bwd", "in", *args)

        def post(module, args, output):
            clock.add("moe_fwd", time.perf_counter() - module._t0)
            (y,) = _Mark.apply(clock, "moe_bwd", "out", output[0])
            return (y, *output[1:])

        block.mlp.register_forward_pre_hook(pre)
        block.mlp.register_forward_hook(post)


def time_exchanges(clock: Clock) -> None:
    """Wrap the halo path's posting and waiting and DeepSpeed's all-to-all (this process only)."""
    import deepspeed.sequence.layer as ds_layer

    from parallel import halo

    def timed(fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                clock.add(f"comm/{clock.active or 'other'}", time.perf_counter() - t0)
        return wrapper

    halo.P2PExchange.start = timed(halo.P2PExchange.start)
    halo.P2PExchange.start_reverse = timed(halo.P2PExchange.start_reverse)
    halo.Pending.wait = timed(halo.Pending.wait)
    ds_layer.single_all_to_all = timed(ds_layer.single_all_to_all)


def reset_peak_rss() -> None:
    """Return freed heap to the OS, then reset the kernel's resident high-water mark (VmHWM)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def rss_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20  # kB
    raise KeyError(field)


def train_step(v: SimpleNamespace, batch, ctx, clock: Clock) -> dict:
    """One step of variant ``v``; its timings, memory and bytes."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    from trainer.loop import backward_loss
    from trainer.metrics import comm_metrics

    tokens, targets, positions, n = batch
    v.counter.reset()
    clock.s.clear()
    reset_peak_rss()
    before = rss_gib("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    out = v.model(tokens, positions=positions, attention_fn=v.fn, seq_len=n, targets=targets)
    loss, global_loss, _ = backward_loss(out, None, ctx.sp_size, AUX_COEF)
    loss.backward()
    t1 = time.perf_counter()
    grads = [p.grad for p in v.model.parameters()]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= ctx.sp_size  # DeepSpeed averages over the reduce group; backward_loss scaled the loss by it
    for g, r in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(r)
    t2 = time.perf_counter()
    v.opt.step()
    v.opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    row = {"step_s": t3 - t0, "cpu_s": time.process_time() - c0, "load1": os.getloadavg()[0],
           "grad_allreduce_s": t2 - t1, "optimizer_s": t3 - t2, "loss": global_loss,
           "peak_rss_gib": rss_gib("VmHWM"), "rss_before_gib": before, **clock.s}
    bytes_ = comm_metrics(v.counter, None, torch.device("cpu"), v.layer_kinds)  # a collective: after the timing
    row.update({k: b for k, b in bytes_.items() if k.startswith("comm/kind/") or k.endswith("_bytes")})
    return row


def _worker(rank: int, P: int, store: str, n: int, steps: int, out_dir: str) -> None:
    from parallel.comm import CommCounter
    from parallel.context import world_context
    from parallel.sp_attention import pick_strategy
    from trainer.engine import ShardedAttention
    from trainer.metrics import layer_kinds

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // P))  # ranks share the cores, as the trainer does
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=P,
                            timeout=timedelta(seconds=1800))
    try:
        ctx, clock = world_context(timeout_s=1800), Clock()
        time_exchanges(clock)
        variants = {}
        for name, strategy in VARIANTS.items():
            model = build_model(n)
            kinds = layer_kinds(model.patterns)
            time_experts(model, clock)
            counter = CommCounter()
            inner = ShardedAttention(ctx, SimpleNamespace(strategy=strategy, backend="auto"), counter)
            cfg = model.cfg
            variants[name] = SimpleNamespace(
                model=model, layer_kinds=kinds, kinds=[KIND_NAMES[k] for k in kinds], counter=counter,
                fn=TimedAttention(inner, [KIND_NAMES[k] for k in kinds], clock),
                opt=torch.optim.AdamW(model.parameters(), lr=1e-4),
                strategies=[pick_strategy(p, P, n, cfg.n_heads, cfg.n_kv_heads, strategy) for p in model.patterns])
        L = n // P
        g = torch.Generator().manual_seed(1)
        seq = torch.randint(0, GPT_OSS_SMALL["vocab_size"], (1, n + 1), generator=g)
        tokens, targets = seq[:, rank * L:(rank + 1) * L], seq[:, rank * L + 1:(rank + 1) * L + 1]
        batch = (tokens, targets, torch.arange(rank * L, (rank + 1) * L), n)
        rows = {name: [] for name in variants}
        order = list(variants)
        for step in range(steps + 1):  # step 0: warm-up
            for name in order if step % 2 == 0 else order[::-1]:
                row = train_step(variants[name], batch, ctx, clock)
                rows[name].append({**row, "warmup": step == 0})
        out = {name: {"strategies": v.strategies, "kinds": v.kinds, "steps": rows[name]}
               for name, v in variants.items()}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as benchmarks.comm: DeepSpeed's comm backend can abort the interpreter's teardown


TIME_KEYS = ("attn/sliding", "attn/full", "experts", "comm/sliding", "comm/full", "grad_allreduce", "other")


def summarize(per_rank: list[dict], name: str, n: int, P: int) -> dict:
    """One row of variant ``name`` at length n from every rank's steps."""
    ranks = [pr[name]["steps"] for pr in per_rank]
    timed = [i for i, s in enumerate(ranks[0]) if not s["warmup"]]
    step_s = [max(r[i]["step_s"] for r in ranks) for i in timed]

    def split(s: dict) -> dict:
        attn = {k: s.get(f"attn_fwd/{k}", 0.0) + s.get(f"attn_bwd/{k}", 0.0) for k in ("sliding", "full")}
        t = {"attn/sliding": attn["sliding"], "attn/full": attn["full"],
             "experts": s.get("moe_fwd", 0.0) + s.get("moe_bwd", 0.0),
             "comm/sliding": s.get("comm/sliding", 0.0), "comm/full": s.get("comm/full", 0.0),
             "grad_allreduce": s["grad_allreduce_s"]}
        t["other"] = s["step_s"] - sum(v for k, v in t.items() if not k.startswith("comm/"))  # comm is inside attn
        return t

    times = {k: statistics.median(statistics.mean(split(r[i])[k] for r in ranks) for i in timed) for k in TIME_KEYS}
    last = ranks[0][timed[-1]]
    return {"variant": name, "seq_len": n, "sp": P, "strategies": per_rank[0][name]["strategies"],
            "kinds": per_rank[0][name]["kinds"], "step_s": statistics.median(step_s),
            "timed_steps": len(step_s), "step_s_all": [round(x, 3) for x in step_s],
            "warmup_step_s": max(r[0]["step_s"] for r in ranks),
            "tokens_per_s": n / statistics.median(step_s),
            "cpu_s": statistics.median(statistics.mean(r[i]["cpu_s"] for r in ranks) for i in timed),
            "load1": [round(ranks[0][i]["load1"], 2) for i in timed],
            "peak_rss_gib": max(r[i]["peak_rss_gib"] for r in ranks for i in timed),
            "rss_before_gib": max(r[i]["rss_before_gib"] for r in ranks for i in timed),
            "bytes": {k.split("/")[2] + "/" + k.split("/")[3].removesuffix("_bytes"): v
                      for k, v in last.items() if k.startswith("comm/kind/")},
            "time_s": times, "loss": last["loss"]}


def run_length(P: int, n: int, steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(P, os.path.join(tmp, "store"), n, steps, tmp), nprocs=P, join=True)
        per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(P)]
    return [summarize(per_rank, name, n, P) for name in VARIANTS]


def _mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def print_rows(rows: list[dict]) -> None:
    print(f"\n{'variant':<8} {'seq_len':>7} {'tokens/s':>9} {'step s':>8} {'cpu s':>8} {'timed':>5} {'warm-up s':>9} "
          f"{'peak GiB':>8}  "
          f"{'sliding MiB fwd/bwd':>20} {'full MiB fwd/bwd':>18}  strategies")
    for r in rows:
        b = r["bytes"]
        sl = f"{_mib(b.get('window/forward', 0))}/{_mib(b.get('window/backward', 0))}"
        fu = f"{_mib(b.get('dense/forward', 0))}/{_mib(b.get('dense/backward', 0))}"
        print(f"{r['variant']:<8} {r['seq_len']:>7} {r['tokens_per_s']:>9,.0f} {r['step_s']:>8.2f} "
              f"{r['cpu_s']:>8.2f} {r['timed_steps']:>5} {r['warmup_step_s']:>9.2f} "
              f"{r['peak_rss_gib']:>8.2f}  {sl:>20} {fu:>18}  {','.join(r['strategies'])}")
    print("\nwhere the time goes (s per step, mean over ranks; comm is part of attn)")
    print(f"{'variant':<8} {'seq_len':>7} " + " ".join(f"{k:>14}" for k in TIME_KEYS))
    for r in rows:
        print(f"{r['variant']:<8} {r['seq_len']:>7} " + " ".join(f"{r['time_s'][k]:>14.3f}" for k in TIME_KEYS))


def ratios(rows: list[dict]) -> list[dict]:
    out = []
    for n in dict.fromkeys(r["seq_len"] for r in rows):
        m, u = (next(r for r in rows if r["seq_len"] == n and r["variant"] == v) for v in VARIANTS)
        sl_m = m["bytes"].get("window/forward", 0) + m["bytes"].get("window/backward", 0)
        sl_u = u["bytes"].get("window/forward", 0) + u["bytes"].get("window/backward", 0)
        out.append({"seq_len": n, "tokens_per_s": m["tokens_per_s"] / u["tokens_per_s"],
                    "cpu_s": m["cpu_s"] / u["cpu_s"],
                    "peak_rss": m["peak_rss_gib"] / u["peak_rss_gib"],
                    "sliding_bytes": sl_m / sl_u if sl_u else float("nan"),
                    "attn_sliding_s": m["time_s"]["attn/sliding"] / u["time_s"]["attn/sliding"],
                    "comm_sliding_s": m["time_s"]["comm/sliding"] / u["time_s"]["comm/sliding"]})
    return out


def print_ratios(rat: list[dict]) -> None:
    print("\nmixed / ulysses")
    print(f"{'seq_len':>7} {'tokens/s':>9} {'cpu s':>7} {'peak RSS':>9} {'sliding bytes':>14} {'sliding attn s':>15} "
          f"{'sliding comm s':>15}")
    for r in rat:
        print(f"{r['seq_len']:>7} {r['tokens_per_s']:>9.3f} {r['cpu_s']:>7.3f} {r['peak_rss']:>9.3f} "
              f"{r['sliding_bytes']:>14.4f} "
              f"{r['attn_sliding_s']:>15.3f} {r['comm_sliding_s']:>15.3f}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default="4096,16384,65536")
    ap.add_argument("--steps", default="3,3,1",
                    help="timed steps per variant after one warm-up step each; one value, or one per --seq-lens")
    ap.add_argument("--nproc", type=int, default=2, help="ranks = sequence-parallel size")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cpu = cpu_header()
    header = (f"{cpu}\nload average at start: {os.getloadavg()[0]:.2f}; torch {torch.__version__}; "
              f"SP={args.nproc}, {max(1, (os.cpu_count() or 1) // args.nproc)} thread(s) per rank, fp32")
    print(header, flush=True)
    lens, steps = [int(x) for x in args.seq_lens.split(",")], [int(x) for x in args.steps.split(",")]
    if len(steps) not in (1, len(lens)):
        raise SystemExit(f"--steps: one value or one per --seq-lens ({len(lens)}), got {args.steps!r}")
    steps = steps * len(lens) if len(steps) == 1 else steps
    rows = []
    for n, k in zip(lens, steps, strict=True):
        t0 = time.monotonic()
        got = run_length(args.nproc, n, k)
        rows += got
        print_rows(got)
        print(f"({n} tokens: {time.monotonic() - t0:.0f} s wall, load average {os.getloadavg()[0]:.2f})", flush=True)
    print("\nall rows")
    print_rows(rows)
    rat = ratios(rows)
    print_ratios(rat)
    result = {"cpu": cpu, "header": header, "model": GPT_OSS_SMALL, "seq_lens": lens, "steps": steps, "rows": rows, "ratios": rat,
              "load_average_end": os.getloadavg()[0]}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
