"""Console progress: a tqdm bar on a terminal; in a log file (SLURM, CI) one line now and then instead."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """Redraws flood non-TTY logs, so there a line is printed at most every `every_s` seconds and at the end."""

    def __init__(self, total: int, initial: int, enabled: bool, every_s: float = 10.0) -> None:
        self.total, self.step, self.enabled, self.every_s = total, initial, enabled, every_s
        self.bar = (
            tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
            if enabled and sys.stderr.isatty()
            else None
        )
        self.last_print = time.monotonic()

    def update(self, **fields) -> None:
        self.step += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(**fields)
            return
        now = time.monotonic()
        if now - self.last_print >= self.every_s or self.step == self.total:
            self.last_print = now
            text = " ".join(f"{k} {v}" for k, v in fields.items())
            print(f"retro.train: step {self.step}/{self.total} {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
