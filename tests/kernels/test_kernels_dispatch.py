"""Backend selection for retro.kernels (`auto` held to the measured table), and that the package cannot pose
as the HF `kernels` hub."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retro.kernels import dispatch, dispatch_table
from retro.kernels import newton_schulz as ns_module
from retro.kernels.adapter import adapter, adapter_reference
from retro.kernels.newton_schulz import newton_schulz, newton_schulz_reference


@pytest.fixture(autouse=True)
def _clean_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(dispatch.TRITON_CONFIG_ENV, raising=False)
    dispatch.set_backend(None)
    yield
    dispatch.set_backend(None)


def test_env_selects_backend(monkeypatch):
    assert dispatch.get_backend() == "auto"
    monkeypatch.setenv(dispatch.ENV_VAR, "Torch")
    assert dispatch.get_backend() == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="RETRO_KERNELS='cuda'"):
        dispatch.get_backend()


def test_ns_schedule_env_is_validated(monkeypatch):
    monkeypatch.delenv(dispatch.NS_SCHEDULE_ENV, raising=False)
    assert dispatch.ns_schedule() == "auto"
    monkeypatch.setenv(dispatch.NS_SCHEDULE_ENV, "streamk")
    with pytest.raises(ValueError, match="RETRO_NS_SCHEDULE='streamk'"):
        dispatch.ns_schedule()


def test_triton_config_env_is_validated(monkeypatch):
    assert dispatch.triton_config() == "autotune"
    monkeypatch.setenv(dispatch.TRITON_CONFIG_ENV, " Pinned ")
    assert dispatch.triton_config() == "pinned"
    monkeypatch.setenv(dispatch.TRITON_CONFIG_ENV, "fixed")
    with pytest.raises(ValueError, match="RETRO_TRITON_CONFIG='fixed'"):
        dispatch.triton_config()


def test_config_overrides_env(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    dispatch.set_backend("triton")
    assert dispatch.get_backend() == "triton"
    dispatch.set_backend(None)
    assert dispatch.get_backend() == "torch"
    with pytest.raises(ValueError, match="'fast'"):
        dispatch.set_backend("fast")


def test_auto_on_cpu_uses_torch():
    x = torch.randn(4, 4)
    assert not dispatch.use_triton("newton_schulz", x)
    assert not dispatch.use_triton("newton_schulz", torch.randn(8, 4, 4, dtype=torch.bfloat16), batch=8)
    # and the public functions give the reference result on that path
    torch.testing.assert_close(newton_schulz(x), newton_schulz_reference(x), rtol=0, atol=0)
    w, inj = torch.randn(4, 4), torch.randn(4)
    torch.testing.assert_close(adapter(x[0], w, inj), adapter_reference(x[0], w, inj), rtol=0, atol=0)


def test_forced_triton_on_cpu_without_interpreter_fails_loudly():
    dispatch.set_backend("triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        newton_schulz(torch.randn(4, 4))


def test_forced_triton_rejects_unsupported_dtype(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dispatch.set_backend("triton")
    with pytest.raises(TypeError, match="float64"):
        newton_schulz(torch.randn(4, 4, dtype=torch.float64))
    dispatch.set_backend("auto")  # auto quietly takes the torch path for float64
    assert not dispatch.use_triton("newton_schulz", torch.randn(2, 2, dtype=torch.float64))


def test_adapter_shape_and_dtype_errors():
    with pytest.raises(ValueError, match="injection must have shape"):
        adapter(torch.randn(3, 4), torch.randn(4, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="does not fit w_state"):
        adapter(torch.randn(3, 5), torch.randn(4, 4), torch.randn(3, 4))
    with pytest.raises(TypeError, match="dtypes differ"):
        adapter(torch.randn(3, 4), torch.randn(4, 4).double(), torch.randn(3, 4))


def test_not_mistaken_for_hf_kernels_package(tmp_path):
    """From outside the repo root, `kernels` is never our folder (Hugging Face's package when installed,
    which transformers >= 5.25 requires), before and after `retro.kernels` is imported."""
    ours = str(Path(__file__).resolve().parents[2] / "kernels")
    code = (
        "import importlib.util, os, sys\n"
        f"ours = {ours!r}\n"
        "def where():\n"
        "    spec = importlib.util.find_spec('kernels')\n"
        "    return [] if spec is None else [os.path.realpath(p) for p in spec.submodule_search_locations or []]\n"
        "assert ours not in where(), where()\n"
        "import retro.kernels.newton_schulz\n"
        "assert ours not in where(), where()\n"
        "assert os.path.realpath(retro.kernels.newton_schulz.__file__).startswith(ours)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# ---- auto's choices, held to the measured table (kernels/dispatch_table.py) --------------------

# What the H200 measurements of 2026-12-04 say (issue 26): single Newton-Schulz matrices and the adapter
# are slower in Triton than in torch; same-shape stacks of bf16 matrices are faster.
EXPECTED = {
    ("newton_schulz", "bfloat16", "single"): "torch",
    ("newton_schulz", "bfloat16", "stack"): "triton",
    ("adapter", "bfloat16", "single"): "torch",
}


def test_table_decisions_are_the_measured_ones():
    assert dispatch_table.decisions() == EXPECTED
    assert dispatch_table.stack_min("newton_schulz", "bfloat16") == 4  # the smallest stack measured
    for m in dispatch_table.MEASUREMENTS:
        assert m.command in dispatch_table.MEASURED["commands"] and m.speedup > 0, m
    assert dispatch_table.MEASURED["date"] == "2026-12-04" and "H200" in dispatch_table.MEASURED["gpu"]


def test_decision_is_the_median_speedup_of_the_class(monkeypatch):
    """One more fast row does not flip a class; a majority does (the rule, not the current rows)."""
    row = dispatch_table.Measurement("adapter", "bfloat16", 1, "made up", 3.0, "python benchmarks/kernels.py")
    monkeypatch.setattr(dispatch_table, "MEASUREMENTS", (*dispatch_table.MEASUREMENTS, row))
    assert dispatch_table.decisions()[("adapter", "bfloat16", "single")] == "torch"  # median of 0.45, 0.82, 3
    monkeypatch.setattr(dispatch_table, "MEASUREMENTS", (*dispatch_table.MEASUREMENTS, row, row))
    assert dispatch_table.decisions()[("adapter", "bfloat16", "single")] == "triton"


@pytest.fixture
def fake_gpu(monkeypatch):
    """CPU tensors that report CUDA and an importable triton: `use_triton`'s auto branch without a GPU."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)


