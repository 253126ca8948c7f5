"""The 2h -> h adapter that feeds the recurrent block: s' = [W_state | W_inject] @ concat(s, e).

e (the prelude output) is fixed for a forward, so W_inject @ e is computed once per forward and
each pass costs one h x h matmul plus an add: half the FLOPs of the concat formula, same result.
"""

from __future__ import annotations

import torch
from torch import nn

from retro.kernels.adapter import adapter, adapter_injection


class Adapter(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.empty(hidden_size, 2 * hidden_size))  # [W_state | W_inject]
        self.reset_identity()

    def reset_identity(self) -> None:
        """[0 | I]: the adapter outputs e, so a no-drop conversion reproduces the source model at r=1."""
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:, self.hidden_size :].copy_(torch.eye(self.hidden_size, dtype=self.weight.dtype))

    def reset_default(self, generator: torch.Generator | None = None) -> None:
        """PyTorch's nn.Linear default (the paper's init): U(-1/sqrt(2h), 1/sqrt(2h))."""
        bound = 1.0 / (2 * self.hidden_size) ** 0.5
        with torch.no_grad():
            self.weight.uniform_(-bound, bound, generator=generator)

    def injection(self, e: torch.Tensor) -> torch.Tensor:
        """W_inject @ e, computed once per forward and reused by every pass."""
        return adapter_injection(e, self.weight[:, self.hidden_size :])

    def forward(self, state: torch.Tensor, injection: torch.Tensor) -> torch.Tensor:
        """W_state @ state + injection (torch.addmm; the Triton kernel with RETRO_KERNELS=triton)."""
        return adapter(state, self.weight[:, : self.hidden_size], injection)
