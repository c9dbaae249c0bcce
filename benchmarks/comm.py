"""Communication per rank per attention layer (forward): measured bytes next to the cost model.

Measured on P local gloo processes (torch.multiprocessing spawn) with small heads so that n up to
1M runs in seconds; each strategy runs only its communication (no attention):

- halo (+ globals): ``P2PExchange`` of the causal sink's plan (window w, g globals),
- Ulysses: ``ulysses_attention`` (DeepSpeed DistributedAttention) around an identity kernel,
- all-gather (= what a ring pass moves): ``dist.all_gather`` of K and V.

The largest per-rank received volume is reported (the halo's interior ranks). Then the cost model
at the worked example. Run: ``python -m benchmarks.comm [--json out.json] [--max-n 1048576]``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.comm import CommCounter, allgather_cost, halo_cost, ulysses_cost

SMALL = {"heads": 8, "kv_heads": 4, "head_dim": 8, "window": 512, "num_global": 16, "itemsize": 4}
WORKED = {"seq_len": 1 << 20, "sp_size": 32, "window": 4096, "num_global": 64, "kv_heads": 8, "head_dim": 128,
          "itemsize": 2}


def model_bytes(n, P, heads, kv_heads, head_dim, window, num_global, itemsize) -> dict[str, int]:
    return {"halo": halo_cost(window, num_global, kv_heads, head_dim, itemsize),
            "ulysses": ulysses_cost(n, P, heads, head_dim, itemsize, kv_heads=kv_heads),
            "allgather": allgather_cost(n, P, kv_heads, head_dim, itemsize)}


def _measure_one(ctx, n: int, cfg: dict) -> dict[str, int]:
    from model.pattern import Window
    from parallel.halo import P2PExchange, Tag, kv_routes
    from parallel.plan import build_plan
    from parallel.ulysses import ulysses_attention

    P, L = ctx.sp_size, n // ctx.sp_size
    H, Hkv, D = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    pattern = Window(causal=True, window_left=cfg["window"], num_global=cfg["num_global"])
    got = {}
    counter = CommCounter()
    kv = torch.randn(2, 1, Hkv, L, D)
    P2PExchange(ctx, *kv_routes(build_plan(pattern, n, P), ctx.sp_rank), Tag.KV, counter, 0).start(kv).wait()
    got["halo"] = counter.total("recv", "forward")

    counter = CommCounter()
    q = torch.randn(1, H, L, D)

    def identity(q, k, v, pattern, **_):  # the all-to-alls are what is measured, not the kernel
        return v.repeat_interleave(q.shape[1] // v.shape[1], dim=1), None

    ulysses_attention(q, kv[0], kv[1], pattern, ctx, identity, n, counter=counter)
    got["ulysses"] = counter.total("recv", "forward")

    parts = [torch.empty_like(kv) for _ in range(P)]
    dist.all_gather(parts, kv.contiguous(), group=ctx.sp_group)
    got["allgather"] = sum(p.numel() * p.element_size() for i, p in enumerate(parts) if i != ctx.sp_rank)
    return got


def _worker(rank: int, P: int, store: str, ns: list[int], cfg: dict, out_dir: str) -> None:
    from parallel.context import world_context

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=P,
                            timeout=timedelta(seconds=120))
    try:
        ctx = world_context(timeout_s=120)
        rows = {n: _measure_one(ctx, n, cfg) for n in ns}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({str(n): r for n, r in rows.items()}, f)
    finally:
        dist.destroy_process_group()
    # After DeepSpeed's comm backend was used, interpreter teardown sometimes aborts in C++
    # ("terminate called without an active exception"); the results are on disk, so skip it.
    os._exit(0)


def measure(P: int, ns: list[int], cfg: dict) -> dict[int, dict[str, int]]:
    """Max over ranks of the received bytes per strategy, for each n."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(P, os.path.join(tmp, "store"), ns, cfg, tmp), nprocs=P, join=True)
        per_rank = []
        for r in range(P):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
    return {n: {k: max(pr[str(n)][k] for pr in per_rank) for k in per_rank[0][str(n)]} for n in ns}


def _mb(b: float) -> str:
    return f"{b / 2**20:10.3f}"


def print_measured(rows: list[dict]) -> None:
    print("Measured vs model (MiB received per rank per layer, forward; "
          "heads={heads} kv_heads={kv_heads} head_dim={head_dim} w={window} g={num_global} fp32)".format(**SMALL))
    head = f"{'P':>2} {'n':>8} | {'halo':>10} {'model':>10} | {'ulysses':>10} {'model':>10} | " \
           f"{'allgather':>10} {'model':>10} | {'U/halo':>7} {'AG/halo':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        m, c = r["measured"], r["model"]
        print(f"{r['P']:>2} {r['n']:>8} | {_mb(m['halo'])} {_mb(c['halo'])} | {_mb(m['ulysses'])} "
              f"{_mb(c['ulysses'])} | {_mb(m['allgather'])} {_mb(c['allgather'])} | "
              f"{m['ulysses'] / m['halo']:7.1f} {m['allgather'] / m['halo']:7.1f}")


def worked_example() -> list[dict]:
    """The cost model at n=1M, P=32, w=4096, g=64, 8 KV heads x 128, bf16, for 8 and 32 query heads."""
    out = []
    for heads in (32, 8):
        c = model_bytes(WORKED["seq_len"], WORKED["sp_size"], heads, WORKED["kv_heads"], WORKED["head_dim"],
                        WORKED["window"], WORKED["num_global"], WORKED["itemsize"])
        # the brief's rough form counts all four tensors at the query heads' width
        rough = 4 * WORKED["seq_len"] // WORKED["sp_size"] * heads * WORKED["head_dim"] * WORKED["itemsize"] \
            * (WORKED["sp_size"] - 1) // WORKED["sp_size"]
        out.append({"heads": heads, **c, "ulysses_rough": rough})
    return out


def print_worked(rows: list[dict]) -> None:
    print("\nCost model, worked example: n=1,048,576, P=32, w=4096, g=64, 8 KV heads x 128, bf16 (K and V)")
    print(f"{'q heads':>7} | {'halo MiB':>9} | {'Ulysses MiB':>11} {'(4·n/P·H·D)':>11} | {'all-gather MiB':>14} | "
          f"{'U/halo':>13} | {'AG/halo':>7}")
    for r in rows:
        print(f"{r['heads']:>7} | {r['halo'] / 2**20:9.2f} | {r['ulysses'] / 2**20:11.1f} {r['ulysses_rough'] / 2**20:11.1f}"
              f" | {r['allgather'] / 2**20:14.1f} | {r['ulysses'] / r['halo']:5.1f} ({r['ulysses_rough'] / r['halo']:5.1f})"
              f" | {r['allgather'] / r['halo']:7.1f}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--min-n", type=int, default=8192)
    ap.add_argument("--max-n", type=int, default=1 << 20)
    ap.add_argument("--json", type=str, default=None, help="write the results here")
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ns = [n for n in (args.min_n << i for i in range(32)) if n <= args.max_n]
    rows = []
    for P in args.procs:
        for n, got in measure(P, ns, SMALL).items():
            rows.append({"P": P, "n": n, "measured": got, "model": model_bytes(n, P, **SMALL)})
    from kernels.cpu import describe

    cpu = describe()
    print("\n".join(f"# {line}" for line in cpu.splitlines()))
    print_measured(rows)
    worked = worked_example()
    print_worked(worked)
    result = {"cpu": cpu, "config": SMALL, "measured": rows, "worked_example": {"config": WORKED, "rows": worked}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
