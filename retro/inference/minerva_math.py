"""MATH is lm-eval's `minerva_math` (7 subjects, 5,000 problems; MATH-500 works the same way):
"Problem:\\n{problem}\\n\\nSolution:" with the first k of the four Minerva exemplars, stop at
"Problem:" and EOS. Scores: `exact_match` (the answer after "Final Answer: The final answer is",
Minerva-normalised, equal as a string or by sympy after `parse_latex`, against the normalised last
\\boxed{} of the reference solution), `math_verify` (the math-verify package on the whole
completion against the whole solution) and the extra `boxed-lenient` (the last \\boxed{} of the
completion against the reference answer with retro's own normaliser). `lm_eval_version` picks
whose minerva_math to reproduce: "0.4.13" (the installed reference) or "0.4.11" (the paper's lock
file), which differ in two exemplar typos and in how units and thousands commas are normalised."""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from retro.inference.boxed import last_boxed, math_equal
from retro.inference.task_base import (
    FEWSHOT_DELIMITER,
    LM_EVAL_VERSIONS,
    TARGET_DELIMITER,
    Example,
    Task,
    fewshot_pool,
    load_records,
)

# The four Minerva exemplars of lm-eval's minerva_math, in order (problem, solution).
MATH_EXEMPLARS: tuple[tuple[str, str], ...] = (
    (
        "Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
        "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and "
        "$5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives $x<5$. "
        "Therefore, the domain of the expression is $\\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$. "
        "I hope it is correct.",
    ),
    (
        "If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
        "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = "
        "\\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct.",
    ),
    (
        "Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many "
        "times must Terrell lift them in order to lift the same total weight?",
        "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of "
        "weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of "
        "$2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$:\n"
        "\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\n"
        "Final Answer: The final answer is $16$. I hope it is correct.",
    ),
    (
        "If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a solution "
        "$(x, y)$ where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ assuming $b$ is nonzero.",
        "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we also "
        "know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\n"
        "Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.",
    ),
)


def math_exemplars(lm_eval_version: str = "0.4.13") -> tuple[tuple[str, str], ...]:
    """The Minerva exemplars as that lm-eval release spells them: 0.4.11 (the paper's) has a stray '}' after
    the first problem and a single backslash before the line breaks of two align* blocks."""
    _check_version(lm_eval_version)
    if lm_eval_version == "0.4.13":
        return MATH_EXEMPLARS
    (p0, s0), shot1, (p2, s2), (p3, s3) = MATH_EXEMPLARS
    return (p0 + "}", s0), shot1, (p2, s2.replace("\\\\\n", "\\\n")), (p3.replace("\\\\\n", "\\\n"), s3)


def _check_version(version: str) -> None:
    if version not in LM_EVAL_VERSIONS:
        raise ValueError(f"lm_eval_version must be one of {LM_EVAL_VERSIONS}, got {version!r}")


MATH_STOP = ("Problem:",)


def math_doc_to_text(problem: str) -> str:
    return f"Problem:\n{problem}\n\nSolution:"


def math_prompt(problem: str, exemplars) -> str:
    shots = "".join(math_doc_to_text(p) + TARGET_DELIMITER + s + FEWSHOT_DELIMITER for p, s in exemplars)
    return shots + math_doc_to_text(problem)


