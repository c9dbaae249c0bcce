"""The typed training config: Hydra's DictConfig -> dataclasses, every setting checked up front.

``load_config(dictconfig, world_size)`` is the only place a DictConfig is read. It rejects unknown
keys (naming the key and the allowed keys), wrong types, out-of-range values and impossible
combinations (seq_len not divisible by the SP size, SP x TP not dividing the world, ...) with ONE
``ConfigError`` line — before any process group, file or tensor is touched. Everything below the
trainer receives these dataclasses (or the ``ModelConfig`` / ``Pattern`` objects built from them).
The dataclasses themselves are ``trainer.config.schema``; this module is what they may hold together.
"""

from __future__ import annotations

import math
import netrc
import os
import re
from dataclasses import fields, is_dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from kernels import BACKENDS
from model.pattern import PatternError
from model.transformer import check_learned_global
from parallel.context import ParallelConfigError, check_sizes
from parallel.sharding import check_divisible
from parallel.sp_attention import STRATEGIES, pick_strategy
from trainer.config import ranges
from trainer.config.schema import (
    EVAL_TASKS,
    OBJECTIVES,
    PRECISIONS,
    WANDB_MODES,
    ConfigError,
    DataSection,
    LoggingSection,
    MlmSection,
    ModelSection,
    OptimSection,
    ParallelSection,
    TrainConfig,
    TrainerSection,
    to_dataclass,
)
from trainer.data.corpus import DataConfigError, Source, fields_of, tokenizer_vocab_size
from trainer.data.formats import FORMATS, LOSS_ON
from trainer.data.tasks import check as check_task
from trainer.data.tasks import task_params

# The config's public names, importable from here as before the schema had its own module.
__all__ = ["ConfigError", "DataSection", "LoggingSection", "MlmSection", "ModelSection", "OptimSection",
           "ParallelSection", "TrainConfig", "TrainerSection", "load_config", "to_dataclass", "validate",
           "env_world_size", "wandb_mode", "check_kernel_environment"]


def env_world_size() -> int:
    """The world size the launcher announces (torchrun sets WORLD_SIZE); 1 without a launcher."""
    raw = os.environ.get("WORLD_SIZE", "1")
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"WORLD_SIZE: must be a positive integer (set by torchrun), got {raw!r}")
    return int(raw)


