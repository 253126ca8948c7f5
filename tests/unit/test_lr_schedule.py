"""LR multipliers at the paper's schedule points, and the LambdaLR wrapper over several groups."""

from __future__ import annotations

import io
import math

import pytest
import torch

from retro.optim.lr_schedule import build_scheduler, lr_multiplier

PAPER = dict(total_steps=50_000, warmup_steps=125, decay_steps=30_000, kind="wsd", min_ratio=0.001)


def test_wsd_at_the_papers_points() -> None:
    f = lambda step: lr_multiplier(step, **PAPER)  # noqa: E731
    assert f(0) == pytest.approx(0.001, abs=1e-15)  # warmup starts at 0.001 * lr
    assert f(62) == pytest.approx(0.001 + 0.999 * 62 / 125, rel=1e-12)  # linear in between
    assert f(125) == 1.0  # warmup done
    assert f(10_000) == 1.0 and f(20_000) == 1.0  # plateau, up to the decay start (50k - 30k)
    assert f(35_000) == pytest.approx(0.5005, rel=1e-12)  # cosine midpoint: (1 + 0.001) / 2
    assert f(27_500) == pytest.approx(0.001 + 0.999 * (1 + math.cos(math.pi / 4)) / 2, rel=1e-12)
    assert f(50_000) == pytest.approx(0.001, abs=1e-15) and f(80_000) == pytest.approx(0.001, abs=1e-15)
    values = [f(s) for s in range(125, 50_001, 50)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # non-increasing after warmup


def test_cosine_and_constant() -> None:
    kw = dict(total_steps=1000, warmup_steps=100, decay_steps=0, min_ratio=0.01)
    cos = lambda step: lr_multiplier(step, kind="cosine", **kw)  # noqa: E731
    assert cos(0) == pytest.approx(0.01) and cos(50) == pytest.approx(0.01 + 0.99 * 0.5)
    assert cos(100) == 1.0 and cos(550) == pytest.approx(0.505) and cos(1000) == pytest.approx(0.01)
    const = lambda step: lr_multiplier(step, kind="constant", **kw)  # noqa: E731
    assert const(0) == pytest.approx(0.01) and const(100) == 1.0 and const(999) == 1.0 and const(5000) == 1.0
    # No warmup: full lr from step 0; wsd with no decay is constant after warmup.
    assert lr_multiplier(0, total_steps=10, warmup_steps=0, decay_steps=5) == 1.0
    assert lr_multiplier(10, total_steps=10, warmup_steps=2, decay_steps=0) == 1.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(total_steps=100, warmup_steps=60, decay_steps=50), "warmup_steps \\+ decay_steps"),
        (dict(total_steps=100, warmup_steps=-1, decay_steps=0), "warmup_steps"),
        (dict(total_steps=100, warmup_steps=0, decay_steps=-5), "decay_steps"),
        (dict(total_steps=0, warmup_steps=0, decay_steps=0), "total_steps"),
        (dict(total_steps=100, warmup_steps=101, decay_steps=0, kind="cosine"), "warmup_steps"),
        (dict(total_steps=100, warmup_steps=0, decay_steps=0, kind="linear"), "kind"),
        (dict(total_steps=100, warmup_steps=0, decay_steps=0, min_ratio=1.5), "min_ratio"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lr_multiplier(0, **kwargs)
    with pytest.raises(ValueError, match=match):
        build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), **kwargs)


def test_negative_step_raises() -> None:
    with pytest.raises(ValueError, match="step"):
        lr_multiplier(-1, **PAPER)


SMALL = dict(total_steps=20, warmup_steps=3, decay_steps=10, kind="wsd", min_ratio=0.001)
LRS = (1e-3, 5e-5)  # Muon's and AdamW's base lrs in the paper


def _setup() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(
        [{"params": a.parameters(), "lr": LRS[0]}, {"params": b.parameters(), "lr": LRS[1]}], weight_decay=0.0
    )
    return opt, build_scheduler(opt, **SMALL)


def _train_step(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR) -> list[float]:
    """One update; returns the lrs it used."""
    used = [g["lr"] for g in opt.param_groups]
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    return used


def test_scheduler_scales_each_groups_own_lr() -> None:
    opt, sched = _setup()
    for step in range(SMALL["total_steps"] + 2):
        used = _train_step(opt, sched)
        mult = lr_multiplier(step, **SMALL)
        assert used == pytest.approx([LRS[0] * mult, LRS[1] * mult], rel=1e-12), step
    assert used[0] / used[1] == pytest.approx(20.0)


def test_state_dict_round_trip_resumes_the_same_lrs() -> None:
    opt, sched = _setup()
    reference = [_train_step(opt, sched) for _ in range(SMALL["total_steps"])]

    opt, sched = _setup()
    for _ in range(7):
        _train_step(opt, sched)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # plain data only: the multiplier is not pickled

    opt2, sched2 = _setup()  # a fresh process would rebuild from the config, then load
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert sched2.last_epoch == 7 and sched2.get_last_lr() == sched.get_last_lr()
    resumed = [_train_step(opt2, sched2) for _ in range(SMALL["total_steps"] - 7)]
    assert resumed == reference[7:]
