"""``python -m model.pattern``: the seed example end to end, the PNG, one-line errors, and
``describe`` for every attention config shipped under ``conf/attention``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from model.pattern import from_config
from model.pattern_cli import CONF_DIR, compose, describe

ATTENTION_CONFIGS = sorted(p.stem for p in (CONF_DIR / "attention").glob("*.yaml"))


def run_cli(repo_root: Path, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "mpl")}
    return subprocess.run([sys.executable, "-m", "model.pattern", *overrides], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_seed_example_and_png(repo_root, tmp_path):
    png = tmp_path / "m.png"
    r = run_cli(repo_root, tmp_path, "attention=sink", "attention.window_left=2", "attention.num_global=1",
                "seq_len=1024", "query=499", f"png={png}")
    assert r.returncode == 0, r.stderr
    assert "query 499 (0-indexed) attends to 4 keys: [0, 497, 498, 499]" in r.stdout, r.stdout
    # Queries 0, 1, 2 see 1, 2, 3 keys (sink + causal window), the other 1021 see 4:
    # (1 + 2 + 3 + 4·1021) / 1024² = 0.0039005...
    assert "density=0.003901 " in r.stdout, r.stdout
    assert "min=1 max=4" in r.stdout, r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert f"wrote {png}" in r.stdout


@pytest.mark.parametrize("overrides,names", [
    (["attention=nope"], "attention=nope: unknown attention option; allowed: "),
    (["attention.window_lft=3"], "attention.window_lft: not a key of the pattern config; did you mean attention.window_left?"),
    (["attention=sink", "attention.window_right=3"], "attention.window_right"),
    (["attention=topk", "attention.select=tokens"], "attention.select: must be one of block, query; got 'tokens'"),
])
def test_cli_errors_are_one_line(repo_root, tmp_path, overrides, names):
    r = run_cli(repo_root, tmp_path, *overrides)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and names in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("name", ATTENTION_CONFIGS)
def test_describe_every_attention_config(name):
    cfg = compose([f"attention={name}", "seq_len=2048"])
    text = describe(cfg)
    density = float(re.search(r"density=([0-9.]+)", text).group(1))
    assert 0 < density <= 1, text
    # The printed figure is the pattern's own density, rounded to the 6 decimals shown.
    assert density == pytest.approx(from_config(cfg.attention, 2048).density(2048), abs=5e-7), text
    assert ("content-based" in text) == (name == "topk"), text


def test_shipped_configs_are_all_there():
    assert set(ATTENTION_CONFIGS) == {"bigbird", "dense", "dilated", "longformer", "sink", "strided", "topk", "window"}