def minerva_last_boxed(text: str) -> str | None:
    """The last boxed expression with its command, as Minerva's scorer finds it: '\\boxed{...}' with balanced
    braces (or '\\fbox{...}' when there is no \\boxed); when the text has '\\boxed ' (a space), whatever
    follows the last one up to the next '$'."""
    if "\\boxed " in text:
        return "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
    if start < 0:
        return None
    depth = 0
    for j in range(start, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[start : j + 1]
    return None


def remove_boxed(boxed: str | None) -> str | None:
    """'\\boxed{x}' or '\\boxed x' -> 'x'; anything else (e.g. '\\fbox{x}') -> None."""
    if boxed is None:
        return None
    if boxed.startswith("\\boxed "):
        return boxed[len("\\boxed ") :]
    if boxed.startswith("\\boxed{") and boxed.endswith("}"):
        return boxed[len("\\boxed{") : -1]
    return None


def unnormalized_answer(completion: str) -> str:
    """The text after 'Final Answer: The final answer is' up to the character before ' I hope it is correct.',
    stripped; '[invalidanswer]' without such a line. 'I hope it is correct.' is appended first, so a completion
    cut after 'is $4$ ' still counts (as '$4': the '.' of the pattern takes the closing '$')."""
    match = re.search(
        r"Final Answer: The final answer is(.*?). I hope it is correct.", completion + "I hope it is correct."
    )
    return match.group(1).strip() if match else "[invalidanswer]"


# Appendix D of Lewkowycz et al. (2022), "Solving quantitative reasoning problems with language models".
MINERVA_SUBSTITUTIONS = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)
MINERVA_REMOVED = (
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "ft",
    "hours",
    "km",
    "units",
    "\\ldots",
    "sue",
    "points",
    "feet",
    "minutes",
    "digits",
    "cents",
    "degrees",
    "cm",
    "gm",
    "pounds",
    "meters",
    "meals",
    "edges",
    "students",
    "childrentickets",
    "multiples",
    "\\text{s}",
    "\\text{.}",
    "\\text{\ns}",
    "\\text{}^2",
    "\\text{}^3",
    "\\text{\n}",
    "\\text{}",
    "\\mathrm{th}",
    "^\\circ",
    "^{\\circ}",
    "\\;",
    ",\\!",
    "{,}",
    '"',
    "\\dots",
)
_LATEX_COMMAND = re.compile(r"(\\[a-zA-Z]+)")


def _remove_outside_commands(text: str, word: str) -> str:
    """Remove `word` everywhere except inside LaTeX command names ('ft' stays in '\\left')."""
    parts = _LATEX_COMMAND.split(text)  # odd indices are the commands
    return "".join(part if i % 2 else part.replace(word, "") for i, part in enumerate(parts))


