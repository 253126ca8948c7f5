#!/usr/bin/env bash
# The GPU path checks itself in one short run: kernel tests, kernel benchmark, the real trainer (eager and
# compiled) and Muon's step, within 8 minutes on one H200.
#   benchmarks/gpu_check.sh RESULTS_DIR            # on a CUDA machine; fails without a GPU
#   benchmarks/gpu_check.sh --dry-run RESULTS_DIR  # CPU, tiny shapes: the same steps, so the script cannot rot
# Writes into RESULTS_DIR: env.log, nvidia-smi.txt, tests.log/.xml, kernels.log/.json, trainer.log/.json
# (+ trainer/ with each stage's log), muon.log/.json and summary.json (each step's status and seconds). Exits
# non-zero if there is no CUDA GPU (unless --dry-run), if any test fails or skips, or if a step fails or runs
# out of its time. Runs from a scratch directory outside the repository (the checkout is put on PYTHONPATH).
set -uo pipefail

# Seconds per step. They sum to under 480 (8 minutes), so the whole check fits one device call; a step that
# runs out is killed and reported, and the rest still run.
LIMIT_ENV=20
LIMIT_TESTS=100
LIMIT_KERNELS=70
LIMIT_TRAINER=210
LIMIT_MUON=70

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
if [ $# -ne 1 ]; then
    echo "usage: $0 [--dry-run] RESULTS_DIR" >&2
    exit 2
fi
total=$((LIMIT_ENV + LIMIT_TESTS + LIMIT_KERNELS + LIMIT_TRAINER + LIMIT_MUON))
[ "$total" -le 480 ] || { echo "gpu_check: step limits sum to $total s, over the 480 s budget" >&2; exit 2; }
out="$1"
mkdir -p "$out" || { echo "gpu_check: cannot create $out" >&2; exit 2; }
out="$(cd "$out" && pwd)"
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || exit 2
trap 'rm -rf "$work"' EXIT
cd "$work" || exit 2

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's retro and benchmarks
unset TRITON_INTERPRET RETRO_KERNELS RETRO_TRITON_CONFIG  # compiled kernels, auto dispatch, autotuning
if [ "$dry_run" -eq 1 ]; then
    export CUDA_VISIBLE_DEVICES=""  # the same CPU run on any machine
    export OMP_NUM_THREADS=1        # tiny ops: threads only contend
fi

status=0
summary=()
# step NAME LIMIT COMMAND...: run with a time limit, output to NAME.log (and the terminal), record the outcome.
step() {
    local name="$1" limit="$2" started rc
    shift 2
    started=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    local seconds=$(($(date +%s) - started)) outcome="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        outcome="timeout"
    elif [ "$rc" -ne 0 ]; then
        outcome="failed (exit $rc)"
    fi
    [ "$outcome" = "ok" ] || { echo "gpu_check: step $name: $outcome after $seconds s (limit $limit s)" >&2; status=1; }
    summary+=("$name	$outcome	$seconds	$limit")
    return "$rc"
}

read -r -d '' env_check <<'PY'
import importlib.util
import sys

import torch

dry_run = sys.argv[1] == "1"
if not dry_run and not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU; this check needs one (or use --dry-run)")
if dry_run:
    print("dry run on cpu, torch", torch.__version__)
else:
    import triton
    print("gpu", torch.cuda.get_device_name(0), "torch", torch.__version__, "cuda", torch.version.cuda,
          "triton", triton.__version__)
print("retro from", importlib.util.find_spec("retro").origin)
PY

if ! step env "$LIMIT_ENV" python -c "$env_check" "$dry_run"; then
    echo "gpu_check: FAILED before running anything (see $out/env.log)" >&2
    exit 1
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available" > "$out/nvidia-smi.txt"

if [ "$dry_run" -eq 1 ]; then
    # No GPU: the GPU tests would skip; collecting them still imports and parametrises the file.
    step tests "$LIMIT_TESTS" python -m pytest "$repo/tests/gpu/test_kernels_gpu.py" -p no:cacheprovider --collect-only -q
    step kernels "$LIMIT_KERNELS" python -m benchmarks.kernels --scale 64 --repeats 1 --warmup 0 --out "$out/kernels.json"
    step trainer "$LIMIT_TRAINER" python -m benchmarks.gpu_trainer_check --dry-run --work "$work/trainer" \
        --out "$out/trainer.json" --budget $((LIMIT_TRAINER - 15))
    step muon "$LIMIT_MUON" python -m benchmarks.muon --hidden 64 --layers 3 --intermediate 176 --vocab 256 --batch 1 \
        --seq 32 --repeats 1 --ns-repeats 1 --no-torch-muon --out "$out/muon.json"
else
    # The GPU kernel tests must run, not skip: pinned configs, one autotuning test (tests/gpu/test_kernels_gpu.py).
    step tests "$LIMIT_TESTS" env RETRO_REQUIRE_GPU=1 python -m pytest "$repo/tests/gpu/test_kernels_gpu.py" \
        -p no:cacheprovider -v -rs --durations=0 --junitxml="$out/tests.xml"
    if grep -q "SKIPPED" "$out/tests.log"; then
        echo "gpu_check: some GPU tests were SKIPPED (see $out/tests.log)" >&2
        status=1
    fi
    step kernels "$LIMIT_KERNELS" python -m benchmarks.kernels --repeats 10 --out "$out/kernels.json"
    # The real trainer on 1 GPU, eager and compiled, 10 steps each (benchmarks/gpu_trainer_check.py).
    step trainer "$LIMIT_TRAINER" python -m benchmarks.gpu_trainer_check --work "$work/trainer" \
        --out "$out/trainer.json" --budget $((LIMIT_TRAINER - 15))
    # Muon's optimizer step at TinyLlama size (Newton-Schulz through the dispatcher) vs AdamW and torch.optim.Muon.
    step muon "$LIMIT_MUON" python -m benchmarks.muon --repeats 3 --ns-repeats 2 --hidden 2048 --layers 22 \
        --intermediate 5632 --vocab 32000 --batch 4 --seq 1024 --out "$out/muon.json"
fi
mkdir -p "$out/trainer" && cp "$work"/trainer/*.log "$out/trainer/" 2>/dev/null

read -r -d '' write_summary <<'PY'
import json
import sys

rows = [line.split("\t") for line in sys.stdin.read().splitlines() if line.strip()]
steps = {name: {"outcome": outcome, "seconds": int(s), "limit_s": int(limit)} for name, outcome, s, limit in rows}
with open(sys.argv[1], "w") as f:
    json.dump({"dry_run": sys.argv[2] == "1", "steps": steps}, f, indent=2)
print("%-8s %-18s %7s %6s" % ("step", "outcome", "seconds", "limit"))
for name, s in steps.items():
    print("%-8s %-18s %7d %6d" % (name, s["outcome"], s["seconds"], s["limit_s"]))
PY
printf '%s\n' "${summary[@]}" | python -c "$write_summary" "$out/summary.json" "$dry_run"

if [ "$status" -eq 0 ]; then echo "gpu_check: OK, results in $out"; else echo "gpu_check: FAILED, logs in $out" >&2; fi
exit "$status"
