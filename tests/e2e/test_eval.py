"""`python -m retro.eval` end to end on tiny local models with a character tokenizer (no downloads)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from tiny import save_source
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from retro.convert import convert
from retro.eval import main, parse_recurrences
from retro.inference.gsm8k import GSM8K_EXEMPLARS

GSM8K_ROWS = [
    {
        "question": f"Ann has {a} apples and buys {b} more. How many apples does she have?",
        "answer": f"{a} + {b} = {a + b}\n#### {a + b}",
    }
    for a, b in [(2, 3), (10, 5), (7, 1), (1200, 34), (6, 6)]
]
MATH_ROWS = [
    {
        "problem": f"Compute ${a} + {a}$.",
        "solution": f"We add: ${a} + {a} = \\boxed{{{2 * a}}}$.",
        "answer": str(2 * a),
        "subject": "Algebra" if a % 2 else "Prealgebra",
    }
    for a in range(1, 6)
]


def char_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, ids 0-3 for pad/bos/eos/unk (the tiny models' ids);
    pad=False: no pad token (Llama-2/3 style), id 0 unused."""
    chars = sorted(set(string.printable) - set("\x0b\x0c\r\t"))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    if not pad:
        del vocab["<pad>"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        **({"pad_token": "<pad>"} if pad else {}),
    )


def tiny_models(root: Path) -> dict[str, Path]:
    """A recurrent (1,2,1) and a static checkpoint from one tiny Llama, each with the tokenizer."""
    save_source(root / "src", "llama", vocab_size=128, max_position_embeddings=1024)
    char_tokenizer().save_pretrained(root / "src")
    out = {"recurrent": root / "recurrent", "static": root / "static"}
    convert(root / "src", out["recurrent"], shape=(1, 2, 1), adapter_init="default", state_init="zeros")
    convert(root / "src", out["static"], static=True)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    paths = tiny_models(root)
    for name, rows in (("gsm8k", GSM8K_ROWS), ("math", MATH_ROWS)):
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def line_shards(setup, tmp_path: Path, lines: int) -> Path:
    """Shards of numbered lines (half of them the val split), tokenized with the recurrent model's tokenizer."""
    from retro.data.prepare import main as prepare_main

    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"Line {i}: the cat sat on mat number {i * 7}.\n" for i in range(lines)))
    shards = tmp_path / "shards"
    prepare = ["--input", text, "--tokenizer", setup["recurrent"], "--out", shards, "--val-fraction", "0.5"]
    assert prepare_main([str(a) for a in [*prepare, "--quiet"]]) == 0
    return shards


