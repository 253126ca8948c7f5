"""Kernel benchmark: Triton kernels vs their torch references, side by side, medians and ratios.

    python benchmarks/kernels.py                      # CUDA: bf16, full model shapes
    python benchmarks/kernels.py --repeats 3          # CPU: torch paths only, shapes / --scale

Shapes: TinyLlama-1.1B (h 2048, intermediate 5632) and Llama-3.2-1B (h 2048, intermediate 8192).
Newton-Schulz runs on the hidden matrices Muon orthogonalises; the adapter on [tokens, h] states.
Rates are reported against peaks measured in the same run (a large GEMM for TFLOP/s, a large
device copy for GB/s). On CPU, Triton needs CUDA: only the torch paths run (the ratio columns
are then empty), at shapes divided by --scale to stay within a couple of minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Run as a script, Python puts benchmarks/ first on sys.path, where this file would shadow Hugging Face's
# `kernels` package (transformers >= 5.25 imports it): the repository root takes that place instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from retro.kernels import dispatch  # noqa: E402
from retro.kernels.adapter import adapter, adapter_reference  # noqa: E402
from retro.kernels.dispatch_table import auto_backend  # noqa: E402
from retro.kernels.newton_schulz import MUON_COEFFICIENTS, newton_schulz, newton_schulz_reference  # noqa: E402

MODELS = {"tinyllama-1.1b": (2048, 5632), "llama-3.2-1b": (2048, 8192)}


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds for one call of ``fn`` (CUDA events on GPU, perf_counter on CPU)."""
    if device.type == "cuda":

        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3

        return run

    def run_cpu(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run_cpu


def side_by_side(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per function, the functions interleaved within each repeat."""
    clock = timer(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(clock(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def measured_peaks(device: torch.device, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """Reference rates on this device: a large square GEMM (TFLOP/s) and a device copy (GB/s)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    src = torch.empty(256 * 2**20 if device.type == "cuda" else 32 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = side_by_side({"gemm": lambda: a @ b, "copy": lambda: dst.copy_(src)}, repeats, 2, device)
    return {"gemm_tflops": 2 * n**3 / t["gemm"] / 1e12, "copy_gbs": 2 * src.numel() / t["copy"] / 1e9}


def ns_flops(shape: tuple[int, ...], steps: int = 5) -> float:
    """FLOPs of the reference routine (full products; the symmetric kernels do fewer)."""
    *lead, r, c = shape
    m, n = min(r, c), max(r, c)
    batch = 1
    for d in lead:
        batch *= d
    return batch * steps * (4 * m * m * n + 2 * m**3)


def bench_newton_schulz(device, dtype, scale, repeats, warmup, triton_ok):
    rows = []
    shapes = {}
    for model, (h, inter) in MODELS.items():
        shapes[f"{model} gate/up"] = (inter // scale, h // scale)
        shapes[f"{model} down"] = (h // scale, inter // scale)
    shapes["attn q/o x4 (stack)"] = (4, 2048 // scale, 2048 // scale)
    for name, shape in shapes.items():
        grad = torch.randn(shape, device=device, dtype=torch.float32)
        fns = {"torch": lambda g=grad: newton_schulz_reference(g, dtype=dtype)}
        if triton_ok:
            from retro.kernels.dispatch import NS_SCHEDULES
            from retro.kernels.triton_newton_schulz import newton_schulz_triton

            # newton_schulz with the Triton backend forced (auto would run torch for single matrices)
            fns["triton"] = forced_triton(lambda g=grad: newton_schulz(g, dtype=dtype))
            # The iterations alone under each triangle schedule, on the same normalised wide stack.
            wide = grad.to(dtype)
            wide = (wide.mT if wide.size(-2) > wide.size(-1) else wide).reshape(-1, *sorted(shape[-2:]))
            wide = (wide / wide.norm(dim=(-2, -1), keepdim=True)).contiguous()
            steps = [MUON_COEFFICIENTS] * 5
            for schedule in NS_SCHEDULES[1:]:
                fns[schedule] = lambda x=wide, s=schedule: newton_schulz_triton(x, steps, s)
        t = side_by_side(fns, repeats, warmup, device)
        flops = ns_flops(shape)
        row = {
            "kernel": "newton_schulz",
            "case": name,
            "shape": list(shape),
            "flops": flops,
            "torch_ms": t["torch"] * 1e3,
            "torch_tflops": flops / t["torch"] / 1e12,
        }
        if triton_ok:
            from retro.kernels.triton_newton_schulz import choose_schedule, sm_count

            stack = grad.reshape(-1, *shape[-2:])
            row.update(
                triton_ms=t["triton"] * 1e3,
                triton_tflops=flops / t["triton"] / 1e12,
                speedup=t["torch"] / t["triton"],
                direct_ms=t["direct"] * 1e3,
                stream_k_ms=t["stream_k"] * 1e3,
                auto_schedule=choose_schedule(stack.size(0), min(shape[-2:]), sm_count(grad)),
                auto_runs=auto_backend("newton_schulz", str(dtype).removeprefix("torch."), stack.size(0)),
            )
        rows.append(row)
    return rows


def forced_triton(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with the Triton backend forced (``auto`` keeps cuBLAS addmm for the adapter)."""

    def run():
        dispatch.set_backend("triton")
        try:
            return fn()
        finally:
            dispatch.set_backend("auto")

    return run


def bench_adapter(device, dtype, scale, repeats, warmup, triton_ok):
    rows = []
    h = 2048 // scale
    for tokens in (8 * 1024 // scale, 32 * 1024 // scale):
        s = torch.randn(tokens, h, device=device, dtype=dtype)
        weight = torch.randn(h, 2 * h, device=device, dtype=dtype) / h**0.5
        w = weight[:, :h]  # the model's non-contiguous slice
        inj = torch.randn(tokens, h, device=device, dtype=dtype)
        g = torch.randn(tokens, h, device=device, dtype=dtype)
        fwd = {"addmm": lambda: torch.addmm(inj, s, w.T), "torch": lambda: adapter_reference(s, w, inj)}
        if triton_ok:
            fwd["triton"] = forced_triton(lambda: adapter(s, w, inj))

        def fwd_bwd(fn):
            def run():
                sg, wg, ig = (x.detach().requires_grad_() for x in (s, w, inj))
                torch.autograd.grad(fn(sg, wg, ig), (sg, wg, ig), g)

            return run

        both = {"torch": fwd_bwd(adapter_reference)}
        if triton_ok:
            both["triton"] = forced_triton(fwd_bwd(adapter))
        size = dtype.itemsize
        for mode, fns, flops, nbytes in (
            ("forward", fwd, 2 * tokens * h * h, size * (3 * tokens * h + h * h)),
            ("forward+backward", both, 6 * tokens * h * h, size * (8 * tokens * h + 3 * h * h)),
        ):
            t = side_by_side(fns, repeats, warmup, device)
            base = t.get("addmm", t["torch"])
            row = {
                "kernel": "adapter",
                "case": f"{mode} T={tokens} h={h}",
                "flops": flops,
                "bytes": nbytes,
                "torch_ms": t["torch"] * 1e3,
                "torch_tflops": flops / t["torch"] / 1e12,
            }
            if "addmm" in t:
                row["addmm_ms"] = t["addmm"] * 1e3
            if triton_ok:
                row.update(
                    triton_ms=t["triton"] * 1e3,
                    triton_tflops=flops / t["triton"] / 1e12,
                    triton_gbs=nbytes / t["triton"] / 1e9,
                    speedup=base / t["triton"],
                    speedup_vs="addmm" if "addmm" in t else "torch",
                )
            rows.append(row)
    return rows


def machine(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        import triton

        info.update(gpu=torch.cuda.get_device_name(device), triton=triton.__version__, cuda=torch.version.cuda)
    return info


def print_table(rows: list[dict], peaks: dict) -> None:
    nan = float("nan")
    print(
        f"measured peaks: GEMM {peaks['gemm_tflops']:.3f} TFLOP/s, copy {peaks['copy_gbs']:.0f} GB/s; "
        "ratio = torch (addmm for the adapter forward) / triton; %peak of the measured GEMM;\n"
        "Newton-Schulz: triton = newton_schulz with the Triton backend forced (auto schedule, incl. "
        "normalise/transpose); direct and stream-K = the 5 iterations alone under each triangle schedule; "
        "auto runs = what RETRO_KERNELS=auto picks for the case (kernels/dispatch_table.py)"
    )
    head = (
        f"{'kernel':14} {'case':34} {'torch ms':>9} {'addmm ms':>9} {'triton ms':>9} {'ratio':>6} "
        f"{'torch TF/s':>10} {'triton TF/s':>11} {'%peak':>6} {'triton GB/s':>11} {'%copy':>6} "
        f"{'direct ms':>9} {'stream-K ms':>11} {'auto':>8} {'auto runs':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        tfl = r.get("triton_tflops", nan)
        gbs = r.get("triton_gbs", nan)
        print(
            f"{r['kernel']:14} {r['case']:34} {r['torch_ms']:9.3f} {r.get('addmm_ms', nan):9.3f} "
            f"{r.get('triton_ms', nan):9.3f} {r.get('speedup', nan):6.2f} {r['torch_tflops']:10.3f} "
            f"{tfl:11.3f} {100 * tfl / peaks['gemm_tflops']:6.1f} {gbs:11.0f} "
            f"{100 * gbs / peaks['copy_gbs']:6.1f} {r.get('direct_ms', nan):9.3f} "
            f"{r.get('stream_k_ms', nan):11.3f} {r.get('auto_schedule', ''):>8} {r.get('auto_runs', ''):>9}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 20 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5 GPU, 1 CPU)")
    parser.add_argument("--scale", type=int, default=None, help="divide every dimension (default 1 GPU, 4 CPU)")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/kernels_{gpu,cpu}.json)"
    )
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    repeats = args.repeats or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    scale = args.scale or (1 if cuda else 4)
    triton_ok = cuda and dispatch.triton_available()
    dispatch.set_backend("auto")
    if not triton_ok:
        print("Triton needs CUDA (and the triton package): timing the torch paths only.")
    peaks = measured_peaks(device, dtype, repeats)
    rows = bench_newton_schulz(device, dtype, scale, repeats, warmup, triton_ok)
    rows += bench_adapter(device, dtype, scale, repeats, warmup, triton_ok)
    print(f"device {device}, {dtype}, shapes / {scale}, median of {repeats}")
    print_table(rows, peaks)
    out = args.out or Path(__file__).parent / "results" / f"kernels_{'gpu' if cuda else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(device),
        "dtype": str(dtype),
        "scale": scale,
        "repeats": repeats,
        "warmup": warmup,
        "triton": triton_ok,
        "peaks": peaks,
        "rows": rows,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
