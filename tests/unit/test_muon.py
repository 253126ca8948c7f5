"""Single-process tests of retro.optim.Muon: against torch.optim.Muon, an explicit per-matrix
reference, the param-group rule, and the owner assignment / shard layout used under FSDP2."""

from __future__ import annotations

import contextlib
import copy
import math
from unittest import mock

import pytest
import torch
import torch.optim._muon as torch_muon
from muon_helpers import Toy, assert_fp32_close, batches, rel_displacement_error
from torch import nn

from retro.kernels.newton_schulz import MUON_COEFFICIENTS, newton_schulz_reference
from retro.optim import Muon, build_optimizer, group_parameters
from retro.optim.exchange import assign_owners, newton_schulz_cost, shard_rows

# --- param groups -------------------------------------------------------------------------------


def test_groups_follow_the_papers_rule():
    model = Toy()
    groups = group_parameters(model)
    name = {id(p): n for n, p in model.named_parameters()}
    muon = {g["split_sizes"]: sorted(name[id(p)] for p in g["params"]) for g in groups if g["use_muon"]}
    adamw = sorted(name[id(p)] for g in groups if not g["use_muon"] for p in g["params"])
    assert muon[(16, 6, 6)] == ["layers.0.qkv_proj.weight", "layers.1.qkv_proj.weight"]
    assert muon[(12, 12)] == ["layers.0.gate_up_proj.weight", "layers.1.gate_up_proj.weight"]
    assert len(muon[None]) == 2 * 5 + 1  # o_proj, down_proj, three odd Linears per layer; adapter
    assert "adapter.weight" in muon[None]
    assert "lm_head.weight" in adamw and "embed_tokens.weight" in adamw
    assert "layers.0.down_proj.bias" in adamw and "layers.1.mlp_norm.weight" in adamw
    assert len(adamw) == 2 + 1 + 2 * 3  # embed, head, final norm, 2 norms + bias per layer
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    unsplit = group_parameters(model, split_fused=False)
    assert [g["split_sizes"] for g in unsplit if g["use_muon"]] == [None]


def test_groups_of_the_retro_model():
    """On the project's own model: fused QKV / gate-up carry split_sizes, the adapter is on Muon."""
    from retro import RetroForCausalLM
    from retro.model.config import RetroConfig

    config = RetroConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_attention_heads=2,
        num_key_value_heads=1,
        n_prelude=1,
        n_recurrent=1,
        n_coda=1,
    )
    model = RetroForCausalLM(config)
    name = {id(p): n for n, p in model.named_parameters()}
    groups = group_parameters(model)
    muon = {g["split_sizes"]: {name[id(p)] for p in g["params"]} for g in groups if g["use_muon"]}
    adamw = {name[id(p)] for g in groups if not g["use_muon"] for p in g["params"]}
    assert muon.keys() == {(16, 8, 8), (24, 24), None}
    assert [n for n in muon[None] if n.endswith("adapter.weight")]
    assert all("qkv_proj" in n for n in muon[(16, 8, 8)]) and len(muon[(16, 8, 8)]) == 3
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} <= adamw
    assert all(model.get_parameter(n).dim() == 1 for n in adamw - {"lm_head.weight", "model.embed_tokens.weight"})


