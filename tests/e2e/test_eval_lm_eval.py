"""lm-evaluation-harness on a tiny local retro checkpoint: local log-likelihood and generation tasks, and the
shipped gsm8k_cot_sean task through `python -m retro.lm_eval_model` against `python -m retro.eval`.

Needs the `[eval]` extra (CI installs it; these tests do not skip). Hub access is switched off: every task
reads local files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import huggingface_hub
import lm_eval.models.huggingface  # noqa: F401  (lm-eval with its HF backend, i.e. accelerate)
import pytest
import torch
import yaml
from test_eval import tiny_models

from retro.eval import main as retro_eval
from retro.inference.generate import GenerationSettings, generate_text
from retro.inference.task_base import LM_EVAL_TASKS_DIR


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub traffic: the env vars for subprocesses, the already-imported libraries' flags for this one."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


MC_DOCS = [
    {"question": f"{a} plus {a} is", "choices": [f" {2 * a}", f" {a}", " many"], "label": 0} for a in range(1, 5)
]
GEN_DOCS = [{"question": f"What is {a} times 2?", "answer": str(2 * a)} for a in range(1, 4)]


def write_tasks(root):
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (root / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in GEN_DOCS))
    (root / "tasks").mkdir()
    (root / "tasks" / "retro_tiny_mc.yaml").write_text(f"""task: retro_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
""")
    (root / "tasks" / "retro_tiny_gen.yaml").write_text(f"""task: retro_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "gen.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""")


