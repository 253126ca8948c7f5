"""retro.eval's tasks on hand-written inputs with hand-derived expectations (lm-eval itself is the oracle in
test_eval_oracle.py): prompts, lm-eval's filters and their quirks, Minerva normalisation, data loading."""

from __future__ import annotations

import json

import pytest

from retro.inference import gsm8k, task_base
from retro.inference.boxed import last_boxed, math_equal
from retro.inference.gsm8k import (
    GSM8K,
    extract_flexible,
    extract_strict,
    gsm8k_exact_match,
    gsm8k_exemplar,
    gsm8k_target,
    last_number,
    numbers_equal,
)
from retro.inference.minerva_math import (
    MATH,
    math_exemplars,
    minerva_equiv,
    minerva_last_boxed,
    minerva_reference,
    normalize_final_answer,
    remove_boxed,
    unnormalized_answer,
)
from retro.inference.task_base import Example, load_jsonl, load_records

# The paper's 1-shot GSM8K prompt for one question, written out by hand.
GSM8K_ONE_SHOT = (
    "Q: There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
    "there will be 21 trees. How many trees did the grove workers plant today?\n"
    "A: Let's think step by step. There are 15 trees originally. Then there were 21 trees after some more were "
    "planted. So there must have been 21 - 15 = 6. The answer is 6.\n\n"
    "Q: Tom has 3 pens. How many?\nA: Let's think step by step."
)
MATH_ONE_SHOT = (
    "Problem:\nFind the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.\n\nSolution: "
    "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and "
    "$5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives $x<5$. "
    "Therefore, the domain of the expression is $\\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$. "
    "I hope it is correct.\n\nProblem:\nWhat is $1+1$?\n\nSolution:"
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- GSM8K


def test_gsm8k_prompts(tmp_path):
    data = write_jsonl(tmp_path / "g.jsonl", [{"question": "Tom has 3 pens. How many?", "answer": "3\n#### 3"}])
    assert GSM8K(data, None, fewshot=1).examples[0].prompt == GSM8K_ONE_SHOT
    assert (
        GSM8K(data, None, fewshot=0).examples[0].prompt == "Q: Tom has 3 pens. How many?\nA: Let's think step by step."
    )
    eight = GSM8K(data, None, fewshot=8).examples[0].prompt
    assert eight.count("Q: ") == 9 and eight.count("\n\n") == 8 and "The answer is 8.\n\nQ: Tom" in eight
    with pytest.raises(ValueError, match="--fewshot must be between 0 and 8"):
        GSM8K(data, None, fewshot=9)


def test_gsm8k_fewshot_data(tmp_path):
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"question": "A?", "answer": "He pays 2 * 9 = <<2*9=18>>18.\nThen 18 + 1 = 19.\n#### 19"},
            {"question": "B?", "target": "Free text. The answer is 4."},
        ],
    )
    assert gsm8k_exemplar({"question": "A?", "answer": "2 * 9 = <<2*9=18>>18.\n#### 1,018"}) == (
        "A?",
        "2 * 9 = 18. The answer is 1,018.",
    )
    data = write_jsonl(tmp_path / "g.jsonl", [{"question": "C?", "answer": "#### 1"}])
    prompt = GSM8K(data, None, fewshot=2, fewshot_path=train).examples[0].prompt
    assert prompt == (
        "Q: A?\nA: Let's think step by step. He pays 2 * 9 = 18. Then 18 + 1 = 19. The answer is 19.\n\n"
        "Q: B?\nA: Let's think step by step. Free text. The answer is 4.\n\n"
        "Q: C?\nA: Let's think step by step."
    )
    with pytest.raises(ValueError, match="needs 'target'"):
        gsm8k_exemplar({"question": "x", "answer": "no final line"})


def test_gsm8k_target_is_the_text_after_the_last_marker():
    assert gsm8k_target("He pays 2 * <<2*9=18>>18.\n#### 1,018") == "1,018"
    assert gsm8k_target("a #### b\n####  -3 ") == "-3"
    with pytest.raises(ValueError, match="####"):
        gsm8k_target("no final line")


