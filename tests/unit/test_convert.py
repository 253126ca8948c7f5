"""`retro.convert`: layer choice, summary, and clear errors before any weight is read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny import save_source

from retro.convert import convert, main
from retro.hf.surgery import plan_from_shape


def test_paper_layer_choices():
    assert plan_from_shape(22, 4, 8, 4).block == list(range(10, 18))  # TinyLlama (4,8,4)
    p = plan_from_shape(16, 2, 4, 2)  # Llama-3.2-1B (2,4,2)
    assert (p.prelude, p.block, p.coda) == ([0, 1], [10, 11, 12, 13], [14, 15])
    assert plan_from_shape(16, 4, 6, 4).dropped(16) == [4, 5]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("src")
    save_source(path, "llama")
    return path


def test_cli_summary_and_outputs(source, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "retro.convert", "--model", str(source), "--shape", "2,2,1", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "block 3..4" in result.stdout and "dropped [2]" in result.stdout
    summary = json.loads((out / "conversion.json").read_text())
    assert summary["parameters"] < summary["source_parameters"] + 2 * 32 * 32 * 2  # one layer dropped, adapter added
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "retro" and config["n_recurrent"] == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shape": (3, 3, 3)}, "needs 9 layers but the source model has 6"),
        ({"shape": (0, 2, 2)}, "prelude size must be a positive integer"),
        ({"shape": (1, -1, 2)}, "recurrent block size must be a positive integer"),
        ({"layers": "0-2,2-3,4-5"}, "overlaps another range at layers \\[2\\]"),
        ({"layers": "0-1,2-3,4-6"}, "coda uses layers \\[6\\]"),
        ({"layers": "0-1,2-3"}, "three ranges"),
        ({"layers": "0-1,3-2,4-5"}, "ends before it starts"),
        ({"layers": "4-5,2-3,0-1"}, "the block \\(2-3\\) must come after the prelude \\(4-5\\)"),
        ({"layers": "0-1,4-5,2-3"}, "the coda \\(2-3\\) must come after the block \\(4-5\\)"),
        ({"layers": "0-0,2-3,1-1"}, "the coda \\(1-1\\) must come after the block \\(2-3\\)"),
        ({"layers": "3-4,0-1,5-5"}, "the block \\(0-1\\) must come after the prelude \\(3-4\\)"),
    ],
)
def test_bad_layer_requests(source, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        convert(source, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()  # nothing written


def test_layers_with_gaps_keep_their_order():
    from retro.hf.surgery import plan_from_ranges

    plan = plan_from_ranges(8, "0-1,3-5,7")
    assert (plan.prelude, plan.block, plan.coda, plan.dropped(8)) == ([0, 1], [3, 4, 5], [7], [2, 6])


def test_unsupported_architecture(tmp_path):
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'; supported: llama, olmo2, qwen2, qwen3"):
        convert(tmp_path / "gpt", tmp_path / "out", shape=(1, 1, 1))


def test_missing_and_incomplete_checkpoints(source, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(tmp_path / "nowhere", tmp_path / "out", shape=(1, 1, 1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert(tmp_path / "empty", tmp_path / "out", shape=(1, 1, 1))
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((source / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        convert(partial, tmp_path / "out", shape=(1, 1, 1))
    (partial / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(FileNotFoundError, match="missing: model-00001-of-00002.safetensors"):
        convert(partial, tmp_path / "out", shape=(1, 1, 1))


def test_existing_output_needs_force(source, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["--model", str(source), "--out", str(out), "--shape", "1,1,1"]) == 2
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert main(["--model", str(source), "--out", str(out), "--shape", "1,1,1", "--force"]) == 0
    assert not (out / "keep.txt").exists()


def test_sharded_output_round_trip(source, tmp_path):
    import torch

    from retro.hf.weights import WeightReader, save_sharded

    tensors = {f"t{i}": torch.randn(64, 64) for i in range(5)}
    (tmp_path / "s").mkdir()
    paths = save_sharded(tensors, tmp_path / "s", max_shard_bytes=64 * 64 * 4 * 2)
    assert len(paths) == 3
    reader = WeightReader(tmp_path / "s")
    assert all(torch.equal(reader.get(k), v) for k, v in tensors.items())


def test_zero_embedding_rows_are_reported(tmp_path, capsys):
    import torch

    source = save_source(tmp_path / "src", "llama")
    with torch.no_grad():
        source.model.embed_tokens.weight[[0, 5]] = 0
    source.save_pretrained(tmp_path / "src")
    assert main(["--model", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--static"]) == 0
    assert "WARNING: embedding rows [0, 5] are all zeros" in capsys.readouterr().out


def test_a_config_that_disagrees_with_the_tensors_is_refused_and_nothing_written(tmp_path, capsys):
    """config.json's intermediate_size edited after saving: before, convert wrote an unloadable model."""
    src = tmp_path / "src"
    save_source(src, "llama")
    config = json.loads((src / "config.json").read_text())
    real, hidden = config["intermediate_size"], config["hidden_size"]
    config["intermediate_size"] = real - 8
    (src / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["--model", str(src), "--out", str(out), "--shape", "1,1,1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("retro.convert: error: tensor model.") and ".mlp." in err
    # the fused gate_up projection: 2 x intermediate_size rows written, 2 x the edited value implied
    assert f"has shape [{2 * real}, {hidden}], but the source's config.json implies [{2 * (real - 8)}, {hidden}]" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing written, no partial output left
