# One-command setup, test and train. `make setup` is idempotent: .venv is rebuilt only when
# pyproject.toml or the constraints file changed since the last successful setup.
PY ?= python3
VENV := .venv
CONSTRAINTS ?= constraints-cpu.txt
STAMP := $(VENV)/.setup-stamp
# Caches live in ignored project folders, never in $HOME.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor
export WANDB_DIR := $(CURDIR)/.cache/wandb
export WANDB_MODE ?= offline
export MPLCONFIGDIR := $(CURDIR)/.cache/matplotlib
export HYPOTHESIS_STORAGE_DIRECTORY := $(CURDIR)/.cache/hypothesis
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= $(shell nproc)

.PHONY: setup test test-all train lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	mkdir -p .cache/torch_extensions .cache/inductor .cache/wandb .cache/matplotlib
	$(VENV)/bin/python -c "import kernels.fused as f; f.extension()"  # build the fused CPU kernel once (~1 min)
	touch $(STAMP)

test: setup
	$(VENV)/bin/python -m pytest -q

test-all: setup
	SLOW=1 $(VENV)/bin/python -m pytest -q

train: setup
	$(VENV)/bin/torchrun --standalone --nproc_per_node 2 -m trainer.train parallel=sp2 $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .cache outputs multirun
