"""Backend selection for retro.kernels, and that the package cannot pose as the HF `kernels` hub."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retro.kernels import dispatch
from retro.kernels.adapter import adapter, adapter_reference
from retro.kernels.newton_schulz import newton_schulz, newton_schulz_reference


@pytest.fixture(autouse=True)
def _clean_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
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
    assert not dispatch.use_triton(x)
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
    assert not dispatch.use_triton(torch.randn(2, 2, dtype=torch.float64))


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
