"""lm-evaluation-harness is the oracle: retro.eval's prompts and scores equal what lm-eval's own task machinery
(the shipped gsm8k_cot_sean YAML, lm-eval's minerva_math YAML and utils) makes of the same documents and the
same completion strings. Documents are written locally; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval
import pytest
import yaml
from lm_eval.tasks import TaskManager, get_task_dict

from retro.inference import gsm8k, minerva_math, task_base

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
OUR_GSM8K_YAML = task_base.LM_EVAL_TASKS_DIR / "gsm8k_cot_sean.yaml"

# (completion, GSM8K reference after '####'): the filters' and exact match's corner cases.
GSM8K_CASES = [
    (" 3 + 4 = 7. The answer is 7.", "7"),
    (" The answer is 1,234.", "1,234"),
    (" The answer is 1,234.", "1234"),
    (" The answer is $1,234.", "1234"),
    (" It costs $18.00. The answer is 18.", "18"),
    (" It costs $18.00.", "18"),
    (" The answer is 42", "42"),
    (" The answer is 42", "4"),
    (" The answer is -5.", "-5"),
    (" The answer is -5.", "5"),
    (" The answer is 3.5.", "3.5"),
    (" The answer is 10. The answer is 12.", "10"),
    (" The answer is 10. The answer is 12.", "12"),
    (" No number here.", "3"),
    ("", "0"),
    (" #### 72", "72"),
    (" So 9 + 20 is 29. The answer is 29.\n\n", "29"),
    (" The answer is 0.", "0"),
    (" the answer is 5.", "5"),
    (" The answer is 5,000,000.", "5000000"),
    (" The answer is .5.", "0.5"),
    (" The answer is 007.", "7"),
    (" She has -3 dollars left.", "-3"),
    (" 1.5 + 2.5 = 4.0", "4"),
    (" The total is 1,000.00 dollars.", "1000"),
    (" Answer: 36.", "36"),
    (" The answer is 36 apples.", "36"),
    (" -.5", "-0.5"),
    (" 12-3=9", "9"),
    (" 2,3,4", "234"),
    (" The answer is 1e5.", "100000"),
    (" x = 3.14159", "3.14159"),
    (" $$", "0"),
    (" ...", "0"),
    (" The answer is $5.", "5"),
    (" 8 people. 8", "8"),
    (" It is \u22125.", "-5"),
    (" The answer is 18.\nQ: next question 99", "18"),
    (" The answer is 18. \n", "18"),
    (" The answer is ,5.", "5"),
    (" The answer is 1.234,5.", "1.2345"),
    (" It was 25%. The answer is 25.", "25"),
    (" The answer is 12.50.", "12.5"),
    (" The answer is 12.50.", "12.50"),
    (" The answer is 1000!", "1000"),
    (" The answer is 1000", "1000"),
    (" The answer is -1,000.", "-1000"),
    (" The answer is - 5.", "-5"),
    (" 3/4 of 12 is 9.", "9"),
    (" 3/4", "0.75"),
    (" The answer is 6.\n#### 6", "6"),
    (" The Answer Is 6.", "6"),
    (" THE ANSWER IS 6.", "6"),
    (" 5 apples and 7 pears; 5+7=12 total. The answer is 12", "12"),
    (" Numbers: 1, 2, 3.", "3"),
    (" $ 5", "5"),
    (" The answer is 2.5.5.", "2.5.5"),
    (" ####", "0"),
    (" It is 100.", "100."),
    (" The answer is $1,000,000.00.", "$1,000,000"),
]

MATH_DOCS = [
    {"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
    {"problem": "A pair?", "solution": "The pair is $\\boxed{(1,2)}$."},
    {"problem": "Domain?", "solution": "So $\\boxed{[2,5)}$."},
    {"problem": "Money?", "solution": "She has $\\boxed{10,000}$ dollars."},
    {"problem": "Root?", "solution": "We get $\\boxed{2\\sqrt{2}}$."},
    {"problem": "Choice?", "solution": "The answer is $\\boxed{\\text{(B)}}$."},
    {"problem": "Angle?", "solution": "It is $\\boxed{90^\\circ}$."},
    {"problem": "Negative?", "solution": "Thus $x = \\boxed{-3}$."},
    {"problem": "Space box?", "solution": "The answer is $\\boxed 5$."},
    {"problem": "Polynomial?", "solution": "It is $\\boxed{x^2+1}$."},
    {"problem": "Polar?", "solution": "We get $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$."},
    {"problem": "Quarter?", "solution": "That is $\\boxed{0.25}$."},
]
FINAL = "Final Answer: The final answer is {}. I hope it is correct."
MATH_CASES = [
    (0, "So it is $\\frac{1}{2}$.\n" + FINAL.format("$\\frac{1}{2}$")),
    (0, FINAL.format("$0.5$")),
    (0, FINAL.format("$\\dfrac{1}{2}$")),
    (0, FINAL.format("$\\frac12$")),
    (0, "The answer is $\\boxed{\\frac{1}{2}}$."),
    (0, FINAL.format("$\\frac{1}{3}$")),
    (0, "Final Answer: The final answer is $\\frac{1}{2}$ "),
    (1, FINAL.format("$(1,2)$")),
    (1, FINAL.format("$(1, 2)$")),
    (1, FINAL.format("$(2,1)$")),
    (2, FINAL.format("$[2,5)$")),
    (2, FINAL.format("$[2,5]$")),
    (3, FINAL.format("$10,000$")),
    (3, FINAL.format("$10000$ dollars")),
    (3, FINAL.format("10000")),
    (4, FINAL.format("$\\sqrt{8}$")),
    (4, FINAL.format("$2\\sqrt2$")),
    (5, FINAL.format("$\\text{(B)}$")),
    (5, FINAL.format("(B)")),
    (6, FINAL.format("$90^\\circ$")),
    (6, FINAL.format("$90$ degrees")),
    (7, FINAL.format("$-3$")),
    (7, FINAL.format("$x = -3$")),
    (7, FINAL.format("$3$")),
    (7, "First $-2$, then $-3$.\n" + FINAL.format("$-3$") + "\n\nProblem:"),
    (8, FINAL.format("$5$")),
    (8, "\\boxed 5"),
    (9, FINAL.format("$1+x^2$")),
    (10, FINAL.format("$\\left( 3, \\frac{\\pi}{2} \\right)$")),
    (10, FINAL.format("$(3,\\frac{\\pi}{2})$")),
    (11, FINAL.format("$\\frac{1}{4}$")),
    (11, FINAL.format("$25\\%$")),
    (11, "I do not know."),
    (11, ""),
]


class _Loader(yaml.SafeLoader):
    """Reads lm-eval YAMLs, keeping `!function module.name` tags as their text."""


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def read_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def local_lm_eval_task(root: Path, name: str, include: Path, docs: list[dict], **overrides):
    """lm-eval's task `include` with its dataset replaced by local documents (a task YAML that includes it)."""
    folder = root / name
    folder.mkdir()
    data = write_jsonl(folder / "docs.jsonl", docs)
    config = {
        "include": str(include),
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(root / "hf_cache")},
        **overrides,
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
    # Without lm-eval's own task index (slow to build): `include` names the file it needs.
    return get_task_dict([name], TaskManager(include_path=str(folder), include_defaults=False))[name]


