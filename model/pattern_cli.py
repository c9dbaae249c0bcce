"""Look at a pattern: ``python -m model.pattern attention=sink attention.window_left=2
attention.num_global=1 seq_len=1024 query=499 [png=mask.png]``.

Reads the same Hydra configs as training (``conf/pattern.yaml`` composes ``conf/attention/*``).
Prints density and keys per query on every call, the keys of ``query`` when given, and draws the
mask and the block layout with matplotlib when ``png`` is given.
"""

from __future__ import annotations

import sys
from pathlib import Path

from model.pattern import PatternError, from_config
from model.pattern.draw import draw

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose(overrides: list[str], config_name: str = "pattern"):
    """The composed config; a bad override raises Hydra's error (the command, ``model/pattern/__main__.py``,
    reports it in one line first)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def _int_setting(cfg, key: str) -> int | None:
    value = cfg[key]
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise PatternError(f"{key}: must be an integer, got {value!r}")


def describe(cfg) -> str:
    seq_len = _int_setting(cfg, "seq_len")
    pattern = from_config(cfg.attention, seq_len)
    counts = pattern.key_counts(seq_len)
    lines = [
        f"pattern: {pattern!r}",
        f"seq_len={seq_len} density={float(counts.sum()) / seq_len**2:.6f} "
        f"keys/query: mean={counts.float().mean():.2f} min={int(counts.min())} max={int(counts.max())}",
    ]
    if pattern.content_based:
        lines.append("note: content-based pattern; counts are the positional upper bound (the choice depends on q, k)")
    query = _int_setting(cfg, "query")
    if query is not None:
        keys = pattern.keys_of(query, seq_len)
        shown = keys if len(keys) <= 64 else keys[:32] + ["..."] + keys[-32:]
        lines.append(f"query {query} (0-indexed) attends to {len(keys)} keys: {shown}")
    if cfg.png:
        draw(pattern, seq_len, _int_setting(cfg, "block"), str(cfg.png))
        lines.append(f"wrote {cfg.png}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    cfg = compose(sys.argv[1:] if argv is None else argv)
    try:
        print(describe(cfg))
    except PatternError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
