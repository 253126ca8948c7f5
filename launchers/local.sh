#!/usr/bin/env bash
# Training on one machine: torchrun --standalone with one process per GPU.
#
#   launchers/local.sh configs/X.toml [--section.key=value ...]
#   RETRO_NPROC_PER_NODE=2 launchers/local.sh --dry-run configs/X.toml   # print the command only
#
# Resumes from the newest complete checkpoint (`--resume auto`) unless --resume is given.
# Exits with the trainer's own code (0 done, 2 bad config or input, 3 non-finite steps, 85
# checkpointed after SIGTERM/SIGUSR1): torchrun reports any failed worker as 1, so each worker
# (launchers/worker.py) records its code and this script reads them back, as node.sh does.
# SIGTERM and SIGUSR1 sent to this script are forwarded to the training processes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
LAUNCHERS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [[ ${1:-} == --dry-run ]]; then
    export RETRO_DRY_RUN=1
    shift
fi
[[ $# -ge 1 ]] || retro_die "usage: launchers/local.sh [--dry-run] CONFIG.toml [--section.key=value ...]"
[[ -f $1 ]] || retro_die "config file $1 not found"
NPROC=$(retro_gpus_per_node)
retro_train_args "$@"
CMD=("$RETRO_TORCHRUN" --standalone --nnodes=1 --nproc_per_node="$NPROC" "$LAUNCHERS/worker.py" "${TRAIN_ARGS[@]}")
if retro_is_dry_run; then
    retro_quote "${CMD[@]}"
    exit 0
fi

RETRO_EXIT_DIR=$(mktemp -d "${TMPDIR:-/tmp}/retro-exit.XXXXXX")  # launchers/worker.py writes rank_<RANK> here
export RETRO_EXIT_DIR
trap 'rm -rf "$RETRO_EXIT_DIR"' EXIT
# worker.py runs as a script: import retro from this checkout, as `-m retro.train` from its root would
export PYTHONPATH=${LAUNCHERS%/*}${PYTHONPATH:+:$PYTHONPATH}
trap : INT  # Ctrl-C reaches torchrun and the workers directly; keep waiting for their exit codes
RETRO_LABEL="retro local" retro_run_and_exit "${CMD[@]}"