def lm_eval_prompts(task, num_fewshot: int) -> list[str]:
    task.set_config("num_fewshot", num_fewshot)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    return [inst.args[0] for inst in sorted(task.instances, key=lambda i: i.doc_id)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("oracle")


# ---------------------------------------------------------------- the shipped YAML against lm-eval's own


def test_shipped_yaml_is_lm_evals_gsm8k_cot_with_the_papers_prompt():
    ours = read_yaml(OUR_GSM8K_YAML)
    theirs = read_yaml(LM_EVAL_TASKS / "gsm8k" / "gsm8k-cot.yaml")
    for key in ("fewshot_config", "filter_list", "metric_list", "doc_to_target", "output_type", "test_split"):
        assert ours[key] == theirs[key], key
    assert ours["generation_kwargs"] == {**theirs["generation_kwargs"], "max_gen_toks": 256}
    assert ours["doc_to_text"] == "Q: {{question}}\nA: Let's think step by step."  # the paper's prompt
    assert (ours["task"], ours["num_fewshot"], ours["dataset_path"], ours["dataset_name"]) == (
        "gsm8k_cot_sean",
        1,
        "openai/gsm8k",
        "main",
    )
    # retro.eval's constants are the same facts.
    assert list(gsm8k.GSM8K_EXEMPLARS) == [(s["question"], s["target"]) for s in ours["fewshot_config"]["samples"]]
    assert list(gsm8k.GSM8K_STOP) == ours["generation_kwargs"]["until"]
    strict, flexible = (f["filter"][0] for f in ours["filter_list"])
    assert (gsm8k.GSM8K_STRICT.pattern, gsm8k.GSM8K_FLEXIBLE.pattern) == (
        strict["regex_pattern"],
        flexible["regex_pattern"],
    )
    assert list(gsm8k.GSM8K_IGNORE) == ours["metric_list"][0]["regexes_to_ignore"]


def test_minerva_constants_are_lm_evals():
    from lm_eval.tasks.minerva_math import utils

    assert list(minerva_math.MATH_EXEMPLARS) == [(s["problem"], s["solution"]) for s in utils.list_fewshot_samples()]
    assert list(minerva_math.MINERVA_SUBSTITUTIONS) == utils.SUBSTITUTIONS
    assert list(minerva_math.MINERVA_REMOVED) == utils.REMOVED_EXPRESSIONS
    config = read_yaml(LM_EVAL_TASKS / "minerva_math" / "minerva_math_algebra.yaml")
    assert list(minerva_math.MATH_STOP) == config["generation_kwargs"]["until"]
    group = read_yaml(LM_EVAL_TASKS / "benchmarks" / "minerva_math.yaml")
    subjects = [read_yaml(LM_EVAL_TASKS / "minerva_math" / f"{t}.yaml") for t in group["task"]]
    assert [s.get("dataset_name", "algebra") for s in subjects] == list(task_base.MATH_SUBJECTS)


# ---------------------------------------------------------------- prompts

GSM8K_DOCS = [
    {"question": "Janet\u2019s ducks lay 16 eggs per day. How many in $2 a week?", "answer": "16 * 7 = 112\n#### 112"},
    {"question": "Two lines?\nYes: two.", "answer": "#### 2"},
    {"question": "  Leading spaces and trailing  ", "answer": "#### -3"},
]


MATH_PROMPT_DOCS = MATH_DOCS[:3] + [{"problem": "Two\n\nparagraphs, $x$?", "solution": "$\\boxed{x}$"}]


@pytest.fixture(scope="module")
def gsm8k_task(root):
    return local_lm_eval_task(root, "gsm8k_prompts", OUR_GSM8K_YAML, GSM8K_DOCS)


@pytest.fixture(scope="module")
def math_task(root):
    include = LM_EVAL_TASKS / "minerva_math" / "minerva_math_algebra.yaml"
    return local_lm_eval_task(root, "math_prompts", include, MATH_PROMPT_DOCS, training_split=None)


@pytest.mark.parametrize("num_fewshot", [0, 1, 3, 8])
def test_gsm8k_prompts_equal_lm_evals(root, gsm8k_task, num_fewshot):
    ours = gsm8k.GSM8K(write_jsonl(root / f"g{num_fewshot}.jsonl", GSM8K_DOCS), None, fewshot=num_fewshot).examples
    assert [e.prompt for e in ours] == lm_eval_prompts(gsm8k_task, num_fewshot)
    assert [e.reference for e in ours] == [gsm8k_task.doc_to_target(d) for d in gsm8k_task.test_docs()]


@pytest.mark.parametrize("num_fewshot", [0, 1, 4])
def test_math_prompts_equal_lm_evals(root, math_task, num_fewshot):
    ours = minerva_math.MATH(
        write_jsonl(root / f"m{num_fewshot}.jsonl", MATH_PROMPT_DOCS), None, fewshot=num_fewshot
    ).examples
    assert [e.prompt for e in ours] == lm_eval_prompts(math_task, num_fewshot)


# ---------------------------------------------------------------- scores


@pytest.fixture(scope="module")
def gsm8k_scored(root):
    """Every case through lm-eval: the YAML's filters on the completion, then the YAML's exact_match."""
    docs = [{"question": f"Question {i}?", "answer": f"Work.\n#### {gold}"} for i, (_, gold) in enumerate(GSM8K_CASES)]
    task = local_lm_eval_task(root, "gsm8k_scores", OUR_GSM8K_YAML, docs)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    instances = sorted(task.instances, key=lambda i: i.doc_id)
    for inst in instances:
        inst.resps = [GSM8K_CASES[inst.doc_id][0]]
    task.apply_filters()
    theirs = [
        {
            f: (inst.filtered_resps[f], task.process_results(inst.doc, [inst.filtered_resps[f]]))
            for f in inst.filtered_resps
        }
        for inst in instances
    ]
    ours_task = gsm8k.GSM8K(write_jsonl(root / "gsm8k_scores.jsonl", docs), None, fewshot=1)
    ours = [ours_task.score(c, e) for (c, _), e in zip(GSM8K_CASES, ours_task.examples)]
    return theirs, ours


def test_gsm8k_scores_equal_lm_evals(gsm8k_scored):
    theirs, ours = gsm8k_scored
    assert len(GSM8K_CASES) >= 50
    for case, lm, mine in zip(GSM8K_CASES, theirs, ours):
        assert set(lm) == {"strict-match", "flexible-extract"}
        for name, (filtered, metrics) in lm.items():
            assert (mine[f"{name}_answer"], mine[name]) == (filtered, bool(metrics["exact_match"])), (case, name)
    # The cases exercise both outcomes of both filters.
    for name in ("strict-match", "flexible-extract"):
        assert {m[name] for m in ours} == {True, False}
        assert any(m[f"{name}_answer"] == "[invalid]" for m in ours)


def test_gsm8k_lenient_numeric_is_only_an_extra(gsm8k_scored):
    """flexible-numeric differs from lm-eval's flexible-extract exactly where a value compare is kinder."""
    _, ours = gsm8k_scored
    kinder = [
        (c, m["flexible-extract_answer"])
        for (c, _), m in zip(GSM8K_CASES, ours)
        if m["flexible-numeric"] and not m["flexible-extract"]
    ]
    assert (" 1.5 + 2.5 = 4.0", "4.0") in kinder and (" The answer is 12.50.", "12.50.") in kinder


def test_math_scores_equal_lm_evals(root):
    """lm-eval's minerva_math process_docs and process_results (exact_match, math_verify) on every case."""
    task = local_lm_eval_task(
        root,
        "math_scores",
        LM_EVAL_TASKS / "minerva_math" / "minerva_math_algebra.yaml",
        MATH_DOCS,
        training_split=None,
    )
    lm_docs = list(task.test_docs())
    ours_task = minerva_math.MATH(write_jsonl(root / "math_scores.jsonl", MATH_DOCS), None, fewshot=1)
    assert [e.reference for e in ours_task.examples] == [d["answer"] for d in lm_docs]
    assert len(MATH_CASES) >= 30
    outcomes = {"exact_match": set(), "math_verify": set()}
    for i, completion in MATH_CASES:
        theirs = task.process_results(lm_docs[i], [completion])
        mine = ours_task.score(completion, ours_task.examples[i])
        for metric in outcomes:
            assert mine[metric] == bool(theirs[metric]), (metric, MATH_DOCS[i]["solution"], completion)
            outcomes[metric].add(mine[metric])
    assert outcomes == {"exact_match": {True, False}, "math_verify": {True, False}}


def test_minerva_helpers_equal_lm_evals_on_math500_style_answers():
    from lm_eval.tasks.minerva_math import utils

    answers = [
        "\\frac{14}{3}",
        "\\text{Evelyn}",
        "(-\\infty, 0]",
        "3, 5, 7",
        "\\left[ \\frac{\\pi^2}{8}, \\frac{5 \\pi^2}{4} \\right]",
        "x \\in [-2,7]",
        "1,\\!000",
        "12\\text{ cm}^2",
        "\\$32,\\!348",
        "11\\sqrt2",
        "\\sqrt[3]{4}",
        "p - q",
        "0.5\\text{ feet}",
        "\\dfrac{9}{7}",
        "5\\text{ ways}",
        "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
    ]
    for answer in answers:
        assert minerva_math.normalize_final_answer(answer) == utils.normalize_final_answer(answer), answer
        text = f"so $\\boxed{{{answer}}}$ and \\fbox{{1}}"
        assert minerva_math.minerva_last_boxed(text) == utils.last_boxed_only_string(text)
        assert minerva_math.remove_boxed(minerva_math.minerva_last_boxed(text)) == utils.remove_boxed(
            utils.last_boxed_only_string(text)
        )
        for completion in (FINAL.format(f"${answer}$"), f"Final Answer: The final answer is {answer}", "none"):
            assert minerva_math.unnormalized_answer(completion) == utils.get_unnormalized_answer(completion)
    for text in ("\\boxed 5. Also $\\frac{1}{2}$", "a \\boxed{1} b \\boxed {2}", "\\fbox{7}", "none", "\\boxed{x"):
        assert minerva_math.minerva_last_boxed(text) == utils.last_boxed_only_string(text), text
