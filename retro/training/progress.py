"""Console progress: a tqdm bar on a terminal; in a log file (SLURM, CI) one line now and then instead."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """Redraws flood non-TTY logs, so there a line is printed at most every `every_s` seconds and at the end.

    `prog: label done/total unit fields`, e.g. "retro.train: step 7/100 loss 2.31" or
    "retro.select_layers: calibration 4096/32768 tokens".
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        enabled: bool = True,
        every_s: float = 10.0,
        prog: str = "retro.train",
        label: str = "step",
        unit: str = "",
    ) -> None:
        self.total, self.step, self.enabled, self.every_s = total, initial, enabled, every_s
        self.prog, self.label, self.unit = prog, label, unit
        self.bar = (
            tqdm(total=total, initial=initial, desc=label, unit=unit or "it", dynamic_ncols=True)
            if enabled and sys.stderr.isatty()
            else None
        )
        self.last_print = time.monotonic()

    def update(self, amount: int = 1, **fields) -> None:
        self.step += amount
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(amount)
            if fields:
                self.bar.set_postfix(**fields)
            if self.step >= self.total:
                self.close()
            return
        now = time.monotonic()
        if now - self.last_print >= self.every_s or self.step >= self.total:
            self.last_print = now
            text = " ".join([f"{self.step}/{self.total}", self.unit, *(f"{k} {v}" for k, v in fields.items())])
            print(f"{self.prog}: {self.label} {' '.join(text.split())}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
