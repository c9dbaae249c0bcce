"""What of the config may be written down: ``config.yaml`` in the run directory and W&B's run config.

A value read from the environment (``${oc.env:VAR}``) is recorded as that expression, not as its
value: the environment is where API keys and tokens live, and the record still resolves the same
way where it is read again (trainer.generate, trainer.coverage read config.yaml). A value under a
key named like a credential (a ``_``/``-``/``.``-separated part that is key, token, secret,
password, passwd, credential(s) or auth, e.g. ``api_key``, ``hf_token``) is ``REDACTED`` when it is a
string (numbers such as ``data.passkey.key_len`` are settings, not credentials).
"""

from __future__ import annotations

import re

from omegaconf import DictConfig, OmegaConf

REDACTED = "<redacted>"
SECRET_PARTS = {"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials", "auth"}
ENV = re.compile(r"\$\{\s*oc\.env\s*:")


def secret_name(key: str) -> bool:
    return any(part in SECRET_PARTS for part in re.split(r"[_\-.]", str(key).lower()))


def loggable(cfg: DictConfig) -> dict:
    """The resolved config as a plain dict, with env-read values as their expressions and secrets redacted."""
    return _walk(OmegaConf.to_container(cfg, resolve=False), OmegaConf.to_container(cfg, resolve=True))


def unresolved(cfg: DictConfig) -> dict:
    """The config as composed (interpolations kept as written, as Hydra records it), credential-like
    keys redacted."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    return _walk(raw, raw)


def _walk(raw, resolved, key: str = ""):
    """``resolved`` with each leaf whose ``raw`` (unresolved) form reads the environment put back as
    that form, and each leaf under a credential-like key redacted."""
    if isinstance(raw, str) and ENV.search(raw):
        return raw
    if isinstance(resolved, dict) and isinstance(raw, dict):
        return {k: _walk(raw.get(k), v, k) for k, v in resolved.items()}
    if isinstance(resolved, list) and isinstance(raw, list) and len(raw) == len(resolved):
        return [_walk(r, v, key) for r, v in zip(raw, resolved)]
    if secret_name(key) and isinstance(resolved, str):  # a number is no credential (data.passkey.key_len)
        return REDACTED
    return resolved
