"""The project's `kernels/` folder never shadows a top-level `kernels` package.

transformers >= 5.25 imports Hugging Face's `kernels` at start-up, and `python -m` puts the working directory
first on `sys.path`. When our folder was a regular package, every command run from the repository root
imported it instead and failed. These tests run the commands from the repository root with a stand-in
`kernels` package on the path and fail if the project's folder is the one imported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Marks itself, then becomes an installed Hugging Face `kernels` if there is one (outside the repository),
# so that transformers, which imports names from it, keeps working with the stand-in first on the path.
STAND_IN = """
import importlib.machinery, os, sys
IS_STAND_IN = True
_skip = {os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.getcwd()}
_others = [p for p in sys.path if os.path.abspath(p or os.curdir) not in _skip]
_real = importlib.machinery.PathFinder.find_spec("kernels", _others)
if _real is not None and _real.origin and _real.origin.endswith("__init__.py"):
    __path__[:] = list(_real.submodule_search_locations)
    with open(_real.origin) as _f:
        exec(compile(_f.read(), _real.origin, "exec"))
"""


@pytest.fixture
def stand_in_env(tmp_path: Path) -> dict[str, str]:
    package = tmp_path / "stand_in" / "kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(STAND_IN)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package.parent), env.get("PYTHONPATH")]))
    return env


def run_from_root(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_train_help_runs_from_the_repository_root(stand_in_env):
    result = run_from_root(["-m", "retro.train", "--help"], stand_in_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage:" in result.stdout


def test_import_from_the_repository_root_keeps_both_kernels_apart(stand_in_env):
    probe = (
        "import retro.model, retro.kernels.adapter, kernels; "
        "print(getattr(kernels, 'IS_STAND_IN', False)); print(kernels.__file__); "
        "print(retro.kernels.adapter.__file__)"
    )
    result = run_from_root(["-c", probe], stand_in_env)
    assert result.returncode == 0, result.stderr[-3000:]
    is_stand_in, kernels_file, adapter_file = result.stdout.split()
    assert is_stand_in == "True", f"`import kernels` found {kernels_file}, not the stand-in on the path"
    assert Path(adapter_file).resolve() == REPO / "kernels" / "adapter.py"


def test_the_project_folder_is_no_regular_package():
    """A regular package here would win over any installed `kernels` from the repository root."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert (REPO / "retro" / "kernels").resolve() == REPO / "kernels"


def source_copy(dest: Path) -> Path:
    """The checkout's files (tracked and untracked, not ignored) under `dest`, symlinks kept: a build there
    cannot pick up a stale `build/` folder of the checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    )
    for name in filter(None, listed.stdout.split("\0")):
        source, target = REPO / name, dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        elif source.is_file():
            shutil.copy2(source, target)
    return dest


def test_the_wheel_installs_the_folder_as_retro_kernels(tmp_path):
    """Built without installing anything: the wheel holds `retro/kernels/*.py` and no top-level `kernels`."""
    pytest.importorskip("setuptools")
    source = source_copy(tmp_path / "src")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("retro-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    kernel_files = sorted(p.name for p in (REPO / "kernels").glob("*.py"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("retro/kernels/")) == kernel_files
    assert not [n for n in names if n.startswith("kernels/")]
