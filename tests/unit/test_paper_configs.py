"""The paper's runs as configs: every file under configs/paper/ holds the values of the paper's public code.

The table below is written from the paper's shells (LoopedLMs/retrofitting-recurrence: shells/tinyllama.sh,
shells/llama.sh, shells/olmo.sh) and train.py, not from the config files. train.py turns fractions into steps
as ceil(fraction * max_steps) for the LR warmup, the cosine cooldown and the curriculum warmup, so the test
does the same from each run's fractions. See docs/reproducing.md for the commands of each run.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from retro.training.job_config import ConfigError, load_config
from retro.training.preflight import check_draw_groups
from retro.training.recurrence import RecurrenceSchedule

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PAPER = CONFIGS / "paper"

# Shared by every run of the paper (train.py defaults and the shells' common arguments).
COMMON = dict(
    seq_len=1024,  # --max_length=1024 (+1 shifted target)
    global_batch=1024,  # nodes x 4 GPUs x batch_size: 8 x 4 x 32 or 16 x 4 x 16 = 1024 rows = 2^20 tokens
    micro_batch=8,  # --micro_batch_size=8
    grad_clip=1.0,  # --max_grad_norm=1.0
    lr=5e-5,  # --optim_config.lr=5e-5 (AdamW: the aux AdamW of Muon, or every parameter)
    betas=[0.9, 0.95],
    weight_decay=1e-4,
    schedule="wsd",  # HF warmup_stable_decay
    min_lr_ratio=0.001,
    backprop_depth=8,  # the converted model's mean_backprop_depth
    sigma=0.5,
    cap=0,  # r is unbounded in the paper
)
MUON = dict(
    optimizer="muon",
    muon_lr=1e-3,  # --muon.lr=0.001
    muon_weight_decay=1e-4,
    momentum=0.95,
    nesterov=True,
    ns_steps=5,
    ns_coefficients=[3.4445, -4.7750, 2.0315],
    muon_scale="original",  # sqrt(max(1, rows / cols))
    eps=1e-10,  # MuonWithAuxAdam's aux AdamW default; train.py passes no eps to it
)
ADAMW = dict(optimizer="adamw", eps=1e-8)  # torch.optim.AdamW(**optim_config): train.py's default eps=1e-8

SHAPES = {"tinyllama": [4, 8, 4], "llama32": [4, 6, 4], "olmo2": [4, 6, 4]}
STATIC = {"tinyllama": [22, 0, 0], "llama32": [16, 0, 0], "olmo2": [16, 0, 0]}  # retro.convert --static
MATH = dict(steps=50_000, warmup=0.0025, cooldown=0.6, curriculum="1-sqrt", ramp=0.75, sources=1)
FINEWEB = dict(steps=25_000, warmup=0.005, cooldown=0.9, curriculum="linear", ramp=0.25, sources=1)
MIX = dict(steps=25_000, warmup=0.005, cooldown=0.9, curriculum="linear", ramp=0.25, sources=3)
NO_RECURRENCE = dict(curriculum="none", max_mean=1, ramp=0.0)


def recurrent(shape, schedule, max_mean, optim=MUON, **extra):
    row = {**COMMON, **optim, **schedule, "shape": shape, "max_mean": max_mean, **extra}
    if optim is MUON:  # the paper's recurrent model fuses Wqkv and gate|up (`fc`): Muon orthogonalises them whole
        row["muon_split_fused"] = False
    return row


def static(model, schedule):
    # the paper's baseline is the Hugging Face model: q, k, v, gate, up are separate matrices for Muon
    return {**COMMON, **MUON, **schedule, **NO_RECURRENCE, "shape": STATIC[model], "muon_split_fused": True}


RUNS = {
    # Figure 4: TinyLlama (4,8,4) on FineWeb-Edu (350B sample). The Muon run is also Figure 8's recurrent phase 1.
    "tinyllama-484-fineweb-muon": recurrent(SHAPES["tinyllama"], FINEWEB, 32),
    "tinyllama-484-fineweb-adamw": recurrent(
        SHAPES["tinyllama"], {**FINEWEB, "steps": 30_000, "warmup": 0.0042}, 32, optim=ADAMW
    ),
    # Figures 5/7 (TinyLlama), 7 (Llama-3.2-1B), 6/7 (OLMo-2-0425-1B): Nemotron-CC-Math-v1 4plus, M in {4, 8, 16, 32}
    **{
        f"{prefix}-math-m{m}": recurrent(SHAPES[model], MATH, m)
        for model, prefix in (("tinyllama", "tinyllama-484"), ("llama32", "llama32-464"), ("olmo2", "olmo2-464"))
        for m in (4, 8, 16, 32)
    },
    **{f"{model}-static-math": static(model, MATH) for model in ("tinyllama", "llama32", "olmo2")},
    # Figure 8: single phase on the equal mix at M = 4; two-phase = FineWeb-Edu phase 1, then the mix at M = 4
    "tinyllama-484-mix": recurrent(SHAPES["tinyllama"], MIX, 4),
    "tinyllama-484-two-phase-2-mix": recurrent(SHAPES["tinyllama"], MIX, 4),
    "tinyllama-static-fineweb": static("tinyllama", FINEWEB),
    "tinyllama-static-mix": static("tinyllama", MIX),
    "tinyllama-static-two-phase-2-mix": static("tinyllama", MIX),
    # Figure 3: Llama (2,4,2), 1 node x 4 GPUs x batch_size 128 = 512 rows, plain AdamW, no cooldown, linear 0.125
    "llama32-242-fineweb-curriculum": recurrent(
        [2, 4, 2],
        dict(steps=25_000, warmup=0.005, cooldown=0.0, curriculum="linear", ramp=0.125, sources=1),
        32,
        optim=ADAMW,
        global_batch=512,
    ),
}

# recurrence.draws_per_step: train.py seeds every GPU's draw by its data step alone, so all GPUs run the same r at a
# micro-batch index and a step sees batch_size / micro_batch_size distinct r (one per micro-batch of a GPU).
# run -> (draws per step, the shell's GPUs = nodes x 4 from its "Figure" header, the shell line, its batch arguments)
DRAWS = {
    "tinyllama-484-fineweb-muon": (4, 32, "shells/tinyllama.sh:10", "--micro_batch_size=8 --batch_size=32"),
    "tinyllama-484-fineweb-adamw": (4, 32, "shells/tinyllama.sh:13", "--micro_batch_size=8 --batch_size=32"),
    **{
        f"tinyllama-484-math-m{m}": (2, 64, "shells/tinyllama.sh:20", "--micro_batch_size=8 --batch_size=16")
        for m in (4, 8, 16, 32)
    },
    "tinyllama-static-math": (2, 64, "shells/tinyllama.sh:23", "--micro_batch_size=8 --batch_size=16"),
    "tinyllama-static-mix": (4, 32, "shells/tinyllama.sh:28", "--micro_batch_size=8 --batch_size=32"),
    "tinyllama-484-mix": (4, 32, "shells/tinyllama.sh:31", "--micro_batch_size=8 --batch_size=32"),
    "tinyllama-static-fineweb": (4, 32, "shells/tinyllama.sh:35", "--micro_batch_size=8 --batch_size=32"),
    "tinyllama-static-two-phase-2-mix": (4, 32, "shells/tinyllama.sh:42", "--micro_batch_size=8 --batch_size=32"),
    "tinyllama-484-two-phase-2-mix": (4, 32, "shells/tinyllama.sh:45", "--micro_batch_size=8 --batch_size=32"),
    "llama32-242-fineweb-curriculum": (16, 4, "shells/llama.sh:17", "--micro_batch_size=8 --batch_size=128"),
    **{
        f"llama32-464-math-m{m}": (2, 64, "shells/llama.sh:21", "--micro_batch_size=8 --batch_size=16")
        for m in (4, 8, 16, 32)
    },
    "llama32-static-math": (2, 64, "shells/llama.sh:24", "--micro_batch_size=8 --batch_size=16"),
    **{
        f"olmo2-464-math-m{m}": (2, 64, "shells/olmo.sh:10", "--micro_batch_size=8 --batch_size=16")
        for m in (4, 8, 16, 32)
    },
    "olmo2-static-math": (2, 64, "shells/olmo.sh:13", "--micro_batch_size=8 --batch_size=16"),
}

# Phase 2 starts from phase 1's exported final weights (retro.export), with a fresh optimizer and schedules.
PHASE_2 = {
    "tinyllama-484-two-phase-2-mix": ("tinyllama-484-fineweb-muon", "checkpoints/tinyllama-484-phase1"),
    "tinyllama-static-two-phase-2-mix": ("tinyllama-static-fineweb", "checkpoints/tinyllama-static-phase1"),
}

# Keys every paper config must state itself, so that a change of a retro default cannot change a paper run.
EXPLICIT = {
    "data": ["train", "seq_len"],
    "train": ["steps", "global_batch", "micro_batch", "grad_clip", "dtype", "out_dir"],
    "recurrence": [
        "max_mean",
        "curriculum",
        "ramp_fraction",
        "backprop_depth",
        "sigma",
        "cap",
        "draws_per_step",
        "fixed",
        "start_mean",
    ],
    "optim": ["name", "lr", "betas", "eps", "weight_decay", "schedule", "warmup_steps", "decay_steps", "min_lr_ratio"],
    "model": ["path", "init", "shape"],
    "parallel": ["compile"],
}
EXPLICIT_MUON = [
    "muon_lr",
    "muon_weight_decay",
    "momentum",
    "nesterov",
    "ns_steps",
    "ns_coefficients",
    "muon_scale",
    "muon_split_fused",
]


def test_every_config_loads():
    paths = sorted(CONFIGS.rglob("*.toml"))
    assert len(paths) >= len(RUNS) + 2  # the paper's runs, tiny-cpu, demo
    for path in paths:
        load_config(path)  # validates every section; raises ConfigError naming the key


def test_table_and_files_agree():
    assert sorted(p.stem for p in PAPER.glob("*.toml")) == sorted(RUNS)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_paper_config_matches_the_paper(name):
    row = RUNS[name]
    job = load_config(PAPER / f"{name}.toml")
    t, o, r, d = job.train, job.optim, job.recurrence, job.data
    steps = row["steps"]
    assert t.steps == steps
    assert o.warmup_steps == math.ceil(row["warmup"] * steps)
    assert o.decay_steps == math.ceil(row["cooldown"] * steps)
    assert (t.global_batch, t.micro_batch, d.seq_len) == (row["global_batch"], row["micro_batch"], row["seq_len"])
    assert t.grad_clip == row["grad_clip"]
    assert t.dtype == "bf16"
    assert len(d.train) == row["sources"]
    if row["sources"] > 1:
        assert d.weights == [1.0] * row["sources"]  # an equal mix
    assert job.model.shape == row["shape"]
    assert job.model.init == "pretrained"
    # Not the paper's (it ran eager): compiled layers measured 1.21x faster with the same losses (issue 26).
    assert job.parallel.compile is True

    assert o.name == row["optimizer"]
    assert o.lr == row["lr"]
    assert o.betas == row["betas"]
    assert o.eps == row["eps"]
    assert o.weight_decay == row["weight_decay"]
    assert (o.schedule, o.min_lr_ratio) == (row["schedule"], row["min_lr_ratio"])
    if row["optimizer"] == "muon":
        assert o.muon_lr == row["muon_lr"]
        assert o.muon_weight_decay == row["muon_weight_decay"]
        assert (o.momentum, o.nesterov, o.ns_steps) == (row["momentum"], row["nesterov"], row["ns_steps"])
        assert o.ns_coefficients == row["ns_coefficients"]
        assert o.muon_scale == row["muon_scale"]
        assert o.muon_split_fused is row["muon_split_fused"]

    assert r.curriculum == row["curriculum"]
    assert r.max_mean == row["max_mean"]
    assert r.ramp_fraction == row["ramp"]
    assert (r.sigma, r.cap) == (row["sigma"], row["cap"])
    assert r.draws_per_step == DRAWS[name][0]
    assert (r.fixed, r.start_mean) == (False, 1)  # none of these shells sets fix_num_steps or a curriculum start
    if row["shape"][1] > 0:
        assert r.backprop_depth == row["backprop_depth"]
        # the curriculum reaches M at ceil(ramp * steps), as train.py's mean-recurrence scheduler
        schedule = RecurrenceSchedule.from_settings(r, t.steps, t.seed)
        assert schedule.ramp_steps == math.ceil(row["ramp"] * steps)
        assert schedule.mean_at(0) == 1
        assert schedule.mean_at(steps - 1) == row["max_mean"]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_paper_config_names_what_it_relies_on(name):
    """Read the raw TOML: the values above must come from the file, not from retro's defaults."""
    with (PAPER / f"{name}.toml").open("rb") as f:
        raw = tomllib.load(f)
    required = {section: list(keys) for section, keys in EXPLICIT.items()}
    if RUNS[name]["optimizer"] == "muon":
        required["optim"] += EXPLICIT_MUON
    missing = [f"{s}.{k}" for s, keys in required.items() for k in keys if k not in raw.get(s, {})]
    assert not missing, f"{name}.toml relies on retro's defaults for {missing}"


