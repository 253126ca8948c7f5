"""SIGTERM / SIGUSR1 (SLURM's warning before the time limit) ask for a checkpoint and a requeue exit."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 85  # checkpoint written after SIGTERM/SIGUSR1: the launcher requeues the job


class SignalFlag:
    def __init__(self) -> None:
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank got a signal (one tiny all-reduce), so all save together."""
        flag = torch.tensor([float(self.raised)], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
