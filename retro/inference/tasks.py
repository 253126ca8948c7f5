"""Tasks of `retro.eval`, built and scored as lm-evaluation-harness does for the paper's tasks.

The tasks themselves: `retro.inference.gsm8k` (GSM8K), `retro.inference.minerva_math` (MATH);
shared loading and types in `retro.inference.task_base`.
"""

from __future__ import annotations

from retro.inference.gsm8k import GSM8K
from retro.inference.minerva_math import MATH

TASKS = {"gsm8k": GSM8K, "math": MATH}
