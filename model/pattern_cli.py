"""Look at a pattern: ``python -m model.pattern attention=sink attention.window_left=2
attention.num_global=1 seq_len=1024 query=499 [png=mask.png]``.

Reads the same Hydra configs as training (``conf/pattern.yaml`` composes ``conf/attention/*``).
Prints density and keys per query on every call, the keys of ``query`` when given, and draws the
mask and the block layout with matplotlib when ``png`` is given.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from model.pattern import Pattern, PatternError, from_config

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
DRAW_MAX = 2048  # draw at most this many positions of the mask (a picture, not a dump)


def compose(overrides: list[str], config_name: str = "pattern"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides)
    except HydraException as e:
        raise SystemExit(f"error: {str(e).splitlines()[0]}") from None


def draw(pattern: Pattern, seq_len: int, block: int, path: str) -> None:
    os.environ.setdefault("MPLCONFIGDIR", str(CONF_DIR.parent / ".cache" / "matplotlib"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(seq_len, DRAW_MAX)
    pos = torch.arange(n)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    axes[0].imshow(pattern.mask(pos, pos, seq_len).numpy(), cmap="Greys", interpolation="nearest")
    axes[0].set_title(f"mask (first {n} of {seq_len} positions)")
    axes[1].imshow(pattern.block_layout(seq_len, block).numpy(), cmap="Blues", interpolation="nearest")
    axes[1].set_title(f"block layout (block={block})")
    for ax in axes:
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.suptitle(repr(pattern), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
