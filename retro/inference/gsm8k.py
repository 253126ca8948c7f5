"""GSM8K is the paper's lm-eval task `gsm8k_cot_sean` (shipped as `lm_eval_tasks/gsm8k_cot_sean.yaml`):
"Q: {question}\\nA: Let's think step by step." with the first k of lm-eval's eight chain-of-thought
exemplars (target delimiter " ", few-shot delimiter "\\n\\n"), greedy, stop at "Q:", "</s>",
"<|im_end|>" and EOS. Scores: exact match (ignore case; ",", "$", "(?s).*#### " and a final "." removed
from both sides; a string comparison) after the strict-match filter ("The answer is N.") and after
the flexible-extract filter (the last number-like match); `flexible-numeric` is an extra, lenient
score (the last number compared by value, 18.00 == 18) that lm-eval does not report."""

from __future__ import annotations

import re
from fractions import Fraction

from retro.inference.task_base import FEWSHOT_DELIMITER, TARGET_DELIMITER, Example, Task, fewshot_pool, load_records

# The eight chain-of-thought exemplars of lm-eval's gsm8k-cot task (also the paper's yaml), in order.
GSM8K_EXEMPLARS: tuple[tuple[str, str], ...] = (
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
        "there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
        "been 21 - 15 = 6. The answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
        "they had 74 - 35 = 39. The answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
        "Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
        "The answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
        "now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
        "The answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, from monday to "
        "thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
        "were added. 9 + 20 is 29. The answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
        "balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
        "he had 35 - 2 = 33 golf balls. The answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
        "left. 23 - 15 is 8. The answer is 8.",
    ),
)
GSM8K_STOP = ("Q:", "</s>", "<|im_end|>")
GSM8K_STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")  # the final "." matches any character
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")  # removed, in this order, before exact match
INVALID = "[invalid]"  # what a regex filter yields when nothing matches


def gsm8k_doc_to_text(question: str) -> str:
    return f"Q: {question}\nA: Let's think step by step."


def gsm8k_prompt(question: str, exemplars) -> str:
    """The first exemplars (question, chain-of-thought target) as lm-eval joins them, then the question."""
    shots = "".join(gsm8k_doc_to_text(q) + TARGET_DELIMITER + t + FEWSHOT_DELIMITER for q, t in exemplars)
    return shots + gsm8k_doc_to_text(question)


def gsm8k_target(answer: str) -> str:
    """lm-eval's reference: the text after the last '####', stripped ('1,018' stays '1,018')."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '#### N' line: {answer[-80:]!r}")
    return answer.split("####")[-1].strip()


def regex_extract(text: str, pattern: re.Pattern, select: int = 0, fallback: str = INVALID) -> str:
    """Match number `select` of `pattern` (with groups: its first non-empty group), stripped; else `fallback`."""
    matches = pattern.findall(text)
    if not matches:
        return fallback
    match = matches[select]
    if isinstance(match, tuple):
        match = next((g for g in match if g), fallback)
    return match.strip()


def extract_strict(completion: str) -> str:
    """lm-eval's strict-match filter: the number of the first 'The answer is N.'"""
    return regex_extract(completion, GSM8K_STRICT, 0)


def extract_flexible(completion: str) -> str:
    """lm-eval's flexible-extract filter: the last number-like run ('$1,234.' stays as it is)."""
    return regex_extract(completion, GSM8K_FLEXIBLE, -1)


def gsm8k_exact_match(prediction: str, reference: str) -> bool:
    """lm-eval's exact_match with the task's options: a string comparison after the ignored patterns."""

    def clean(s: str) -> str:
        for pattern in GSM8K_IGNORE:
            s = re.sub(pattern, "", s)
        return s.lower().rstrip("\x00")  # numpy string arrays drop trailing NULs

    return clean(prediction) == clean(reference)


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


def _clean_number(text: str) -> str:
    return text.replace("$", "").replace(",", "").rstrip(".")


def last_number(completion: str) -> str | None:
    """The last number in the text ('1,234' -> '1234', '$5' -> '5', '-3.' -> '-3'), for the lenient score."""
    found = _NUMBER.findall(completion)
    return _clean_number(found[-1]) if found else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Equal values of two plain numbers ('18.00' == '18'); strings that are not numbers compare as text."""
    if a is None or b is None:
        return False
    a, b = _clean_number(a), _clean_number(b)
    try:
        return Fraction(a) == Fraction(b)
    except (ValueError, ZeroDivisionError):
        return a == b


def gsm8k_exemplar(record: dict) -> tuple[str, str]:
    """A few-shot exemplar from a record: {question, target} as in the yaml, or a GSM8K train record
    {question, answer} turned into that format (calculator notes dropped, '#### N' -> 'The answer is N.')."""
    if "target" in record:
        return record["question"], record["target"]
    if "####" not in record.get("answer", ""):
        raise ValueError(f"a GSM8K exemplar needs 'target', or an 'answer' with '#### N'; it has {sorted(record)}")
    reasoning, _, number = re.sub(r"<<[^>]*>>", "", record["answer"]).rpartition("####")
    return record["question"], f"{' '.join(reasoning.split())} The answer is {number.strip()}."


class GSM8K(Task):
    """lm-eval's gsm8k_cot_sean; `fewshot_path` replaces the built-in exemplars (see `gsm8k_exemplar`)."""

    name, stop_strings = "gsm8k", GSM8K_STOP
    metrics = ("strict-match", "flexible-extract", "flexible-numeric")

    def __init__(self, path, limit, fewshot: int = 1, fewshot_path=None, **_) -> None:
        shots = fewshot_pool(fewshot, GSM8K_EXEMPLARS, fewshot_path, ("question",), gsm8k_exemplar)
        self.examples = [
            Example(gsm8k_prompt(r["question"], shots), gsm8k_target(r["answer"]))
            for r in load_records(path, ("question", "answer"), limit)
        ]

    def score(self, completion: str, example: Example) -> dict:
        strict, flexible, number = extract_strict(completion), extract_flexible(completion), last_number(completion)
        return {
            "strict-match_answer": strict,
            "flexible-extract_answer": flexible,
            "flexible-numeric_answer": number,
            "strict-match": gsm8k_exact_match(strict, example.reference),
            "flexible-extract": gsm8k_exact_match(flexible, example.reference),
            "flexible-numeric": numbers_equal(number, example.reference),
        }