def run_eval(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def lm_eval_gsm8k(completion: str, reference: str) -> dict:
    """lm-eval's filters and exact_match, configured from the shipped YAML, on one completion (the oracle)."""
    import yaml
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.filters.selection import TakeFirstFilter

    from retro.inference.task_base import LM_EVAL_TASKS_DIR

    config = yaml.safe_load((LM_EVAL_TASKS_DIR / "gsm8k_cot_sean.yaml").read_text())
    options = {
        k: v for k, v in config["metric_list"][0].items() if k not in ("metric", "aggregation", "higher_is_better")
    }
    out = {}
    for pipeline in config["filter_list"]:
        regex = pipeline["filter"][0]
        resps = RegexFilter(regex["regex_pattern"], regex.get("group_select", 0)).apply([[completion]], [{}])
        value = list(TakeFirstFilter().apply(resps, [{}]))[0]
        out[pipeline["name"]] = (value, bool(exact_match_hf_evaluate([value], [reference], **options)["exact_match"]))
    return out


def one_shot_gsm8k_prompt(question: str) -> str:
    q, target = GSM8K_EXEMPLARS[0]
    return f"Q: {q}\nA: Let's think step by step. {target}\n\nQ: {question}\nA: Let's think step by step."


def test_gsm8k_two_models_writes_json_table_plot(setup, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err = run_eval(
        capsys,
        "--model",
        setup["recurrent"],
        "--model",
        setup["static"],
        "--task",
        "gsm8k",
        "--data",
        setup["gsm8k"],
        "--recurrences",
        "2,1",
        "--max-new-tokens",
        "10",
        "--batch-size",
        "2",
        "--out",
        out,
    )
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text())
    metrics = ["strict-match", "flexible-extract", "flexible-numeric"]
    assert results["metrics"] == metrics
    assert results["settings"]["add_bos"] is True and results["settings"]["max_length"] == 1024
    rec, static = results["models"]
    assert (rec["static"], static["static"]) == (False, True)
    assert [run["recurrences"] for run in rec["runs"]] == [1, 2] and [run["recurrences"] for run in static["runs"]] == [
        None
    ]
    for model in results["models"]:
        for run in model["runs"]:
            assert run["n"] == 5 and [e["index"] for e in run["examples"]] == list(range(5))
            for e in run["examples"]:
                row = GSM8K_ROWS[e["index"]]
                assert e["prompt"] == one_shot_gsm8k_prompt(row["question"])  # the full prompt, as --log_samples
                assert e["prompt_tokens"] == len(e["prompt"]) + 1 and e["truncated"] is False  # chars + BOS
                assert e["reference"] == row["answer"].split("#### ")[1]  # lm-eval's target: '1,234' stays
                for name, (value, correct) in lm_eval_gsm8k(e["completion"], e["reference"]).items():
                    assert (e[f"{name}_answer"], e[name]) == (value, correct)
                assert 1 <= e["tokens"] <= 10
            for metric in metrics:
                assert run["metrics"][metric] == sum(e[metric] for e in run["examples"]) / 5
    assert [run["mean_passes"] for run in rec["runs"]] == [1.0, 2.0]
    table = (out / "results.md").read_text().splitlines()
    assert (
        table[0] == "| model | r | exit | mean passes | strict-match (%) | flexible-extract (%) | flexible-numeric (%) "
        "| n | tok/s |"
    )
    assert len(table) == 2 + 3 and "| static | static |" in table[-1]
    assert (out / "gsm8k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "recurrent  r=2" in stdout


@pytest.fixture(scope="module")
def no_pad_model(setup, tmp_path_factory):
    """The recurrent checkpoint with a tokenizer that has no pad token (as Llama-2/3 ship)."""
    import shutil

    path = tmp_path_factory.mktemp("nopad") / "recurrent"
    shutil.copytree(setup["recurrent"], path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    char_tokenizer(pad=False).save_pretrained(path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(path).pad_token is None
    return path


def test_tokenizer_without_pad_token(setup, no_pad_model, tmp_path, capsys):
    """Used to fail with 'Asking to pad but the tokenizer does not have a padding token' at any batch size."""
    texts = {}
    for bs in (1, 3):
        rc, _, err = run_eval(
            capsys,
            *("--model", no_pad_model, "--task", "gsm8k", "--data", setup["gsm8k"], "--recurrences", "2"),
            *("--max-new-tokens", "6", "--batch-size", bs, "--out", tmp_path / str(bs)),
        )
        assert rc == 0, err
        run = json.loads((tmp_path / str(bs) / "results.json").read_text())["models"][0]["runs"][0]
        texts[bs] = [e["completion"] for e in run["examples"]]
    # The padded tokenizer gives the same ids for these prompts, so the same completions.
    rc, _, err = run_eval(
        capsys,
        *("--model", setup["recurrent"], "--task", "gsm8k", "--data", setup["gsm8k"], "--recurrences", "2"),
        *("--max-new-tokens", "6", "--batch-size", "3", "--out", tmp_path / "pad"),
    )
    assert rc == 0, err
    padded = json.loads((tmp_path / "pad" / "results.json").read_text())["models"][0]["runs"][0]
    assert texts[1] == texts[3] == [e["completion"] for e in padded["examples"]]


def test_long_prompts_are_left_truncated(setup, tmp_path, capsys):
    """--max-length bounds prompt + generation: prompts keep their last (max-length - max-new-tokens) tokens."""
    rc, _, err = run_eval(
        capsys,
        *("--model", setup["recurrent"], "--task", "gsm8k", "--data", setup["gsm8k"], "--recurrences", "1"),
        *("--max-new-tokens", "4", "--max-length", "104", "--out", tmp_path / "o"),
    )
    assert rc == 0, err
    run = json.loads((tmp_path / "o" / "results.json").read_text())["models"][0]["runs"][0]
    assert all(e["truncated"] and e["prompt_tokens"] == 100 for e in run["examples"])
    rc, _, err = run_eval(
        capsys,
        *("--model", setup["recurrent"], "--task", "gsm8k", "--data", setup["gsm8k"], "--recurrences", "1"),
        *("--max-new-tokens", "4", "--max-length", "4", "--out", tmp_path / "bad"),
    )
    assert rc == 2 and "must exceed --max-new-tokens" in err


def test_batch_size_does_not_change_completions(setup, tmp_path, capsys):
    """Left padding is masked: batch of 5 and one-by-one give the same text (deterministic s0)."""
    texts = []
    for bs in (1, 5):
        rc, _, err = run_eval(
            capsys,
            "--model",
            setup["recurrent"],
            "--task",
            "gsm8k",
            "--data",
            setup["gsm8k"],
            "--recurrences",
            "3",
            "--max-new-tokens",
            "8",
            "--fewshot",
            "0",
            "--batch-size",
            bs,
            "--out",
            tmp_path / str(bs),
        )
        assert rc == 0, err
        run = json.loads((tmp_path / str(bs) / "results.json").read_text())["models"][0]["runs"][0]
        texts.append([e["completion"] for e in run["examples"]])
    assert texts[0] == texts[1]


def test_depth_batching_gives_one_by_one_completions(setup, tmp_path, capsys):
    """--depth-batching (2 rows fed from a queue of 5 prompts, read out together) gives each example the
    completion, token count and mean passes of one-by-one decoding, for an exit rule and fixed r; the static model
    decodes as without it."""
    runs = {}
    depth = ["--batch-size", "2", "--depth-batching", "--readout-share", "1"]
    for name, extra in (("single", ["--batch-size", "1"]), ("depth", depth)):
        out = tmp_path / name
        rc, _, err = run_eval(
            capsys,
            *("--model", setup["recurrent"], "--model", setup["static"], "--task", "gsm8k", "--data", setup["gsm8k"]),
            *("--recurrences", "6", "--max-new-tokens", "10", "--fewshot", "0", "--adaptive-exit", "kl:1e-3,fixed"),
            *extra,
            *("--out", out),
        )
        assert rc == 0, err
        results = json.loads((out / "results.json").read_text())
        runs[name] = [
            [(e["completion"], e["tokens"], pytest.approx(e["mean_passes"], rel=1e-6)) for e in run["examples"]]
            for model in results["models"]
            for run in model["runs"]
        ]
    assert runs["depth"] == runs["single"] and len(runs["depth"]) == 3
    assert min(p.expected for _, _, p in runs["depth"][0]) < 6  # the rule did exit early


def test_math_with_adaptive_exit(setup, tmp_path, capsys):
    from datasets import Dataset
    from lm_eval.tasks.minerva_math import utils

    out = tmp_path / "math"
    rc, _, err = run_eval(
        capsys,
        "--model",
        setup["recurrent"],
        "--task",
        "math",
        "--data",
        setup["math"],
        "--recurrences",
        "8",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "5",
        "--adaptive-exit",
        "1e-3",
        "--out",
        out,
    )
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text())
    run = results["models"][0]["runs"][0]
    assert results["metrics"] == ["exact_match", "math_verify", "boxed-lenient"] and run["recurrences"] == 8
    assert 2 <= run["mean_passes"] < 8
    docs = list(utils.process_docs(Dataset.from_list(MATH_ROWS)))  # lm-eval's minerva_math is the oracle
    for e in run["examples"]:
        assert e["prompt"].startswith("Problem:\nFind the domain") and e["prompt"].endswith(
            f"Problem:\n{MATH_ROWS[e['index']]['problem']}\n\nSolution:"
        )
        assert e["reference"] == docs[e["index"]]["answer"] and e["subject"] == MATH_ROWS[e["index"]]["subject"]
        theirs = utils.process_results(docs[e["index"]], [e["completion"]])
        assert (e["exact_match"], e["math_verify"]) == (bool(theirs["exact_match"]), bool(theirs["math_verify"]))
    # Per-subject means, and the overall mean is their size-weighted mean (lm-eval's minerva_math group).
    subjects = run["subjects"]
    assert {s: v["n"] for s, v in subjects.items()} == {"Algebra": 3, "Prealgebra": 2}
    for metric in results["metrics"]:
        weighted = sum(v[metric] * v["n"] for v in subjects.values()) / 5
        assert run["metrics"][metric] == pytest.approx(weighted)
    assert (out / "math.png").is_file()


def test_exit_rules_with_fixed_r_beside(setup, tmp_path, capsys):
    """--adaptive-exit takes {kl,state,entropy}:T rules and 'fixed'; each r runs once per rule, with the rule, the
    mean passes and tokens/s recorded, plotted against mean passes; --adaptive-min-r holds every decoded token to
    at least that many passes (kl:1e9 exits at the first allowed pass: exactly 3 here)."""
    out = tmp_path / "rules"
    argv = ["--model", setup["recurrent"], "--model", setup["static"], "--task", "gsm8k", "--data", setup["gsm8k"]]
    rc, stdout, err = run_eval(
        capsys,
        *argv,
        *("--recurrences", "4", "--max-new-tokens", "6", "--batch-size", "5"),
        *("--adaptive-exit", "kl:1e9,fixed", "--adaptive-min-r", "3", "--out", out),
    )
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text())
    adaptive, fixed = results["models"][0]["runs"]
    assert (adaptive["exit"], fixed["exit"]) == ("kl:1e+09:min3", None)
    assert fixed["mean_passes"] == 4.0 and adaptive["tokens_per_s"] > 0 and fixed["tokens_per_s"] > 0
    for e in adaptive["examples"]:  # the first token comes from the prompt (4 passes), each later one exits at 3
        assert e["mean_passes"] == pytest.approx((4 + 3 * (e["tokens"] - 1)) / e["tokens"])
    assert len(results["models"][1]["runs"]) == 1 and results["models"][1]["runs"][0]["exit"] is None
    table = (out / "results.md").read_text()
    assert "| recurrent | 4 | kl:1e+09:min3 |" in table and "| recurrent | 4 | fixed | 4.00 |" in table
    assert "exit kl:1e+09:min3" in stdout and (out / "gsm8k.png").is_file()


def test_loss_under_adaptive_exit(setup, tmp_path, capsys):
    """--task loss with exit rules decodes each row token by token: a rule that never exits (kl:0) gives the
    fixed-r loss of one forward, a rule that always exits uses 2 passes per token after the first."""
    shards = line_shards(setup, tmp_path, 40)
    out = tmp_path / "loss"
    rc, _, err = run_eval(
        capsys,
        *("--model", setup["recurrent"], "--task", "loss", "--data", shards, "--recurrences", "3"),
        *("--seq-len", "16", "--batch-size", "2", "--limit", "2", "--adaptive-exit", "fixed,kl:0,kl:1e9"),
        *("--out", out),
    )
    assert rc == 0, err
    fixed, never, always = json.loads((out / "results.json").read_text())["models"][0]["runs"]
    assert never["metrics"]["loss"] == pytest.approx(fixed["metrics"]["loss"], rel=1e-5)
    assert never["mean_passes"] == 3.0 and never["tokens"] == fixed["tokens"] == 2 * 2 * 16
    assert always["mean_passes"] == pytest.approx((3 + 2 * 15) / 16)
    assert always["metrics"]["loss"] != pytest.approx(fixed["metrics"]["loss"], rel=1e-4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/missing.jsonl"], "missing.jsonl does not exist"),
        (["--data", "{wrong}"], "missing field(s) ['question']"),
        (["--recurrences", ""], "at least one positive integer"),
        (["--recurrences", "0,2"], "must be >= 1"),
        (["--recurrences", "1,x"], "comma-separated integers"),
        (["--model", "{tmp}/nomodel"], "nomodel has no config.json"),
        (["--fewshot", "9"], "--fewshot must be between 0 and"),
        (["--adaptive-exit", "depth:1"], "--adaptive-exit must be {kl,state,entropy}:THRESHOLD"),
        (["--adaptive-exit", "state:nan"], "finite state threshold >= 0, got nan"),
        (["--adaptive-exit", "kl:1", "--adaptive-min-r", "0"], "--adaptive-min-r must be >= 1"),
    ],
)
def test_bad_input_errors(setup, tmp_path, capsys, args, message):
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"problem": "x", "answer": "1"}) + "\n")
    defaults = {
        "--model": str(setup["recurrent"]),
        "--task": "gsm8k",
        "--data": str(setup["gsm8k"]),
        "--recurrences": "1",
    }
    given = dict(zip(args[::2], [a.format(tmp=tmp_path, wrong=wrong) for a in args[1::2]]))
    argv = [x for k, v in {**defaults, **given}.items() for x in (k, v)] + ["--out", str(tmp_path / "o")]
    rc, _, err = run_eval(capsys, *argv)
    assert rc == 2 and message in err
    assert not (tmp_path / "o").exists()


