"""torchrun's worker entry: run `retro.train` and record its exit code for the launcher.

torchrun reports any failed worker as exit code 1, so the trainer's "checkpoint written, requeue
me" code (85, `retro.train.REQUEUE_EXIT_CODE`) would be lost. Each worker writes its own code to
`$RETRO_EXIT_DIR/rank_<RANK>` before exiting; launchers/node.sh and slurm.sbatch read them back.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from retro.train import main


def record(code: int) -> None:
    folder = os.environ.get("RETRO_EXIT_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, f"rank_{os.environ.get('RANK', '0')}").write_text(f"{code}\n")


if __name__ == "__main__":
    code = 1
    try:
        code = main(sys.argv[1:])
    finally:
        record(code)
    raise SystemExit(code)
