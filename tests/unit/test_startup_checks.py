"""Start-up checks of retro.train's config and data section, and of retro.plan's --model-config: each bad value
is one ConfigError naming the key (or file) and the value, before any weight is read or file written."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from retro.model.config import RetroConfig
from retro.plan import main as plan_main
from retro.training.errors import ConfigError
from retro.training.job_config import load_config
from retro.training.preflight import check_data

TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2, n_prelude=1, n_recurrent=1)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.val_recurrences=[]", "train.val_recurrences must list a test recurrence or more (e.g. [1, 4]), got []"),
        ("checkpoint.every=-1", "checkpoint.every must be >= 0"),
        ("checkpoint.every=-7", "got -7"),
    ],
)
def test_config_values_refused(override, message):
    with pytest.raises(ConfigError, match=r"^" + override.split("=")[0].replace(".", r"\.")) as error:
        load_config(None, [override])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_checkpoint_every_zero_is_the_end_only_default():
    assert load_config(None, ["checkpoint.every=0"]).checkpoint.every == 0


def job_for(tmp_path, *overrides: str):
    """A job whose data.train does not exist: checks that come before the shards are opened still run."""
    base = [f"model.path={tmp_path / 'model'}", f"data.train={tmp_path / 'data'}", f"train.out_dir={tmp_path / 'run'}"]
    return load_config(None, [*base, "train.global_batch=8", "train.micro_batch=8", *overrides])


def test_seq_len_above_max_position_embeddings(tmp_path):
    config = RetroConfig(**TINY, max_position_embeddings=64)
    with pytest.raises(ConfigError) as error:
        check_data(job_for(tmp_path, "data.seq_len=65"), config, 1)
    assert str(error.value).startswith("data.seq_len = 65 exceeds the model's") and "max_position_embeddings = 64" in (
        str(error.value)
    )
    with pytest.raises(Exception) as error:  # at the limit: on to the shards, which are missing here
        check_data(job_for(tmp_path, "data.seq_len=64"), config, 1)
    assert "exceeds" not in str(error.value)


@pytest.mark.parametrize(
    "key, where, how",
    [
        ("model.path", "model", "is"),
        ("model.path", "model/run", "sits inside"),
        ("model.path", ".", "contains"),
        ("data.train", "data", "is"),
        ("data.train", "data/sub/run", "sits inside"),
        ("data.val", "val/x", "sits inside"),
    ],
)
def test_out_dir_overlapping_an_input(tmp_path, key, where, how):
    job = job_for(tmp_path, f"train.out_dir={tmp_path / where}", f"data.val={tmp_path / 'val'}")
    with pytest.raises(ConfigError) as error:
        check_data(job, RetroConfig(**TINY), 1)
    text = str(error.value)
    assert text.startswith(f"train.out_dir = {tmp_path / where}") and f" {how} {key} = " in text, text
    assert "\n" not in text


def test_out_dir_containing_the_teacher(tmp_path):
    (tmp_path / "teacher.gguf").write_bytes(b"")
    job = job_for(tmp_path, f"train.out_dir={tmp_path}", f"distill.teacher={tmp_path / 'teacher.gguf'}")
    job.model.path = str(tmp_path.parent / "elsewhere")  # only the teacher overlaps
    job.data.train = [str(tmp_path.parent / "elsewhere-data")]
    with pytest.raises(ConfigError, match=r"contains distill\.teacher = .*teacher\.gguf"):
        check_data(job, RetroConfig(**TINY), 1)


def test_out_dir_beside_its_inputs_is_accepted(tmp_path):
    """A sibling whose name starts like an input's is not inside it (paths, not string prefixes)."""
    job = job_for(tmp_path, f"train.out_dir={tmp_path / 'model-run'}")
    with pytest.raises(Exception) as error:  # passes the overlap check, then the missing shards stop it
        check_data(job, RetroConfig(**TINY), 1)
    assert "train.out_dir" not in str(error.value)


def test_plan_refuses_a_config_that_is_not_a_retro_models(tmp_path, capsys):
    path = tmp_path / "config.json"
    LlamaConfig(vocab_size=64, hidden_size=16, num_attention_heads=2, num_hidden_layers=2).to_json_file(path)
    assert plan_main(["--model-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"retro.plan: error: {path} has model_type 'llama', not 'retro'")
    RetroConfig(**TINY).save_pretrained(tmp_path / "retro")
    assert plan_main(["--model-config", str(tmp_path / "retro" / "config.json")]) == 0


def test_draws_per_step_that_splits_no_micro_batch_column_is_refused(tmp_path, capsys):
    """global 8 / (micro 1 x 2 ranks) = 4 micro-batches per rank: 1, 2, 4 draws split them into whole columns, 3
    and 8 do not (ranks would run different r at one micro index); retro.train and retro.plan say so in one line."""
    for draws in (1, 2, 4):
        with pytest.raises(Exception) as error:  # past the split check: on to the shards, which are missing here
            check_data(job_for(tmp_path, "train.micro_batch=1", f"recurrence.draws_per_step={draws}"), None, 2)
        assert "must divide" not in str(error.value)
    for draws in (3, 8):
        with pytest.raises(ConfigError) as error:
            check_data(job_for(tmp_path, "train.micro_batch=1", f"recurrence.draws_per_step={draws}"), None, 2)
        message = str(error.value)
        assert message.startswith(f"recurrence.draws_per_step = {draws} must divide the 4 micro-batches each rank")
        assert "(train.global_batch 8 / (train.micro_batch 1 x 2 ranks))" in message and "\n" not in message
    args = ["--preset", "tinyllama-484", "--gpus", "16", "--recurrence.draws_per_step=16"]  # 1024 / (8 x 16) = 8
    assert plan_main(args) == 2
    err = capsys.readouterr().err
    assert "draws_per_step = 16 must divide the 8 micro-batches" in err and "x 16 GPUs))" in err
    assert plan_main([*args[:-1], "--recurrence.draws_per_step=8", "--train.steps=500"]) == 0


def test_out_dir_holding_another_commands_output_is_refused(tmp_path):
    """A converted model as train.out_dir used to get its config.json replaced by the job config."""
    other = tmp_path / "other_model"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"")
    job = job_for(tmp_path, f"train.out_dir={other}")
    with pytest.raises(ConfigError, match=r"holds model weights \(model\.safetensors\)"):
        check_data(job, RetroConfig(**TINY), 1)
    (other / "model.safetensors").unlink()
    (other / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ConfigError, match="a config.json that is not a run's job config"):
        check_data(job, RetroConfig(**TINY), 1)


def test_out_dir_paths_expand_the_home_directory_and_may_not_be_empty(tmp_path, monkeypatch):
    """'~/runs/x' used to create a folder literally named `~`; an empty out_dir trained into the cwd."""
    monkeypatch.setenv("HOME", str(tmp_path))
    job = load_config(None, ["train.out_dir=~/runs/x", "model.path=~/model"])
    assert job.train.out_dir == str(tmp_path / "runs" / "x") and job.model.path == str(tmp_path / "model")
    with pytest.raises(ConfigError, match="train.out_dir is empty"):
        load_config(None, ["train.out_dir="])
