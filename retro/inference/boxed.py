"""retro's own lenient MATH scorer (`boxed-lenient`): the last \\boxed{} of a completion, normalised
(dfrac, \\left, units, 1/2 == 0.5) and compared with the reference answer. Not an lm-eval metric."""

from __future__ import annotations

import re
from fractions import Fraction


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} (balanced braces), or the token after '\\boxed '
    ('\\boxed 5. Also' -> '5'), for the lenient score."""
    found = list(re.finditer(r"\\(?:boxed|fbox)", text))
    if not found:
        return None
    rest = text[found[-1].end() :]
    if rest.lstrip().startswith("{"):
        i = len(rest) - len(rest.lstrip())
        depth = 0
        for j in range(i, len(rest)):
            depth += {"{": 1, "}": -1}.get(rest[j], 0)
            if depth == 0:
                return rest[i + 1 : j]
        return None
    match = re.match(r"\s+([^\s$]+)", rest)
    token = match.group(1).rstrip(".,;:") if match else ""
    return token or None


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{b} -> \\frac{1}{b}."""
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    return re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)


def normalize_math(answer: str) -> str:
    """retro's lenient canonical form of a MATH answer: spacing, \\left/\\right, dfrac, degrees, %, $, text
    wrappers, 'x =' prefixes, thousands commas and trailing zeros are removed or unified."""
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
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s).replace(" ", "").rstrip(".")
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
    """Lenient: equal after `normalize_math`, or the same numeric value (\\frac{1}{2} == 1/2 == 0.5)."""
    if predicted is None:
        return False
    a, b = normalize_math(predicted), normalize_math(reference)
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    return x is not None and x == y
