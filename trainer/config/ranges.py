"""The range of every numeric key of the training config (``TrainConfig`` and its sections, by
dotted key), checked in one place (``check``) before the other rules of ``validate``. The attention
node's keys are ``model.pattern.ranges.ATTENTION``'s. A numeric key without an entry here fails
tests/test_schema_ranges.py, so none is added without its range.
"""

from __future__ import annotations

import typing
from dataclasses import fields, is_dataclass

from model.pattern.ranges import COUNT, SEED, SIZE, Bounds
from trainer.config.schema import ConfigError

FRACTION = Bounds(0, 1, lo_open=True, hi_open=True)
POSITIVE = Bounds(0, lo_open=True)

RANGES: dict[str, Bounds] = {
    "seq_len": SIZE, "batch_size": SIZE, "steps": Bounds(0, note="0 only with model.init_from: convert, no training"),
    "seed": SEED,
    "eval_every": Bounds(0, note="0 = only after the last step"), "eval_batches": SIZE,
    "model.vocab_size": SIZE, "model.d_model": SIZE, "model.n_layers": SIZE, "model.n_heads": SIZE,
    "model.n_kv_heads": SIZE, "model.d_ff": Bounds(1, note="null: 8/3 of d_model"),
    "model.rope_theta": Bounds(0, lo_open=True, note="the rotary base; null: the preset's"),
    "model.n_learned_global": COUNT, "model.dense_every": Bounds(0, note="0 = no dense layers"),
    "model.loss_chunk": Bounds(0, note="0 = the whole LM head at once"),
    "model.n_experts": Bounds(0, note="0 = a dense SwiGLU; null: the preset's / config.json's"),
    "model.experts_per_token": Bounds(1, note="<= model.n_experts"),
    "model.swiglu_alpha": POSITIVE, "model.swiglu_limit": POSITIVE,
    "model.router_aux_loss_coef": Bounds(0, note="0 = no load-balancing loss"),
    "model.global_rope_distance": Bounds(0, note="the rotary distance to the last global key"),
    "parallel.sequence_parallel_size": Bounds(1, note="null: all ranks"), "parallel.tensor_parallel_size": SIZE,
    "parallel.timeout_s": Bounds(0, lo_open=True, note="seconds"), "parallel.zero_stage": Bounds(0, 3, one_of=(0, 1, 2, 3)),
    "data.bpe_vocab_size": SIZE, "data.val_fraction": Bounds(0, 1, True, True, "evaluation needs data"),
    "data.passkey.key_len": SIZE, "data.passkey.depth": Bounds(0, 1), "data.passkey.first_positions": COUNT,
    "data.recall.pairs": SIZE, "data.recall.queries": SIZE, "data.recall.distance": SIZE,
    "data.mix.text_fraction": Bounds(0, 1),
    "optim.lr": POSITIVE, "optim.min_lr": COUNT, "optim.weight_decay": COUNT,
    "optim.betas": Bounds(0, 1, hi_open=True), "optim.eps": POSITIVE, "optim.warmup_steps": COUNT,
    "optim.grad_clip": Bounds(0, note="0 = no clipping"),
    "logging.stats_every": Bounds(0, note="0 = never"), "logging.log_every": SIZE,
    "mlm.mask_prob": FRACTION,
    "trainer.ckpt_every": Bounds(0, note="0 = never"), "trainer.keep_last": Bounds(0, note="0 = keep every checkpoint"),
    "trainer.max_consecutive_nonfinite": SIZE,
}


def numeric_keys(cls, prefix: str = "") -> dict[str, type]:
    """Every field of ``cls`` (recursively) whose type holds a number: int, float, their optional,
    tuple and list forms. Derived fields are not read from the YAML and have no range; a field whose
    range another module checks names it (``range_checked_by``) and is tested there."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        hint = hints[f.name]
        if f.metadata.get("derived") or f.metadata.get("range_checked_by"):  # the latter names its checker
            continue
        if is_dataclass(hint):
            out.update(numeric_keys(hint, f"{prefix}{f.name}."))
        elif _numeric(hint):
            out[prefix + f.name] = hint
    return out


def _numeric(hint) -> bool:
    if hint in (int, float):
        return True
    return any(_numeric(a) for a in typing.get_args(hint) if a is not type(None) and a is not Ellipsis)


def check(cfg) -> None:
    """ConfigError (``KEY: must be ..., got V``) for the first numeric key of ``cfg`` outside its range."""
    for key, bounds in RANGES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        bounds.check(key, value, ConfigError)
