"""The typed training config: Hydra's DictConfig -> dataclasses, every setting checked up front.

``load_config(dictconfig, world_size)`` is the only place a DictConfig is read. It rejects unknown
keys (naming the key and the allowed keys), wrong types, out-of-range values and impossible
combinations (seq_len not divisible by the SP size, SP x TP not dividing the world, ...) with ONE
``ConfigError`` line — before any process group, file or tensor is touched. Everything below the
trainer receives these dataclasses (or the ``ModelConfig`` / ``Pattern`` objects built from them).
"""

from __future__ import annotations

import math
import netrc
import os
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from kernels import BACKENDS
from model.pattern import Pattern, PatternError, from_config
from model.transformer import ModelConfig, layer_patterns, model_preset
from parallel.context import ParallelConfigError, check_sizes
from parallel.sharding import check_divisible
from parallel.sp_attention import STRATEGIES, pick_strategy
from trainer.data import DataConfigError, tokenizer_vocab_size
from trainer.mlm import MlmSpec
from trainer.tasks import MixParams, PasskeyParams, RecallParams, task_params
from trainer.tasks import check as check_task


class ConfigError(ValueError):
    """A bad setting; the message is one line naming the key and what is allowed."""


@dataclass
class ModelSection:
    preset: str = "tiny"
    vocab_size: int | None = None  # None: the tokenizer's vocabulary (TrainConfig.model_config)
    d_model: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    d_ff: int | None = None
    rope_theta: float | None = None
    n_learned_global: int = 0
    # model.sink_logits, not attention.*: the sinks are parameters (they change the state dict),
    # while the attention node describes which keys a query sees and is read by the pattern alone.
    sink_logits: bool = False
    activation_checkpointing: bool = False
    dense_every: int = 0
    layer_overrides: dict = field(default_factory=dict)

    def build(self, tokenizer_vocab: int) -> ModelConfig:
        """The preset with the fields set here; vocab_size unset is ``tokenizer_vocab``, not the preset's."""
        skip = ("preset", "dense_every", "layer_overrides")
        overrides = {f.name: getattr(self, f.name) for f in fields(self)
                     if f.name not in skip and getattr(self, f.name) is not None}
        return model_preset(self.preset, **{"vocab_size": tokenizer_vocab, **overrides})


@dataclass
class ParallelSection:
    sequence_parallel_size: int | None = None  # None: every rank not used by tensor parallelism
    tensor_parallel_size: int = 1
    strategy: str = "auto"
    backend: str = "auto"
    timeout_s: float = 120.0
    zero_stage: int = 0
    precision: str = "auto"


@dataclass
class DataSection:
    path: str | None = None
    tokenizer: str = "bytes"
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.01
    cache_dir: str | None = None
    document_mask: bool = False  # queries see only their own document (ids from DOC_SEP); globals excepted
    reset_positions: bool | None = None  # rotary positions restart per document; None: = document_mask
    task: str = "text"  # text | passkey | recall | mix: trainer/tasks.py (loss on the answers only)
    passkey: PasskeyParams = field(default_factory=PasskeyParams)
    recall: RecallParams = field(default_factory=RecallParams)
    mix: MixParams = field(default_factory=MixParams)


@dataclass
class OptimSection:
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 10
    grad_clip: float = 1.0


@dataclass
class LoggingSection:
    wandb: str = "offline"
    project: str = "haloformer"
    entity: str | None = None
    run_name: str | None = None
    stats_every: int = 25
    log_every: int = 1
    mask_png: bool = True


@dataclass
class MlmSection:
    mask_prob: float = 0.15  # fraction of (non-global) positions chosen; trainer/mlm.py says what happens to them


@dataclass
class TrainerSection:
    resume: str = "none"
    ckpt_every: int = 0
    ckpt_dir: str = "checkpoints"
    keep_last: int = 0  # keep the newest N checkpoints, delete older ones after each save; 0 = keep all
    max_consecutive_nonfinite: int = 5


