"""Backend choice for the fused kernels: Triton where a GPU measurement shows it faster, torch otherwise.

``RETRO_KERNELS`` (environment) or :func:`set_backend` (from code: benchmarks, tests) selects:

* ``auto``   (default) Triton only where a committed GPU measurement shows it faster
  (:mod:`retro.kernels.dispatch_table`: stacks of same-shape bf16 Newton-Schulz matrices), and only
  when every tensor is on CUDA and ``triton`` imports; torch otherwise;
* ``torch``  always the plain-torch reference;
* ``triton`` always Triton; CPU tensors are allowed only under ``TRITON_INTERPRET=1`` (the tests).

A backend set in code wins over the environment.

``RETRO_NS_SCHEDULE`` (``auto``/``direct``/``stream_k``) picks how the Triton Newton-Schulz kernels
schedule the symmetric products (see :mod:`retro.kernels.triton_newton_schulz`); ``auto`` decides
from the GPU's SM count. ``RETRO_TRITON_CONFIG`` (``autotune``/``pinned``) picks how compiled
kernels choose their launch config: autotuned (default) or one fixed config per kernel
(:mod:`retro.kernels.triton_build`; the GPU correctness tests pin it).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .dispatch_table import auto_backend

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "RETRO_KERNELS"
NS_SCHEDULES = ("auto", "direct", "stream_k")
NS_SCHEDULE_ENV = "RETRO_NS_SCHEDULE"
TRITON_CONFIGS = ("autotune", "pinned")
TRITON_CONFIG_ENV = "RETRO_TRITON_CONFIG"
# dtypes the Triton kernels accept (tl.dot with fp32 accumulation); others take the torch path.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_forced: str | None = None


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a kernel backend; choose one of {BACKENDS}")
    return name


def set_backend(name: str | None) -> None:
    """Force a backend from code (``auto``/``torch``/``triton``); ``None`` defers to the environment."""
    global _forced
    _forced = None if name is None else _check(name, "kernels backend")


def get_backend() -> str:
    """The backend in force: the one set in code if any, else ``$RETRO_KERNELS``, else ``auto``."""
    if _forced is not None:
        return _forced
    return _check(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (not whether a GPU exists)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def use_triton(kernel: str, *tensors: torch.Tensor, batch: int = 1) -> bool:
    """Decide the path for one call of ``kernel`` (``adapter``/``newton_schulz``) from the backend
    setting, the tensors' device and dtype and, under ``auto``, the measured table for its shape
    class (``batch``: same-shape matrices in the call)."""
    backend = get_backend()
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    supported = all(t.dtype in TRITON_DTYPES for t in tensors)
    if backend == "auto":
        if not (on_cuda and supported and triton_available()):
            return False
        dtype = str(tensors[0].dtype).removeprefix("torch.")
        return auto_backend(kernel, dtype, batch) == "triton"
    if not triton_available():
        raise RuntimeError(f"{ENV_VAR}=triton but the triton package is not installed")
    if not supported:
        raise TypeError(
            f"{ENV_VAR}=triton: Triton kernels take {TRITON_DTYPES}, got {sorted({str(t.dtype) for t in tensors})}"
        )
    if not on_cuda and not interpreting():
        raise RuntimeError(
            f"{ENV_VAR}=triton with CPU tensors: set TRITON_INTERPRET=1 to run the Triton "
            "interpreter on CPU, or use RETRO_KERNELS=auto"
        )
    return True


def ns_schedule() -> str:
    """The Newton-Schulz triangle schedule from ``$RETRO_NS_SCHEDULE`` (default ``auto``)."""
    name = os.environ.get(NS_SCHEDULE_ENV, "auto").strip().lower() or "auto"
    if name not in NS_SCHEDULES:
        raise ValueError(f"{NS_SCHEDULE_ENV}={name!r} is not a Newton-Schulz schedule; choose one of {NS_SCHEDULES}")
    return name


def triton_config() -> str:
    """How Triton kernels pick a launch config, from ``$RETRO_TRITON_CONFIG`` (default ``autotune``)."""
    name = os.environ.get(TRITON_CONFIG_ENV, "autotune").strip().lower() or "autotune"
    if name not in TRITON_CONFIGS:
        raise ValueError(f"{TRITON_CONFIG_ENV}={name!r} is not a config mode; choose one of {TRITON_CONFIGS}")
    return name