def test_build_optimizer_switches_and_errors():
    model = Toy()
    muon = build_optimizer(model, muon_lr=2e-3, lr=3e-5)
    assert isinstance(muon, Muon)
    assert {g["lr"] for g in muon.param_groups if g["use_muon"]} == {2e-3}
    assert {g["lr"] for g in muon.param_groups if not g["use_muon"]} == {3e-5}

    adamw = build_optimizer(model, lr=3e-5, weight_decay=0.1, name="adamw")
    assert type(adamw) is torch.optim.AdamW
    assert [g["lr"] for g in adamw.param_groups] == [3e-5, 3e-5]
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.1]
    assert sum(len(g["params"]) for g in adamw.param_groups) == len(list(model.parameters()))

    with pytest.raises(ValueError, match="optimizer name"):
        build_optimizer(model, name="sgd")
    model.layers[0].qkv_proj.split_sizes = (16, 6, 5)
    with pytest.raises(ValueError, match=r"layers.0.qkv_proj.split_sizes=\(16, 6, 5\)"):
        build_optimizer(model, muon_split_fused=True)  # the split option checks split_sizes
    with pytest.raises(ValueError, match="unknown keys"):
        Muon([{"params": [nn.Parameter(torch.ones(2, 2))], "weight_decy": 0.1}])
    with pytest.raises(ValueError, match="2-D"):
        Muon([nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="ns_coefficients"):
        Muon([nn.Parameter(torch.ones(2, 2))], ns_steps=5, ns_coefficients=[MUON_COEFFICIENTS] * 4)


def test_one_scheduler_drives_both_learning_rates():
    opt = build_optimizer(Toy(), muon_lr=1e-3, lr=5e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    opt.step()
    sched.step()
    sched.step()
    lrs = {(g["use_muon"], g["lr"]) for g in opt.param_groups}
    assert lrs == {(True, 1e-3 / 4), (False, 5e-5 / 4)}


# --- numerics against references ----------------------------------------------------------------


def _torch_pair(model: Toy, muon_lr: float, adamw_lr: float, scale_rule: str):
    """torch.optim.Muon on our Muon matrices (split_fused=False) + torch AdamW on the rest."""
    groups = group_parameters(model, split_fused=False)
    matrices = [p for g in groups if g["use_muon"] for p in g["params"]]
    others = [p for g in groups if not g["use_muon"] for p in g["params"]]
    return [
        torch.optim.Muon(matrices, lr=muon_lr, weight_decay=1e-4, adjust_lr_fn=scale_rule),
        torch.optim.AdamW(others, lr=adamw_lr, betas=(0.9, 0.95), eps=1e-10, weight_decay=1e-4),
    ]


def _run_same_grads(ours: Toy, opt: torch.optim.Optimizer, followers: list, steps: int) -> None:
    """Step `ours` and every (model, optimizers, context) follower with identical gradients (taken
    from `ours`), so the runs differ only in their updates."""
    for tokens in batches(steps):
        opt.zero_grad()
        ours(tokens).backward()
        for model, opts, context in followers:
            for p, q in zip(ours.parameters(), model.parameters()):
                q.grad = p.grad.clone()
            with context:
                for o in opts:
                    o.step()
        opt.step()


def _fp32_torch_newton_schulz(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's own iteration (addmm form) without its bf16 cast."""
    a, b, c = ns_coefficients
    x = grad.T if grad.size(0) > grad.size(1) else grad
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if grad.size(0) > grad.size(1) else x


def _torch_fp32_ns():
    return mock.patch.object(torch_muon, "_zeropower_via_newtonschulz", _fp32_torch_newton_schulz)


@pytest.mark.parametrize("scale_rule", ["original", "match_rms_adamw"])
def test_equals_torch_muon_fp32(scale_rule):
    """Same momentum, decay, scale and NS polynomial as torch.optim.Muon: with torch's NS run in fp32
    (its only difference from ours is the bf16 cast) the parameters agree to 1e-6 after 5 steps."""
    torch.manual_seed(0)
    ours = Toy()
    theirs = copy.deepcopy(ours)
    start = [p.detach().clone() for p in ours.parameters()]
    opt = build_optimizer(
        ours, muon_lr=0.02, lr=1e-3, muon_split_fused=False, muon_scale=scale_rule, ns_dtype="float32"
    )
    _run_same_grads(ours, opt, [(theirs, _torch_pair(theirs, 0.02, 1e-3, scale_rule), _torch_fp32_ns())], 5)
    for (name, p), q, s in zip(ours.named_parameters(), theirs.parameters(), start):
        assert_fp32_close(p, q, s, name)


def test_equals_torch_muon_bf16():
    """torch.optim.Muon always runs NS in bf16. Ours in bf16 rounds differently (b*G + c*G@G as
    separate bf16 ops instead of one addmm), so bitwise agreement is impossible; the fp32 test above
    checks the semantics to 1e-5. Here the yardstick is bf16 itself: torch-bf16 lands ~4% (of the
    displacement) from the same iteration in exact fp32 after 5 steps; ours may differ from torch-bf16
    by two such errors (2.5x, ours rounds more often) and never by more than 8% of the displacement.
    Negative control: a wrong scale rule (match_rms_adamw vs original) misses by more than 10%."""
    torch.manual_seed(0)
    ours = Toy()
    theirs, exact, wrong = copy.deepcopy(ours), copy.deepcopy(ours), copy.deepcopy(ours)
    start = [p.detach().clone() for p in ours.parameters()]
    opt = build_optimizer(ours, muon_lr=0.02, lr=1e-3, muon_split_fused=False, ns_dtype="bfloat16")
    followers = [
        (theirs, _torch_pair(theirs, 0.02, 1e-3, "original"), contextlib.nullcontext()),
        (exact, _torch_pair(exact, 0.02, 1e-3, "original"), _torch_fp32_ns()),
        (wrong, _torch_pair(wrong, 0.02, 1e-3, "match_rms_adamw"), contextlib.nullcontext()),
    ]
    _run_same_grads(ours, opt, followers, 5)
    matrices = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    ours_vs_torch, torch_vs_exact, ours_vs_wrong = [], [], []
    for (name, p), q, e, w, s in zip(
        ours.named_parameters(), theirs.parameters(), exact.parameters(), wrong.parameters(), start
    ):
        if id(p) in matrices:
            ours_vs_torch.append(rel_displacement_error(p, q, s))
            torch_vs_exact.append(rel_displacement_error(q, e, s))
            ours_vs_wrong.append(rel_displacement_error(p, w, s))
        else:  # AdamW parameters: the same functional AdamW as torch's
            assert_fp32_close(p, q, s, name)
    assert len(ours_vs_torch) == 15
    assert max(ours_vs_torch) < 0.08, ours_vs_torch
    assert max(ours_vs_torch) < 2.5 * max(torch_vs_exact), (ours_vs_torch, torch_vs_exact)
    assert min(ours_vs_wrong) > 0.1, ours_vs_wrong  # every matrix: above the 8% tolerance


def reference_muon_step(params, splits, state, *, lr, wd, mu, nesterov, steps, coefficients, rule):
    """Explicit per-matrix Muon: one block at a time, no batching, no transposition tricks."""
    for p, split in zip(params, splits):
        g = p.grad
        buf = state.setdefault(p, torch.zeros_like(p))
        buf.mul_(mu).add_(g, alpha=1 - mu)
        update = (1 - mu) * g + mu * buf if nesterov else buf
        p.data.mul_(1 - lr * wd)
        row = 0
        for rows in split or (p.shape[0],):
            block = update[row : row + rows]
            ortho = newton_schulz_reference(block, steps=steps, coefficients=coefficients)
            scale = (
                math.sqrt(max(1, rows / p.shape[1])) if rule == "original" else 0.2 * math.sqrt(max(rows, p.shape[1]))
            )
            p.data[row : row + rows] -= lr * scale * ortho
            row += rows


# Polar-Express-style per-iteration coefficients (any 3 per step exercise the code path).
PER_STEP = [
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
]


@pytest.mark.parametrize(
    "split_fused,nesterov,coefficients,rule",
    [
        (True, True, MUON_COEFFICIENTS, "original"),
        (True, False, PER_STEP, "match_rms_adamw"),
        (False, True, PER_STEP, "original"),
    ],
)
def test_equals_explicit_reference_fp32(split_fused, nesterov, coefficients, rule):
    """Batched, split, scaled Muon equals the explicit per-block loop (fp32) to 1e-6 / 1e-5."""
    torch.manual_seed(0)
    ours = Toy()
    ref = copy.deepcopy(ours)
    start = [p.detach().clone() for p in ours.parameters()]
    opt = build_optimizer(
        ours,
        muon_lr=0.02,
        lr=1e-3,
        muon_split_fused=split_fused,
        nesterov=nesterov,
        ns_coefficients=coefficients,
        muon_scale=rule,
        ns_dtype="float32",
    )
    ref_names = dict(ref.named_parameters())
    our_names = {id(p): n for n, p in ours.named_parameters()}
    muon_params, splits, others = [], [], []
    for g in opt.param_groups:
        mapped = [ref_names[our_names[id(p)]] for p in g["params"]]
        if g["use_muon"]:
            muon_params += mapped
            splits += [g["split_sizes"]] * len(mapped)
        else:
            others += mapped
    adamw = torch.optim.AdamW(others, lr=1e-3, betas=(0.9, 0.95), eps=1e-10, weight_decay=1e-4)
    state: dict = {}

    class ReferenceMuon:
        def step(self):
            reference_muon_step(
                muon_params,
                splits,
                state,
                lr=0.02,
                wd=1e-4,
                mu=0.95,
                nesterov=nesterov,
                steps=5,
                coefficients=coefficients,
                rule=rule,
            )

    _run_same_grads(ours, opt, [(ref, [ReferenceMuon(), adamw], contextlib.nullcontext())], 5)
    for (name, p), q, s in zip(ours.named_parameters(), ref.parameters(), start):
        assert_fp32_close(p, q, s, name)


# --- FSDP2 layout and owner assignment -----------------------------------------------------------


@pytest.mark.parametrize("rows,world", [(7, 4), (10, 4), (3, 4), (28, 4), (5, 2), (16, 1)])
def test_shard_rows_match_torch_chunk(rows, world):
    """FSDP2 shards dim 0 like torch.chunk (uneven tail, possibly empty ranks)."""
    chunks = torch.arange(rows).chunk(world)
    for rank in range(world):
        start, stop = shard_rows(rows, world, rank)
        expected = chunks[rank].tolist() if rank < len(chunks) else []
        assert list(range(start, stop)) == expected


def test_owner_assignment_balances_newton_schulz_cost():
    shapes = [(688, 256)] * 16 + [(256, 256)] * 16 + [(256, 688)] * 8 + [(7, 16), (3, 7)]
    costs = [newton_schulz_cost(r, c, 5) for r, c in shapes]
    for world in (2, 3, 4, 8):
        owners = assign_owners(costs, world)
        loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(world)]
        # LPT's guarantee is 4/3 of optimal; these jobs are small against the total, so far tighter.
        assert max(loads) <= 1.05 * sum(costs) / world, (world, loads)
        assert owners == assign_owners(costs, world)  # deterministic: every rank agrees
    assert newton_schulz_cost(688, 256, 5) == newton_schulz_cost(256, 688, 5)  # transposed: same work


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton Newton-Schulz)")
def test_cuda_bf16_triton_matches_fp32():
    """On CUDA, ns_dtype="auto" runs Newton-Schulz in bf16 through retro.kernels' Triton kernels
    (checked by counting calls); with the CPU fp32 run's gradients it stays within the bf16
    tolerance of test_equals_torch_muon_bf16 (8% of the displacement) after 5 steps."""
    import retro.kernels.triton_newton_schulz as triton_ns

    torch.manual_seed(0)
    cpu = Toy()
    gpu = copy.deepcopy(cpu).cuda()
    start = [p.detach().clone() for p in cpu.parameters()]
    opt_cpu = build_optimizer(cpu, muon_lr=0.02, lr=1e-3, ns_dtype="float32")
    opt_gpu = build_optimizer(gpu, muon_lr=0.02, lr=1e-3)
    calls = []
    real = triton_ns.newton_schulz_triton

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    with mock.patch.object(triton_ns, "newton_schulz_triton", counting):
        for tokens in batches(5):
            opt_cpu.zero_grad()
            cpu(tokens).backward()
            for p, q in zip(cpu.parameters(), gpu.parameters()):
                q.grad = p.grad.cuda()
            opt_cpu.step()
            opt_gpu.step()
    assert calls and all(shape[0] >= 1 for shape in calls)
    matrices = {id(p) for g in opt_cpu.param_groups if g["use_muon"] for p in g["params"]}
    for (name, p), q, s in zip(cpu.named_parameters(), gpu.parameters(), start):
        if id(p) in matrices:
            assert rel_displacement_error(q.cpu(), p, s) < 0.08, name
        else:
            assert_fp32_close(q.cpu(), p, s, name)
