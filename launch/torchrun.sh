#!/usr/bin/env bash
# torchrun launch, one node or many: launch/torchrun.sh [NPROC_PER_NODE] [Hydra overrides...]
#   launch/torchrun.sh 2 attention=window seq_len=16384          # one node, 2 processes
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun.sh 4 steps=100   # on node 0, and
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun.sh 4 steps=100   # on node 1
# Every rank runs trainer.train; the SP size defaults to all ranks (parallel.sequence_parallel_size=null).
#
# Environment (a positional NPROC wins over NPROC_PER_NODE):
#   NNODES          nodes in the job (1)
#   NPROC_PER_NODE  processes per node (the GPUs if any, else 2)
#   NODE_RANK       0..NNODES-1; required when NNODES > 1. Node 0 hosts the rendezvous store.
#   MASTER_ADDR     node 0's address as the other nodes reach it; required when NNODES > 1
#   MASTER_PORT     rendezvous port on node 0 (29500)
#   RDZV_ID         job id, the same on every node (haloformer)
#   MAX_RESTARTS    times torchrun restarts all workers after a failure (0); with trainer.resume=auto
#                   a restart continues from the latest checkpoint
#   LOCAL_ADDR      this node's address for the other nodes, when its hostname does not resolve to it
#   HALO_RUN_DIR    the run directory. With NNODES > 1 it defaults to outputs/$RDZV_ID and MUST be on a
#                   filesystem every node shares: all ranks write (and resume from) one directory.
# NNODES=1 without MASTER_ADDR runs --standalone (a private rendezvous on a free port); anything else
# uses the c10d rendezvous at MASTER_ADDR:MASTER_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "launch/torchrun.sh: $*" >&2; exit 2; }
need_int() {  # need_int NAME MIN: $NAME is an integer >= MIN
  [[ ${!1} =~ ^[0-9]+$ ]] && (( 10#${!1} >= $2 )) || die "$1 must be an integer >= $2, got '${!1}'"
}

gpus=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L | grep -c '^GPU' || true)
fi
if (( gpus > 0 )); then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
else
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi

if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then NPROC_PER_NODE=$1; shift; fi
NPROC_PER_NODE=${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 2 ))}
NNODES=${NNODES:-1}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}
RDZV_ID=${RDZV_ID:-haloformer}
need_int NPROC_PER_NODE 1
need_int NNODES 1
need_int MASTER_PORT 1
need_int MAX_RESTARTS 0
[[ $RDZV_ID =~ ^[A-Za-z0-9._-]+$ ]] || die "RDZV_ID must be letters, digits, '.', '_' or '-', got '$RDZV_ID'"

launch=(--nproc-per-node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS")
if (( NNODES == 1 )) && [[ -z ${MASTER_ADDR:-} ]]; then
  launch+=(--standalone)
else
  [[ -n ${MASTER_ADDR:-} ]] || die "MASTER_ADDR must be set when NNODES > 1 (node 0's address)"
  if (( NNODES == 1 )); then NODE_RANK=${NODE_RANK:-0}; fi
  [[ -n ${NODE_RANK:-} ]] || die "NODE_RANK must be set when NNODES > 1 (0..$((NNODES - 1)))"
  need_int NODE_RANK 0
  (( 10#$NODE_RANK < NNODES )) || die "NODE_RANK must be < NNODES=$NNODES, got '$NODE_RANK'"
  # Which agent hosts the c10d store is stated, not guessed: torch guesses by comparing MASTER_ADDR
  # with this machine's hostname and its addresses (rendezvous/utils.py:_matches_machine_hostname),
  # which says no when node 0 is addressed by a secondary interface, and then nobody hosts it.
  launch+=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
           --rdzv-id "$RDZV_ID" --rdzv-conf "is_host=$([[ 10#$NODE_RANK -eq 0 ]] && echo 1 || echo 0)")
  if (( NNODES > 1 )); then
    # Each node's launch_stamp is its own agent's start time: name one directory for all ranks.
    export HALO_RUN_DIR=${HALO_RUN_DIR:-outputs/$RDZV_ID}
  fi
fi
# The agents tell each other, and their workers, this address (default: the hostname's fqdn).
if [[ -n ${LOCAL_ADDR:-} ]]; then launch+=(--local-addr "$LOCAL_ADDR"); fi

export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export WANDB_MODE=${WANDB_MODE:-offline}
# torchrun forwards SIGUSR1 to the ranks (they stop after the step and checkpoint) instead of dying of it.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
exec .venv/bin/torchrun "${launch[@]}" -m trainer.train "$@"