@pytest.mark.parametrize(
    "completion, strict, flexible",
    [
        (" 3 + 4 = 7. The answer is 7.", "7", "7."),
        (" The answer is 1,234.\n", "1,234", "1,234."),  # the final '.' takes any character but a newline
        (" The answer is 42", "4", "42"),  # the pattern's final '.' takes any character: the last digit
        (" The answer is 10. No, the answer is 12.", "10.", "12."),  # greedy: the final '.' takes the space
        (" The answer is $5.", "[invalid]", "$5."),
        (" the answer is 5.", "[invalid]", "5."),
        (" It is -3 degrees. The answer is -3.", "-3", "-3."),
        (" 12-3=9", "[invalid]", "9"),
        (" I am not sure.", "[invalid]", "[invalid]"),
        (" #### 72", "[invalid]", "72"),
        (" x 5 y", "[invalid]", "5"),
    ],
)
def test_gsm8k_filters(completion, strict, flexible):
    assert extract_strict(completion) == strict
    assert extract_flexible(completion) == flexible


def test_flexible_pattern_groups():
    """Two or more characters of [$0-9.,] (after an optional '-') fill the first group, else the second."""
    assert gsm8k.GSM8K_FLEXIBLE.findall(" 12-3=9 $5 -.5") == [
        ("12", ""),
        ("", "-3"),
        ("", "9"),
        ("$5", ""),
        ("-.5", ""),
    ]


@pytest.mark.parametrize(
    "prediction, reference, equal",
    [
        ("1,234.", "1,234", True),
        ("$1,234", "1234", True),
        ("18.", "18", True),
        ("18.00", "18", False),  # a string comparison: lm-eval does not compare values
        ("-5", "5", False),
        ("[invalid]", "5", False),
        ("0.5", ".5", False),
        ("5", "5.", True),
        ("3..", "3.", False),  # only one final '.' is removed
        ("ABC", "abc", True),
        ("#### 7", "7", True),
    ],
)
def test_gsm8k_exact_match(prediction, reference, equal):
    assert gsm8k_exact_match(prediction, reference) is equal


def test_gsm8k_lenient_numeric_is_an_extra():
    assert last_number(" costs $2.50, so 4 cost $10.00.") == "10.00"
    assert numbers_equal("10.00", "10") and numbers_equal("1,018", "1018") and not numbers_equal("12", "-12")
    assert last_number("none") is None and not numbers_equal(None, "3")


def test_gsm8k_score_record():
    task = GSM8K.__new__(GSM8K)
    assert task.score(" 2 + 2 = 4. The answer is 4.0.", Example("p", "4")) == {
        "strict-match_answer": "4.0",
        "flexible-extract_answer": "4.0.",
        "flexible-numeric_answer": "4.0",
        "strict-match": False,
        "flexible-extract": False,
        "flexible-numeric": True,
    }
    assert task.metrics == ("strict-match", "flexible-extract", "flexible-numeric")


# ---------------------------------------------------------------- MATH


def test_math_prompts_and_exemplars(tmp_path):
    data = write_jsonl(tmp_path / "m.jsonl", [{"problem": "What is $1+1$?", "solution": "$\\boxed{2}$"}])
    assert MATH(data, None, fewshot=1).examples[0].prompt == MATH_ONE_SHOT
    assert MATH(data, None, fewshot=0).examples[0].prompt == "Problem:\nWhat is $1+1$?\n\nSolution:"
    four = MATH(data, None, fewshot=4).examples[0].prompt
    assert four.count("Problem:\n") == 5 and four.count("I hope it is correct.\n\nProblem:") == 4
    # The paper's lm-eval (0.4.11) spells two exemplars differently; 1-shot sees only the first one.
    old = MATH(data, None, fewshot=1, lm_eval_version="0.4.11").examples[0].prompt
    assert old == MATH_ONE_SHOT.replace("{5-x}}$.\n", "{5-x}}$.}\n", 1)
    new, paper = math_exemplars("0.4.13"), math_exemplars("0.4.11")
    assert "30n&=480\\\\\n\\Rightarrow" in new[2][1] and "30n&=480\\\n\\Rightarrow" in paper[2][1]
    assert "6x-4y&=a,\\\\\n6y" in new[3][0] and "6x-4y&=a,\\\n6y" in paper[3][0]
    assert new[1] == paper[1] and new[3][1] == paper[3][1]
    with pytest.raises(ValueError, match="lm_eval_version"):
        math_exemplars("0.3")


