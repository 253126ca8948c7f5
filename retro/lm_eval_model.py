"""`python -m retro.lm_eval_model`: lm-evaluation-harness's CLI with `--model retro` (a retro checkpoint at test r).

    python -m retro.lm_eval_model --model retro \\
        --model_args pretrained=ckpt/recurrent,recurrences=32,add_bos_token=True,max_length=1024 \\
        --tasks gsm8k_cot_sean,minerva_math --num_fewshot 1

The paper's GSM8K task `gsm8k_cot_sean` ships with retro (retro/inference/lm_eval_tasks/); this CLI adds
that folder as --include_path when none is given (see docs/eval.md for the paper's commands). The model
class and its arguments are in retro/inference/lm_eval_adapter.py. Needs the `[eval]` extra.
"""

from __future__ import annotations

import sys

# Importing the adapter registers the "retro" model class with lm-eval (its @register_model).
from retro.inference.lm_eval_adapter import with_default_include_path


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    sys.argv[1:] = with_default_include_path(sys.argv[1:])
    cli_evaluate()


if __name__ == "__main__":
    main()
