"""Answer extraction and normalisation on hand-written completions."""

from __future__ import annotations

import json

import pytest

from retro.inference.tasks import (
    GSM8K,
    MATH,
    extract_flexible,
    extract_strict,
    gsm8k_gold,
    gsm8k_prompt,
    last_boxed,
    load_jsonl,
    math_equal,
    numbers_equal,
)


@pytest.mark.parametrize(
    "completion, flexible, strict",
    [
        (" She has 3 + 4 = 7 apples.\n#### 7", "7", "7"),
        (" The total is 1,234 dollars, so the answer is 1,234.", "1234", None),
        (" It drops by 5 degrees to -12.\n#### -12", "-12", "-12"),
        (" Each costs $2.50, so 4 cost $10.00.", "10.00", None),
        (" #### 1,000 and then some text 42", "42", "1000"),
        (" 0.5 of 8 is 4.", "4", None),
        (" I am not sure.", None, None),
    ],
)
def test_gsm8k_extraction(completion, flexible, strict):
    assert extract_flexible(completion) == flexible
    assert extract_strict(completion) == strict


def test_gsm8k_scoring_compares_numbers():
    assert numbers_equal("10.00", "10") and numbers_equal("1234", "1234") and numbers_equal("-12", "-12")
    assert not numbers_equal("12", "-12") and not numbers_equal(None, "3")
    assert gsm8k_gold("He pays 2 * <<2*9=18>>18.\n#### 1,018") == "1018"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no final line")


def test_gsm8k_prompt_shape():
    prompt = gsm8k_prompt("How many?", [("One q?", "Calc <<1+1=2>>2.\n#### 2")])
    assert prompt.endswith("Q: How many?\nA: Let's think step by step.")
    assert "<<" not in prompt and "#### 2" in prompt


@pytest.mark.parametrize(
    "text, boxed",
    [
        ("so $\\boxed{5}$.", "5"),
        ("first \\boxed{1} then \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\fbox{-7}", "-7"),
        ("\\boxed 9", "9"),
        ("no box here 12", None),
        ("\\boxed{unbalanced", None),
    ],
)
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize(
    "predicted, reference",
    [
        ("\\dfrac{7}{8}", "\\frac78"),
        ("\\frac{1}{2}", "0.5"),
        ("1/2", "\\frac{1}{2}"),
        ("-\\frac{3}{4}", "-0.75"),
        ("\\frac{-3}{4}", "-\\frac{3}{4}"),
        ("10,000", "10000"),
        ("x = 3", "3"),
        ("90^\\circ", "90"),
        ("\\text{(B)}", "(B)"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("5.00", "5"),
        ("12\\%", "12"),
    ],
)
def test_math_equal(predicted, reference):
    assert math_equal(predicted, reference)


@pytest.mark.parametrize(
    "predicted, reference",
    [
        ("\\frac{1}{3}", "0.33"),
        ("-5", "5"),
        ("(1,2)", "(2,1)"),
        (None, "1"),
        ("1,2", "12"),
    ],
)
def test_math_not_equal(predicted, reference):
    assert not math_equal(predicted, reference)


def test_task_scoring_records():
    gsm = GSM8K.__new__(GSM8K)
    assert gsm.score(" 2 + 2 = 4\n#### 4", "4") == {
        "flexible_answer": "4",
        "strict_answer": "4",
        "flexible": True,
        "strict": True,
    }
    assert gsm.score(" it is 4, not 5", "4")["flexible"] is False
    math = MATH.__new__(MATH)
    assert math.score("so $\\boxed{\\dfrac{1}{2}}$", "\\frac12")["boxed"] is True


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
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"problem": "p", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match="--fewshot"):
        MATH(good, None, fewshot=5)
