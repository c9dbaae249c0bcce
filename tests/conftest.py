"""Shared test setup: caches under the project's ``.cache``, a modest hypothesis profile, seeded torch.

The Makefile exports the same cache variables; setting them here too keeps a bare
``.venv/bin/python -m pytest`` from writing into ``$HOME`` or a stray ``.hypothesis/`` folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = REPO_ROOT / ".cache"

os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(CACHE / "hypothesis"))
os.environ.setdefault("MPLCONFIGDIR", str(CACHE / "matplotlib"))

# Modest example counts: the property tests loop in pure Python and the suite must stay well under a
# minute on 2 CPU cores. deadline=None because the first example of a test pays torch's warm-up.
settings.register_profile(
    "haloformer",
    max_examples=50,
    deadline=None,
    database=DirectoryBasedExampleDatabase(Path(os.environ["HYPOTHESIS_STORAGE_DIRECTORY"]) / "examples"),
    suppress_health_check=[HealthCheck.too_slow],
)
# A longer hunt on demand: HYPOTHESIS_PROFILE=thorough.
settings.register_profile("thorough", parent=settings.get_profile("haloformer"), max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "haloformer"))


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same torch RNG state, so a failure reproduces exactly."""
    torch.manual_seed(0)


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def one_thread():
    """Tiny single-token ops: threads only contend on the shared 2-core machine (5x slower measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
