"""Sequence parallelism: shard the sequence over ranks, exchange only what the pattern needs.

Entry points: ``init_parallel`` (groups → ``ParallelContext``), ``shard``/``positions`` (which
positions a rank holds), ``sp_attention`` (sharded attention: halo, top-k via block summaries, or Ulysses), ``check_sp_attention``
(startup guard), ``CommCounter`` (bytes per layer, direction and kind).
"""

from parallel.comm import CommCounter
from parallel.context import ParallelConfigError, ParallelContext, init_parallel, world_context
from parallel.guard import ShardMismatchError, check_sp_attention
from parallel.sharding import positions, shard
from parallel.sp_attention import sp_attention

__all__ = ["CommCounter", "ParallelConfigError", "ParallelContext", "init_parallel", "world_context",
           "ShardMismatchError", "check_sp_attention", "positions", "shard", "sp_attention"]