def test_math_reference_answers(tmp_path):
    rows = [
        {"problem": "p", "solution": "So $x = \\boxed{\\dfrac{1}{2}}$.", "answer": "\\frac12", "subject": "Algebra"},
        {"problem": "p", "answer": "10,000"},  # MATH-500 style without a solution
        {"problem": "p", "solution": "no box at all", "answer": "7"},
        {"problem": "p", "solution": "The pairs are $\\boxed{(1, 2)}$.", "type": "Geometry"},
    ]
    examples = MATH(write_jsonl(tmp_path / "m.jsonl", rows), None, fewshot=0).examples
    assert [e.reference for e in examples] == ["\\dfrac{1}{2}", "10000", "7", "(1,2)"]
    assert examples[1].doc == {"solution": "$\\boxed{10,000}$", "answer": "10,000"}
    assert examples[3].doc["answer"] == "(1, 2)" and examples[3].doc["subject"] == "Geometry"
    with pytest.raises(ValueError, match="needs 'solution' or 'answer'"):
        MATH(write_jsonl(tmp_path / "bad.jsonl", [{"problem": "p"}]), None, fewshot=0)
    with pytest.raises(ValueError, match="no \\\\boxed"):
        MATH(write_jsonl(tmp_path / "bad2.jsonl", [{"problem": "p", "solution": "none"}]), None, fewshot=0)


@pytest.mark.parametrize(
    "text, minerva, lenient",
    [
        ("\\boxed 5. Also $\\frac{1}{2}$", "\\boxed 5. Also ", "5"),  # was '1' (the brace of the \frac)
        ("so $\\boxed{5}$.", "\\boxed{5}", "5"),
        (
            "first \\boxed{1} then \\boxed{\\frac{\\sqrt{3}}{2}}",
            "\\boxed{\\frac{\\sqrt{3}}{2}}",
            "\\frac{\\sqrt{3}}{2}",
        ),
        ("\\fbox{-7}", "\\fbox{-7}", "-7"),
        ("\\boxed {12}", "\\boxed {12}", "12"),
        ("\\boxed 9", "\\boxed 9", "9"),
        ("\\boxed{unbalanced", None, None),
        ("no box here 12", None, None),
    ],
)
def test_boxed_extraction(text, minerva, lenient):
    assert minerva_last_boxed(text) == minerva
    assert last_boxed(text) == lenient


def test_remove_boxed():
    assert remove_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}" and remove_boxed("\\boxed 5. ") == "5. "
    assert remove_boxed("\\fbox{3}") is None and remove_boxed(None) is None
    assert minerva_reference("$\\boxed{\\text{(B)}}$") == "(B)" and minerva_reference("none") is None


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("... = 4.\nFinal Answer: The final answer is $4$. I hope it is correct.", "$4$"),
        ("Final Answer: The final answer is $\\frac{1}{2}$", "[invalidanswer]"),  # no ' I hope...' after it
        ("Final Answer: The final answer is $\\frac{1}{2}$ ", "$\\frac{1}{2}"),  # the appended end fits, eats '$'
        ("Final Answer: The final answer is 3.5. I hope it is correct.", "3.5"),
        ("the answer is $\\boxed{4}$", "[invalidanswer]"),
    ],
)
def test_unnormalized_answer(completion, answer):
    assert unnormalized_answer(completion) == answer


@pytest.mark.parametrize(
    "answer, new, old",
    [
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\left(3,\\frac{\\pi}{2}\\right)", "\\le(3,\\frac{\\pi}{2}\\right)"),
        ("3, 5, 7", "3,5,7", "357"),
        ("(2,\\infty)", "(2,\\infty)", "(2,\\iny)"),
        ("10,000", "10000", "10000"),
        ("x = 5 \\text{ cm}^2", "5", "5"),
        ("$\\frac12$", "\\frac{1}{2}", "\\frac{1}{2}"),
        ("\\sqrt[3]8", "\\sqrt[3]{8}", "\\sqrt{[}3]8"),
        ("90^\\circ", "90", "90"),
        ("2\\pi cm", "2\\pi", "2\\pi"),
    ],
)
def test_normalize_final_answer(answer, new, old):
    assert normalize_final_answer(answer) == new
    assert normalize_final_answer(answer, "0.4.11") == old


def test_minerva_equiv():
    assert minerva_equiv("\\frac{1}{2}", "0.5") and minerva_equiv("2\\sqrt{2}", "\\sqrt{8}")
    assert not minerva_equiv("3", "4") and not minerva_equiv("[invalidanswer]", "4")
    assert minerva_equiv("(1,2)", "(1,2)")  # 0.4.13: equal strings; sympy cannot parse a tuple
    assert not minerva_equiv("(1,2)", "(1,2)", "0.4.11")


def test_math_score_record():
    task = MATH.__new__(MATH)
    task.lm_eval_version = "0.4.13"
    example = Example("p", "\\frac{1}{2}", {"solution": "$\\boxed{\\frac{1}{2}}$", "answer": "\\frac12"})
    record = task.score("So $0.5$.\nFinal Answer: The final answer is $0.5$. I hope it is correct.", example)
    assert record == {
        "exact_match_answer": "0.5",
        "boxed-lenient_answer": None,
        "exact_match": True,
        "math_verify": True,
        "boxed-lenient": False,
    }
    assert task.score("It is $\\boxed{\\dfrac{1}{2}}$.", example)["boxed-lenient"] is True
    assert task.metrics == ("exact_match", "math_verify", "boxed-lenient")


