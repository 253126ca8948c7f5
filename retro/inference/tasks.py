"""Task definitions for `retro.eval`: loading local jsonl files, prompts, and answer extraction.

GSM8K: chain-of-thought prompt ending "Let's think step by step.", k-shot (default 1) from a
built-in exemplar or a local train file; scored with a flexible extract (the last number in the
completion) and a strict extract (the number after "####"). MATH: minerva-style "Problem:" /
"Solution:" prompt; the last \\boxed{...} is compared with the reference after normalisation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

GSM8K_FIELDS = ("question", "answer")
MATH_FIELDS = ("problem", "answer")

# Written for this project (not taken from either dataset), in each dataset's answer format.
GSM8K_EXEMPLARS = [
    (
        "A shop sells pencils in boxes of 12. Tom buys 3 boxes and gives away 10 pencils. How many pencils does "
        "he keep?",
        "3 boxes hold 3 * 12 = 36 pencils. After giving away 10 he keeps 36 - 10 = 26 pencils.\n#### 26",
    ),
    (
        "Mia reads 15 pages a day for 4 days, then 20 pages on the fifth day. How many pages does she read in total?",
        "In 4 days she reads 4 * 15 = 60 pages. Adding the fifth day gives 60 + 20 = 80 pages.\n#### 80",
    ),
]
MATH_EXEMPLARS = [
    (
        "What is the value of $\\frac{3}{4} + \\frac{1}{8}$?",
        "We write $\\frac{3}{4} = \\frac{6}{8}$, so the sum is $\\frac{6}{8} + \\frac{1}{8} = \\frac{7}{8}$. "
        "Final Answer: The final answer is $\\boxed{\\frac{7}{8}}$.",
    ),
]
GSM8K_STOP = ("\n\nQ:", "\nQ:", "Question:")
MATH_STOP = ("\n\nProblem:", "\nProblem:")


def load_jsonl(path: str | Path, fields: tuple[str, ...], limit: int | None = None) -> list[dict]:
    """Records of a local jsonl file, each checked for `fields` (errors name the file and line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    records = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            missing = [k for k in fields if k not in record] if isinstance(record, dict) else list(fields)
            if missing:
                have = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{line_no}: missing field(s) {missing}; the record has {have}")
            records.append(record)
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise ValueError(f"data file {path} has no records")
    return records


# ---------------------------------------------------------------- GSM8K

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
_STRICT = re.compile(r"####\s*(-?\$?[\d,]*\.?\d+)")


def _clean_number(text: str) -> str:
    return text.replace("$", "").replace(",", "").rstrip(".")


def gsm8k_gold(answer: str) -> str:
    """The reference number after '####' in a GSM8K answer."""
    match = _STRICT.search(answer)
    if match is None:
        raise ValueError(f"GSM8K answer has no '#### N' line: {answer[-80:]!r}")
    return _clean_number(match.group(1))


def extract_flexible(completion: str) -> str | None:
    """The last number in the completion ('1,234' -> '1234', '$5' -> '5', '-3.' -> '-3')."""
    found = _NUMBER.findall(completion)
    return _clean_number(found[-1]) if found else None


def extract_strict(completion: str) -> str | None:
    """The number after the first '####' (the GSM8K answer format), else None."""
    match = _STRICT.search(completion)
    return _clean_number(match.group(1)) if match else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Numeric equality of two extracted numbers ('18.00' == '18')."""
    if a is None or b is None:
        return False
    try:
        return Fraction(a) == Fraction(b)
    except (ValueError, ZeroDivisionError):
        return a == b


def _strip_calculator(answer: str) -> str:
    return re.sub(r"<<[^>]*>>", "", answer)


def gsm8k_prompt(question: str, exemplars: list[tuple[str, str]]) -> str:
    shots = "".join(f"Q: {q}\nA: Let's think step by step. {_strip_calculator(a)}\n\n" for q, a in exemplars)
    return f"{shots}Q: {question}\nA: Let's think step by step."


# ---------------------------------------------------------------- MATH


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), with nested braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        match = re.match(r"\\boxed ([^\s$]+)", text[start:])  # \boxed 5
        return match.group(1) if match else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{b} -> \\frac{1}{b}."""
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    return re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)


def _strip_text(s: str) -> str:
    """\\text{cm} and friends -> their content."""
    return re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)


