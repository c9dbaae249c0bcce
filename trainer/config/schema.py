"""The training config's schema: one dataclass per YAML group, ``TrainConfig`` over them, and the
conversion of a plain dict into them (``to_dataclass``: pydantic checks the types; unknown keys, missing
ones and wrong types are one ``ConfigError`` line). What the settings may be together is ``trainer.config.validate``'s part (``validate``).
"""

from __future__ import annotations

import functools
import json
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass

from kernels.global_part import check_model
from model.pattern import Pattern, from_config
from model.transformer import ModelConfig, layer_patterns, model_preset, override_layers
from parallel.sp_attention import check_strategy
from trainer.data.corpus import tokenizer_vocab_size
from trainer.data.mlm import MlmSpec
from trainer.data.tasks import MixParams, PasskeyParams, RecallParams
from trainer.hf.config_map import hf_layer_attention, model_fields, read_hf_config


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
    sink_logits: bool | None = None  # None: the preset's (off) or config.json's (gpt-oss: on)
    activation_checkpointing: bool = False
    dense_every: int = 0
    layer_overrides: dict = field(default_factory=dict)
    # A local Hugging Face model directory (trainer/hf): its config.json gives the shape, its weights
    # the initial parameters. patterns_from: hf = each layer's attention from config.json (dense
    # causal, or its sliding window), config = the attention group; auto = hf when init_from is set.
    # model.layer_overrides apply on top of either.
    init_from: str | None = None
    patterns_from: str = "auto"
    loss_chunk: int = 0  # > 0: LM head + loss over this many rows at a time (model.transformer.chunked_cross_entropy)
    # Mixture of experts (model/moe.py, gpt-oss's): null = the preset's (none) or config.json's.
    n_experts: int | None = None
    experts_per_token: int | None = None
    swiglu_alpha: float | None = None
    swiglu_limit: float | None = None
    router_aux_loss_coef: float = 0.0  # > 0: + coef x the load-balancing loss (Switch; Hugging Face's formula)
    # Rotary distance to the global keys (kernels.global_part): position (each query's own) | fixed.
    global_rope: str = "position"
    global_rope_distance: int = 1  # fixed: every query this far from the last global key

    def uses_hf_patterns(self) -> bool:
        return self.init_from is not None and self.patterns_from in ("auto", "hf")

    def build(self, tokenizer_vocab: int) -> ModelConfig:
        """The preset with the fields set here; vocab_size unset is ``tokenizer_vocab``, not the preset's.
        With init_from: config.json's shape, which a field set here may repeat but not contradict."""
        skip = ("preset", "dense_every", "layer_overrides", "init_from", "patterns_from")
        overrides = {f.name: getattr(self, f.name) for f in fields(self)
                     if f.name not in skip and getattr(self, f.name) is not None}
        if self.init_from is None:
            return model_preset(self.preset, **{"vocab_size": tokenizer_vocab, **overrides})
        imported = model_fields(read_hf_config(self.init_from))
        for key, value in overrides.items():
            if key in imported and value != imported[key]:
                raise ValueError(f"model.{key}: {value!r} contradicts {self.init_from}/config.json, which says "
                                 f"{imported[key]!r}; leave model.{key} unset (null) with model.init_from")
        return ModelConfig(**{**imported, **overrides}).validate()


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
    # trainer/data/formats.py: file, dir, glob, blend; its blend weights' range (> 0) is checked there,
    # where the message can name the part a weight belongs to
    path: str | list[str | float] | dict | None = field(default=None, metadata={"range_checked_by": "trainer.data.formats"})
    tokenizer: str = "bytes"
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.01
    cache_dir: str | None = None
    document_mask: bool = False  # queries see only their own document (ids from DOC_SEP); globals excepted
    reset_positions: bool | None = None  # rotary positions restart per document; None: = document_mask
    task: str = "text"  # text | passkey | recall | mix: trainer/data/tasks.py (loss on the answers only)
    passkey: PasskeyParams = field(default_factory=PasskeyParams)
    recall: RecallParams = field(default_factory=RecallParams)
    mix: MixParams = field(default_factory=MixParams)
    format: str = "auto"  # auto | text | jsonl | parquet | arrow | megatron (trainer/data/formats.py)
    text_key: str = "text"  # the field of jsonl / parquet / arrow rows that holds a document
    loss_on: str = "all"  # all | completion: rows are (prompt_key, completion_key), loss on the completion
    prompt_key: str = "prompt"
    completion_key: str = "completion"

    @property
    def resets_positions(self) -> bool:
        """Rotary positions restart per document: ``reset_positions``, or when unset ``document_mask``
        (the one place this default is resolved: the trainer, generation and coverage read it)."""
        return self.document_mask if self.reset_positions is None else self.reset_positions


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
    mask_prob: float = 0.15  # fraction of (non-global) positions chosen; trainer/data/mlm.py says what happens to them


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
    world_size: int = field(default=1, init=False, metadata={"derived": True})

    def __post_init__(self):
        # An imported model reads its own tokenizer unless data.tokenizer names another than the
        # default: here, so that every reader of the config (train, generate, export) agrees.
        if self.model.init_from is not None and self.data.tokenizer == "bytes":
            self.data.tokenizer = f"hf:{self.model.init_from}"

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
        if self.model.init_from is not None:  # config.json's vocabulary (checked against the tokenizer's)
            return self.model.build(0)
        return self.model.build(self.tokenizer_vocab() + int(self.objective == "mlm"))

    def mlm_spec(self) -> MlmSpec:
        """What trainer/data/mlm.py needs: never chosen are the global positions of any layer."""
        return MlmSpec(mask_prob=self.mlm.mask_prob, mask_id=self.tokenizer_vocab(),
                       tokenizer_vocab=self.tokenizer_vocab(), num_global=max(p.num_global for p in self.patterns()),
                       seed=self.seed)

    def patterns(self) -> list[Pattern]:
        """One validated pattern per layer (the attention group, dense_every, layer_overrides)."""
        overrides = {int(k): v for k, v in self.model.layer_overrides.items()}
        if self.model.uses_hf_patterns():
            hf = hf_layer_attention(read_hf_config(self.model.init_from), self.seq_len)
            pats = override_layers([from_config(a, self.seq_len) for a in hf], overrides)
        else:
            base = from_config(self.attention, self.seq_len)
            pats = layer_patterns(base, self.model_config().n_layers, self.model.dense_every, overrides)
        for p in pats:
            p.validate(self.seq_len)
        if self.model.global_rope == "fixed":  # the layers and the SP strategy must take the globals apart
            model = self.model_config()
            check_model(pats)
            if self.sp_size > 1:
                check_strategy(pats, self.sp_size, self.seq_len, model.n_heads, model.n_kv_heads, self.parallel.strategy)
        return pats


