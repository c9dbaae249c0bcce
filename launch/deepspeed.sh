#!/usr/bin/env bash
# DeepSpeed-launcher launch: launch/deepspeed.sh [HOSTFILE] [Hydra overrides...]
#   printf 'localhost slots=2\n' > hostfile && launch/deepspeed.sh hostfile steps=20
# The hostfile has one `host slots=N` line per node (N processes there; # starts a comment).
#   One host:      its N ranks run here; no ssh, no pdsh.
#   Several hosts: started from here over pdsh and passwordless ssh (the repository and .venv at this
#                  path on every host); or, with NODE_RANK set, run this script on every host yourself
#                  (deepspeed --no_ssh: each host starts its own ranks, like launch/torchrun.sh).
# Environment:
#   HOSTFILE      the hostfile, when it is not the first argument
#   MASTER_ADDR   rank 0's host as the others reach it. One host: 127.0.0.1. Several: deepspeed asks
#                 the first host over ssh (`hostname -I`); required with NODE_RANK.
#   MASTER_PORT   29500
#   NODE_RANK     this host's line in the hostfile (0-based): the launch without ssh
#   HALO_RUN_DIR  several hosts: the run directory (outputs/$RUN_ID), on a filesystem every host shares.
#                 Given as a hydra.run.dir override: pdsh forwards no environment to the other hosts
#                 (only PYTHON*, NCCL*, ... and the lines of a .deepspeed_env file).
#   RUN_ID        names the default multi-host run directory (haloformer)
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "launch/deepspeed.sh: $*" >&2; exit 2; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
else
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi

if [[ $# -gt 0 && -f $1 ]]; then HOSTFILE=$1; shift; fi
[[ -n ${HOSTFILE:-} ]] || die "HOSTFILE must be set (or the hostfile given as the first argument)"
[[ -f $HOSTFILE ]] || die "HOSTFILE: no such file '$HOSTFILE'"
hosts=0
while IFS= read -r line || [[ -n $line ]]; do
  line=${line%%#*}
  [[ $line =~ ^[[:space:]]*$ ]] && continue
  [[ $line =~ ^[[:space:]]*[^[:space:]]+[[:space:]]+slots=[1-9][0-9]*[[:space:]]*$ ]] \
    || die "HOSTFILE: '$line' in $HOSTFILE is not 'host slots=N'"
  hosts=$((hosts + 1))
done < "$HOSTFILE"
(( hosts > 0 )) || die "HOSTFILE: $HOSTFILE lists no host"

MASTER_PORT=${MASTER_PORT:-29500}
[[ $MASTER_PORT =~ ^[0-9]+$ ]] || die "MASTER_PORT must be an integer, got '$MASTER_PORT'"
launch=(--hostfile "$HOSTFILE" --master_port "$MASTER_PORT" --module --no_local_rank)
# --no_local_rank: otherwise every rank gets --local_rank=N, which Hydra rejects (LOCAL_RANK is in the env).
overrides=()
if (( hosts == 1 )); then
  # A hostfile makes deepspeed check ssh to its first host, even though one host runs locally.
  launch+=(--no_ssh_check --master_addr "${MASTER_ADDR:-127.0.0.1}")
else
  if [[ -n ${NODE_RANK:-} ]]; then
    [[ $NODE_RANK =~ ^[0-9]+$ ]] && (( 10#$NODE_RANK < hosts )) \
      || die "NODE_RANK must be an integer < $hosts (the hosts in $HOSTFILE), got '$NODE_RANK'"
    [[ -n ${MASTER_ADDR:-} ]] || die "MASTER_ADDR must be set with NODE_RANK (the first host's address)"
    launch+=(--no_ssh --node_rank "$NODE_RANK")
  fi
  if [[ -n ${MASTER_ADDR:-} ]]; then launch+=(--master_addr "$MASTER_ADDR"); fi
  # Each host's launch_stamp is its own launcher's start time: name one directory for all ranks
  # (first, so a hydra.run.dir=... of the caller's still wins).
  overrides+=("hydra.run.dir=${HALO_RUN_DIR:-outputs/${RUN_ID:-haloformer}}")
fi

export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export WANDB_MODE=${WANDB_MODE:-offline}
exec .venv/bin/deepspeed "${launch[@]}" trainer.train "${overrides[@]}" "$@"
