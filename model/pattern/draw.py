"""A picture of a pattern: its mask (the first positions) beside its block layout (matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from model.pattern.base import Pattern

DRAW_MAX = 2048  # draw at most this many positions of the mask (a picture, not a dump)
MPL_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "matplotlib"


def draw(pattern: Pattern, seq_len: int, block: int, path: str) -> None:
    os.environ.setdefault("MPLCONFIGDIR", str(MPL_CACHE))
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