OBJECTIVES = ("clm", "mlm")
EVAL_TASKS = ("passkey",)
WANDB_MODES = ("offline", "online", "disabled")
PRECISIONS = ("auto", "fp32", "bf16")


# --- DictConfig -> dataclasses ----------------------------------------------------------------------
# pydantic validates the dict against the dataclasses above (strict: no "3" -> 3, no true -> 1; every
# section forbids unknown keys); its first error becomes one ConfigError line naming the key.

_SECTION = {"extra": "forbid"}  # pydantic's ConfigDict (a TypedDict) for every section


def _sections(cls) -> list[type]:
    """``cls`` and every dataclass nested in it (the classes pydantic validates as sections)."""
    found = [cls]
    for hint in typing.get_type_hints(cls).values():
        if is_dataclass(hint):
            found += [c for c in _sections(hint) if c not in found]
    return found


@functools.cache
def _adapter(cls):
    """pydantic's validator of ``cls``; every section class gets ``extra="forbid"`` (pydantic reads a
    stdlib dataclass's config from its ``__pydantic_config__``)."""
    import pydantic

    for section in _sections(cls):
        section.__pydantic_config__ = _SECTION
    return pydantic.TypeAdapter(cls)


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        return "a list"
    if hint is dict or origin is dict or is_dataclass(hint):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _locate(cls, loc: tuple) -> tuple[str, tuple, object, object, bool]:
    """A pydantic error location as the dotted key, the location without pydantic's union tags (the
    path into the user's dict), the hint there, the one above it (a section or a container) and
    whether the location names a key of a section that is not one of its fields."""
    key, path, hint, parent = "", (), cls, None
    parts = list(loc)
    while parts:
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(hint) if a is not type(None)]
            if len(members) == 1:  # X | None: pydantic tags nothing
                hint = members[0]
                continue
            if len(parts) == 1:  # the value fits no member: the error is the union's
                break
            tag = parts.pop(0).split("[")[0]  # the member pydantic tried, as it names it
            hint = next((a for a in members if getattr(typing.get_origin(a) or a, "__name__", None) == tag), members[0])
            continue
        part = parts.pop(0)
        if is_dataclass(hint) and isinstance(part, str):
            hints = typing.get_type_hints(hint)
            if part not in hints or not _settable(hint, part):
                return key + part, path + (part,), None, hint, True
            key, hint, parent = f"{key}{part}.", hints[part], hint
        elif isinstance(part, int) and typing.get_origin(hint) in (list, tuple):
            args = typing.get_args(hint)
            key, hint, parent = f"{key.rstrip('.')}[{part}].", args[min(part, len(args) - 1)], hint
        else:
            break
        path += (part,)
    return key.rstrip("."), path, hint, parent, False


def _settable(cls, name: str) -> bool:
    """Whether ``name`` is a field a config may set (derived fields are not: init=False)."""
    return any(f.name == name and f.init for f in fields(cls))


def _first_error(cls, node: dict, error: dict) -> ConfigError:
    loc, kind = tuple(error["loc"]), error["type"]
    key, path, hint, parent, unknown = _locate(cls, loc)
    if unknown:
        allowed = [f.name for f in fields(parent) if f.init]
        return ConfigError(f"{key}: unknown key; allowed keys: {', '.join(allowed)}")
    value = node
    for part in path:  # the value the user wrote (pydantic's input is JSON-parsed)
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            break
    for container, tup in ((key.rsplit("[", 1)[0], parent), (key, hint)):
        if typing.get_origin(tup) is tuple and kind in ("missing", "too_long", "too_short"):
            return ConfigError(f"{container}: must be a list of {len(typing.get_args(tup))} values, got {error['input']!r}")
    if kind == "missing":
        return ConfigError(f"{key}: missing; the config must set it")
    if kind.startswith("value_error"):  # raised by a section's own __post_init__
        return ConfigError(f"{key or 'config'}: {error['msg'].removeprefix('Value error, ')}")
    return ConfigError(f"{key or 'config'}: must be {_type_name(hint)}, got {value!r}")


def to_dataclass(cls, node: dict):
    """Build ``cls`` from a plain dict (YAML values: str, numbers, bool, null, lists, mappings); unknown
    keys, missing ones and wrong types raise ConfigError, one line, for the first error."""
    import pydantic

    if not isinstance(node, dict):
        raise ConfigError(f"config: must be a mapping, got {node!r}")
    try:  # JSON mode: strict, yet a list is a tuple and an int a float, as YAML writes them
        return _adapter(cls).validate_json(json.dumps(node, allow_nan=True), strict=True)
    except pydantic.ValidationError as e:
        raise _first_error(cls, node, e.errors(include_url=False)[0]) from None
