"""Hostile inputs to the command-line tools: each is refused with exit code 2 and one line naming the
file or key, and nothing but the requested output is ever written, replaced or deleted.

Every test snapshots the whole working folder (paths and SHA-256 of every file) before the command
and compares after it: a refused command must leave it exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from data_helpers import prepare_dir, random_docs, reversed_word_tokenizer, word_tokenizer, write_jsonl
from tiny import save_source

from retro.convert import main as convert_main
from retro.data.manifest import MANIFEST_NAME
from retro.data.prepare import main as prepare_main
from retro.eval import main as eval_main
from retro.export import main as export_main
from retro.train import main as train_main

REPO = Path(__file__).resolve().parents[2]
NUM_WORDS = 95  # + [UNK], [EOS] = 97 = the tiny source model's vocabulary
STEP = "step_00000002"


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """{relative path: SHA-256 of a file, or 'dir'} for everything under root except `skip`."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def error_line(err: str, tool: str) -> str:
    """The one error line a refused command printed (and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith(f"{tool}: error: "), err
    return lines[0]


def refused(main, argv: list[str], capsys, tool: str, root: Path) -> str:
    """Run a CLI in-process; it must exit 2 with one error line and leave `root` untouched."""
    before = snapshot(root)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert snapshot(root) == before, "a refused command changed files"
    return error_line(err, tool)


def run_cli(module: str, argv: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, argv)], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


# --- shared, read-only assets; each test works on its own copy ---------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """tok/ (word tokenizer), src/ (tiny Llama with the tokenizer), model/ (converted), run/ (a fake run
    whose one checkpoint holds the converted model's weights, as `retro.train` would lay it out)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from retro.convert import convert
    from retro.model.config import RetroConfig
    from retro.model.modeling import RetroForCausalLM

    root = tmp_path_factory.mktemp("hostile")
    tok = word_tokenizer(root / "tok", NUM_WORDS)
    save_source(root / "src", "llama", eos_token_id=1)
    for name in os.listdir(tok):
        shutil.copy2(tok / name, root / "src" / name)
    convert(root / "src", root / "model", shape=(1, 2, 1))
    config = RetroConfig.from_pretrained(root / "model")
    run = root / "run"
    config.save_pretrained(run / "model_config")
    ckpt = run / "checkpoints" / STEP
    with warnings.catch_warnings():  # "no process group: saving in a single process" is the intent here
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": get_model_state_dict(RetroForCausalLM(config))}, checkpoint_id=str(ckpt))
    (ckpt / "COMPLETE").write_text("{}")
    write_jsonl(root / "corpus.jsonl", random_docs(40, NUM_WORDS, seed=1))
    return root


@pytest.fixture
def work(assets, tmp_path) -> Path:
    """A private copy of the assets; run/config.json names the copy's model as model.path."""
    root = tmp_path / "work"
    shutil.copytree(assets, root)
    set_model_path(root / "run", root / "model")
    return root


def set_model_path(run: Path, model: Path | str) -> None:
    (run / "config.json").write_text(json.dumps({"model": {"path": str(model)}, "recurrence": {"max_mean": 2.5}}))


# --- retro.convert ----------------------------------------------------------------------------------
def drop_tensor(src: Path, dst: Path, name: str) -> Path:
    """A copy of checkpoint `src` whose weights lack tensor `name` (fails late, while building)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    del tensors[name]
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_convert_force_failure_keeps_previous_output(work, capsys):
    out = work / "out"
    assert convert_main(["--model", str(work / "src"), "--out", str(out), "--shape", "1,2,1"]) == 0
    broken = drop_tensor(work / "src", work / "broken", "model.norm.weight")
    capsys.readouterr()
    line = refused(
        convert_main, ["--model", broken, "--out", out, "--shape", "1,2,1", "--force"], capsys, "retro.convert", work
    )
    assert "model.norm.weight" in line


@pytest.mark.parametrize("where", ["model", "parent", "inside"])
def test_convert_out_overlapping_model_is_refused(work, capsys, where):
    model = work / "src"
    out = {"model": model, "parent": work, "inside": model / "retro"}[where]
    line = refused(
        convert_main, ["--model", model, "--out", out, "--shape", "1,2,1", "--force"], capsys, "retro.convert", work
    )
    assert str(model) in line and "--out" in line


def test_convert_out_is_a_file(work, capsys):
    (work / "out.txt").write_text("not a directory")
    line = refused(
        convert_main, ["--model", work / "src", "--out", work / "out.txt", "--static"], capsys, "retro.convert", work
    )
    assert "out.txt" in line and "not a directory" in line


def test_convert_truncated_safetensors_cli(work):
    """Through the real CLI: one line, exit 2, the file named; nothing written."""
    weights = work / "src" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = snapshot(work)
    result = run_cli("retro.convert", ["--model", work / "src", "--out", work / "out", "--shape", "1,2,1"])
    assert result.returncode == 2, result.stderr
    assert snapshot(work) == before
    line = error_line(result.stderr, "retro.convert")
    assert str(weights) in line and "truncated or corrupted" in line
    assert result.stderr.strip() == line


def test_convert_truncated_shard_of_an_index(work, capsys):
    """A sharded source: the damaged shard (not the first) is named."""
    import torch

    from retro.hf.weights import SINGLE_NAME, WeightReader, save_sharded

    src = work / "src"
    tensors = {name: WeightReader(src).get(name) for name in WeightReader(src).file_of}
    (src / SINGLE_NAME).unlink()
    paths = save_sharded(tensors, src, max_shard_bytes=sum(t.numel() * 4 for t in tensors.values() if t.dim()) // 3)
    assert len(paths) >= 3 and all(t.dtype == torch.float32 for t in tensors.values())
    shard = paths[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    line = refused(
        convert_main, ["--model", src, "--out", work / "out", "--shape", "1,2,1"], capsys, "retro.convert", work
    )
    assert str(shard) in line and "truncated or corrupted" in line


def test_convert_layers_out_of_order(work, capsys):
    argv = ["--model", work / "src", "--out", work / "out", "--layers", "4-5,2-3,0-1"]
    line = refused(convert_main, argv, capsys, "retro.convert", work)
    assert "--layers" in line and "block" in line and "after the prelude" in line


# --- retro.data.prepare -----------------------------------------------------------------------------
def prepare_args(work: Path, inputs: list[Path], out: Path, *extra: str) -> list:
    return ["--input", *inputs, "--tokenizer", work / "tok", "--out", out, "--quiet", "--val-fraction", "0", *extra]


def test_prepare_overwrite_refuses_a_directory_that_is_not_shards(work, capsys):
    out = work / "notes"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    line = refused(
        prepare_main,
        prepare_args(work, [work / "corpus.jsonl"], out, "--overwrite"),
        capsys,
        "retro.data.prepare",
        work,
    )
    assert str(out) in line and MANIFEST_NAME in line


def test_prepare_overwrite_refuses_a_foreign_manifest(work, capsys):
    out = work / "webapp"
    out.mkdir()
    (out / MANIFEST_NAME).write_text(json.dumps({"name": "my app"}))
    line = refused(
        prepare_main,
        prepare_args(work, [work / "corpus.jsonl"], out, "--overwrite"),
        capsys,
        "retro.data.prepare",
        work,
    )
    assert str(out) in line


def test_prepare_overwrite_replaces_empty_and_shard_directories(work, capsys):
    out = work / "shards"
    out.mkdir()
    before = snapshot(work, skip=out)
    for _ in range(2):  # an empty directory, then the shard directory the first run wrote
        assert prepare_main([str(a) for a in prepare_args(work, [work / "corpus.jsonl"], out, "--overwrite")]) == 0
        assert (out / MANIFEST_NAME).is_file() and snapshot(work, skip=out) == before
    capsys.readouterr()


def test_prepare_refuses_out_containing_an_input(work, capsys):
    out = work / "shards"
    assert prepare_main([str(a) for a in prepare_args(work, [work / "corpus.jsonl"], out)]) == 0
    shutil.copy2(work / "corpus.jsonl", out / "more.jsonl")  # an input kept inside an old shard directory
    capsys.readouterr()
    line = refused(
        prepare_main, prepare_args(work, [out / "more.jsonl"], out, "--overwrite"), capsys, "retro.data.prepare", work
    )
    assert str(out / "more.jsonl") in line and "inside --out" in line


@pytest.mark.parametrize("overwrite", [False, True])
def test_prepare_out_is_a_file(work, capsys, overwrite):
    (work / "out.bin").write_bytes(b"\0" * 10)
    argv = prepare_args(work, [work / "corpus.jsonl"], work / "out.bin", *(["--overwrite"] if overwrite else []))
    line = refused(prepare_main, argv, capsys, "retro.data.prepare", work)
    assert "out.bin" in line and "not a directory" in line


BAD_INPUTS = {
    "not_string.jsonl": (b'{"text": "w1 w2"}\n{"text": 5}\n', "row 1", "'text' is int, not a string"),
    "list.jsonl": (b'{"text": "w1 w2"}\n{"text": ["w1"]}\n', "row 1", "'text' is list, not a string"),
    "bad_json.jsonl": (b'{"text": "w1 w2"}\n{"text": "w3"}\n{"text": "w4\n', "line 3", "invalid JSON"),
    "bad_utf8.jsonl": (b'{"text": "w1 w2"}\n{"text": "w3 \xff\xfe"}\n', "line 2", "invalid UTF-8"),
    "bad_utf8.txt": (b"w1 w2\nw3\nw4 \xff\n", "line 3", "invalid UTF-8"),
    "array.json": (b'[{"text": "w1"},\n {"text": "w2"},\n {"text": w3}]\n', "line 3", "invalid JSON"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_prepare_bad_input_named(work, capsys, name):
    content, where, what = BAD_INPUTS[name]
    (work / name).write_bytes(content)
    line = refused(prepare_main, prepare_args(work, [work / name], work / "out"), capsys, "retro.data.prepare", work)
    assert f"{work / name}: {where}" in line and what in line


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "a_file"])
def test_prepare_bad_tokenizer_path(work, capsys, kind):
    bad = work / "tok_bad"
    if kind == "empty_dir":
        bad.mkdir()
    elif kind == "a_file":
        bad.write_text("{}")
    argv = prepare_args(work, [work / "corpus.jsonl"], work / "out")
    argv[argv.index("--tokenizer") + 1] = bad
    line = refused(prepare_main, argv, capsys, "retro.data.prepare", work)
    assert f"--tokenizer {bad}" in line


def test_prepare_bad_input_cli_one_line(work):
    """Through the real CLI (datasets' own error log included): exactly one line on stderr, exit 2."""
    bad = work / "bad.jsonl"
    bad.write_bytes(BAD_INPUTS["bad_json.jsonl"][0])
    before = snapshot(work)
    result = run_cli("retro.data.prepare", prepare_args(work, [bad], work / "out"))
    assert result.returncode == 2, result.stderr
    assert snapshot(work) == before
    assert result.stderr.strip() == error_line(result.stderr, "retro.data.prepare")
    assert f"{bad}: line 3: invalid JSON" in result.stderr


# --- retro.export -----------------------------------------------------------------------------------
def test_export_into_its_own_run_is_refused(work, capsys):
    run = work / "run"
    line = refused(export_main, [run, "--out", run, "--force"], capsys, "retro.export", work)
    assert str(run) in line and "run directory" in line
    assert export_main([str(run), "--out", str(work / "hf")]) == 0  # the run is still exportable
    capsys.readouterr()


@pytest.mark.parametrize("where", ["inside", "checkpoint", "parent", "model"])
def test_export_out_overlapping_run_or_model_is_refused(work, capsys, where):
    run = work / "run"
    out = {
        "inside": run / "hf",
        "checkpoint": run / "checkpoints" / STEP,
        "parent": work,
        "model": work / "model",
    }[where]
    line = refused(export_main, [run, "--out", out, "--force"], capsys, "retro.export", work)
    assert "--out" in line and (str(run) in line or str(work / "model") in line)


def test_export_checkpoint_moved_out_of_its_run(work, capsys):
    moved = work / "saved" / STEP
    shutil.copytree(work / "run" / "checkpoints" / STEP, moved)
    line = refused(export_main, [moved, "--out", work / "hf"], capsys, "retro.export", work)
    assert str(moved) in line and "run directory" in line


def test_export_overwritten_run_config_is_named(work, capsys):
    (work / "run" / "config.json").write_text(json.dumps({"model_type": "retro"}))  # what --out RUN did
    line = refused(export_main, [work / "run", "--out", work / "hf"], capsys, "retro.export", work)
    assert str(work / "run" / "config.json") in line and "recurrence" in line


@pytest.mark.parametrize("kind", ["missing", "no_tokenizer_files"])
def test_export_missing_tokenizer_source(work, capsys, kind):
    model = work / "model"
    if kind == "missing":
        shutil.rmtree(model)
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (model / name).unlink()
    line = refused(export_main, [work / "run", "--out", work / "hf"], capsys, "retro.export", work)
    assert str(model) in line and "tokenizer" in line and "--tokenizer" in line
    # --tokenizer names another source; the export then carries its files
    assert export_main([str(work / "run"), "--out", str(work / "hf"), "--tokenizer", str(work / "tok")]) == 0
    assert (work / "hf" / "tokenizer.json").read_bytes() == (work / "tok" / "tokenizer.json").read_bytes()
    capsys.readouterr()


def test_export_out_is_a_file(work, capsys):
    (work / "hf").write_text("x")
    line = refused(export_main, [work / "run", "--out", work / "hf", "--force"], capsys, "retro.export", work)
    assert str(work / "hf") in line and "not a directory" in line


def test_export_force_replaces_only_its_output(work, capsys):
    out = work / "hf"
    out.mkdir()
    (out / "stale.bin").write_text("old")
    before = snapshot(work, skip=out)
    assert export_main([str(work / "run"), "--out", str(out), "--force"]) == 0
    assert not (out / "stale.bin").exists() and (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert snapshot(work, skip=out) == before
    capsys.readouterr()


# --- retro.train: start-up checks (refused before any weight is read or file written) -----------------
def train_args(work: Path, *extra: str) -> list[str]:
    """The converted model, a data source that is never opened (the checks come first), a fresh out_dir."""
    return [
        f"--model.path={work / 'model'}",
        f"--data.train={work / 'data'}",
        f"--train.out_dir={work / 'out'}",
        *extra,
    ]


@pytest.mark.parametrize(
    "where, how, key",
    [("model", "is", "model.path"), ("model/run", "sits inside", "model.path"), (".", "contains", "model.path")],
)
def test_train_out_dir_overlapping_the_model_is_refused(work, capsys, where, how, key):
    """Used to replace the converted model's config.json with the job config and exit 0."""
    out = work / where
    line = refused(train_main, train_args(work, f"--train.out_dir={out}"), capsys, "retro.train", work)
    assert line.startswith(f"retro.train: error: train.out_dir = {out} ") and f" {how} {key} = {work / 'model'}" in line


def test_train_out_dir_inside_a_data_source_is_refused(work, capsys):
    (work / "data").mkdir()
    out = work / "data" / "run"
    line = refused(train_main, train_args(work, f"--train.out_dir={out}"), capsys, "retro.train", work)
    assert f"sits inside data.train = {work / 'data'}" in line


@pytest.mark.parametrize("where, how", [("run/sub", "sits inside"), ("runs", "contains")])
def test_train_out_dir_overlapping_another_run_is_refused(work, capsys, where, how):
    """Another run's directory (its config.json and checkpoints/) is not a place to train into, nor to hold."""
    shutil.copytree(work / "run", work / "runs" / "earlier")
    other = work / "run" if where == "run/sub" else work / "runs" / "earlier"
    line = refused(train_main, train_args(work, f"--train.out_dir={work / where}"), capsys, "retro.train", work)
    assert f"{how} the run directory {other}" in line


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--data.seq_len=129", "data.seq_len = 129 exceeds the model's ({model}) max_position_embeddings = 128"),
        ("--train.val_recurrences=[]", "train.val_recurrences must list a test recurrence or more"),
        ("--checkpoint.every=-1", "checkpoint.every must be >= 0"),
    ],
)
def test_train_start_up_values_are_refused(work, capsys, override, expected):
    """Each used to be accepted: a seq_len past the model's positions, no validation recurrence at all, and
    checkpoint.every = -1, which checkpointed every step."""
    line = refused(train_main, train_args(work, override), capsys, "retro.train", work)
    assert expected.format(model=work / "model") in line


# --- retro.eval -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(assets, tmp_path_factory) -> dict[str, Path]:
    """Prepared shards of the assets' corpus: own (the model's tokenizer), other (another tokenizer of the same
    size) and bigger (a larger vocabulary than the model's)."""
    root = tmp_path_factory.mktemp("shards")
    corpus, val = assets / "corpus.jsonl", ("--val-fraction", "0.5")
    wide = write_jsonl(root / "wide.jsonl", random_docs(40, NUM_WORDS + 50, seed=2))
    return {
        "own": prepare_dir(root / "own", [corpus], assets / "tok", *val),
        "other": prepare_dir(root / "other", [corpus], reversed_word_tokenizer(root / "other_tok", NUM_WORDS), *val),
        "bigger": prepare_dir(root / "bigger", [wide], word_tokenizer(root / "big_tok", NUM_WORDS + 50), *val),
    }


def loss_args(work: Path, data: Path, out: Path, *extra) -> list:
    return ["--model", work / "model", "--task", "loss", "--data", data, "--recurrences", "1", "--seq-len", "8"] + [
        *("--batch-size", "2", "--limit", "1", "--out", out, *extra)
    ]


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_eval_adaptive_exit_must_be_a_finite_threshold(work, capsys, value):
    """--adaptive-exit nan used to be accepted (no token ever exits)."""
    argv = ["--model", work / "model", "--task", "gsm8k", "--data", work / "corpus.jsonl", "--out", work / "ev"]
    line = refused(eval_main, [*argv, "--adaptive-exit", value], capsys, "retro.eval", work)
    assert f"--adaptive-exit must be a finite KL threshold >= 0, got {float(value)}" in line


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_eval_readout_share_must_be_a_share(work, capsys, value):
    argv = ["--model", work / "model", "--task", "gsm8k", "--data", work / "corpus.jsonl", "--out", work / "ev"]
    line = refused(eval_main, [*argv, "--depth-batching", "--readout-share", value], capsys, "retro.eval", work)
    assert f"--readout-share must be in [0, 1], got {float(value)}" in line


def test_eval_out_with_earlier_results_is_refused(work, capsys, shards):
    """Used to replace the earlier results without notice; the earlier results.json keeps its bytes."""
    out = work / "ev"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}')
    line = refused(eval_main, loss_args(work, shards["own"], out), capsys, "retro.eval", work)
    assert f"--out {out} is not empty" in line and "--force" in line