@pytest.mark.parametrize(
    "kernel,dtype,batch,expected",
    [
        ("newton_schulz", torch.bfloat16, 1, False),  # single matrix: torch (0.36-0.74x)
        ("newton_schulz", torch.bfloat16, 2, False),  # a stack smaller than any measured: no class, torch
        ("newton_schulz", torch.bfloat16, 4, True),  # measured stacks: Triton
        ("newton_schulz", torch.bfloat16, 64, True),
        ("newton_schulz", torch.float32, 64, False),  # fp32 iterations were never measured
        ("newton_schulz", torch.float16, 8, False),
        ("adapter", torch.bfloat16, 1, False),  # addmm (0.45-0.82x)
        ("adapter", torch.float32, 1, False),
    ],
)
def test_auto_follows_the_table(fake_gpu, kernel, dtype, batch, expected):
    dispatch.set_backend("auto")
    x = torch.zeros(2, 2, dtype=dtype)
    assert dispatch.use_triton(kernel, x, batch=batch) is expected
    assert expected == (dispatch_table.auto_backend(kernel, str(dtype).removeprefix("torch."), batch) == "triton")
    dispatch.set_backend("torch")
    assert not dispatch.use_triton(kernel, x, batch=batch)


def test_newton_schulz_reports_its_stack_size(monkeypatch):
    """The batch auto decides on is the number of same-shape matrices: every leading dim, tall or wide."""
    seen = []
    monkeypatch.setattr(ns_module, "use_triton", lambda kernel, *t, batch: seen.append((kernel, batch)) or False)
    for shape in [(6, 10), (4, 6, 10), (2, 3, 10, 6)]:
        newton_schulz(torch.randn(shape), steps=1)
    assert seen == [("newton_schulz", 1), ("newton_schulz", 4), ("newton_schulz", 6)]


def test_docs_show_the_table():
    """docs/kernels.md carries the table auto follows, row for row."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "kernels.md").read_text()
    for line in dispatch_table.markdown():
        assert line in doc, line
