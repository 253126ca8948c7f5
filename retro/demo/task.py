"""The demo's synthetic reasoning task: chains of variable assignments, arithmetic mod 10.

A problem with k steps reads

    q = 3 ; f = q + 4 ; x = f - 7 ; ? x = 0        (evaluation prompt and answer)
    q = 3 ; f = q + 4 ; x = f - 7 ; ? f = 7 ? x = 0 ? q = 3    (training document)

Each statement needs the value of the one before it, so the answer takes k sequential steps: a
fixed-depth model can only follow as many steps as its layers allow, which is the kind of problem
where running a recurrent block longer should help. The answer is a single token (a digit).
Training and evaluation problems are drawn from one generator and the evaluation set is removed
from the training corpus by exact text, so every evaluation problem is unseen, at every k.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

VARIABLES = tuple(string.ascii_lowercase)
DIGITS = tuple(str(d) for d in range(10))
SYMBOLS = ("=", ";", "+", "-", "?")


@dataclass(frozen=True)
class Problem:
    """One chain. `prompt` (the chain, then `? <last variable> =`) is what evaluation asks; `answer` is
    the digit that follows it. `text`, the training document, asks every variable once, in a random
    order: the query of a variable j statements down the chain needs j steps, so one document
    carries answers at every depth up to k (denser supervision than one answer per document).
    """

    steps: int
    chain: str
    queries: tuple[tuple[str, str], ...]  # (variable, value) in the order the document asks them
    answer: str

    @property
    def prompt(self) -> str:
        return f"{self.chain} ? {self.last} ="

    @property
    def last(self) -> str:
        return self.chain.split(";")[-2].split()[0]

    @property
    def text(self) -> str:
        return " ".join([self.chain, *(f"? {name} = {value}" for name, value in self.queries)])


def make_problem(steps: int, rng: random.Random) -> Problem:
    """A chain of `steps` dependent statements after the initial assignment (steps >= 1)."""
    if steps < 1:
        raise ValueError(f"a problem needs at least one step, got steps={steps}")
    if steps + 1 > len(VARIABLES):
        raise ValueError(f"steps={steps} needs {steps + 1} distinct variable names; only {len(VARIABLES)} exist")
    names = rng.sample(VARIABLES, steps + 1)
    value = rng.randrange(10)
    values = [value]
    parts = [f"{names[0]} = {value} ;"]
    for i in range(1, steps + 1):
        op, operand = rng.choice("+-"), rng.randrange(1, 10)
        value = (value + operand if op == "+" else value - operand) % 10
        values.append(value)
        parts.append(f"{names[i]} = {names[i - 1]} {op} {operand} ;")
    order = rng.sample(range(steps + 1), steps + 1)
    return Problem(steps, " ".join(parts), tuple((names[i], str(values[i])) for i in order), str(value))


def solve(prompt: str) -> str:
    """Reference solver (the generator's inverse), used by tests to check problems and answers."""
    values: dict[str, int] = {}
    statements = [s.split() for s in prompt.split(";")]
    for words in statements[:-1]:
        if len(words) == 3:
            values[words[0]] = int(words[2])
        else:
            name, _, source, op, operand = words
            values[name] = (values[source] + int(operand) * (1 if op == "+" else -1)) % 10
    query = statements[-1]
    if len(query) != 3 or query[0] != "?" or query[2] != "=":
        raise ValueError(f"malformed query {' '.join(query)!r} in {prompt!r}")
    return str(values[query[1]])


def build_splits(max_steps: int, train_per_step: int, eval_per_step: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, eval): equal counts per k = 1..max_steps; no eval problem's text occurs in train."""
    rng = random.Random(seed)
    evals: list[Problem] = []
    seen: set[str] = set()
    for k in range(1, max_steps + 1):
        made = 0
        while made < eval_per_step:
            p = make_problem(k, rng)
            if p.chain not in seen:
                seen.add(p.chain)
                evals.append(p)
                made += 1
    train = []
    for k in range(1, max_steps + 1):
        made = 0
        while made < train_per_step:
            p = make_problem(k, rng)
            if p.chain not in seen:
                train.append(p)
                made += 1
    rng.shuffle(train)
    return train, evals


def write_corpus(problems: list[Problem], path: Path) -> Path:
    """JSONL with one document per problem ({"text": ...}), the input of retro.data.prepare."""
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps({"text": p.text}) + "\n")
    return path


def write_eval(problems: list[Problem], path: Path) -> Path:
    """JSONL of held-out problems: steps, prompt (ends with '='), answer."""
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps({"steps": p.steps, "prompt": p.prompt, "answer": p.answer}) + "\n")
    return path


def read_eval(path: Path) -> list[dict]:
    """Rows of `write_eval`: {"steps", "prompt", "answer"}."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
