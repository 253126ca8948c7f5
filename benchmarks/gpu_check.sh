#!/usr/bin/env bash
# Kernel correctness on the GPU (bf16 + fp32) and the kernel benchmark, in one go.
#   benchmarks/gpu_check.sh RESULTS_DIR
# Writes into RESULTS_DIR: env.txt, nvidia-smi.txt, kernels_tests.log, kernels_tests.xml,
# kernels_bench.log, kernels_gpu.json, train_throughput.log/.json, muon.log/.json. Exits non-zero if
# there is no CUDA GPU, if any test fails or is skipped, or if a benchmark fails. Each step has its
# own time limit (the device machine lends ~10 minutes per call), so one slow step cannot eat the rest.
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 RESULTS_DIR" >&2
    exit 2
fi
out="$1"
mkdir -p "$out" || { echo "gpu_check: cannot create $out" >&2; exit 2; }
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.." || exit 2
unset TRITON_INTERPRET RETRO_KERNELS  # compiled kernels, auto dispatch
# `retro.kernels` is the top-level kernels/ folder mapped by the package install: install it if needed
# (offline machines: no build isolation, no dependency resolution).
python -c "import retro.kernels" 2>/dev/null || python -m pip install --quiet --no-build-isolation --no-deps -e . \
    || { echo "gpu_check: cannot install the project (pip install -e .)" >&2; exit 2; }

if ! python - > "$out/env.txt" 2>&1 <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU; this check needs one")
import triton
print("gpu", torch.cuda.get_device_name(0), "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", triton.__version__)
PY
then
    cat "$out/env.txt" >&2
    echo "gpu_check: FAILED before running anything (no CUDA GPU or no triton)" >&2
    exit 1
fi
cat "$out/env.txt"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not available" > "$out/nvidia-smi.txt"

status=0
# GPU tests (must run, not skip) plus the CPU interpreter and dispatch tests.
RETRO_REQUIRE_GPU=1 timeout 150 python -m pytest tests/gpu/test_kernels_gpu.py tests/kernels/test_kernels_interpret.py \
    tests/kernels/test_kernels_dispatch.py -v -rs --junitxml="$out/kernels_tests.xml" 2>&1 | tee "$out/kernels_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: kernel tests FAILED" >&2; status=1; }
if grep -q "SKIPPED" "$out/kernels_tests.log"; then
    echo "gpu_check: some kernel tests were SKIPPED (see $out/kernels_tests.log)" >&2
    status=1
fi

timeout 150 python benchmarks/kernels.py --out "$out/kernels_gpu.json" 2>&1 | tee "$out/kernels_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: benchmark FAILED" >&2; status=1; }

# bf16 training steps of the paper's TinyLlama (4,8,4) shape: loop-aware MFU at r = 1, 8, 32 (target >= 50% at 32).
timeout 180 python -m benchmarks.train_throughput --preset tinyllama-484 --batch 4 --seq 1024 --recurrences 1,8,32 --repeats 3 \
    --compile 2>&1 | tee "$out/train_throughput.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: train throughput FAILED" >&2; status=1; }
cp benchmarks/results/train_throughput_gpu.json "$out/" 2>/dev/null || true

# Muon's optimizer step at TinyLlama size (Newton-Schulz through the dispatcher) vs AdamW and torch.optim.Muon.
timeout 100 python -m benchmarks.muon --repeats 5 --ns-repeats 3 --hidden 2048 --layers 22 --intermediate 5632 \
    --vocab 32000 --batch 4 --seq 1024 --name muon_gpu_check 2>&1 | tee "$out/muon.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: muon benchmark FAILED" >&2; status=1; }
mv benchmarks/results/muon_gpu_check.json "$out/muon.json" 2>/dev/null || true

if [ "$status" -eq 0 ]; then echo "gpu_check: OK, results in $out"; else echo "gpu_check: FAILED, logs in $out" >&2; fi
exit "$status"
