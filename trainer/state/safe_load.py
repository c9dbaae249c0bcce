"""Reading a ``.pt`` file without running what its pickle asks for.

A pickle is a program: ``torch.load(weights_only=False)`` calls any function the file names
(``__reduce__``), so a checkpoint directory from someone else could run code on every rank. Every
``.pt`` file this project reads — DeepSpeed's model and optimizer states at every ZeRO stage, on
resume, in ``trainer.generate`` and ``trainer.coverage`` — goes through ``load`` here:
``torch.load(weights_only=True)``, which builds only tensors, containers and plain values, plus
``ALLOWED``, the few other types DeepSpeed's own checkpoints hold (found by saving real ZeRO 0-3
checkpoints with this trainer and listing what ``weights_only`` refused; tests/test_security.py
loads all four stages through it). A file that names anything else is refused with one
``ConfigError`` line naming it, before the pickle's first call runs.

The allowlist is applied with ``torch.serialization.safe_globals`` around each load, not added to
torch's process-wide list, so nothing else in the process loads more than it asked for.
"""

from __future__ import annotations

import functools
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from trainer.config.validate import ConfigError


def allowed() -> list:
    """What DeepSpeed's checkpoints hold besides tensors and plain containers:

    - the client state's RNG (``checkpoint.rng_state``): numpy's MT19937 state, a uint32 array;
    - ZeRO 1-3 optimizer files: the loss scaler object, the ZeRO stage enum and, at stages 1-2,
      the fragment addresses of the flat partitions."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            LossScaler, ZeroStageEnum, fragment_address]


def load(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` under ``allowed()``; ConfigError naming ``path`` if
    its pickle would build anything else (what a crafted file needs to run code)."""
    mmap = mmap and zipfile.is_zipfile(path)  # torch maps only the zip format
    with torch.serialization.safe_globals(allowed()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a hand-made pickle: refused below
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            raise ConfigError(f"{path}: refused to load: {_what(e)}; a checkpoint holds only tensors and "
                              "DeepSpeed's state, so this file was not written by the trainer (nothing in it "
                              "was run)") from None


def check(path: str | Path) -> None:
    """``load``'s verdict on ``path`` without reading its tensors (memory-mapped): for the preflight."""
    load(path, mmap=True)


def check_checkpoint(ckpt: Path) -> None:
    """Every ``.pt`` file of the checkpoint directory ``ckpt`` passes ``check``."""
    for f in sorted(Path(ckpt).rglob("*.pt")):
        check(f)


def _what(e: pickle.UnpicklingError) -> str:
    """The forbidden thing torch names in its (many-line) message, in a few words."""
    text = str(e)
    m = re.search(r"GLOBAL (\S+) (?:was not an allowed|whose module)", text) or re.search(r"global: GLOBAL (\S+)", text)
    if m:
        return f"its pickle calls {m.group(1)}, which is not a tensor or a type DeepSpeed's checkpoints hold"
    m = re.search(r"Can only build [^,]*.*?but got (<[^>]+>)", text)
    if m:
        return f"its pickle builds {m.group(1)}, which is not a type DeepSpeed's checkpoints hold"
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(_BOILERPLATE)]
    return f"its pickle is not plain data ({(lines or ['?'])[0].removeprefix('WeightsUnpickler error: ')[:160]})"


_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def install(engine) -> None:
    """Make ``engine`` (a DeepSpeed engine) read its checkpoint files through ``load``: DeepSpeed's
    ``load_checkpoint`` reads every model and optimizer file via ``engine.checkpoint_engine.load``,
    which for its default ``TorchCheckpointEngine`` is ``torch.load(weights_only=False)``. Saving
    is unchanged (the subclass writes exactly as its parent). Another engine kind (DeepSpeed's
    fast/decoupled writers, configured in its ``checkpoint`` section) is not what this trainer
    configures: refused rather than left unsafe."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if isinstance(current, _safe_engine_class()):
        return
    if type(current) is not TorchCheckpointEngine:
        raise ConfigError(f"trainer.resume: DeepSpeed's checkpoint engine is {type(current).__name__}; this trainer "
                          "loads checkpoints only through its safe TorchCheckpointEngine")
    safe = _safe_engine_class().__new__(_safe_engine_class())
    safe.__dict__.update(current.__dict__)  # the same settings (zipfile serialization, name) as the one replaced
    engine.checkpoint_engine = safe


@functools.cache
def _safe_engine_class():
    """DeepSpeed's TorchCheckpointEngine with ``load`` replaced (built on first use: deepspeed is
    imported only by the paths that need it)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load(path, map_location=map_location)

    return SafeCheckpointEngine
