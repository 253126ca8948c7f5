# shellcheck shell=bash
# Shared by slurm.sbatch, node.sh and local.sh: paths, environment defaults, the torchrun command.
# Every setting is an environment variable with a default; docs/launchers.md lists them.

RETRO_HOME=${RETRO_HOME:-${SLURM_SUBMIT_DIR:-$(pwd)}}
RETRO_PYTHON=${RETRO_PYTHON:-python}
RETRO_TORCHRUN=${RETRO_TORCHRUN:-torchrun}
RETRO_LOG_DIR=${RETRO_LOG_DIR:-$RETRO_HOME/logs}
export RETRO_HOME RETRO_PYTHON RETRO_TORCHRUN RETRO_LOG_DIR

# NCCL / threading defaults (only when unset, so a site profile or the user wins).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

retro_die() {
    echo "retro launcher: error: $*" >&2
    exit 2
}

# The command as one shell-quoted line (what --dry-run prints).
retro_quote() {
    local out
    printf -v out '%q ' "$@"
    echo "${out% }"
}

retro_is_dry_run() {
    [[ ${RETRO_DRY_RUN:-0} == 1 ]]
}

# Hostnames of the allocation, one per line, in SLURM's order.
retro_hosts() {
    local list=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
    [[ -n $list ]] || { hostname; return; }
    local out=""
    if command -v scontrol >/dev/null 2>&1; then
        out=$(scontrol show hostnames "$list" 2>/dev/null) || out=""
    fi
    if [[ -z $out ]]; then
        out=$("$RETRO_PYTHON" "$RETRO_HOME/launchers/nodelist.py" "$list") || retro_die "cannot parse SLURM_JOB_NODELIST=$list"
    fi
    printf '%s\n' "$out"
}

# Processes (GPUs) per node: RETRO_NPROC_PER_NODE, else SLURM's GPU variables, else nvidia-smi.
retro_gpus_per_node() {
    local n
    if [[ -n ${RETRO_NPROC_PER_NODE:-} ]]; then
        n=$RETRO_NPROC_PER_NODE
    elif [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        n=$SLURM_GPUS_ON_NODE
    elif [[ -n ${SLURM_GPUS_PER_NODE:-} ]]; then
        n=${SLURM_GPUS_PER_NODE##*:}  # "h100:8" -> 8
    elif command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L | grep -c '^GPU')
    else
        n=1
    fi
    [[ $n =~ ^[1-9][0-9]*$ ]] || retro_die "processes per node must be a positive integer, got '$n' (set RETRO_NPROC_PER_NODE)"
    echo "$n"
}

# Appends `--resume auto` unless the user already chose a --resume.
retro_train_args() {
    local arg resume=0
    for arg in "$@"; do
        [[ $arg == --resume || $arg == --resume=* || $arg == --checkpoint.resume* ]] && resume=1
    done
    TRAIN_ARGS=(--config "$@")
    (( resume )) || TRAIN_ARGS+=(--resume auto)
}

# Runs the torchrun command "$@" in the background, forwards SIGTERM/SIGUSR1 to its workers, waits,
# and exits with the workers' own code: torchrun reports any failed worker as 1, so each worker
# (launchers/worker.py) writes rank_<RANK> into $RETRO_EXIT_DIR; 85 (requeue) if any asked for it.
# $RETRO_LABEL names the caller in the messages.
retro_run_and_exit() {
    "$@" &
    TORCHRUN_PID=$!
    retro_forward() {
        echo "$RETRO_LABEL: $1 received; forwarding to the training processes" >&2
        pkill "-$1" -P "$TORCHRUN_PID" || true
    }
    trap 'retro_forward USR1' USR1
    trap 'retro_forward TERM' TERM
    local status=0 requeue=0 file code
    while true; do  # `wait` returns early (> 128) when a trapped signal arrives: wait again
        wait "$TORCHRUN_PID" && status=0 || status=$?
        kill -0 "$TORCHRUN_PID" 2>/dev/null || break
    done
    shopt -s nullglob
    for file in "$RETRO_EXIT_DIR"/rank_*; do
        code=$(<"$file")
        if [[ $code == 85 ]]; then requeue=1; elif [[ $code != 0 ]]; then exit "$code"; fi
    done
    (( requeue )) && exit 85
    exit "$status"
}