def test_lm_eval_retro_model_uses_the_chosen_recurrence(tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from retro.inference.lm_eval_adapter import RetroLM

    ckpt = tiny_models(tmp_path)["recurrent"]
    write_tasks(tmp_path)
    r = 4
    lm = RetroLM(pretrained=str(ckpt), recurrences=r, device="cpu", batch_size=2, dtype="float32")
    out = simple_evaluate(
        model=lm,
        tasks=["retro_tiny_mc", "retro_tiny_gen"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        log_samples=True,
        bootstrap_iters=0,
    )
    model, tok = lm.model, lm.tokenizer

    # Log-likelihoods equal a direct computation at r (and differ from r = 1, so r was really used).
    @torch.no_grad()
    def loglik(context, continuation, recurrences):
        ctx, cont = tok(context)["input_ids"], tok(continuation)["input_ids"]
        ids = torch.tensor([ctx + cont])
        logp = model(ids, num_recurrences=recurrences).logits[0, len(ctx) - 1 : -1].log_softmax(-1)
        return float(logp.gather(-1, torch.tensor(cont)[:, None]).sum())

    correct = 0
    for sample in out["samples"]["retro_tiny_mc"]:
        doc = sample["doc"]
        ours = [loglik(doc["question"], c, r) for c in doc["choices"]]
        theirs = [float(resp[0][0]) for resp in sample["resps"]]
        assert theirs == pytest.approx(ours, abs=1e-4)
        assert [loglik(doc["question"], c, 1) for c in doc["choices"]] != pytest.approx(ours, abs=1e-3)
        correct += int(max(range(3), key=ours.__getitem__) == doc["label"])
    assert out["results"]["retro_tiny_mc"]["acc,none"] == pytest.approx(correct / len(MC_DOCS))

    # Generations equal retro.generate's greedy text at r, cut at the stop string.
    prompts = [f"Q: {d['question']}\nA:" for d in GEN_DOCS]
    ours = generate_text(model, tok, prompts, GenerationSettings(max_new_tokens=6, num_recurrences=r), ["\n"])
    theirs = {s["doc"]["question"]: s["resps"][0][0] for s in out["samples"]["retro_tiny_gen"]}
    assert [theirs[d["question"]] for d in GEN_DOCS] == [c.text for c in ours]
    assert "exact_match,none" in out["results"]["retro_tiny_gen"]


def test_lm_eval_rejects_bad_recurrences(tmp_path):
    from retro.inference.lm_eval_adapter import RetroLM

    with pytest.raises(ValueError, match="recurrences must be >= 1"):
        RetroLM(pretrained=str(tmp_path), recurrences=0)


def test_lm_eval_takes_exit_rules(tmp_path):
    """adaptive_exit=RULE and adaptive_min_r=N as model_args (strings): generation equals retro's own adaptive
    decoding with that rule; a bad rule is refused before any weight loads."""
    from retro.inference.adaptive import ExitRule
    from retro.inference.lm_eval_adapter import RetroLM

    with pytest.raises(ValueError, match="must be {kl,state,entropy}"):
        RetroLM(pretrained=str(tmp_path), adaptive_exit="depth:1")
    ckpt = tiny_models(tmp_path)["recurrent"]
    lm = RetroLM(
        pretrained=str(ckpt), recurrences="4", adaptive_exit="kl:1e9", adaptive_min_r="3", device="cpu", dtype="float32"
    )
    rule = ExitRule("kl", 1e9, 3)
    assert lm.adaptive_exit == rule
    prompts = [f"Q: {d['question']}\nA:" for d in GEN_DOCS]
    ours = generate_text(lm.model, lm.tokenizer, prompts, GenerationSettings(6, 4, adaptive_exit=rule))
    assert all(c.mean_passes == pytest.approx((4 + 3 * (c.num_tokens - 1)) / c.num_tokens) for c in ours)
    for prompt, mine in zip(prompts, ours):
        context = torch.tensor([lm.tokenizer(prompt)["input_ids"]])
        row = lm._model_generate(context, context.size(1) + 6, [])[0, context.size(1) :]
        assert lm.tokenizer.decode(row[: mine.num_tokens].tolist(), skip_special_tokens=True) == mine.text
    legacy = RetroLM(pretrained=str(ckpt), recurrences=4, adaptive_exit="1e-3", device="cpu", dtype="float32")
    assert legacy.adaptive_exit == ExitRule("kl", 1e-3)


# GSM8K-style documents; the last question is long enough to be left-truncated at max_length 1024.
PAPER_DOCS = [
    {"question": "Ann has 2 apples and buys 3 more. How many apples does she have?"},
    {"question": "A train leaves at 9 and arrives at 11. How long is the trip, in hours?"},
    {"question": "Tom pays $1,200 for 3 chairs. What does one chair cost?"},
    {"question": "Count the sheep. " * 55 + "How many sheep are there?"},
]


def test_paper_gsm8k_command_matches_retro_eval(tmp_path, monkeypatch):
    """The paper's lm-eval run (shipped gsm8k_cot_sean, 1-shot, add_bos_token, max_length 1024) via
    `python -m retro.lm_eval_model --include_path ...` and `python -m retro.eval --task gsm8k` on the same
    documents: the same prompts, completions, filtered answers, per-example scores and means."""
    ckpt = tiny_models(tmp_path)["recurrent"]  # zeros s0: batching cannot change a completion
    data = tmp_path / "gsm8k.jsonl"

    def write_docs(answers):
        data.write_text(
            "".join(json.dumps({**d, "answer": f"Work.\n#### {a}"}) + "\n" for d, a in zip(PAPER_DOCS, answers))
        )

    def run_retro(out):
        argv = ["--model", ckpt, "--task", "gsm8k", "--data", data, "--recurrences", "2", "--batch-size", "3"]
        assert retro_eval([str(a) for a in [*argv, "--out", out]]) == 0
        return json.loads((out / "results.json").read_text())["models"][0]["runs"][0]

    # Pick references from a first run so that some examples score 1 (the prompts do not show the answers).
    write_docs(["0"] * len(PAPER_DOCS))
    probe = run_retro(tmp_path / "probe")["examples"]
    write_docs([e["flexible-extract_answer"] if i % 2 == 0 else "7" for i, e in enumerate(probe)])
    ours = run_retro(tmp_path / "retro")
    assert ours["examples"][-1]["truncated"] and ours["examples"][-1]["prompt_tokens"] == 1024 - 256
    assert any(e["flexible-extract"] for e in ours["examples"])

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local.yaml").write_text(
        yaml.safe_dump(
            {
                "include": str(LM_EVAL_TASKS_DIR / "gsm8k_cot_sean.yaml"),
                "task": "gsm8k_cot_sean_local",
                "dataset_path": "json",
                "dataset_name": None,
                "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(tmp_path / "hf_cache")},
            }
        )
    )
    model_args = f"pretrained={ckpt},recurrences=2,add_bos_token=True,max_length=1024,dtype=float32"
    argv = [
        *("--model", "retro", "--model_args", model_args, "--tasks", "gsm8k_cot_sean_local"),
        *("--include_path", str(tasks), "--num_fewshot", "1", "--batch_size", "4", "--device", "cpu"),
        *("--output_path", str(tmp_path / "lm_eval"), "--log_samples"),
    ]
    from retro.lm_eval_model import main as lm_eval_main

    monkeypatch.setattr(sys, "argv", ["retro.lm_eval_model", *argv])
    lm_eval_main()
    (samples_file,) = (tmp_path / "lm_eval").rglob("samples_gsm8k_cot_sean_local_*.jsonl")
    (results_file,) = (tmp_path / "lm_eval").rglob("results_*.json")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert sorted((s["doc_id"], s["filter"]) for s in samples) == [
        (i, f) for i in range(len(PAPER_DOCS)) for f in ("flexible-extract", "strict-match")
    ]
    for s in samples:
        mine = ours["examples"][s["doc_id"]]
        assert s["arguments"]["gen_args_0"]["arg_0"] == mine["prompt"]
        assert s["resps"][0][0] == mine["completion"]
        assert s["target"] == mine["reference"]
        assert (s["filtered_resps"][0], bool(s["exact_match"])) == (mine[f"{s['filter']}_answer"], mine[s["filter"]])
    results = json.loads(results_file.read_text())["results"]["gsm8k_cot_sean_local"]
    for name in ("strict-match", "flexible-extract"):
        assert results[f"exact_match,{name}"] == pytest.approx(ours["metrics"][name])


def test_shipped_task_folder_is_found_by_default():
    """`python -m retro.lm_eval_model --tasks gsm8k_cot_sean ...` works without --include_path."""
    from lm_eval.tasks import TaskManager

    from retro.inference.lm_eval_adapter import with_default_include_path

    argv = ["--model", "retro", "--tasks", "gsm8k_cot_sean"]
    assert with_default_include_path(argv) == [*argv, "--include_path", str(LM_EVAL_TASKS_DIR)]
    assert with_default_include_path([*argv, "--include_path=x"]) == [*argv, "--include_path=x"]
    assert with_default_include_path(["--help"]) == ["--help"] and with_default_include_path([]) == []
    manager = TaskManager(include_path=str(LM_EVAL_TASKS_DIR), include_defaults=False)
    assert "gsm8k_cot_sean" in manager.all_tasks
    assert Path(LM_EVAL_TASKS_DIR, "gsm8k_cot_sean.yaml").is_file()