def test_parse_recurrences():
    assert parse_recurrences("8, 1,2,2") == [1, 2, 8]
    for bad in ("", " , ", "-1", "1.5"):
        with pytest.raises(ValueError):
            parse_recurrences(bad)


def test_validation_loss_on_prepared_shards(setup, tmp_path, capsys):
    """--task loss equals a direct token-weighted cross entropy over the same val windows, per r."""
    import torch

    from retro.data.loader import build_val_batches
    from retro.data.prepare import main as prepare_main
    from retro.model.modeling import RetroForCausalLM

    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"Line {i}: the cat sat on mat number {i * 7}.\n" for i in range(40)))
    shards = tmp_path / "shards"
    assert (
        prepare_main(
            [
                "--input",
                str(text),
                "--tokenizer",
                str(setup["recurrent"]),
                "--out",
                str(shards),
                "--val-fraction",
                "0.5",
                "--quiet",
            ]
        )
        == 0
    )
    out = tmp_path / "loss"
    rc, _, err = run_eval(
        capsys,
        "--model",
        setup["recurrent"],
        "--model",
        setup["static"],
        "--task",
        "loss",
        "--data",
        shards,
        "--recurrences",
        "1,3",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--limit",
        "3",
        "--out",
        out,
    )
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text())
    model = RetroForCausalLM.from_pretrained(setup["recurrent"]).eval()
    for run in results["models"][0]["runs"]:
        total = count = 0.0
        with torch.no_grad():
            for batch in build_val_batches(shards, 32, 2, 0, 1, 3):
                logits = model(batch["input_ids"], num_recurrences=run["recurrences"]).logits
                total += float(
                    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
                )
                count += batch["labels"].numel()
        assert run["tokens"] == count == 3 * 2 * 32
        assert run["metrics"]["loss"] == pytest.approx(total / count, rel=1e-5)
    losses = [run["metrics"]["loss"] for run in results["models"][0]["runs"]]
    assert losses[0] != pytest.approx(losses[1], rel=1e-4)
    assert results["models"][1]["static"] and len(results["models"][1]["runs"]) == 1
    assert (out / "loss.png").is_file() and "| static | static |" in (out / "results.md").read_text()


