"""SIGTERM / SIGUSR1 (SLURM's warning before the time limit) ask for a checkpoint and a requeue exit."""

from __future__ import annotations

import signal

REQUEUE_EXIT_CODE = 85  # checkpoint written after SIGTERM/SIGUSR1: the launcher requeues the job


class SignalFlag:
    def __init__(self) -> None:
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True
