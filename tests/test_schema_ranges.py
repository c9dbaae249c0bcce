"""Every numeric key has a declared range, and every value outside it is refused in one line naming
the key: the schema walked field by field (trainer/config/ranges.py) and the attention node's keys
(model/pattern/ranges.py), values drawn by hypothesis, checked in-process through ``load_config``;
plus the command line for a few (exit 2, one line, no traceback)."""

from __future__ import annotations

import subprocess
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from model.pattern import _KEYS
from model.pattern.ranges import ATTENTION
from tests.train_utils import PY, REPO, _env
from trainer.config.ranges import RANGES, numeric_keys
from trainer.config.schema import TrainConfig
from trainer.config.validate import ConfigError, load_config
from trainer.tools.generate import RANGES as GENERATE_RANGES
from trainer.tools.generate import GenerateConfig, load_generate_config

NON_NUMERIC_ATTENTION = {"name", "causal", "variant", "summary", "select", "parts"}


def test_every_numeric_key_declares_a_range():
    keys = numeric_keys(TrainConfig)
    assert sorted(set(keys) - set(RANGES)) == [], "numeric keys without a range in trainer/config/ranges.py"
    assert sorted(set(RANGES) - set(keys)) == [], "ranges for keys the schema does not have"
    assert sorted(_KEYS - NON_NUMERIC_ATTENTION - set(ATTENTION)) == [], "attention keys without a range"
    assert sorted(numeric_keys(GenerateConfig)) == sorted(GENERATE_RANGES), "generate keys without a range"


@pytest.mark.parametrize("key", sorted(GENERATE_RANGES))
def test_generate_values_outside_the_range_are_one_line(key):
    from hydra import compose, initialize_config_dir

    bounds = GENERATE_RANGES[key]
    integer = numeric_keys(GenerateConfig)[key] is int
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        base = compose(config_name="generate", overrides=["trainer.resume=/x"])

    @settings(max_examples=15)
    @given(outside(bounds, integer))
    def check(value):
        cfg = base.copy()
        OmegaConf.update(cfg, key, value)
        with pytest.raises(ConfigError) as e:
            load_generate_config(cfg)
        assert str(e.value).startswith(f"{key}: ") and "\n" not in str(e.value), str(e.value)

    check()


@pytest.fixture(scope="module")
def base():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["seq_len=512", "attention.window_left=64"])
    OmegaConf.set_struct(cfg, False)
    cfg.trainer.ckpt_dir = "checkpoints"  # the default names Hydra's run directory, unset in-process
    load_config(cfg, world_size=1)  # the base itself is valid
    return cfg


def outside(bounds, integer: bool):
    """A strategy of values outside ``bounds``."""
    parts = []
    if bounds.lo is not None:
        if integer:
            parts.append(st.integers(max_value=int(bounds.lo) - (0 if bounds.lo_open else 1)))
        else:
            parts.append(st.floats(max_value=bounds.lo, exclude_max=not bounds.lo_open, allow_nan=False))
    if bounds.hi is not None:
        if integer:
            parts.append(st.integers(min_value=int(bounds.hi) + (0 if bounds.hi_open else 1)))
        else:
            parts.append(st.floats(min_value=bounds.hi, exclude_min=not bounds.hi_open, allow_nan=False))
    return st.one_of(*parts)


def _is_int(hint) -> bool:
    """int, int | None, list[int] | None (not float nor tuple[float, ...])."""
    return hint is int or any(_is_int(a) for a in typing.get_args(hint) if a not in (type(None), Ellipsis))


CASES = [(k, RANGES[k], _is_int(h)) for k, h in numeric_keys(TrainConfig).items()]
CASES += [(f"attention.{k}", b, True) for k, b in ATTENTION.items()]


@pytest.mark.parametrize("key,bounds,integer", CASES, ids=[c[0] for c in CASES])
def test_values_outside_the_range_are_one_line_naming_the_key(base, key, bounds, integer):
    hint = numeric_keys(TrainConfig).get(key)
    n = len(typing.get_args(hint)) if typing.get_origin(hint) is tuple else None
    listy = "list[" in str(hint)

    @settings(max_examples=15)
    @given(outside(bounds, integer))
    def check(value):
        cfg = base.copy()
        if n:  # a tuple: one element outside, the others as given
            value = [value] + list(OmegaConf.select(cfg, key))[1:]
        elif listy:
            value = [value]
        OmegaConf.update(cfg, key, value, force_add=True)
        with pytest.raises(ConfigError) as e:
            load_config(cfg, world_size=1)
        assert str(e.value).startswith(f"{key}: ") and "\n" not in str(e.value), str(e.value)

    check()


@pytest.mark.parametrize("overrides,message", [
    (["attention=bigbird", "attention.seed=-1"], "attention.seed: must be in [0, 2**63)"),
    (["attention=strided", "attention.stride=0"], "attention.stride: must be >= 1, got 0"),
    (["optim.betas=[0.9,1.0]"], "optim.betas: each value must be in [0, 1), got [0.9, 1.0]"),
])
def test_the_command_line_refuses_in_one_line(overrides, message):
    proc = subprocess.run([PY, "-m", "trainer.train", *overrides], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"config error: {message}"), proc.stderr
