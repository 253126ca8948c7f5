"""The training-time recurrence sampler and its curriculum (PAPER.md, "Training").

For each micro-batch the number of recurrences r is drawn from a Poisson-lognormal:

    lambda ~ LogNormal(ln(m) - sigma^2 / 2, sigma)      (so E[lambda] = m)
    r      = 1 + Poisson(lambda)                          (so E[r] = m + 1)

and split into n = max(r - s, 0) passes under no_grad followed by k = min(r, s) passes with
gradient (truncated backprop). The backprop depth is s = min(backprop_depth, m): the paper's
"s = 8 (s = m when m < 8)". That reading is the one that reproduces the paper's reference table:
at m = 4, E[min(r, 4)] = 3.41 (the table's E[k]) whereas E[min(r, 8)] = 4.67. With `fixed`, r = m
exactly (the paper's `fix_num_steps`, for ablations).

The mean m follows a curriculum m(step) = max(start_mean, ceil(M * f(step / W))), f(x) = 1 - sqrt(1 - x)
("1-sqrt"), f(x) = x ("linear") or f = 1 ("none"); f = 1 once step >= W. start_mean is a floor, as the
paper's `mean_recurrence_schedule.start`: m stays there until M * f passes it.

Which micro-batches share a draw. A step's data, in global order, is a sequence of micro-batch
columns: column j is micro-batch j of every rank, and with one data source and N ranks its windows are
positions [j * B * N, (j + 1) * B * N) of the step's slice of the epoch's order (rank r reads positions
r, r + N, ...: retro/data/mixture.py). Ranks must run the same r at a micro index, or the FSDP2 collectives of the
recurrent block fall out of lockstep. draws_per_step = 0 draws once per column (keyed by its index, the
paper's per-data-step draw: as many distinct r per step as a rank has micro-batches, so the count
changes with the number of ranks); draws_per_step = G splits the columns into G equal runs, each sharing
one draw keyed by its group index. A group then covers the same windows on any number of ranks, so the
(window, r) pairs of a run do not depend on the world size; G must divide the micro-batches per rank.

Every rank must use the same r without communicating, so each draw comes from a fresh numpy Generator
seeded with (seed, step, column or group): deterministic, process-independent, and never touching the
global RNG state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

CURRICULA = ("1-sqrt", "linear", "none")
# keys of [recurrence] that were replaced, with what to write instead (job_config refuses them with this line)
RETIRED = {
    "sample_every": 'recurrence.sample_every was replaced by recurrence.draws_per_step: "micro_batch" is '
    'draws_per_step = 0 (one draw per micro-batch), "step" is draws_per_step = 1 (one per optimizer step)',
}

# ceil(M * f) is taken after subtracting this, so a value that is an integer in exact arithmetic
# but lands 1 ulp above it in floating point (M = 9, f = 1 - sqrt(1/9) gives 6.000000000000001) is
# not rounded up. It cannot misround a genuine value: for integer M and step, M * f is either an
# integer j or at least 1 / (2 W M) away from one (|q - p^2| >= 1 / (W M^2) with q = 1 - step/W,
# p = 1 - j/M), which exceeds 1e-9 whenever W * M < 5e8.
_CEIL_SLACK = 1e-9


def draw_r(mean: float, sigma: float, rng: np.random.Generator, size: int | None = None) -> np.ndarray | int:
    """Uncapped draws of r = 1 + Poisson(LogNormal(ln(mean) - sigma^2/2, sigma)), E[r] = mean + 1.

    Vectorised (size draws at once) so tests and planning tools can take 10^5+ draws cheaply; the
    per-step sampler calls it with size=None and so follows exactly the same distribution code.
    """
    lam = rng.lognormal(math.log(mean) - sigma * sigma / 2.0, sigma, size)
    r = 1 + rng.poisson(lam)
    return int(r) if size is None else r


def split_passes(r: int, depth: int) -> tuple[int, int]:
    """(n no-grad passes, k grad passes) for r recurrences with backprop depth `depth`."""
    return max(r - depth, 0), min(r, depth)


@lru_cache(maxsize=256)
def _r_pmf(mean: float, sigma: float, upto: int) -> np.ndarray:
    """P(r = j) for j = 1..upto, by quadrature over the lognormal (no sampling).

    P(r = j) = E_lambda[Poisson(j - 1; lambda)] is integrated with the trapezoid rule over the
    standardised log-lambda x in [-9, 9] (normal mass outside < 1e-18). The integrand is smooth
    and vanishes at both ends, so the trapezoid rule converges spectrally; the grid step is kept
    well below the integrand's width in x, about 1 / (sigma * sqrt(j)).
    """
    h = min(0.005, 0.25 / (sigma * math.sqrt(upto)))
    x = np.linspace(-9.0, 9.0, int(round(18.0 / h)) + 1)
    weights = np.exp(-0.5 * x * x) * (x[1] - x[0]) / math.sqrt(2.0 * math.pi)
    log_lam = math.log(mean) - sigma * sigma / 2.0 + sigma * x
    lam = np.exp(log_lam)
    j = np.arange(upto, dtype=np.float64)  # Poisson counts 0..upto-1, i.e. r = 1..upto
    lgamma = np.array([math.lgamma(v + 1.0) for v in j])
    pmf = np.empty(upto)
    for start in range(0, upto, 256):  # chunks bound memory for large caps
        jj = j[start : start + 256, None]
        log_p = jj * log_lam[None, :] - lam[None, :] - lgamma[start : start + 256, None]
        pmf[start : start + 256] = np.exp(log_p) @ weights
    pmf.flags.writeable = False
    return pmf


def r_pmf(mean: float, sigma: float, upto: int) -> np.ndarray:
    """P(r = j) for j = 1..upto of the uncapped sampler, computed by quadrature (deterministic).

    Used for exact expectations under a cap and as a sampling-free reference in tests.
    """
    if upto < 1:
        raise ValueError(f"upto must be >= 1, got {upto}")
    return _r_pmf(float(mean), float(sigma), int(upto)).copy()


def _expected_min(mean: float, sigma: float, c: int) -> float:
    """E[min(r, c)] = sum_{j=1..c} P(r >= j), from the pmf of r up to c - 1."""
    if c <= 1:
        return 1.0
    cdf = np.cumsum(_r_pmf(mean, sigma, c - 1))  # P(r <= j), j = 1..c-1
    return 1.0 + float(np.sum(1.0 - cdf))


@dataclass
class RecurrenceSettings:
    """The run's `[recurrence]` section; `RecurrenceSchedule.from_settings` turns it into the sampler."""

    max_mean: float = 32.0  # M, the curriculum's final mean recurrence
    curriculum: str = "1-sqrt"  # 1-sqrt | linear | none
    ramp_fraction: float = 0.75  # W = ramp_fraction * train.steps
    backprop_depth: int = 8  # s: passes with gradient
    sigma: float = 0.5
    cap: int = 0  # 0 = no cap on the sampled r
    draws_per_step: int = 0  # 0 = one draw per micro-batch column; G = G draws per step, each for 1/G of its data
    fixed: bool = False  # r = m exactly, no sampling (the paper's fix_num_steps)
    start_mean: int = 1  # the curriculum's floor: m = max(start_mean, ceil(M f))

    def validate(self) -> None:
        """The schedule's own checks, on these values (ramp length and seed do not matter here)."""
        if not 0 <= self.ramp_fraction <= 1:
            raise ValueError(f"recurrence.ramp_fraction must be in [0, 1], got {self.ramp_fraction}")
        try:
            RecurrenceSchedule.from_settings(self, total_steps=0, seed=0)
        except ValueError as error:
            raise ValueError(f"recurrence.{error}") from None


