"""Process groups, the model with its attention function, and the DeepSpeed engine around it.

Gradient reduction with sequence parallelism. SP ranks hold different tokens of the same sequences,
so their gradients are partial sums of one gradient, exactly like data-parallel ranks holding
different sequences. DeepSpeed is therefore given ONE reduce group: every rank that holds different
tokens (megatron's data-parallel group *with* the context-parallel ranks; the whole world when
tensor parallelism is off). It averages gradients over that group (size G); the loop multiplies
each rank's loss by G / (tokens of the global batch) so the average is the gradient of the global
mean loss — SP=2 trains exactly like SP=1 (see ``trainer.loop.backward_loss``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from kernels.contract import AttnCall, AttnResult
from model.attention import local_attention
from model.transformer import Transformer
from parallel.comm import CommCounter
from parallel.context import ParallelContext, init_parallel
from parallel.guard import check_sp_attention
from parallel.sp_attention import sp_attention
from trainer.config.validate import ParallelSection, TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


def set_environment() -> None:
    """Defaults for a CPU run; a launcher's own settings win."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    # DeepSpeed's comm backend JIT-compiles a shared-memory op on first use (~50 s): cache it in the repo.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))
    # Optional accelerations megatron-core and DeepSpeed look for and announce at import; quiet here.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    for name in ("megatron", "compilers", "DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def init_distributed(cfg: TrainConfig) -> ParallelContext:
    """The default process group (gloo on CPU, nccl on GPU; a short timeout), then megatron's groups."""
    timeout = timedelta(seconds=cfg.parallel.timeout_s)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        # Ranks on one host share its cores: more threads than cores only thrash.
        # torchrun says LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if "RANK" in os.environ:  # a launcher (torchrun, deepspeed, srun + torchrun) set the env:// variables
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend, store=launcher_store(rank, world, timeout), rank=rank, world_size=world,
                                timeout=timeout)
    else:  # one process, no launcher: a world of one (DeepSpeed still reads LOCAL_RANK)
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return init_parallel(cfg.parallel.tensor_parallel_size, cfg.sp_size, cfg.parallel.timeout_s)


def launcher_store(rank: int, world: int, timeout: timedelta) -> dist.Store:
    """The env:// rendezvous store, its keys prefixed with the torchrun attempt.

    torchrun's agent hosts the store and keeps it across ``--max-restarts``; process groups are
    named by creation order, so without the prefix a restarted group would read its predecessor's
    addresses (a dead rank's port) and fail to connect. Other launchers: rank 0 hosts it."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent, timeout=timeout, multi_tenant=True)
    return dist.PrefixStore(f"haloformer/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def teardown(ctx: ParallelContext | None) -> None:
    if ctx is not None:
        ctx.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()


# --- the model and its attention function -------------------------------------------------------------

class ShardedAttention:
    """``AttentionFn`` of a sequence-parallel rank: ``sp_attention`` over the context, bytes counted
    per layer (the ``layer`` index the model hands over, also when activation checkpointing
    recomputes a block)."""

    def __init__(self, ctx: ParallelContext, par: ParallelSection, counter: CommCounter):
        self.ctx, self.strategy, self.backend, self.counter = ctx, par.strategy, par.backend, counter

    def __call__(self, q, k, v, pattern, call: AttnCall) -> AttnResult:
        # This rank's queries, as the contract says; the loop reduces their statistics over all ranks.
        return sp_attention(q, k, v, pattern, self.ctx, call, strategy=self.strategy, backend=self.backend,
                            counter=self.counter)


def build_model(cfg: TrainConfig) -> Transformer:
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and for every SP size
    model = Transformer(cfg.model_config(), cfg.patterns())
    if cfg.model.init_from is not None:  # the imported weights replace the initial ones (trainer/hf)
        from trainer.hf.weights import load_into

        load_into(model, cfg.model.init_from)
    return model


def count_params(cfg: TrainConfig) -> int:
    """The model's parameter count, from a model built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return Transformer(cfg.model_config(), cfg.patterns()).num_params()


def parallelize(model: Transformer, ctx: ParallelContext, par: ParallelSection, counter: CommCounter) -> None:
    """Bind this rank's attention to the model, once (torchtitan's ``parallelize_model``): the local
    kernel, or sequence-parallel attention over the context with its bytes counted."""
    if ctx.sp_size == 1:
        model.bind_attention(functools.partial(local_attention, backend=par.backend))
    else:
        model.bind_attention(ShardedAttention(ctx, par, counter))


def check_startup(model: Transformer, ctx: ParallelContext, par: ParallelSection, seq_len: int) -> None:
    """The startup guard: sharded attention equals the reference for every distinct layer pattern,
    on a probe with the run's geometry (``parallel.guard.probe_local_len``)."""
    if ctx.sp_size == 1:
        return
    cfg = model.cfg
    for pattern in dict.fromkeys(model.patterns):  # distinct, in layer order
        check_sp_attention(pattern, ctx, strategy=par.strategy, backend=par.backend, seq_len=seq_len,
                           heads=(cfg.n_heads, cfg.n_kv_heads))


# --- DeepSpeed ------------------------------------------------------------------------------------

class ReduceGroups:
    """What DeepSpeed calls an ``mpu``: its "data-parallel" group is our gradient-reduce group (every
    rank holding different tokens: data x sequence parallel); model parallel is tensor parallel.
    Sequence parallelism is deliberately not declared: DeepSpeed's own SP handling assumes Ulysses
    and would divide by a different group size."""

    def __init__(self, ctx: ParallelContext):
        self.group = ctx.reduce_group if ctx.reduce_group is not None else dist.group.WORLD
        self.ctx = ctx

    def get_data_parallel_group(self):
        return self.group

    def get_data_parallel_rank(self):
        return dist.get_rank(self.group)

    def get_data_parallel_world_size(self):
        return dist.get_world_size(self.group)

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.group)

    def get_model_parallel_group(self):
        return self.ctx.tp_group

    def get_model_parallel_rank(self):
        return self.ctx.tp_rank

    def get_model_parallel_world_size(self):
        return self.ctx.tp_size

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self):
        return dist.get_global_rank(self.ctx.tp_group, 0)


def precision(cfg: TrainConfig) -> str:
    if cfg.parallel.precision != "auto":
        return cfg.parallel.precision
    return "bf16" if torch.cuda.is_available() else "fp32"  # bf16 matmuls are ~3x slower on CPU


def deepspeed_config(cfg: TrainConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": precision(cfg) == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # the loop logs; DeepSpeed's own progress lines would interleave
    }


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to optim.lr over warmup_steps, then cosine decay to min_lr at the last step."""
    opt = cfg.optim
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    progress = (step - opt.warmup_steps) / max(1, cfg.steps - opt.warmup_steps)
    return opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def build_engine(cfg: TrainConfig, model: Transformer, ctx: ParallelContext):
    """``(engine, reduce_group)``: DeepSpeed around the model, AdamW with the warmup+cosine schedule."""
    import deepspeed

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != "global_emb"]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n == "global_emb"]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
    schedule = lambda optimizer: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
        optimizer, lambda s: lr_at(s, cfg) / cfg.optim.lr)
    groups = ReduceGroups(ctx)
    # dist_init_required=False: our process group is the one; DeepSpeed only wraps it.
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=schedule, mpu=groups,
                                      config=deepspeed_config(cfg), dist_init_required=False)
    return engine, groups.group