def test_loss_task_needs_a_shard_directory(setup, tmp_path, capsys):
    rc, _, err = run_eval(
        capsys, "--model", setup["recurrent"], "--task", "loss", "--data", setup["gsm8k"], "--out", tmp_path / "o"
    )
    assert rc == 2 and "not a directory" in err


def test_adaptive_exit_benchmark_on_a_model_and_its_shards(setup, tmp_path):
    """benchmarks.adaptive_exit --model/--data (the SmolLM2 measurement's path) on the tiny model: a rule that
    never exits (kl:0) has fixed r_max's loss and tokens, the sweep runs each share, the report renders."""
    from benchmarks.adaptive_exit import main as bench_main
    from benchmarks.adaptive_exit import markdown

    shards = line_shards(setup, tmp_path, 60)
    out = tmp_path / "bench"
    argv = ["--model", setup["recurrent"], "--data", shards, "--r-max", "3", "--fixed", "1,3", "--rules", "kl:0"]
    argv += ["--seq-len", "16", "--val-rows", "2", "--val-batches", "2", "--prompt-len", "4", "--gen-tokens", "3"]
    argv += ["--agree-prompts", "4", "--speed-prompts", "4", "--repeats", "1", "--share-sweep", "kl:0"]
    argv += ["--sweep-shares", "0,1", "--out", out]
    assert bench_main([str(a) for a in argv]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {row["config"]: row for row in results["rows"]}
    never, fixed = rows["kl:0 (r<=3)"], rows["fixed r=3"]
    assert never["loss"] == pytest.approx(fixed["loss"], rel=1e-6) and never["mean_passes"] == 3
    assert never["agreement"] == fixed["agreement"] == 1.0
    assert rows["fixed r=1"]["mean_passes"] == 1 and rows["fixed r=1"]["loss"] != fixed["loss"]
    assert [s["share"] for s in results["share_sweep"]["shares"]] == [0.0, 1.0]
    assert (out / "results.md").read_text() == markdown(results) and (out / "quality.png").is_file()