@dataclass(frozen=True)
class Draw:
    """One micro-batch's recurrence: r = n no-grad passes + k grad passes, at curriculum mean m."""

    mean: int  # m, the curriculum's mean at this step
    r: int  # after the cap
    n: int
    k: int
    capped: bool  # the drawn r exceeded the cap (logged: how often the cap bites)


@dataclass(frozen=True)
class RecurrenceSchedule:
    """Curriculum over the mean recurrence plus the per-step Poisson-lognormal sampler.

    max_mean: M, the curriculum's end value. curriculum: "1-sqrt" | "linear" | "none" (m = M from
    step 0). ramp_steps: W; f = 1 from step W on (W = 0 means no ramp). backprop_depth: s, used as
    min(s, m): the reading of "s = m when m < 8" that reproduces PAPER's E[k] = 3.41 at m = 4.
    sigma: the lognormal's shape. cap: optional upper bound on r (**Ours**; the paper's r is
    unbounded), reported per draw through `Draw.capped`. draws_per_step: 0 draws for each micro-batch
    column, G > 0 once per group of columns (module docstring). fixed: r = m, nothing drawn. start_mean:
    the floor of m. seed: mixed into every draw.
    """

    max_mean: float = 32.0
    curriculum: str = "1-sqrt"
    ramp_steps: int = 0
    backprop_depth: int = 8
    sigma: float = 0.5
    cap: int | None = None
    draws_per_step: int = 0
    fixed: bool = False
    start_mean: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_settings(cls, settings: RecurrenceSettings, total_steps: int, seed: int) -> RecurrenceSchedule:
        """The sampler a run with these `[recurrence]` settings, train.steps and train.seed uses."""
        return cls(
            max_mean=settings.max_mean,
            curriculum=settings.curriculum,
            ramp_steps=int(settings.ramp_fraction * total_steps),
            backprop_depth=settings.backprop_depth,
            sigma=settings.sigma,
            cap=settings.cap or None,
            draws_per_step=settings.draws_per_step,
            fixed=settings.fixed,
            start_mean=settings.start_mean,
            seed=seed,
        )

    def validate(self) -> None:
        """Raise ValueError naming the offending field."""
        if not (isinstance(self.max_mean, (int, float)) and math.isfinite(self.max_mean) and self.max_mean >= 1):
            raise ValueError(f"max_mean (M) must be a finite number >= 1, got {self.max_mean!r}")
        if self.curriculum not in CURRICULA:
            raise ValueError(f"curriculum must be one of {CURRICULA}, got {self.curriculum!r}")
        if not isinstance(self.ramp_steps, int) or self.ramp_steps < 0:
            raise ValueError(f"ramp_steps (W) must be an int >= 0, got {self.ramp_steps!r}")
        if not isinstance(self.backprop_depth, int) or self.backprop_depth < 1:
            raise ValueError(f"backprop_depth (s) must be an int >= 1, got {self.backprop_depth!r}")
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma!r}")
        if self.cap is not None and (not isinstance(self.cap, int) or self.cap < 1):
            raise ValueError(f"cap must be None or an int >= 1, got {self.cap!r}")
        if not isinstance(self.draws_per_step, int) or self.draws_per_step < 0:
            raise ValueError(f"draws_per_step must be an int >= 0 (0: one per micro-batch), got {self.draws_per_step}")
        if not isinstance(self.fixed, bool):
            raise ValueError(f"fixed must be true or false, got {self.fixed!r}")
        if not isinstance(self.start_mean, int) or not 1 <= self.start_mean <= self.max_mean:
            raise ValueError(f"start_mean must be an int in [1, max_mean = {self.max_mean:g}], got {self.start_mean!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")

    @staticmethod
    def _check_step(step: int, name: str = "step") -> None:
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"{name} must be an int >= 0, got {step!r}")

    def mean_at(self, step: int) -> int:
        """m(step) = max(start_mean, ceil(M * f(step / W))) (see _CEIL_SLACK for the float rounding)."""
        self._check_step(step)
        if self.curriculum == "none" or step >= self.ramp_steps:
            value = float(self.max_mean)
        elif self.curriculum == "linear":
            value = self.max_mean * step / self.ramp_steps  # exact when M * step / W is an integer
        else:
            value = self.max_mean * (1.0 - math.sqrt((self.ramp_steps - step) / self.ramp_steps))
        return max(self.start_mean, math.ceil(value - _CEIL_SLACK))

    def depth_at(self, step: int) -> int:
        """Backprop depth in force at this step: min(backprop_depth, m)."""
        return min(self.backprop_depth, self.mean_at(step))

    def _rng(self, step: int, micro_step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(step), int(micro_step)])

    def draw(self, step: int, micro_step: int = 0) -> Draw:
        """The draw for (step, micro_step): deterministic in (seed, step, micro_step), identical on
        every rank and in every process, with no communication; r = m with `fixed`. n + k == r always."""
        m = self.mean_at(step)
        self._check_step(micro_step, "micro_step")
        r = m if self.fixed else draw_r(m, self.sigma, self._rng(step, micro_step))
        capped = self.cap is not None and r > self.cap
        if capped:
            r = self.cap
        n, k = split_passes(r, min(self.backprop_depth, m))  # = depth_at(step)
        return Draw(mean=m, r=r, n=n, k=k, capped=capped)

    def draws(self, step: int, micro_batches: int) -> list[Draw]:
        """The recurrence of each of a rank's `micro_batches` micro-batches of optimizer step `step` (the
        same list on every rank): draw(step, micro) per micro-batch with draws_per_step = 0 (the paper's
        per-data-step draw), else draw(step, group) shared by each of the draws_per_step runs of columns."""
        per_draw = draw_group_size(self.draws_per_step, micro_batches)
        drawn: dict[int, Draw] = {}
        for micro in range(micro_batches):
            key = micro // per_draw
            if key not in drawn:
                drawn[key] = self.draw(step, key)
        return [drawn[micro // per_draw] for micro in range(micro_batches)]

    def sample(self, step: int, micro_step: int = 0) -> tuple[int, int]:
        """(n no-grad passes, k grad passes) of `draw(step, micro_step)`."""
        drawn = self.draw(step, micro_step)
        return drawn.n, drawn.k

    def expected_r(self, step: int) -> float:
        """E[r] at this step's mean: m + 1 uncapped, E[min(r, cap)] (by quadrature) with a cap; min(m, cap) fixed."""
        m = self.mean_at(step)
        if self.fixed:
            return float(min(m, self.cap or m))
        if self.cap is None:
            return m + 1.0
        return _expected_min(float(m), float(self.sigma), self.cap)

    def expected_k(self, step: int) -> float:
        """E[k] = E[min(r, s)] at this step (cap included), by quadrature: grad passes for planning."""
        m = self.mean_at(step)
        depth = min(self.backprop_depth, m)
        if self.cap is not None:
            depth = min(depth, self.cap)
        if self.fixed:
            return float(depth)  # k = min(r, depth) with r = min(m, cap) >= depth
        return _expected_min(float(m), float(self.sigma), depth)


def draw_group_size(draws_per_step: int, micro_batches: int) -> int:
    """Micro-batches (columns) per draw: 1 for draws_per_step = 0, else micro_batches / draws_per_step.

    ValueError unless draws_per_step divides micro_batches: a group of columns must be whole, so that
    every rank runs the same r at each micro index (module docstring)."""
    if draws_per_step == 0:
        return 1
    if micro_batches % draws_per_step:
        raise ValueError(
            f"draws_per_step = {draws_per_step} must divide the {micro_batches} micro-batches each rank runs per "
            "step, so that every rank runs the same r at each micro-batch"
        )
    return micro_batches // draws_per_step


def state_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    """Initial-state noise keyed by (seed, step, micro-batch, rank): a resumed run draws the same."""
    return torch.Generator(device).manual_seed(((seed * 1_000_003 + step) * 1009 + micro) * 257 + rank)