@dataclass
class TrainConfig:
    attention: dict
    model: ModelSection
    parallel: ParallelSection
    data: DataSection
    optim: OptimSection
    logging: LoggingSection
    trainer: TrainerSection
    mlm: MlmSection = field(default_factory=MlmSection)
    objective: str = "clm"
    seq_len: int = 4096
    batch_size: int = 1
    steps: int = 100
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 4
    eval_tasks: list[str] = field(default_factory=list)
    # Derived by validate(), not read from the YAML:
    world_size: int = field(default=1, metadata={"derived": True})

    @property
    def sp_size(self) -> int:
        return self.parallel.sequence_parallel_size or self.world_size // self.parallel.tensor_parallel_size

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.sp_size * self.parallel.tensor_parallel_size)

    def tokenizer_vocab(self) -> int:
        """The tokenizer's vocabulary (256 for bytes, data.bpe_vocab_size for bpe), from the config alone."""
        return tokenizer_vocab_size(self.data.tokenizer, self.data.bpe_vocab_size)

    def model_config(self) -> ModelConfig:
        """The model to build: model.vocab_size unset follows the tokenizer, plus the mask token
        (id = the tokenizer's vocabulary size) under objective=mlm."""
        return self.model.build(self.tokenizer_vocab() + int(self.objective == "mlm"))

    def mlm_spec(self) -> MlmSpec:
        """What trainer/mlm.py needs: never chosen are the global positions of any layer."""
        return MlmSpec(mask_prob=self.mlm.mask_prob, mask_id=self.tokenizer_vocab(),
                       tokenizer_vocab=self.tokenizer_vocab(), num_global=max(p.num_global for p in self.patterns()),
                       seed=self.seed)

    def patterns(self) -> list[Pattern]:
        """One validated pattern per layer (the attention group, dense_every, layer_overrides)."""
        base = from_config(self.attention, self.seq_len)
        n_layers = self.model_config().n_layers
        pats = layer_patterns(base, n_layers, self.model.dense_every,
                              {int(k): v for k, v in self.model.layer_overrides.items()})
        for p in pats:
            p.validate(self.seq_len)
        return pats


OBJECTIVES = ("clm", "mlm")
EVAL_TASKS = ("passkey",)
WANDB_MODES = ("offline", "online", "disabled")
PRECISIONS = ("auto", "fp32", "bf16")


# --- DictConfig -> dataclasses ----------------------------------------------------------------------

