#!/usr/bin/env bash
# One node's share of a SLURM job (srun starts one copy per node): a torchrun whose c10d
# rendezvous lives on the first node. SIGUSR1/SIGTERM are forwarded to the training processes;
# the exit code is 85 when they wrote a checkpoint and asked to be requeued.
#   usage (from slurm.sbatch): node.sh CONFIG [--section.key=value ...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ $# -ge 1 ]] || retro_die "node.sh needs the config path"
mapfile -t HOSTS < <(retro_hosts)
NNODES=${SLURM_NNODES:-${#HOSTS[@]}}
[[ ${#HOSTS[@]} -eq $NNODES ]] || retro_die "SLURM_NNODES=$NNODES but the node list has ${#HOSTS[@]} hosts: ${HOSTS[*]}"
NODE_RANK=${RETRO_NODE_RANK:-${SLURM_NODEID:-${SLURM_PROCID:-0}}}
(( NODE_RANK >= 0 && NODE_RANK < NNODES )) || retro_die "node rank $NODE_RANK outside 0..$((NNODES - 1))"
NPROC=$(retro_gpus_per_node)
JOB_ID=${SLURM_JOB_ID:-local}
PORT=${RETRO_RDZV_PORT:-$(( 20000 + ${SLURM_JOB_ID:-9500} % 20000 ))}
IS_HOST=$(( NODE_RANK == 0 ? 1 : 0 ))
retro_train_args "$@"

CMD=("$RETRO_TORCHRUN" --nnodes="$NNODES" --nproc_per_node="$NPROC" --node_rank="$NODE_RANK"
     --rdzv_backend=c10d --rdzv_endpoint="${HOSTS[0]}:$PORT" --rdzv_id="$JOB_ID" --rdzv_conf=is_host="$IS_HOST"
     --max_restarts=0 "$RETRO_HOME/launchers/worker.py" "${TRAIN_ARGS[@]}")

if retro_is_dry_run; then
    echo "node $NODE_RANK (${HOSTS[$NODE_RANK]}): $(retro_quote "${CMD[@]}")"
    exit 0
fi

: "${RETRO_EXIT_ROOT:?RETRO_EXIT_ROOT must name a folder for the workers exit codes (slurm.sbatch sets it)}"
export RETRO_EXIT_DIR=$RETRO_EXIT_ROOT/node_$NODE_RANK  # launchers/worker.py writes rank_<RANK> here
rm -rf "$RETRO_EXIT_DIR"
cd "$RETRO_HOME"
export PYTHONPATH=$RETRO_HOME${PYTHONPATH:+:$PYTHONPATH}
RETRO_LABEL="retro node $NODE_RANK" retro_run_and_exit "${CMD[@]}"
