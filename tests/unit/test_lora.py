"""LoRA on the recurrent block (retro/model/lora.py): the base model at step 0, per-projection rows of the
fused matrices, and the merge into plain weights."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_recurrent

from retro.model.lora import TARGETS, LoraSettings, add_lora, is_lora_parameter, lora_start_values, merge_lora
from retro.training.job_config import ConfigError, load_config

IDS = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))


def logits(model, r=3) -> torch.Tensor:
    return model(IDS, num_recurrences=r, initial_state=torch.zeros(2, 9, 32)).logits


def with_lora(settings: LoraSettings, trained: bool = True):
    """(base model, a copy with LoRA updates; with `trained`, B random as after some training)."""
    base = tiny_recurrent()
    model = copy.deepcopy(base)
    add_lora(model.model.recurrent.block, settings)
    if trained:
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".B"):
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return base, model


def test_the_lora_model_at_step_0_is_the_base_model_exactly():
    base, model = with_lora(LoraSettings(rank=4, alpha=8.0), trained=False)
    names = [n for n, _ in model.named_parameters() if is_lora_parameter(n)]
    assert len(names) == 2 * 2 * len(TARGETS)  # A and B, 2 block layers, every projection
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith(".A"))  # A random, not zero
    assert torch.equal(logits(model), logits(base))


def test_start_values_are_seeded_A_random_B_zero():
    _, model = with_lora(LoraSettings(rank=4, targets=["q_proj", "down_proj"]), trained=False)
    first, again = lora_start_values(model, seed=3), lora_start_values(model, seed=3)
    other = lora_start_values(model, seed=4)
    name_a = "model.recurrent.block.0.attn.qkv_proj.lora.updates.q_proj.A"
    assert set(first) == {n for n, _ in model.named_parameters() if is_lora_parameter(n)} and name_a in first
    assert first[name_a].shape == (4, 32) and first[name_a].abs().max() <= 32**-0.5
    assert all(torch.equal(first[n], again[n]) for n in first) and not torch.equal(first[name_a], other[name_a])
    assert all(not first[n].any() for n in first if n.endswith(".B"))


def test_a_target_changes_only_its_own_rows_of_a_fused_matrix():
    """k_proj alone: the merged qkv weight differs from the base in the k rows only, by alpha/rank · B A."""
    settings = LoraSettings(rank=2, alpha=6.0, targets=["k_proj"])
    base, model = with_lora(settings)
    linear = model.model.recurrent.block[1].attn.qkv_proj
    update = linear.lora.updates["k_proj"]
    expected_delta = 3.0 * update.B.detach() @ update.A.detach()
    merge_lora(model)
    q, kv = 32, 16  # 4 heads x 8, 2 KV heads x 8
    before, after = base.model.recurrent.block[1].attn.qkv_proj.weight, linear.weight
    assert torch.equal(after[:q], before[:q]) and torch.equal(after[q + kv :], before[q + kv :])
    torch.testing.assert_close(after[q : q + kv] - before[q : q + kv], expected_delta, rtol=0, atol=1e-6)


@pytest.mark.parametrize("targets", [list(TARGETS), ["v_proj", "up_proj"], ["o_proj"]])
def test_merging_gives_a_plain_model_with_the_same_logits(targets):
    """Tolerance: fp32 rounding of W + s·BA vs W x + s·B(A x), at most 1e-5 of the logits' scale."""
    base, model = with_lora(LoraSettings(rank=3, alpha=5.0, targets=targets))
    before = logits(model)
    assert (before - logits(base)).abs().max() > 1e-2  # the updates matter
    assert merge_lora(model) == 2 * len(targets)
    assert not any(is_lora_parameter(n) for n in model.state_dict())
    assert set(model.state_dict()) == set(base.state_dict())
    after = logits(model)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5 * before.abs().max().item())


@pytest.mark.parametrize(
    "override,message",
    [
        ("lora.rank=0", "lora.rank must be >= 1, got 0"),
        ("lora.alpha=0", "lora.alpha must be > 0"),
        ("lora.targets=[q_proj,qkv_proj]", "lora.targets: unknown qkv_proj; choose from q_proj, k_proj"),
        ("lora.targets=[q_proj,q_proj]", "lora.targets names a projection twice"),
        ("train.trainable=some", "train.trainable = 'some'; choose one of 'all', 'recurrent', 'adapter', 'lora'"),
    ],
)
def test_bad_lora_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, ["data.train=[d]", override])
