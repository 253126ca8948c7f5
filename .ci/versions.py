"""Print the resolved versions of the packages retro depends on most, so drift is visible in every CI log."""

import sys
from importlib import metadata

PACKAGES = ["torch", "transformers", "kernels", "triton", "datasets", "torchdata", "lm_eval", "numpy", "setuptools"]

print(f"{'python':>13} {sys.version.split()[0]}")
for name in PACKAGES:
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        version = "not installed"
    print(f"{name:>13} {version}")