def test_eval_out_is_a_file(work, capsys, shards):
    (work / "ev").write_text("x")
    line = refused(eval_main, loss_args(work, shards["own"], work / "ev", "--force"), capsys, "retro.eval", work)
    assert f"--out {work / 'ev'} is a file" in line


def test_eval_force_replaces_the_results_whole_or_not_at_all(work, capsys, shards, monkeypatch):
    out = work / "ev"

    def leftovers() -> list[str]:
        return [p.name for p in work.iterdir() if p.name.startswith(".ev.")]

    assert eval_main([str(a) for a in loss_args(work, shards["own"], out)]) == 0  # new: the staging dir renamed
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "results.json", "results.md"] and not leftovers()
    (out / "notes.txt").write_text("mine")
    before = snapshot(work)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("retro.inference.plots.plot_results", crash)  # a crash after results.json was written
    with pytest.raises(OSError, match="disk full"):
        eval_main([str(a) for a in loss_args(work, shards["own"], out, "--force")])
    assert snapshot(work) == before and not leftovers()  # the earlier results, whole
    monkeypatch.undo()
    assert eval_main([str(a) for a in loss_args(work, shards["own"], out, "--force")]) == 0
    assert "--force" in json.loads((out / "results.json").read_text())["command"]
    assert (out / "notes.txt").read_text() == "mine" and not leftovers()
    capsys.readouterr()


