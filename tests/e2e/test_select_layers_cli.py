"""`python -m retro.select_layers` end to end on a tiny llama with a word tokenizer and shards made on the fly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import prepare_dir, random_docs, word_tokenizer, write_jsonl
from gguf_helpers import write_tiny_gguf
from tiny import save_source

from retro.select_layers import main

NUM_WORDS = 95  # + [UNK], [EOS] = the tiny models' vocabulary of 97
FAST = ["--calibration-tokens", "128", "--seq-len", "32", "--batch-size", "2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("select")
    save_source(root / "src", "llama")
    word_tokenizer(root / "src", NUM_WORDS)
    corpus = write_jsonl(root / "corpus.jsonl", random_docs(120, NUM_WORDS, seed=3, min_len=10))
    data = prepare_dir(root / "data", [corpus], root / "src", "--val-fraction", "0.5")
    big = word_tokenizer(root / "big_tok", NUM_WORDS + 20)  # ids beyond the model's vocabulary
    other = prepare_dir(root / "other", [corpus], big, "--val-fraction", "0.5")
    same_size = word_tokenizer(root / "chat_tok", NUM_WORDS - 2, chat=True)  # 97 entries, two of them different
    corpus = write_jsonl(root / "chat.jsonl", random_docs(120, NUM_WORDS - 2, seed=4, min_len=10))
    chat = prepare_dir(root / "chat", [corpus], same_size, "--val-fraction", "0.5")
    return {"root": root, "src": root / "src", "data": data, "other": other, "chat": chat}


def run(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_shape_table_json_plot_and_measure(setup, capsys):
    out = setup["root"] / "out_shape"
    args = ["--model", setup["src"], "--data", setup["data"], "--shape", "1,2,1", *FAST, "--measure", "1", "--out", out]
    rc, stdout, stderr = run(capsys, *args)
    assert rc == 0, stderr
    assert "--layers" in stdout and "<- paper's rule" in stdout and "source loss (no layer dropped)" in stdout
    assert "python -m retro.convert --model" in stdout and "calibration 128/128 tokens" in stderr
    result = json.loads((out / "selection.json").read_text())
    assert (out / "selection.png").read_bytes()[:4] == b"\x89PNG"
    assert result["num_layers"] == 6 and len(result["metrics"]["block_influence"]) == 6
    assert [len(row) for row in result["metrics"]["angular_distance"]] == [7, 6, 5, 4, 3, 2, 1]
    rows = result["candidates"]
    assert [r["layers"] for r in rows if r["paper_rule"]] == ["0-0,3-4,5-5"]  # plan_from_shape(6, 1, 2, 1)
    assert len(rows) == 3 and [r["rank"] for r in rows] == [1, 2, 3]
    assert [r["proxy"] for r in rows] == sorted(r["proxy"] for r in rows)
    measured = {r["layers"]: r["loss_r1"] for r in rows if r["loss_r1"] is not None}
    assert rows[0]["layers"] in measured and "0-0,3-4,5-5" in measured and len(measured) <= 2
    assert result["source_loss"] > 0 and all(v > 0 for v in measured.values())
    assert result["measure"] == {"windows": [4, 8], "tokens": 128}  # held out: the windows after calibration
    assert result["knees"] is not None and 0 < result["knees"][0] < result["knees"][1] < 6
    # a second run replaces its own output directory
    assert run(capsys, *args[:-4], "--out", out)[0] == 0


def test_budget_ranks_all_splits(setup, capsys):
    out = setup["root"] / "out_budget"
    rc, stdout, stderr = run(
        capsys, "--model", setup["src"], "--data", setup["data"], "--budget", "4", *FAST, "--out", out
    )
    assert rc == 0, stderr
    rows = json.loads((out / "selection.json").read_text())["candidates"]
    drops = [tuple(r["dropped"]) for r in rows]
    assert len(set(drops)) == len(drops) and all(len(d) == 2 for d in drops)
    # 3 block positions for each of (1,1,2), (1,2,1), (2,1,1), folded by the layers they drop
    assert sum(1 + len(r["equivalent"]) for r in rows) == 3 * 3
    assert any(r["paper_rule"] for r in rows) and "splits with the same drops" in stdout


def test_gguf_source(setup, tmp_path, capsys):
    for name in ("gguf", "accelerate"):
        pytest.importorskip(name)
    from transformers import AutoTokenizer

    path = tmp_path / "g" / "tiny.gguf"
    write_tiny_gguf(path)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp_path / "tok")
    docs = [" ".join(["the cat sat on the mat in the sun"] * 4)] * 40
    data = prepare_dir(
        tmp_path / "data", [write_jsonl(tmp_path / "c.jsonl", docs)], tmp_path / "tok", "--val-fraction", "0.5"
    )
    args = ["--data", data, "--shape", "1,1,1", *FAST, "--out", tmp_path / "out"]
    rc, stdout, stderr = run(capsys, "--model", path.parent, "--gguf-file", path.name, *args)
    assert rc == 0, stderr
    assert "--gguf-file tiny.gguf --layers" in stdout
    assert len(json.loads((tmp_path / "out" / "selection.json").read_text())["metrics"]["block_influence"]) == 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--shape", "3,3,3"], "needs 9 layers but the source model has 6"),
        (["--shape", "1,2"], "--shape must be three integers"),
        (["--shape", "0,2,2"], "prelude size must be a positive integer"),
        (["--budget", "7"], "--budget 7 is larger than the source model's 6 layers"),
        (["--budget", "2"], "--budget must be at least 3"),
        (["--shape", "1,2,1", "--calibration-tokens", "100000"], "lower --calibration-tokens"),
        (["--shape", "1,2,1", "--calibration-tokens", "8"], "must be at least --seq-len"),
        (["--shape", "1,2,1", "--seq-len", "4096"], "exceeds the model's max_position_embeddings 128"),
        (["--shape", "1,2,1", "--split", "test"], "no split 'test'"),
    ],
)
def test_bad_requests_exit_2_with_one_line(setup, capsys, extra, message):
    rc, _, stderr = run(
        capsys, "--model", setup["src"], "--data", setup["data"], *FAST, *extra, "--out", setup["root"] / "never"
    )
    assert rc == 2 and message in stderr and stderr.count("\n") == 1, stderr
    assert not (setup["root"] / "never").exists()


def test_bad_inputs_exit_2(setup, capsys, tmp_path):
    base = ["--shape", "1,2,1", *FAST]
    rc, _, stderr = run(capsys, "--model", setup["src"], "--data", tmp_path / "nope", *base, "--out", tmp_path / "o")
    assert rc == 2 and "no manifest found" in stderr
    rc, _, stderr = run(capsys, "--model", setup["src"], "--data", setup["other"], *base, "--out", tmp_path / "o")
    assert rc == 2 and "data/tokenizer vocab mismatch" in stderr and "vocab_size 117" in stderr
    rc, _, stderr = run(capsys, "--model", setup["src"], "--data", setup["chat"], *base, "--out", tmp_path / "o")
    assert rc == 2 and "data/tokenizer vocab mismatch" in stderr and "hash" in stderr
    lenient = ["--model", setup["src"], "--data", setup["chat"], *base, "--allow-tokenizer-mismatch"]
    assert run(capsys, *lenient, "--out", tmp_path / "o")[0] == 0  # ids fit the vocabulary: allowed on request
    rc, _, stderr = run(capsys, "--model", tmp_path / "none", "--data", setup["data"], *base, "--out", tmp_path / "o")
    assert rc == 2 and "does not exist" in stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    rc, _, stderr = run(capsys, "--model", setup["src"], "--data", setup["data"], *base, "--out", tmp_path / "busy")
    assert rc == 2 and "exists and is not empty" in stderr and (tmp_path / "busy" / "keep.txt").exists()


def test_help_prints(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--budget" in capsys.readouterr().out