def test_draws_per_step_table_is_the_shells_arithmetic():
    """Each value is the shell's batch_size / micro_batch_size, and its GPUs x batch_size is the run's global batch."""
    assert sorted(DRAWS) == sorted(RUNS)
    for name, (draws, gpus, _, arguments) in DRAWS.items():
        args = dict(a.removeprefix("--").split("=") for a in arguments.split())
        assert draws == int(args["batch_size"]) // int(args["micro_batch_size"]), name
        assert gpus * int(args["batch_size"]) == RUNS[name]["global_batch"], name


@pytest.mark.parametrize("name", sorted(RUNS))
def test_paper_draws_at_the_papers_gpu_count_and_on_8_gpus(name):
    """At the paper's GPU count every micro-batch column gets its own draw (train.py's per-data-step draw); on
    8 GPUs the same number of draws covers the step in equal groups. Figure 3 (16 draws of 512 rows) needs
    16 micro-batches per rank: micro_batch 4 on 8 GPUs (its header says so)."""
    job = load_config(PAPER / f"{name}.toml")
    draws, gpus, _, _ = DRAWS[name]
    schedule = RecurrenceSchedule.from_settings(job.recurrence, job.train.steps, job.train.seed)
    per_rank = job.train.global_batch // (job.train.micro_batch * gpus)
    assert per_rank == draws and schedule.draws(1000, per_rank) == [schedule.draw(1000, j) for j in range(draws)]
    if name == "llama32-242-fineweb-curriculum":
        with pytest.raises(ConfigError, match="draws_per_step = 16 must divide the 8 micro-batches"):
            check_draw_groups(job, 8)
        job = load_config(PAPER / f"{name}.toml", ["train.micro_batch=4"])
    check_draw_groups(job, 8)
    on_8 = job.train.global_batch // (job.train.micro_batch * 8)
    groups = [schedule.draw(1000, g) for g in range(draws) for _ in range(on_8 // draws)]
    assert schedule.draws(1000, on_8) == groups


def test_runs_do_not_share_an_out_dir():
    # checkpoint.resume = "auto" continues from out_dir: two runs sharing one would resume each other
    out_dirs = [load_config(PAPER / f"{name}.toml").train.out_dir for name in sorted(RUNS)]
    assert len(set(out_dirs)) == len(out_dirs)


@pytest.mark.parametrize("phase_2", sorted(PHASE_2))
def test_phase_2_starts_from_phase_1(phase_2):
    phase_1, export = PHASE_2[phase_2]
    first, second = (load_config(PAPER / f"{n}.toml") for n in (phase_1, phase_2))
    assert second.model.path == export != first.model.path
    assert second.train.out_dir != first.train.out_dir  # a fresh optimizer, LR schedule and curriculum
    assert first.data.train[0] == second.data.train[0]  # phase 1's FineWeb-Edu is one third of the mix


def test_static_baselines_share_data_and_schedule_with_their_recurrent_runs():
    pairs = {
        "tinyllama-static-math": "tinyllama-484-math-m32",
        "llama32-static-math": "llama32-464-math-m32",
        "olmo2-static-math": "olmo2-464-math-m32",
        "tinyllama-static-fineweb": "tinyllama-484-fineweb-muon",
        "tinyllama-static-mix": "tinyllama-484-mix",
    }
    for static_name, recurrent_name in pairs.items():
        s, rec = (load_config(PAPER / f"{n}.toml") for n in (static_name, recurrent_name))
        assert s.data.train == rec.data.train
        assert (s.train.steps, s.optim.warmup_steps, s.optim.decay_steps) == (
            rec.train.steps,
            rec.optim.warmup_steps,
            rec.optim.decay_steps,
        )
