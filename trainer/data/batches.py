"""The batches of the objective: ``sampler_for(cfg, tokens, ctx)`` for training and evaluation alike."""

from __future__ import annotations

import numpy as np

from trainer.data.mlm import MaskedLMSampler
from trainer.data.sampling import LongDocSampler
from trainer.data.tasks import TaskSampler, task_params


def sampler_for(cfg, tokens: np.ndarray, ctx) -> LongDocSampler | MaskedLMSampler | TaskSampler:
    """Next-token windows (clm) or their masked-LM corruption (mlm); with data.task != text the task's
    sequences (trainer/data/tasks.py; ``tokens`` only for mix's text)."""
    if cfg.data.task != "text":
        return TaskSampler(task_params(cfg.data), cfg.seq_len, cfg.batch_size, cfg.seed, ctx.dp_rank, ctx.dp_size,
                           reserved=cfg.model.n_learned_global, text_tokens=tokens)
    sampler = LongDocSampler(tokens, cfg.seq_len, cfg.batch_size, cfg.seed, ctx.dp_rank, ctx.dp_size,
                             documents=cfg.data.document_mask, reset_positions=cfg.data.resets_positions)
    return MaskedLMSampler(sampler, cfg.mlm_spec()) if cfg.objective == "mlm" else sampler


def doc_kwargs(docs) -> dict:
    """The model's ``rope_positions`` [, ``doc_ids``] from a shard's extra fields (``LongDocSampler.next_shard``
    under data.reset_positions / data.document_mask); none for plain windows."""
    return dict(zip(("rope_positions", "doc_ids"), docs))