@pytest.mark.parametrize(
    "predicted, reference",
    [
        ("\\dfrac{7}{8}", "\\frac78"),
        ("\\frac{1}{2}", "0.5"),
        ("1/2", "\\frac{1}{2}"),
        ("-\\frac{3}{4}", "-0.75"),
        ("10,000", "10000"),
        ("x = 3", "3"),
        ("90^\\circ", "90"),
        ("\\text{(B)}", "(B)"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("5.00", "5"),
        ("12\\%", "12"),
    ],
)
def test_lenient_math_equal(predicted, reference):
    assert math_equal(predicted, reference)


@pytest.mark.parametrize(
    "predicted, reference", [("\\frac{1}{3}", "0.33"), ("-5", "5"), ("(1,2)", "(2,1)"), (None, "1")]
)
def test_lenient_math_not_equal(predicted, reference):
    assert not math_equal(predicted, reference)


# ---------------------------------------------------------------- data


def test_load_jsonl_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_jsonl(tmp_path / "nope.jsonl", ("question",))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field\(s\) \['question', 'answer'\]"):
        load_jsonl(bad, ("question", "answer"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:1: not valid JSON"):
        load_jsonl(broken, ("question",))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        load_jsonl(empty, ("question",))
    good = write_jsonl(tmp_path / "good.jsonl", [{"problem": "p", "answer": "1"}])
    with pytest.raises(ValueError, match="--fewshot must be between 0 and 4"):
        MATH(good, None, fewshot=5)


def test_load_records_from_a_math_release_directory(tmp_path):
    """The original MATH release: test/<subject>/<n>.json, one record per file; jsonl files are read too."""
    for subject, n in (("algebra", 2), ("geometry", 1)):
        (tmp_path / "test" / subject).mkdir(parents=True)
        for i in range(n):
            record = {"problem": f"{subject} {i}", "solution": f"$\\boxed{{{i}}}$", "type": subject.title()}
            (tmp_path / "test" / subject / f"{i}.json").write_text(json.dumps(record))
    write_jsonl(tmp_path / "test" / "extra.jsonl", [{"problem": "x", "solution": "$\\boxed{9}$"}])
    records = load_records(tmp_path / "test", ("problem",))
    assert [r["problem"] for r in records] == ["x", "algebra 0", "algebra 1", "geometry 0"]
    assert len(load_records(tmp_path / "test", ("problem",), limit=2)) == 2
    examples = MATH(tmp_path / "test", None, fewshot=0).examples
    assert [e.doc.get("subject") for e in examples] == [None, "Algebra", "Algebra", "Geometry"]
    (tmp_path / "test" / "algebra" / "bad.json").write_text(json.dumps({"question": "q"}))
    with pytest.raises(ValueError, match=r"bad.json\[0\]: missing field\(s\) \['problem'\]"):
        load_records(tmp_path / "test", ("problem",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.jsonl or \\*.json records"):
        load_records(tmp_path / "empty", ("problem",))
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        load_records(tmp_path / "missing", ("problem",))


def test_load_records_from_the_hub(monkeypatch):
    """hf:EleutherAI/hendrycks_math reads the test split of all 7 subjects (datasets is stubbed: no network)."""
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return [{"problem": f"{config} problem", "solution": "$\\boxed{1}$", "level": "Level 1"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = MATH("hf:EleutherAI/hendrycks_math", None, fewshot=0).examples
    assert calls == [("EleutherAI/hendrycks_math", s, "test") for s in task_base.MATH_SUBJECTS]
    assert [e.doc["subject"] for e in examples] == list(task_base.MATH_SUBJECTS)
    calls.clear()
    records = load_records("hf:HuggingFaceH4/MATH-500", ("problem",))
    assert calls == [("HuggingFaceH4/MATH-500", None, "test")] and "subject" not in records[0]
    calls.clear()
    load_records("hf:EleutherAI/hendrycks_math:algebra,geometry", ("problem",))
    assert [c[1] for c in calls] == ["algebra", "geometry"]
    calls.clear()
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, config=None, split=None: calls.append(config) or [{"question": "q"}]
    )
    with pytest.raises(ValueError, match=r"missing field\(s\) \['answer'\]"):
        GSM8K("hf:openai/gsm8k", None, fewshot=0)
    assert calls == ["main"]
