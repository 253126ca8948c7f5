"""Lazy decoration of Triton kernels, so ``TRITON_INTERPRET`` is read at first use.

``triton.jit`` chooses between the compiler and the CPU interpreter when it *decorates* a function,
from the environment at that moment. Decorating at import time would freeze that choice for the
whole process (a test that sets ``TRITON_INTERPRET=1`` after something imported the module would
get GPU kernels). Here the plain functions are decorated on first launch, once per mode.

The same freeze applies to Triton's own jit-decorated helpers (``tl.cdiv``, ``tl.zeros``), which
are decorated when ``triton`` is imported; the kernels therefore use only builtins (``//``,
``tl.full``) so they run under either mode whatever the import order.

Launch configurations (:func:`launch`): compiled kernels are autotuned over their GPU configs by
default; ``RETRO_TRITON_CONFIG=pinned`` (:func:`retro.kernels.dispatch.triton_config`) runs each
kernel with one fixed, representative config instead, in the compiler and in the interpreter alike,
so correctness tests compile each kernel once instead of once per config and shape.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from .dispatch import interpreting, triton_config

# (meta-parameters, num_warps, num_stages)
Config = tuple[dict[str, int], int, int]


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


def kernel(fn: Callable, gpu_configs: Sequence[Config], key: Sequence[str], reset_to_zero: Sequence[str] = ()) -> Any:
    """The Triton kernel for ``fn`` in the current mode.

    Compiled mode: autotuned over ``gpu_configs`` (meta-parameters, num_warps, num_stages) keyed by
    ``key``; ``reset_to_zero`` names buffers the kernel accumulates into, zeroed before each
    autotuning trial. Interpreter mode, or ``RETRO_TRITON_CONFIG=pinned``: the bare kernel; the
    caller passes the block sizes (:func:`launch` does). One kernel function may be wrapped several
    times with different configs (separate tuners). A kernel with an ``EVEN_K`` parameter gets it
    computed from its ``K`` and ``BLOCK_K``.
    """
    if interpreting() or triton_config() == "pinned":
        return _jit(fn, interpreting(), None, (), ())
    frozen = tuple((tuple(sorted(c.items())), w, s) for c, w, s in gpu_configs)
    return _jit(fn, False, frozen, tuple(key), tuple(reset_to_zero))


def launch(
    fn: Callable,
    grid: Callable[[dict], tuple[int, ...]],
    args: Sequence[Any],
    flags: dict[str, Any],
    *,
    gpu_configs: Sequence[Config],
    pinned: Config,
    interpret: dict[str, int],
    key: Sequence[str],
    reset_to_zero: Sequence[str] = (),
) -> None:
    """Run ``fn`` over ``grid`` with the config the mode calls for.

    Autotuned (compiled, the default): the tuner picks among ``gpu_configs``. Pinned
    (``RETRO_TRITON_CONFIG=pinned``, compiled or interpreted): ``pinned``, one of ``gpu_configs``,
    with its warps and stages. Interpreter otherwise: the small blocks ``interpret``, so simulated
    programs stay cheap.
    """
    fn = kernel(fn, gpu_configs, key, reset_to_zero)
    if hasattr(fn, "configs"):  # autotuned
        fn[grid](*args, **flags)
    elif triton_config() == "pinned":
        meta, warps, stages = pinned
        fn[grid](*args, **flags, **meta, num_warps=warps, num_stages=stages)
    else:
        fn[grid](*args, **flags, **interpret)