@pytest.mark.parametrize("data", ["other", "bigger"])
def test_eval_loss_on_shards_of_another_tokenizer_is_refused(work, capsys, shards, monkeypatch, data):
    """other: the same vocabulary size, another hash (used to report a loss); bigger: ids past the model's
    vocabulary, now refused before the weights are read (the model's tokenizer files removed, so the
    vocabulary size is what is checked)."""

    def no_weights(*args, **kwargs):
        raise AssertionError("weights read before the shards were checked")

    monkeypatch.setattr("retro.inference.evaluate.load_model", no_weights)
    if data == "bigger":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (work / "model" / name).unlink()
    line = refused(eval_main, loss_args(work, shards[data], work / "ev"), capsys, "retro.eval", work)
    assert "data/tokenizer vocab mismatch" in line and str(shards[data]) in line
    assert (str(work / "model") in line) if data == "other" else ("the model's vocabulary has 97 entries" in line)


# --- launchers/local.sh -----------------------------------------------------------------------------
LOCAL = REPO / "launchers" / "local.sh"


def test_local_launcher_reports_the_workers_exit_code(tmp_path):
    """retro.train exits 2 on a bad config; torchrun would report 1, local.sh must report 2."""
    config = tmp_path / "bad.toml"
    config.write_text("[train]\nno_such_key = 1\n")
    env = {**os.environ, "RETRO_NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1"}
    before = snapshot(tmp_path)
    result = subprocess.run(
        ["bash", str(LOCAL), str(config)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "no_such_key" in result.stderr
    assert snapshot(tmp_path) == before  # the exit-code folder is cleaned up


def test_local_launcher_dry_run_runs_the_worker(tmp_path):
    """The command local.sh runs: torchrun on launchers/worker.py (which records each rank's exit code)."""
    config = tmp_path / "run.toml"
    config.write_text("")
    env = {**os.environ, "RETRO_NPROC_PER_NODE": "2"}
    result = subprocess.run(
        ["bash", str(LOCAL), "--dry-run", str(config), "--train.steps=3"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout.strip()) == [
        "torchrun",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        str(REPO / "launchers" / "worker.py"),
        "--config",
        str(config),
        "--train.steps=3",
        "--resume",
        "auto",
    ]


@pytest.mark.parametrize("where", ["model", "data"])
def test_eval_out_overlapping_an_input_is_refused(work, capsys, shards, where):
    """eval --out onto the evaluated model (with --force) or inside its data used to write results there."""
    data = work / "own"
    shutil.copytree(shards["own"], data)
    out = work / "model" if where == "model" else data / "results"
    line = refused(eval_main, loss_args(work, data, out, "--force"), capsys, "retro.eval", work)
    assert (f"--out {out} is --model" if where == "model" else f"--out {out} is inside --data") in line


def test_select_layers_out_inside_its_data_is_refused(work, capsys, shards):
    from retro.select_layers import main as select_main

    data = work / "own"
    shutil.copytree(shards["own"], data)
    argv = ["--model", work / "src", "--data", data, "--shape", "1,1,1", "--seq-len", "8", "--out", data / "sel"]
    line = refused(select_main, argv, capsys, "retro.select_layers", work)
    assert f"--out {data / 'sel'} is inside --data" in line


def test_prepare_out_inside_the_tokenizer_is_refused(work, capsys):
    out = work / "tok" / "shards"
    line = refused(prepare_main, prepare_args(work, [work / "corpus.jsonl"], out), capsys, "retro.data.prepare", work)
    assert f"--out {out} is inside --tokenizer" in line


# --- outputs onto a training run (probe round, issue 24) ---------------------------------------------
def test_no_command_writes_over_a_training_run_even_with_force(work, capsys):
    """convert --out RUN --force replaced a live run's checkpoints with a model; export --out OTHER_RUN --force
    deleted another run; prepare could write shards into RUN/checkpoints/step_N, which a save would delete."""
    run = work / "run"
    argv = ["--model", work / "src", "--shape", "1,2,1", "--out", run, "--force"]
    line = refused(convert_main, argv, capsys, "retro.convert", work)
    assert f"--out {run} is the training run directory {run}" in line
    shutil.copytree(run, work / "other_run")
    line = refused(export_main, [run, "--out", work / "other_run", "--force"], capsys, "retro.export", work)
    assert "is the training run directory" in line
    out = run / "checkpoints" / "step_00000099"
    line = refused(prepare_main, prepare_args(work, [work / "corpus.jsonl"], out), capsys, "retro.data.prepare", work)
    assert f"is inside the training run directory {run}" in line


def test_select_layers_keeps_a_folder_that_holds_more_than_its_selection(work, capsys, shards):
    """A folder with an earlier selection.json counted as --force and was replaced whole, notes and all."""
    from retro.select_layers import main as select_main

    out = work / "sel"
    out.mkdir()
    (out / "selection.json").write_text("{}")
    (out / "notes.md").write_text("mine")
    argv = ["--model", work / "src", "--data", shards["own"], "--shape", "1,1,1", "--seq-len", "8", "--out", out]
    line = refused(select_main, argv, capsys, "retro.select_layers", work)
    assert "not empty" in line and "--force" in line
