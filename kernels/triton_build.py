"""Lazy decoration of Triton kernels, so ``TRITON_INTERPRET`` is read at first use.

``triton.jit`` chooses between the compiler and the CPU interpreter when it *decorates* a function,
from the environment at that moment. Decorating at import time would freeze that choice for the
whole process (a test that sets ``TRITON_INTERPRET=1`` after something imported the module would
get GPU kernels). Here the plain functions are decorated on first launch, once per mode.

The same freeze applies to Triton's own jit-decorated helpers (``tl.cdiv``, ``tl.zeros``), which
are decorated when ``triton`` is imported; the kernels therefore use only builtins (``//``,
``tl.full``) so they run under either mode whatever the import order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from .dispatch import interpreting


def _even_k(args: dict) -> bool:
    """``EVEN_K``: K is a multiple of BLOCK_K, so the main loop's loads need no mask."""
    return args["K"] % args["BLOCK_K"] == 0


@functools.cache
def _jit(
    fn: Callable, interpret: bool, configs: tuple | None, key: tuple[str, ...], reset_to_zero: tuple[str, ...]
) -> Any:
    import triton

    del interpret  # part of the cache key only: triton.jit reads TRITON_INTERPRET itself
    kernel = triton.jit(fn)
    if "EVEN_K" in fn.__code__.co_varnames[: fn.__code__.co_argcount]:
        kernel = triton.heuristics({"EVEN_K": _even_k})(kernel)
    if configs is None:
        return kernel
    return triton.autotune(
        configs=[triton.Config(dict(c), num_warps=w, num_stages=s) for c, w, s in configs],
        key=list(key),
        reset_to_zero=list(reset_to_zero) or None,
    )(kernel)


def kernel(
    fn: Callable, gpu_configs: Sequence[tuple[dict, int, int]], key: Sequence[str], reset_to_zero: Sequence[str] = ()
) -> Any:
    """The Triton kernel for ``fn`` in the current mode.

    Compiled mode: autotuned over ``gpu_configs`` (meta-parameters, num_warps, num_stages) keyed by
    ``key``; ``reset_to_zero`` names buffers the kernel accumulates into, zeroed before each
    autotuning trial. Interpreter mode: the bare kernel; the caller passes small fixed block sizes.
    One kernel function may be wrapped several times with different configs (separate tuners).
    A kernel with an ``EVEN_K`` parameter gets it computed from its ``K`` and ``BLOCK_K``.
    """
    if interpreting():
        return _jit(fn, True, None, (), ())
    frozen = tuple((tuple(sorted(c.items())), w, s) for c, w, s in gpu_configs)
    return _jit(fn, False, frozen, tuple(key), tuple(reset_to_zero))
