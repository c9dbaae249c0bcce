"""The config's types, checked by pydantic against the schema's dataclasses (trainer/config/schema.py):
every wrong type, unknown key or missing key is one ConfigError line naming the key, strictly (YAML's
``"3"`` is not an int, ``true`` is not 1, ``2.5`` is not an int), while an int is a float and a list a
tuple as YAML writes them. In-process through ``to_dataclass`` on the composed default config."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
from omegaconf import OmegaConf

from tests.train_utils import REPO
from trainer.config.schema import ConfigError, OptimSection, TrainConfig, to_dataclass
from trainer.data.tasks import PasskeyParams
from trainer.tools.generate import GenerateConfig


@pytest.fixture(scope="module")
def node() -> dict:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["trainer.ckpt_dir=checkpoints"])
    node = OmegaConf.to_container(cfg, resolve=True)
    node.pop("hydra", None)
    return node


def with_value(node: dict, key: str, value) -> dict:
    out = copy.deepcopy(node)
    *path, last = key.split(".")
    at = out
    for part in path:
        at = at[part]
    at[last] = value
    return out


# (key, value, the whole message): one member of each class of wrong type, at every depth of nesting
WRONG = [
    ("batch_size", "two", "batch_size: must be int, got 'two'"),
    ("seed", True, "seed: must be int, got True"),  # a bool is not an int (Python says it is)
    ("steps", 2.5, "steps: must be int, got 2.5"),
    ("seq_len", "4096", "seq_len: must be int, got '4096'"),  # no string coercion
    ("optim.lr", "fast", "optim.lr: must be float, got 'fast'"),
    ("optim.lr", False, "optim.lr: must be float, got False"),
    ("logging.mask_png", 1, "logging.mask_png: must be bool, got 1"),
    ("logging.wandb", 3, "logging.wandb: must be str, got 3"),
    ("model.d_model", 2.5, "model.d_model: must be int or null, got 2.5"),
    ("data.path", 3, "data.path: must be str or a list or a mapping or null, got 3"),
    ("optim.betas", [0.9], "optim.betas: must be a list of 2 values, got [0.9]"),
    ("optim.betas", [0.9, 0.9, 0.9], "optim.betas: must be a list of 2 values, got [0.9, 0.9, 0.9]"),
    ("optim.betas", [0.9, "x"], "optim.betas[1]: must be float, got 'x'"),
    ("data.passkey.depth", [0.5], "data.passkey.depth: must be a list of 2 values, got [0.5]"),
    ("data.recall.distance", [1, "far"], "data.recall.distance[1]: must be int, got 'far'"),
    ("eval_tasks", "passkey", "eval_tasks: must be a list, got 'passkey'"),
    ("model.layer_overrides", [1], "model.layer_overrides: must be a mapping, got [1]"),
    ("attention", "dense", "attention: must be a mapping, got 'dense'"),
    ("optim", 3, "optim: must be a mapping, got 3"),
    ("data.passkey", "deep", "data.passkey: must be a mapping, got 'deep'"),
]


@pytest.mark.parametrize(("key", "value", "message"), WRONG, ids=[f"{k}={v!r}" for k, v, _ in WRONG])
def test_a_wrong_type_is_one_line_naming_the_key(node, key, value, message):
    with pytest.raises(ConfigError) as e:
        to_dataclass(TrainConfig, with_value(node, key, value))
    assert str(e.value) == message


@pytest.mark.parametrize(("key", "section"), [("zz", TrainConfig), ("optim.zz", OptimSection),
                                              ("data.passkey.zz", PasskeyParams), ("world_size", TrainConfig)])
def test_an_unknown_key_is_refused_with_the_allowed_ones(node, key, section):
    """At every depth; ``world_size`` is a field, but derived (set by the launcher), not a setting."""
    with pytest.raises(ConfigError) as e:
        to_dataclass(TrainConfig, with_value(node, key, 1))
    allowed = [f.name for f in dataclasses.fields(section) if f.init]
    assert str(e.value) == f"{key}: unknown key; allowed keys: {', '.join(allowed)}"
    assert "world_size" not in allowed


def test_a_missing_required_key_is_named(node):
    bad = copy.deepcopy(node)
    del bad["attention"]
    with pytest.raises(ConfigError, match=r"^attention: missing; the config must set it$"):
        to_dataclass(TrainConfig, bad)


def test_yaml_numbers_and_lists_become_the_schema_types(node):
    cfg = to_dataclass(TrainConfig, with_value(with_value(node, "optim.lr", 1), "optim.betas", [0, 0.5]))
    assert type(cfg.optim.lr) is float and cfg.optim.lr == 1.0
    assert cfg.optim.betas == (0.0, 0.5) and type(cfg.optim.betas) is tuple
    assert all(type(b) is float for b in cfg.optim.betas)
    # non-finite floats pass the type check and reach validate's finite check (tests/test_bad_input.py)
    assert math.isnan(to_dataclass(TrainConfig, with_value(node, "optim.lr", float("nan"))).optim.lr)


def test_the_default_config_round_trips(node):
    """Every field of every section is a type pydantic validates: the composed default converts, and the
    dataclasses' own values convert back to the same config."""
    cfg = to_dataclass(TrainConfig, node)
    again = dataclasses.asdict(cfg)
    again.pop("world_size")
    assert to_dataclass(TrainConfig, again) == cfg


def test_the_generate_config_is_checked_the_same_way():
    with pytest.raises(ConfigError, match=r"^max_new_tokens: must be int, got True$"):
        to_dataclass(GenerateConfig, {"max_new_tokens": True})
    with pytest.raises(ConfigError, match=r"^trainer.zz: unknown key; allowed keys: resume$"):
        to_dataclass(GenerateConfig, {"trainer": {"zz": 1}})
    assert to_dataclass(GenerateConfig, {"temperature": 1}).temperature == 1.0
