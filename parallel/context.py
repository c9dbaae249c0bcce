"""The ParallelContext: process groups, ranks and sizes, built once and passed explicitly.

Groups come from megatron-core's ``parallel_state`` (tensor, context = our sequence-parallel, data);
megatron keeps them in its own module state, which ``ParallelContext.destroy`` clears. Nothing here
is a module global of ours: every function that communicates takes the context as an argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


class ParallelConfigError(ValueError):
    """An invalid parallel setting; the message names the setting and the allowed values."""


@dataclass
class ParallelContext:
    """Groups and ranks of this process. ``sp_*``: the sequence-parallel (megatron: context-parallel)
    group over which one sequence is sharded; ``dp_*``: data parallel; ``tp_*``: tensor parallel."""

    world_size: int
    rank: int
    backend: str
    sp_group: dist.ProcessGroup | None
    sp_rank: int
    sp_size: int
    dp_group: dist.ProcessGroup | None
    dp_rank: int
    dp_size: int
    tp_group: dist.ProcessGroup | None
    tp_rank: int
    tp_size: int
    timeout_s: float = 60.0
    uses_megatron: bool = True  # groups built by megatron-core's parallel_state (destroy clears them)
    # The gradient-reduce group: every rank holding other tokens (data x sequence parallel); None =
    # the default group (world_context: one SP group, no data parallelism).
    reduce_group: dist.ProcessGroup | None = None

    @property
    def timeout(self) -> timedelta:
        return timedelta(seconds=self.timeout_s)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def sp_global_rank(self, sp_rank: int) -> int:
        """Global rank of the member ``sp_rank`` of the SP group (point-to-point ops address global ranks)."""
        return dist.get_global_rank(self.sp_group, sp_rank)

    def destroy(self) -> None:
        """Tear down megatron's model-parallel groups (the default process group stays)."""
        if not self.uses_megatron:
            return
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()


def check_sizes(world_size: int, tensor_parallel_size: int, sequence_parallel_size: int) -> None:
    """Raise ParallelConfigError naming the setting when the sizes cannot tile ``world_size``."""
    for name, value in (("tensor_parallel_size", tensor_parallel_size),
                        ("sequence_parallel_size", sequence_parallel_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ParallelConfigError(f"parallel.{name}: must be a positive integer, got {value!r}")
    if world_size % (tensor_parallel_size * sequence_parallel_size):
        raise ParallelConfigError(
            f"parallel.sequence_parallel_size={sequence_parallel_size} x parallel.tensor_parallel_size="
            f"{tensor_parallel_size} must divide the world size {world_size}; allowed sequence_parallel_size "
            f"values here: {[p for p in range(1, world_size + 1) if world_size % (p * tensor_parallel_size) == 0]}")


def world_context(timeout_s: float = 60.0) -> ParallelContext:
    """Every rank in one SP group (the default group), no TP/DP, without megatron: for benchmarks and
    tools that need only sequence parallelism and should not pay megatron-core's import."""
    world, rank = dist.get_world_size(), dist.get_rank()
    return ParallelContext(world_size=world, rank=rank, backend=dist.get_backend(),
                           sp_group=dist.group.WORLD, sp_rank=rank, sp_size=world,
                           dp_group=None, dp_rank=0, dp_size=1, tp_group=None, tp_rank=0, tp_size=1,
                           timeout_s=timeout_s, uses_megatron=False)


def init_parallel(tensor_parallel_size: int = 1, sequence_parallel_size: int | None = None,
                  timeout_s: float = 60.0) -> ParallelContext:
    """Build the groups with megatron-core (after ``torch.distributed.init_process_group``).

    ``sequence_parallel_size`` defaults to all ranks not used by tensor parallelism; the rest is data
    parallel. Groups use the default backend: gloo on CPU, nccl on GPU.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("init_parallel: call torch.distributed.init_process_group first")
    from megatron.core import parallel_state as ps

    world, backend = dist.get_world_size(), dist.get_backend()
    sp = world // tensor_parallel_size if sequence_parallel_size is None else sequence_parallel_size
    check_sizes(world, tensor_parallel_size, sp)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        context_parallel_size=sp,
        distributed_timeout_minutes=max(1, math.ceil(timeout_s / 60)),
        # On CPU the default groups already are gloo; megatron's extra gloo copies would be duplicates.
        create_gloo_process_groups=backend != "gloo",
    )
    ctx = ParallelContext(
        world_size=world, rank=dist.get_rank(), backend=backend,
        sp_group=ps.get_context_parallel_group(), sp_rank=ps.get_context_parallel_rank(),
        sp_size=ps.get_context_parallel_world_size(),
        dp_group=ps.get_data_parallel_group(), dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        tp_group=ps.get_tensor_model_parallel_group(), tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(), timeout_s=timeout_s,
        reduce_group=ps.get_data_parallel_group(with_context_parallel=True),
    )
    # Touch the SP group once: NCCL creates communicators lazily, and the first point-to-point call
    # would otherwise need every rank of the group to take part.
    dist.barrier(group=ctx.sp_group)
    return ctx
