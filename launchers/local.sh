#!/usr/bin/env bash
# Training on one machine: torchrun --standalone with one process per GPU.
#
#   launchers/local.sh configs/X.toml [--section.key=value ...]
#   RETRO_NPROC_PER_NODE=2 launchers/local.sh --dry-run configs/X.toml   # print the command only
#
# Resumes from the newest complete checkpoint (`--resume auto`) unless --resume is given.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ ${1:-} == --dry-run ]]; then
    export RETRO_DRY_RUN=1
    shift
fi
[[ $# -ge 1 ]] || retro_die "usage: launchers/local.sh [--dry-run] CONFIG.toml [--section.key=value ...]"
[[ -f $1 ]] || retro_die "config file $1 not found"
NPROC=$(retro_gpus_per_node)
retro_train_args "$@"
CMD=("$RETRO_TORCHRUN" --standalone --nnodes=1 --nproc_per_node="$NPROC" -m retro.train "${TRAIN_ARGS[@]}")
if retro_is_dry_run; then
    retro_quote "${CMD[@]}"
    exit 0
fi
exec "${CMD[@]}"
