#!/usr/bin/env bash
# Single-node launch: launch/torchrun.sh [NPROC] [Hydra overrides...]
#   launch/torchrun.sh 2 attention=window seq_len=16384
# Every rank runs trainer.train; the SP size defaults to all ranks (parallel.sequence_parallel_size=null).
set -euo pipefail
cd "$(dirname "$0")/.."
nproc=2
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then nproc=$1; shift; fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
else
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export WANDB_MODE=${WANDB_MODE:-offline}
exec .venv/bin/torchrun --standalone --nproc_per_node "$nproc" -m trainer.train "$@"
