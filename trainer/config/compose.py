"""Hydra composition errors in one line, for every command that reads ``conf/``.

``composition_error(argv, config_name)`` composes ``conf/<config_name>.yaml`` with the command line's
overrides as Hydra is about to and turns a composition error (an unknown option of a group, a key that
is not in the config, an override that does not parse) into one line; None when it composes. Hydra's
own report of these is several lines with a hint about HYDRA_FULL_ERROR. Sweeps (-m) and custom config
paths are left to Hydra. Used by ``trainer.train``, ``trainer.generate`` and ``python -m model.pattern``.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

CONF = Path(__file__).resolve().parents[2] / "conf"

# Hydra flags that take a value (the value is not an override).
VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"}


def overrides_of(argv: list[str]) -> list[str] | None:
    """The overrides on a command line (Hydra's flags and their values dropped); None for a sweep or a
    custom config path, which Hydra composes its own way."""
    overrides, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in VALUE_FLAGS:
            skip = True
        elif arg in ("-m", "--multirun") or arg.startswith(("--config", "-cp", "-cn", "-cd")):
            return None
        elif not arg.startswith("-") and not arg.lstrip("+~").startswith("hydra."):
            overrides.append(arg)
    return overrides


def compose(config_name: str, overrides: list[str] | None = None):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


def composition_error(argv: list[str], config_name: str = "config") -> str | None:
    """One line for the first composition error of ``argv`` against ``conf/<config_name>.yaml``."""
    overrides = overrides_of(argv)
    if overrides is None:
        return None
    from hydra.errors import MissingConfigException

    try:
        compose(config_name, overrides)
    except MissingConfigException as e:  # attention=foo / model=huge
        return _missing_option(e)
    except Exception as e:  # noqa: BLE001 - any composition error is reported, in one line
        return _composition_error(e, overrides, config_name)
    return None


def _missing_option(e) -> str:
    m = re.search(r"Could not find '([^']+)'", str(e))
    group, _, option = (m.group(1) if m else "").rpartition("/")
    allowed = ", ".join(o for o in (e.options or []) if not o.startswith("_"))
    if group:
        return f"{group}={option}: unknown {group} option; allowed: {allowed}"
    return str(e).strip().splitlines()[0]


def _composition_error(e: Exception, overrides: list[str], config_name: str) -> str:
    text = " ".join(str(e).split())
    m = re.match(r"Could not override '([^']+)'", text)
    if not m:  # a syntax error: Hydra's message names no override, so name them
        return f"{' '.join(overrides)}: {text[:300]}"
    key = m.group(1)
    from omegaconf import OmegaConf

    keys = dict(_flat(OmegaConf.to_container(compose(config_name), resolve=False)))
    close = difflib.get_close_matches(key, list(keys), n=1)
    which = "the config" if config_name == "config" else f"the {config_name} config"
    if close:
        return f"{key}: not a key of {which}; did you mean {close[0]}?"
    return f"{key}: not a key of {which}; allowed: {', '.join(k for k, leaf in keys.items() if leaf)}"


def _flat(node: dict, prefix: str = ""):
    """(dotted key, is a leaf) for every key of a composed config but Hydra's own."""
    for k, v in node.items():
        if k == "hydra":
            continue
        yield f"{prefix}{k}", not isinstance(v, dict)
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