def _check_type(value, hint, key: str):
    """``value`` as type ``hint`` (int, float, bool, str, None, X | None, tuple[...], list[...], dict)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _check_type(value, next(a for a in args if a is not type(None)), key)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: must be a list of {len(args)} values, got {value!r}")
        return tuple(_check_type(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    elif origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: must be a list, got {value!r}")
        return [_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    elif hint is dict or origin is dict:
        ok = isinstance(value, dict)
    else:
        raise TypeError(f"unsupported config type {hint!r} for {key}")
    if not ok:
        raise ConfigError(f"{key}: must be {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


def to_dataclass(cls, node: dict, prefix: str = ""):
    """Build ``cls`` from a plain dict; unknown keys and wrong types raise ConfigError."""
    if not isinstance(node, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a mapping, got {node!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in fields(cls) if not f.metadata.get("derived")]
    unknown = sorted(set(node) - set(allowed))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; allowed keys: {', '.join(allowed)}")
    kwargs = {}
    for name, value in node.items():
        hint = hints[name]
        kwargs[name] = (to_dataclass(hint, value, f"{prefix}{name}.") if is_dataclass(hint)
                        else _check_type(value, hint, prefix + name))
    for f in fields(cls):
        if f.name not in kwargs and f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{prefix}{f.name}: missing; the config must set it")
    return cls(**kwargs)


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
    return cfg


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
    for key in ("seq_len", "batch_size", "steps", "eval_batches"):
        _require(getattr(cfg, key) >= 1, key, "must be >= 1", getattr(cfg, key))
    _require(0 <= cfg.seed < 2**63, "seed", "must be in [0, 2**63) (numpy and torch seeds are non-negative)", cfg.seed)
    _require(cfg.eval_every >= 0, "eval_every", "must be >= 0 (0 = only after the last step)", cfg.eval_every)
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
    try:
        model = cfg.model_config()
        patterns = cfg.patterns()
    except (PatternError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    for i, p in enumerate(patterns):
        for side in ("window_left", "window_right"):  # the kernels accept it; in training it is a mistake
            if getattr(p, side, 0) >= cfg.seq_len:
                raise ConfigError(f"attention.{side}: must be < seq_len={cfg.seq_len} (a window that wide is dense "
                                  f"attention: use attention=dense); got {getattr(p, side)}")
        if cfg.objective == "clm" and p.sees_future():
            raise ConfigError(f"objective: clm (next-token loss) needs causal attention, but layer {i}'s pattern {p} "
                              "lets queries see later keys, their own targets among them; use objective=mlm "
                              "(masked tokens), or a causal pattern (attention.causal=true, attention.window_right=0)")
        if p.num_global < model.n_learned_global:
            raise ConfigError(f"model.n_learned_global: must be <= attention.num_global of every layer "
                              f"(layer {i} has {p.num_global}); got {model.n_learned_global}")
    _require(model.ffn_dim >= 1, "model.d_ff", "must be >= 1 (null: 8/3 of d_model)", model.d_ff)
    _require(model.rope_theta > 0, "model.rope_theta", "must be > 0 (the rotary base; null: the preset's)",
             model.rope_theta)
    if cfg.sp_size > 1:  # the very rule sp_attention applies on the first forward, checked now
        for p in patterns:
            try:
                pick_strategy(p, cfg.sp_size, cfg.seq_len, model.n_heads, model.n_kv_heads, cfg.parallel.strategy)
            except ParallelConfigError as e:
                raise ConfigError(str(e)) from None


def _validate_data(cfg: TrainConfig) -> None:
    data = cfg.data
    try:
        tok_vocab = tokenizer_vocab_size(data.tokenizer, data.bpe_vocab_size)
    except DataConfigError as e:
        raise ConfigError(str(e)) from None
    if data.path not in (None, "") and not Path(data.path).expanduser().is_dir():
        raise ConfigError(f"data.path: must be an existing directory of text files, or null for the built-in "
                          f"stdlib corpus; got {data.path!r}")
    if data.path not in (None, "") and not _any_nonempty_file(Path(data.path).expanduser()):
        raise ConfigError(f"data.path: {data.path!r} holds no non-empty (non-hidden) file; it must hold text files, "
                          "or be null for the built-in stdlib corpus")
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


def _any_nonempty_file(root: Path) -> bool:
    """Stops at the first one: cheap even for a corpus of millions of files."""
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        paths = (os.path.join(top, f) for f in files if not f.startswith("."))
        if any(os.path.isfile(f) and os.path.getsize(f) > 0 for f in paths):  # isfile: no broken links
            return True
    return False


def _validate_optim(opt: OptimSection) -> None:
    _require(opt.lr > 0, "optim.lr", "must be > 0", opt.lr)
    _require(0 <= opt.min_lr <= opt.lr, "optim.min_lr", f"must be in [0, optim.lr={opt.lr}]", opt.min_lr)
    _require(opt.weight_decay >= 0, "optim.weight_decay", "must be >= 0", opt.weight_decay)
    _require(all(0 <= b < 1 for b in opt.betas), "optim.betas", "must be two values in [0, 1)", list(opt.betas))
    _require(opt.eps > 0, "optim.eps", "must be > 0", opt.eps)
    _require(opt.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", opt.warmup_steps)
    _require(opt.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = no clipping)", opt.grad_clip)
