"""What trains (retro/training/trainable.py): the frozen set of each mode, the optimizer groups built from
what trains only, and one step that leaves every frozen parameter untouched (single process; FSDP2 in
tests/distributed/test_trainable_fsdp.py)."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_recurrent

import retro
from retro.model.lora import LoraSettings
from retro.optim import build_optimizer
from retro.optim.build import OptimSettings, group_parameters
from retro.training.errors import ConfigError
from retro.training.trainable import MODES, apply_trainable

LORA = LoraSettings(rank=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"])
ADAPTER = {"model.recurrent.adapter.weight"}
BLOCK_LAYER = {
    "attn_norm.weight",
    "attn.qkv_proj.weight",
    "attn.o_proj.weight",
    "mlp_norm.weight",
    "mlp.gate_up_proj.weight",
    "mlp.down_proj.weight",
}
BLOCK = {f"model.recurrent.block.{i}.{name}" for i in range(2) for name in BLOCK_LAYER}
LORA_PARAMS = {
    f"model.recurrent.block.{i}.{path}.lora.updates.{target}.{m}"
    for i in range(2)
    for path, target in (("attn.qkv_proj", "q_proj"), ("attn.qkv_proj", "v_proj"), ("mlp.down_proj", "down_proj"))
    for m in "AB"
}
EXPECTED = {"recurrent": ADAPTER | BLOCK, "adapter": ADAPTER, "lora": ADAPTER | LORA_PARAMS}


def trained_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_trains_exactly_its_parameters(mode):
    model = tiny_recurrent()
    everything = {n for n, _ in model.named_parameters()}
    trainable, total = apply_trainable(model, mode, LORA)
    expected = EXPECTED.get(mode, everything)
    assert trained_names(model) == expected
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert total == sum(p.numel() for p in model.parameters())


def test_lora_without_the_adapter_trains_the_updates_only():
    model = tiny_recurrent()
    settings = LoraSettings(rank=4, targets=LORA.targets, train_adapter=False)
    apply_trainable(model, "lora", settings)
    assert trained_names(model) == LORA_PARAMS


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("optim", ["muon", "adamw"])
def test_optimizer_groups_hold_what_trains_only(mode, optim):
    """Muon gets the 2-D hidden matrices that train (LoRA's A and B included), AdamW the rest that trains."""
    model = tiny_recurrent()
    apply_trainable(model, mode, LORA)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = group_parameters(model)
    muon = {names[id(p)] for g in groups if g["use_muon"] for p in g["params"]}
    adamw = {names[id(p)] for g in groups if not g["use_muon"] for p in g["params"]}
    trained = trained_names(model)
    assert muon | adamw == trained and not muon & adamw
    assert muon == {n for n in trained if model.get_parameter(n).dim() == 2 and "embed" not in n and "lm_head" not in n}
    optimizer = build_optimizer(model, OptimSettings(name=optim))
    in_optimizer = {names[id(p)] for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == trained


@pytest.mark.parametrize("mode", ["recurrent", "adapter", "lora"])
def test_a_step_changes_what_trains_and_nothing_else(mode):
    model = tiny_recurrent(state_init="zeros")
    apply_trainable(model, mode, LORA)
    optimizer = build_optimizer(model, OptimSettings(name="muon", lr=1e-2, muon_lr=1e-2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # two steps: LoRA's A gets a gradient once B is no longer zero
        model(ids, shift_labels=ids, num_recurrences=(1, 2), return_logits=False).loss.backward()
        optimizer.step()
        frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
        assert frozen and all(p.grad is None for _, p in frozen)
        optimizer.zero_grad(set_to_none=True)
    state = {id(p) for p in optimizer.state}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert id(p) in state and not torch.equal(p, before[name]), name
        else:
            assert id(p) not in state and torch.equal(p, before[name]), name


def test_a_static_model_has_no_core_to_train():
    config = retro.RetroConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_attention_heads=2, n_prelude=2, n_recurrent=0, n_coda=1
    )
    with pytest.raises(ConfigError, match="train.trainable = 'adapter' needs a recurrent block"):
        apply_trainable(retro.RetroForCausalLM(config), "adapter", LORA)
