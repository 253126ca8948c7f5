"""Expected training FLOPs over a run's recurrence curriculum, by quadrature over the r distribution."""

from __future__ import annotations

import numpy as np

from retro.model.flops import FlopModel
from retro.training.job_config import JobConfig
from retro.training.recurrence import RecurrenceSchedule, r_pmf

TAIL = 0.99


def r_quantile(mean: float, sigma: float, q: float, cap: int | None) -> int:
    """Smallest r with P(r' <= r) >= q under the sampler (by quadrature, no sampling)."""
    upto = int(mean * 8 + 64)
    cdf = np.cumsum(r_pmf(mean, sigma, upto))
    r = int(np.searchsorted(cdf, q) + 1)
    return min(r, cap) if cap else r


def run_flops(job: JobConfig, flops: FlopModel, teacher_per_token: float = 0.0) -> dict:
    """Expected training FLOPs of every step of the curriculum, grouped by the mean m in force.

    per_token(n, k) is linear in n and k, so E[FLOPs] = per_token(E[n], E[k]) exactly. `teacher_per_token`:
    what every step adds whatever r is drawn (a distillation teacher's forward).
    """
    schedule = RecurrenceSchedule.from_settings(job.recurrence, job.train.steps, job.train.seed)
    tokens = job.train.global_batch * job.data.seq_len
    phases: dict[int, dict] = {}
    for step in range(job.train.steps):
        m = schedule.mean_at(step)
        if m not in phases:
            er, ek = schedule.expected_r(step), schedule.expected_k(step)
            tail_r = round(er) if schedule.fixed else r_quantile(m, schedule.sigma, TAIL, schedule.cap)
            tail_n, tail_k = max(tail_r - schedule.depth_at(step), 0), min(tail_r, schedule.depth_at(step))
            phases[m] = {
                "mean": m,
                "first_step": step,
                "steps": 0,
                "E[r]": er,
                "E[k]": ek,
                "flops_per_step": (flops.per_token(er - ek, ek) + teacher_per_token) * tokens,
                "p99_r": tail_r,
                "p99_k": tail_k,
                "p99_flops_per_step": (flops.per_token(tail_n, tail_k) + teacher_per_token) * tokens,
            }
        phases[m]["steps"] += 1
    total = sum(p["steps"] * p["flops_per_step"] for p in phases.values())
    return {
        "phases": list(phases.values()),
        "total_flops": total,
        "tokens": tokens * job.train.steps,
        "tokens_per_step": tokens,
        "teacher_flops_per_step": teacher_per_token * tokens,
    }
