"""The distillation teacher: built from a Hugging Face directory or a retro directory, it is the source model."""

from __future__ import annotations

import pytest
import torch
from tiny import save_source

from retro.convert import convert
from retro.distributed.parallelize import ParallelSettings
from retro.model.config import RetroConfig
from retro.training.distill import DistillSettings, build_teacher, teacher_targets
from retro.training.errors import ConfigError
from retro.training.job_config import load_config


def student_config(vocab_size: int = 97) -> RetroConfig:
    return RetroConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                       num_key_value_heads=1, n_prelude=1, n_recurrent=1, n_coda=1)  # fmt: skip


def teacher_of(path) -> torch.nn.Module:
    settings = DistillSettings(teacher=str(path))
    return build_teacher(settings, student_config(), ParallelSettings(), None, torch.device("cpu"), torch.float32)


def test_hf_and_converted_teachers_reproduce_the_source_model(tmp_path):
    source = save_source(tmp_path / "src", "llama")
    convert(tmp_path / "src", tmp_path / "static", static=True)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = source(ids).logits
    for path in (tmp_path / "src", tmp_path / "static"):
        teacher = teacher_of(path)
        assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
        targets = teacher_targets(teacher, DistillSettings(str(path)), ids, ids, None)
        logits = targets.teacher.hidden @ targets.teacher.weight.T
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


def test_a_teacher_with_another_vocabulary_is_a_config_error(tmp_path):
    save_source(tmp_path / "src", "llama", vocab_size=101)
    with pytest.raises(ConfigError, match="vocabulary of 101, the student 97"):
        teacher_of(tmp_path / "src")
    with pytest.raises(ConfigError, match="does not exist"):
        teacher_of(tmp_path / "missing")


@pytest.mark.parametrize("key,value", [("kd_weight", "1.5"), ("kd_weight", "-0.1"), ("temperature", "0")])
def test_out_of_range_settings_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"distill.{key}"):
        load_config(None, [f"distill.{key}={value}"])


def test_the_retired_alpha_says_what_to_write_instead():
    """retro's alpha weighed KD, the paper's weighs CE: one line names kd_weight and both translations."""
    with pytest.raises(ConfigError, match="distill.alpha was renamed distill.kd_weight") as error:
        load_config(None, ["distill.alpha=0.5"])
    message = str(error.value)
    assert "retro's alpha = x is kd_weight = x" in message and "kd_weight = 1 - a" in message and "\n" not in message


def test_a_bf16_teacher_is_held_in_bf16_and_close_to_fp32(tmp_path):
    save_source(tmp_path / "src", "llama")
    settings = DistillSettings(teacher=str(tmp_path / "src"))
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        teacher = build_teacher(settings, student_config(), ParallelSettings(), None, torch.device("cpu"), dtype)
        assert {p.dtype for p in teacher.parameters()} == {dtype}
        assert teacher.model.inv_freq.dtype == torch.float32  # RoPE frequencies stay exact
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            t = teacher_targets(teacher, settings, ids, ids, None).teacher
        logits[dtype] = (t.hidden.float() @ t.weight.float().T).float()
    torch.testing.assert_close(logits[torch.bfloat16], logits[torch.float32], rtol=0.05, atol=0.05)