def normalize_math(answer: str) -> str:
    """A canonical string for MATH answers: spacing, \\left/\\right, dfrac, degrees, %, $, units text,
    'x =' prefixes, thousands commas and trailing zeros are removed or unified."""
    s = answer.strip()
    for old, new in (
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\ ", ""),
        ("\\left", ""),
        ("\\right", ""),
        ("dfrac", "frac"),
        ("tfrac", "frac"),
        ("^\\circ", ""),
        ("^{\\circ}", ""),
        ("\\%", ""),
        ("%", ""),
        ("\\$", ""),
        ("$", ""),
        ("\\displaystyle", ""),
    ):
        s = s.replace(old, new)
    s = _strip_text(s).replace(" ", "").rstrip(".")
    s = re.sub(r"^[a-zA-Z]\\?=", "", s) if re.fullmatch(r"[a-zA-Z]=[^=,]+", s) else s
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    s = _fix_fracs(s)
    if re.fullmatch(r"-?\d+\.\d*0+", s):
        s = s.rstrip("0").rstrip(".")
    return s


def _as_number(s: str) -> Fraction | None:
    match = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s) or re.fullmatch(r"(-?)(-?\d+)/(-?\d+)", s)
    try:
        if match:
            value = Fraction(int(match.group(2)), int(match.group(3)))
            return -value if match.group(1) else value
        return Fraction(s) if re.fullmatch(r"-?\d+(\.\d+)?|-?\.\d+", s) else None
    except ZeroDivisionError:
        return None


def math_equal(predicted: str | None, reference: str) -> bool:
    """Normalised string equality, or equal numeric value (\\frac{1}{2} == 1/2 == 0.5)."""
    if predicted is None:
        return False
    a, b = normalize_math(predicted), normalize_math(reference)
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    return x is not None and x == y


def math_prompt(problem: str, exemplars: list[tuple[str, str]]) -> str:
    shots = "".join(f"Problem:\n{p}\n\nSolution:\n{s}\n\n" for p, s in exemplars)
    return f"{shots}Problem:\n{problem}\n\nSolution:\n"


# ---------------------------------------------------------------- task objects


@dataclass
class Example:
    prompt: str
    reference: str


class Task:
    name: str
    stop_strings: tuple[str, ...]
    metrics: tuple[str, ...]

    def score(self, completion: str, reference: str) -> dict:
        raise NotImplementedError


class GSM8K(Task):
    name, stop_strings, metrics = "gsm8k", GSM8K_STOP, ("flexible", "strict")

    def __init__(self, path, limit, fewshot: int, fewshot_path=None) -> None:
        pool = (
            GSM8K_EXEMPLARS
            if fewshot_path is None
            else [(r["question"], r["answer"]) for r in load_jsonl(fewshot_path, GSM8K_FIELDS, fewshot)]
        )
        _check_fewshot(fewshot, pool)
        records = load_jsonl(path, GSM8K_FIELDS, limit)
        self.examples = [Example(gsm8k_prompt(r["question"], pool[:fewshot]), gsm8k_gold(r["answer"])) for r in records]

    def score(self, completion: str, reference: str) -> dict:
        flexible, strict = extract_flexible(completion), extract_strict(completion)
        return {
            "flexible_answer": flexible,
            "strict_answer": strict,
            "flexible": numbers_equal(flexible, reference),
            "strict": numbers_equal(strict, reference),
        }


class MATH(Task):
    name, stop_strings, metrics = "math", MATH_STOP, ("boxed",)

    def __init__(self, path, limit, fewshot: int, fewshot_path=None) -> None:
        pool = (
            MATH_EXEMPLARS
            if fewshot_path is None
            else [(r["problem"], r["solution"]) for r in load_jsonl(fewshot_path, ("problem", "solution"), fewshot)]
        )
        _check_fewshot(fewshot, pool)
        records = load_jsonl(path, MATH_FIELDS, limit)
        self.examples = [Example(math_prompt(r["problem"], pool[:fewshot]), str(r["answer"])) for r in records]

    def score(self, completion: str, reference: str) -> dict:
        boxed = last_boxed(completion)
        return {"boxed_answer": boxed, "boxed": math_equal(boxed, reference)}


def _check_fewshot(fewshot: int, pool: list) -> None:
    if not 0 <= fewshot <= len(pool):
        raise ValueError(f"--fewshot must be between 0 and {len(pool)} (exemplars available), got {fewshot}")


TASKS = {"gsm8k": GSM8K, "math": MATH}