def normalize_final_answer(answer: str, lm_eval_version: str = "0.4.13") -> str:
    """Minerva's answer normalisation. With "0.4.13" unit words are removed as whole words first and never
    from inside a LaTeX command, '\\sqrt[3]a' becomes '\\sqrt[3]{a}', and commas are dropped only from
    thousands groups ('1,000' -> '1000', '0,1' kept); "0.4.11" is the original (plain replacements)."""
    _check_version(lm_eval_version)
    new = lm_eval_version == "0.4.13"
    s = answer.split("=")[-1]
    words = [w for w in MINERVA_REMOVED if w.isalpha()]
    if new:
        for word in words:
            s = re.sub(rf"(?<!\\)\b{word}\b", "", s)
    for old, repl in MINERVA_SUBSTITUTIONS:
        s = s.replace(old, repl)
    for expr in MINERVA_REMOVED:
        s = _remove_outside_commands(s, expr) if new and expr.isalpha() else s.replace(expr, "")
    s = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", r"$\3$", s)  # keep the first $...$
    for command in ("text", "textbf", "overline"):
        s = re.sub(rf"(\\{command}\{{)(.*?)(\}})", r"\2", s)
    s = re.sub(r"(\\boxed\{)(.*)(\})", r"\2", s)
    s = re.sub(r"(frac)([^{])(.)", r"frac{\2}{\3}", s)  # \frac12 -> \frac{1}{2}
    if new:
        s = re.sub(r"(sqrt)(\[[^\]]*\])(\w)", r"\1\2{\3}", s)
        s = re.sub(r"(sqrt)(?!\[)([^{])", r"sqrt{\2}", s)
    else:
        s = re.sub(r"(sqrt)([^{])", r"sqrt{\2}", s)
    s = s.replace("$", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+", s) if new else s.replace(",", "").isdigit():
        s = s.replace(",", "")
    return s


def minerva_reference(solution: str, lm_eval_version: str = "0.4.13") -> str | None:
    """The normalised answer of a reference solution (its last \\boxed{}), as minerva_math's process_docs."""
    inner = remove_boxed(minerva_last_boxed(solution))
    return None if inner is None else normalize_final_answer(inner, lm_eval_version)


@contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """Raise TimeoutError after `seconds` (SIGALRM: main thread only; elsewhere no limit)."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def minerva_equiv(predicted: str, reference: str, lm_eval_version: str = "0.4.13") -> bool:
    """Normalised answers are equal: as strings (0.4.13 only), or by sympy (parse_latex both, the difference
    simplifies to 0, within 5 s). A parse or sympy failure counts as not equal."""
    if lm_eval_version == "0.4.13" and predicted and predicted == reference:
        return True
    from sympy import simplify
    from sympy.parsing.latex import parse_latex

    try:
        with _time_limit(5):
            return bool(simplify(parse_latex(predicted) - parse_latex(reference)) == 0)
    except ImportError:  # no antlr4 runtime: a broken install, not a wrong answer
        raise
    except Exception:  # noqa: BLE001  (parse errors, sympy errors, the time limit)
        return False


def math_verify_equal(solution: str, completion: str) -> bool:
    """math-verify's verdict on the whole completion against the whole reference solution."""
    from math_verify import parse, verify

    return bool(verify(gold=parse(solution), target=parse(completion)))


def require_math_scorers() -> None:
    """Fail early, with the fix, when the MATH scorers cannot run."""
    try:
        import math_verify  # noqa: F401
        from sympy.parsing.latex import parse_latex

        parse_latex("1")
    except ImportError as error:
        raise ImportError(
            f"--task math needs math-verify and antlr4-python3-runtime 4.11 ({error}); "
            "install them with pip install -e '.[eval]'"
        ) from None


class MATH(Task):
    """lm-eval's minerva_math (or minerva_math500 on MATH-500). Records need `problem` and `solution`; a
    record with only `answer` is scored against '\\boxed{answer}' as its solution."""

    name, stop_strings = "math", MATH_STOP
    metrics = ("exact_match", "math_verify", "boxed-lenient")

    def __init__(self, path, limit, fewshot: int = 1, fewshot_path=None, lm_eval_version: str = "0.4.13") -> None:
        _check_version(lm_eval_version)
        require_math_scorers()
        self.lm_eval_version = lm_eval_version
        shots = fewshot_pool(
            fewshot,
            math_exemplars(lm_eval_version),
            fewshot_path,
            ("problem", "solution"),
            lambda r: (r["problem"], r["solution"]),
        )
        self.examples = []
        for i, r in enumerate(load_records(path, ("problem",), limit)):
            if "solution" not in r and "answer" not in r:
                raise ValueError(f"{path} record {i}: a MATH record needs 'solution' or 'answer'; it has {sorted(r)}")
            solution = r.get("solution") or f"$\\boxed{{{r.get('answer', '')}}}$"
            reference = minerva_reference(solution, lm_eval_version)
            if reference is None:  # a solution without a \boxed{} answer: use the answer field
                if "answer" not in r:
                    raise ValueError(f"{path} record {i}: the solution has no \\boxed{{}} answer and no 'answer' field")
                reference = normalize_final_answer(str(r["answer"]), lm_eval_version)
            answer = str(r["answer"]) if "answer" in r else remove_boxed(minerva_last_boxed(solution))
            doc = {"solution": solution, "answer": answer}
            subject = r.get("subject") or r.get("type")
            if subject:
                doc["subject"] = str(subject)
            self.examples.append(Example(math_prompt(r["problem"], shots), reference, doc))

    def score(self, completion: str, example: Example) -> dict:
        predicted = normalize_final_answer(unnormalized_answer(completion), self.lm_eval_version)
        boxed = last_boxed(completion)
        return {
            "exact_match_answer": predicted,
            "boxed-lenient_answer": boxed,
            "exact_match": minerva_equiv(predicted, example.reference, self.lm_eval_version),
            "math_verify": math_verify_equal(example.doc["solution"], completion),
            "boxed-lenient": math_equal(boxed, example.doc["answer"] or ""),
        }
