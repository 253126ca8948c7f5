"""lm-evaluation-harness on a tiny local retro checkpoint with two local tasks (log-likelihood and generation)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip(
    "lm_eval.models.huggingface", reason="lm-eval (with accelerate) is not installed: pip install -e '.[eval]'"
)

from test_eval import tiny_models  # noqa: E402

from retro.inference.generate import GenerationSettings, generate_text  # noqa: E402

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


def test_lm_eval_retro_model_uses_the_chosen_recurrence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from retro.lm_eval_model import RetroLM

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
    from retro.lm_eval_model import RetroLM

    with pytest.raises(ValueError, match="recurrences must be >= 1"):
        RetroLM(pretrained=str(tmp_path), recurrences=0)
