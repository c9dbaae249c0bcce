"""One way to load a trained run without a process group: ``load_run(ckpt) -> (config, model, tokenizer)``.

Used by ``trainer.generate`` and ``trainer.coverage`` (and the Hugging Face export). The user gives
only the checkpoint (a ``step_*`` directory, or a directory of them: its newest intact one; or a
run directory with ``checkpoints/``). The run's ``config.yaml`` (the trainer writes it into the run
directory, the parent of ``trainer.ckpt_dir`` by default) gives the tokenizer and every layer's
pattern; ``meta.json`` gives the model's shape, and the two must agree.

Weights come from DeepSpeed's files at every ZeRO stage: stage 0 from the module state (bf16 runs
stored bf16 weights; they are cast to fp32), stages 1-3 as the fp32 master weights DeepSpeed's
``zero_to_fp32`` reconstructs. Every file is read by ``safe_load`` (``weights_only=True``: a crafted
pickle is refused in one line, nothing in it runs), and the keys must match the model exactly: a
missing or an unexpected weight is one ConfigError line.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from model.pattern import PatternError
from model.transformer import Transformer
from trainer.config.validate import ConfigError, TrainConfig, to_dataclass
from trainer.data.corpus import DataConfigError, documents, get_tokenizer
from trainer.state import checkpoint, safe_load


def resolve_checkpoint(path: str | Path) -> Path:
    """One intact checkpoint directory: ``path`` itself, or the newest intact one under it (or under
    its ``checkpoints/``: a run directory)."""
    p = Path(path).expanduser()
    found = ([p] if (p / checkpoint.META).is_file() else
             checkpoint.complete_checkpoints(p) or checkpoint.complete_checkpoints(p / "checkpoints"))
    if not found:
        raise ConfigError(f"trainer.resume: {str(path)!r} is neither a checkpoint (with {checkpoint.META}), nor a "
                          "directory holding one, nor a run directory with checkpoints/")
    ckpt = checkpoint.newest_intact(found, warn=True)
    if ckpt is None:
        raise ConfigError(f"trainer.resume: {found[-1]} is corrupt: {checkpoint.problem(found[-1])}")
    return ckpt


def config_file(ckpt: Path) -> Path:
    """The run's ``config.yaml``: in the checkpoint directory or one of its two parents."""
    candidates = [ckpt / "config.yaml", ckpt.parent / "config.yaml", ckpt.parent.parent / "config.yaml"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ConfigError(f"trainer.resume: no config.yaml of the run next to {ckpt} (looked in "
                          f"{', '.join(str(c.parent) for c in candidates)}); copy the run's config.yaml there")
    return found


def run_config(ckpt: Path) -> TrainConfig:
    """The training config of the run that wrote ``ckpt``, checked against its meta.json."""
    found = config_file(ckpt)
    try:
        node = OmegaConf.to_container(OmegaConf.load(found), resolve=True)
    except OmegaConfBaseException as e:  # e.g. ${oc.env:VAR} (recorded as written) with VAR unset here
        raise ConfigError(f"{found}: {str(e).splitlines()[0]}") from None
    node.pop("hydra", None)
    cfg = to_dataclass(TrainConfig, node)
    check_shape(cfg, ckpt, found)
    return cfg


def check_shape(cfg: TrainConfig, ckpt: Path, source: Path | str) -> None:
    """ConfigError unless ``cfg`` (read from ``source``) describes the model shape ``ckpt`` holds."""
    try:
        shape = {k: v for k, v in vars(cfg.model_config()).items() if k in checkpoint.SHAPE_KEYS}
        cfg.patterns()
    except (PatternError, DataConfigError, ValueError) as e:
        raise ConfigError(f"{source}: {str(e).splitlines()[0]}") from None
    saved = checkpoint.read_meta(ckpt)["model"]
    if shape != saved:
        raise ConfigError(f"trainer.resume: {source} describes a model of shape {shape}, {ckpt / checkpoint.META} "
                          f"another: {saved}; this config.yaml is not the checkpoint's run")


class _SafeTorch:
    """``torch`` as DeepSpeed's zero_to_fp32 sees it during ``load_state_dict``: every attribute is
    torch's, except ``load``, which is ``safe_load.load`` (zero_to_fp32 calls torch.load with
    weights_only=False on every file it reads)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, mmap=False, weights_only=True, **_):  # weights_only: always True here
        return safe_load.load(f, map_location=map_location or "cpu", mmap=mmap)


def load_state_dict(ckpt: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """fp32 weights from DeepSpeed's files, without a process group; every file read by ``safe_load``."""
    if zero_stage == 0:
        files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ConfigError(f"trainer.resume: {ckpt} holds no mp_rank_*_model_states.pt (DeepSpeed's model file)")
        state = safe_load.load(files[0])["module"]
        return {k: v.float() for k, v in state.items()}
    safe_load.check_checkpoint(ckpt)  # the one-line refusal before DeepSpeed's progress bars start
    from unittest import mock

    from deepspeed.utils import zero_to_fp32

    # zero_to_fp32 names torch.load itself; only that module's view of torch changes, for this call.
    with (mock.patch.object(zero_to_fp32, "torch", _SafeTorch()), contextlib.redirect_stdout(io.StringIO()),
          contextlib.redirect_stderr(io.StringIO())):  # its progress bars
        state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return {k: v.float() for k, v in state.items()}


def load_weights(model: Transformer, state: dict[str, torch.Tensor], ckpt: Path) -> None:
    """``model.load_state_dict`` with every key accounted for: a weight the model has and the
    checkpoint lacks, or one the checkpoint has and the model does not, is a ConfigError. With tied
    embeddings ``lm_head.weight`` is ``wte.weight`` and may be stored under either name or both."""
    want = set(model.state_dict())
    tied = {"lm_head.weight"} if model.cfg.tie_embeddings else set()
    missing, unexpected = sorted(want - set(state) - tied), sorted(set(state) - want)
    if missing or unexpected:
        what = "; ".join(f"{n} {len(ks)} weight(s) ({', '.join(ks[:3])})" for n, ks in
                         (("lacks", missing), ("has unexpected", unexpected)) if ks)
        raise ConfigError(f"trainer.resume: {ckpt} does not match the model of its config.yaml: it {what}")
    try:
        model.load_state_dict(state, strict=not (tied - set(state)))
    except RuntimeError as e:  # a weight of another shape
        raise ConfigError(f"trainer.resume: {ckpt}: {' '.join(str(e).split())[:300]}") from None


def tokenizer_of(cfg: TrainConfig):
    d = cfg.data
    docs = documents(d.path) if d.tokenizer != "bytes" else None
    return get_tokenizer(d.tokenizer, docs, d.cache_dir, d.val_fraction, d.bpe_vocab_size)


def load_run(ckpt: str | Path, device: str | torch.device = "cpu",
             cfg: TrainConfig | None = None) -> tuple[TrainConfig, Transformer, object]:
    """(config, model in eval mode on ``device``, tokenizer) of the checkpoint ``ckpt`` (resolved as
    ``resolve_checkpoint`` does). ``cfg``: the run's config with a caller's overrides (coverage),
    instead of the checkpoint's own; it must describe the same model shape."""
    path = resolve_checkpoint(ckpt)
    if cfg is None:
        cfg = run_config(path)
    else:
        check_shape(cfg, path, "the config")
    model = Transformer(cfg.model_config(), cfg.patterns())
    load_weights(model, load_state_dict(path, checkpoint.read_meta(path)["zero_stage"]), path)
    return cfg, model.to(device).eval(), tokenizer_of(cfg)