def load_config(dictconfig, world_size: int | None = None) -> TrainConfig:
    """The validated TrainConfig of a composed Hydra config (resolved: interpolations expanded)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        node = OmegaConf.to_container(dictconfig, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', '') or 'config'}: {str(e).splitlines()[0]}") from None
    node.pop("hydra", None)
    cfg = to_dataclass(TrainConfig, node)
    cfg.world_size = env_world_size() if world_size is None else world_size
    validate(cfg)
    check_kernel_environment()
    return cfg


def check_kernel_environment() -> None:
    """The fused kernel's environment variables (HALOFORMER_FUSED_ISA, HALOFORMER_FUSED_BF16), checked
    with the config: a value this CPU cannot run is one line here, not an error at the first step."""
    from kernels.cpu import fused_choice

    try:
        fused_choice()
    except ValueError as e:
        raise ConfigError(str(e)) from None


# --- validation ---------------------------------------------------------------------------------

def _require(ok: bool, key: str, what: str, value) -> None:
    if not ok:
        raise ConfigError(f"{key}: {what}, got {value!r}")


def _one_of(value, allowed, key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _check_finite(node, prefix: str = "") -> None:
    """Every float setting is a finite number (inf passes a check like lr > 0; nan fails every comparison, with a message that misleads)."""
    for f in fields(node):
        value, key = getattr(node, f.name), prefix + f.name
        if is_dataclass(value):
            _check_finite(value, key + ".")
        for v in value if isinstance(value, (tuple, list)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")


def wandb_mode(cfg: TrainConfig) -> str:
    """The W&B mode the run will use: ``WANDB_MODE`` when set (W&B's own rule), else logging.wandb."""
    return os.environ.get("WANDB_MODE") or cfg.logging.wandb


def _wandb_has_credentials() -> bool:
    """An API key in the environment or in ~/.netrc for the W&B host (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def validate(cfg: TrainConfig) -> TrainConfig:
    """Raise ConfigError (one line, naming the setting) for anything that cannot run."""
    _check_finite(cfg)
    ranges.check(cfg)  # every numeric key inside its declared range, before any rule that computes with it
    # steps=0 with model.init_from: write the imported model as a checkpoint, and exit
    _require(cfg.steps >= 1 or cfg.model.init_from is not None, "steps",
             "must be >= 1 (0 only with model.init_from: convert, no training)", cfg.steps)
    for task in cfg.eval_tasks:
        _one_of(task, EVAL_TASKS, "eval_tasks")
    _one_of(cfg.objective, OBJECTIVES, "objective")
    _require(0.0 < cfg.mlm.mask_prob < 1.0, "mlm.mask_prob", "must be in (0, 1)", cfg.mlm.mask_prob)
    if cfg.objective == "mlm" and "passkey" in cfg.eval_tasks:
        raise ConfigError("eval_tasks: passkey scores next-token answers; it needs objective=clm, got objective=mlm")
    _validate_parallel(cfg)
    _validate_model(cfg)
    _validate_data(cfg)
    _validate_optim(cfg.optim)
    lg = cfg.logging
    _one_of(lg.wandb, WANDB_MODES, "logging.wandb")
    _one_of(wandb_mode(cfg), WANDB_MODES, "WANDB_MODE (environment)")
    if wandb_mode(cfg) == "online" and not _wandb_has_credentials():
        raise ConfigError("logging.wandb: online needs a W&B API key (WANDB_API_KEY, or run wandb login); allowed "
                          "without one: offline (sync later), disabled")
    _require(lg.stats_every >= 0, "logging.stats_every", "must be >= 0 (0 = never)", lg.stats_every)
    _require(lg.log_every >= 1, "logging.log_every", "must be >= 1", lg.log_every)
    if lg.run_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", lg.run_name):
        raise ConfigError(f"logging.run_name: must be a plain name (letters, digits, '.', '_', '-'; it names the "
                          f"directory outputs/NAME), got {lg.run_name!r}")
    tr = cfg.trainer
    _require(tr.ckpt_every >= 0, "trainer.ckpt_every", "must be >= 0 (0 = never)", tr.ckpt_every)
    _require(tr.keep_last >= 0, "trainer.keep_last", "must be >= 0 (0 = keep every checkpoint)", tr.keep_last)
    _require(tr.max_consecutive_nonfinite >= 1, "trainer.max_consecutive_nonfinite", "must be >= 1",
             tr.max_consecutive_nonfinite)
    if tr.resume not in ("none", "auto") and not Path(tr.resume).exists():
        raise ConfigError(f"trainer.resume: must be none, auto or an existing checkpoint path; got {tr.resume!r}")
    return cfg


def _validate_parallel(cfg: TrainConfig) -> None:
    par = cfg.parallel
    if par.tensor_parallel_size != 1:
        raise ConfigError("parallel.tensor_parallel_size: must be 1 (the model has no tensor-parallel layers); "
                          f"got {par.tensor_parallel_size!r}")
    sp = par.sequence_parallel_size
    _require(sp is None or sp >= 1, "parallel.sequence_parallel_size", "must be null (all ranks) or >= 1", sp)
    try:
        check_sizes(cfg.world_size, par.tensor_parallel_size, cfg.sp_size)
        check_divisible(cfg.seq_len, cfg.sp_size)
    except ParallelConfigError as e:
        raise ConfigError(str(e)) from None
    _one_of(par.strategy, STRATEGIES, "parallel.strategy")
    _one_of(par.backend, BACKENDS, "parallel.backend")
    if par.backend == "flex" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend: flex has no CPU backward; allowed on CPU: auto, reference, blocked; "
                          "got 'flex'")
    _one_of(par.zero_stage, (0, 1, 2, 3), "parallel.zero_stage")
    _one_of(par.precision, PRECISIONS, "parallel.precision")
    _require(par.timeout_s > 0, "parallel.timeout_s", "must be > 0 seconds", par.timeout_s)


def _validate_model(cfg: TrainConfig) -> None:
    _one_of(cfg.model.patterns_from, ("auto", "hf", "config"), "model.patterns_from")
    try:
        model = cfg.model_config()
        patterns = cfg.patterns()
    except (PatternError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    if cfg.model.init_from is not None or cfg.model.patterns_from == "hf":
        _validate_import(cfg, model, patterns)
    if model.loss_chunk and (cfg.objective != "clm" or cfg.data.task != "text"):
        raise ConfigError(f"model.loss_chunk: computes the loss without logits, which objective={cfg.objective} / "
                          f"data.task={cfg.data.task} score; it needs objective=clm and data.task=text, or 0")
    for i, p in enumerate(patterns):
        for side in ("window_left", "window_right"):  # the kernels accept it; in training it is a mistake
            if getattr(p, side, 0) >= cfg.seq_len:
                raise ConfigError(f"attention.{side}: must be < seq_len={cfg.seq_len} (a window that wide is dense "
                                  f"attention: use attention=dense); got {getattr(p, side)}")
        if cfg.objective == "clm" and p.sees_future():
            raise ConfigError(f"objective: clm (next-token loss) needs causal attention, but layer {i}'s pattern {p} "
                              "lets queries see later keys, their own targets among them; use objective=mlm "
                              "(masked tokens), or a causal pattern (attention.causal=true, attention.window_right=0)")
    try:
        check_learned_global(model.n_learned_global, patterns)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(model.ffn_dim >= 1, "model.d_ff", "must be >= 1 (null: 8/3 of d_model)", model.d_ff)
    _require(model.rope_theta > 0, "model.rope_theta", "must be > 0 (the rotary base; null: the preset's)",
             model.rope_theta)
    if cfg.sp_size > 1:  # the very rule sp_attention applies on the first forward, checked now
        for p in patterns:
            try:
                pick_strategy(p, cfg.sp_size, cfg.seq_len, model.n_heads, model.n_kv_heads, cfg.parallel.strategy)
            except ParallelConfigError as e:
                raise ConfigError(str(e)) from None


def _validate_import(cfg: TrainConfig, model, patterns) -> None:
    """model.init_from: the weights fit the config (shapes from the file headers), and the settings
    that assume the models trained here are refused."""
    from model.transformer import Transformer
    from trainer.hf.config_map import SINK_ARCHITECTURES, architecture, read_hf_config
    from trainer.hf.weights import check_shapes, expected_shapes, read_hf_shapes

    if cfg.model.init_from is None:
        raise ConfigError("model.patterns_from: hf reads the patterns of model.init_from's config.json; set "
                          "model.init_from=DIR, or use model.patterns_from=config")
    if cfg.model.uses_hf_patterns() and cfg.model.dense_every:
        raise ConfigError(f"model.dense_every: applies to the attention group (model.patterns_from=config); with the "
                          f"patterns of config.json use model.layer_overrides; got {cfg.model.dense_every}")
    if cfg.objective != "clm":
        raise ConfigError(f"objective: an imported causal LM trains with clm; got {cfg.objective}")
    if cfg.data.document_mask or cfg.data.reset_positions:
        raise ConfigError("data.document_mask / data.reset_positions: not with model.init_from (documents are "
                          "separated by the model's EOS, which the document masks do not read yet)")
    try:
        hf_sinks = architecture(read_hf_config(cfg.model.init_from)) in SINK_ARCHITECTURES
        with torch.device("meta"):
            expected = expected_shapes(Transformer(model, patterns), hf_sinks)
        check_shapes(read_hf_shapes(cfg.model.init_from), expected, model.tie_embeddings)
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def _validate_data(cfg: TrainConfig) -> None:
    data = cfg.data
    try:
        tok_vocab = tokenizer_vocab_size(data.tokenizer, data.bpe_vocab_size)
    except DataConfigError as e:
        raise ConfigError(str(e)) from None
    _validate_source(cfg)
    _require(0.0 < data.val_fraction < 1.0, "data.val_fraction", "must be in (0, 1) (evaluation needs data)",
             data.val_fraction)
    tok = f"data.tokenizer={data.tokenizer}" + (f", data.bpe_vocab_size={data.bpe_vocab_size}"
                                                 if data.tokenizer == "bpe" else "")
    what = f"the tokenizer's {tok_vocab} ({tok})"
    if cfg.objective == "mlm":
        what = f"{tok_vocab + 1}: {what} + the mask token of objective=mlm"
    _require(cfg.model_config().vocab_size >= tok_vocab + int(cfg.objective == "mlm"), "model.vocab_size",
             f"must be >= {what}", cfg.model.vocab_size)
    try:
        check_task(task_params(data), cfg.seq_len, cfg.model.n_learned_global, data.tokenizer)
    except DataConfigError as e:
        raise ConfigError(str(e)) from None
    _validate_documents(cfg)
    if data.task != "text" and cfg.objective != "clm":
        raise ConfigError(f"data.task: {data.task} scores next-token answers; it needs objective=clm, "
                          f"got objective={cfg.objective}")
    if data.tokenizer != "bytes" and "passkey" in cfg.eval_tasks:
        raise ConfigError(f"eval_tasks: passkey is written in byte tokens; it needs data.tokenizer=bytes, "
                          f"got {data.tokenizer!r}")


def _validate_source(cfg: TrainConfig) -> None:
    """data.path / data.format / the row keys: what is known without reading the documents (paths,
    formats, blend weights, columns, megatron index sizes). A bad row is found while the token cache
    is built, in preflight (trainer/state/preflight.py), still before any process group."""
    data = cfg.data
    _one_of(data.format, FORMATS, "data.format")
    _one_of(data.loss_on, LOSS_ON, "data.loss_on")
    for key in ("text_key", "prompt_key", "completion_key"):
        _require(getattr(data, key) != "", f"data.{key}", "must be a non-empty field name", getattr(data, key))
    if data.loss_on == "completion" and (data.task != "text" or cfg.objective != "clm" or data.path in (None, "")):
        raise ConfigError(f"data.loss_on: completion needs prompt/completion rows in data.path, data.task=text and "
                          f"objective=clm; got data.path={data.path!r}, data.task={data.task}, "
                          f"objective={cfg.objective}")
    if data.path in (None, "", []):
        return
    try:
        Source(data.path, data.format, fields_of(data)).check(data.tokenizer)
    except DataConfigError as e:
        raise ConfigError(str(e)) from None


def _validate_documents(cfg: TrainConfig) -> None:
    """data.document_mask: text windows only, and the globals must be learned slots, or one
    document's content would reach every other through them."""
    data = cfg.data
    if not (data.document_mask or data.reset_positions):
        return
    if data.task != "text" or cfg.objective != "clm":
        raise ConfigError(f"data.document_mask / data.reset_positions: need data.task=text and objective=clm (the "
                          f"windows cut from the DOC_SEP-separated stream), got data.task={data.task}, "
                          f"objective={cfg.objective}")
    g = max(p.num_global for p in cfg.patterns())
    if data.document_mask and cfg.model.n_learned_global != g:
        raise ConfigError(f"data.document_mask: needs the global tokens to be learned slots "
                          f"(model.n_learned_global == attention.num_global = {g}), or one document's tokens would "
                          f"reach every other through them; got model.n_learned_global={cfg.model.n_learned_global}")


def _validate_optim(opt: OptimSection) -> None:
    _require(opt.lr > 0, "optim.lr", "must be > 0", opt.lr)
    _require(0 <= opt.min_lr <= opt.lr, "optim.min_lr", f"must be in [0, optim.lr={opt.lr}]", opt.min_lr)
    _require(opt.weight_decay >= 0, "optim.weight_decay", "must be >= 0", opt.weight_decay)
    _require(all(0 <= b < 1 for b in opt.betas), "optim.betas", "must be two values in [0, 1)", list(opt.betas))
    _require(opt.eps > 0, "optim.eps", "must be > 0", opt.eps)
    _require(opt.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", opt.warmup_steps)
    _require(opt.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = no clipping)", opt.grad_clip)
