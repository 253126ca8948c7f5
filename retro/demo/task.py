"""The demo's synthetic reasoning task: composing fixed permutations of the ten digits.

A handful of operations `a b c d` are fixed random permutations of 0..9 (drawn once from the task
seed). A problem with k steps reads

    3 b a d = 7        (prompt `3 b a d =`, answer `7` = d(a(b(3))))

Each operation is a lookup the model can memorise from the one-step problems, but the answer of a
k-step problem needs the k lookups in order: permutations do not commute and have no running-sum
shortcut, so a fixed-depth model can follow only as many steps as its layers allow, the kind of
problem where running a recurrent block longer should help. The answer is one token (a digit).

Held-out problems: at every k >= 2 a random subset of the operation sequences is reserved, and no
training document uses a reserved sequence (with any start digit), so every k >= 2 evaluation
problem is an unseen composition. At k = 1 there are only 10 x (number of operations) problems and
they are the facts to memorise: the k = 1 evaluation is all of them, seen in training.
"""

from __future__ import annotations

import itertools
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

DIGITS = tuple(str(d) for d in range(10))
OPERATIONS = tuple(string.ascii_lowercase[:8])  # the tokenizer's names; a task uses the first num_ops
SYMBOLS = ("=",)


@dataclass(frozen=True)
class Problem:
    """One composition: `prompt` (start digit, operation names, `=`) is what evaluation asks; `answer`
    is the digit that follows it; `text`, the training document, is the prompt and its answer."""

    start: int
    ops: tuple[str, ...]
    answer: str

    @property
    def steps(self) -> int:
        return len(self.ops)

    @property
    def prompt(self) -> str:
        return " ".join([str(self.start), *self.ops, "="])

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}"


def make_permutations(num_ops: int, seed: int) -> dict[str, tuple[int, ...]]:
    """`num_ops` fixed random permutations of 0..9, none the identity, named a, b, c, ..."""
    if not 1 <= num_ops <= len(OPERATIONS):
        raise ValueError(f"num_ops must be in 1..{len(OPERATIONS)}, got {num_ops}")
    rng = random.Random(f"permutations-{seed}")
    perms: dict[str, tuple[int, ...]] = {}
    for name in OPERATIONS[:num_ops]:
        while True:
            p = tuple(rng.sample(range(10), 10))
            if p != tuple(range(10)) and p not in perms.values():
                perms[name] = p
                break
    return perms


def apply(perms: dict[str, tuple[int, ...]], start: int, ops: tuple[str, ...]) -> int:
    """The value after applying `ops` left to right to `start`."""
    value = start
    for name in ops:
        value = perms[name][value]
    return value


def make_problem(perms: dict[str, tuple[int, ...]], start: int, ops: tuple[str, ...]) -> Problem:
    if not ops:
        raise ValueError("a problem needs at least one step (operation), got none")
    unknown = [o for o in ops if o not in perms]
    if unknown:
        raise ValueError(f"unknown operations {unknown}; the task has {sorted(perms)}")
    return Problem(start, tuple(ops), str(apply(perms, start, tuple(ops))))


def solve(prompt: str, perms: dict[str, tuple[int, ...]]) -> str:
    """Reference solver from the prompt text, used by tests to check problems and answers."""
    words = prompt.split()
    if len(words) < 3 or words[-1] != "=" or not words[0].isdigit():
        raise ValueError(f"malformed prompt {prompt!r}: expected '<digit> <op> ... ='")
    return str(apply(perms, int(words[0]), tuple(words[1:-1])))


def _held_out_sequences(
    ops: tuple[str, ...], k: int, fraction: float, want: int, rng: random.Random
) -> set[tuple[str, ...]]:
    """A random `fraction` of the |ops|^k sequences of length k (at least one, at most `want`)."""
    total = len(ops) ** k
    n = min(want, max(1, round(fraction * total)))
    if total <= 100_000:
        return set(rng.sample(list(itertools.product(ops, repeat=k)), n))
    chosen: set[tuple[str, ...]] = set()
    while len(chosen) < n:
        chosen.add(tuple(rng.choice(ops) for _ in range(k)))
    return chosen


def build_splits(
    max_steps: int, train_per_step: int, eval_per_step: int, seed: int, num_ops: int = 4, held_out_fraction: float = 0.2
) -> tuple[dict[str, tuple[int, ...]], list[Problem], list[Problem]]:
    """(permutations, train, eval). Train: `train_per_step` random problems per k = 1..max_steps, none
    using a held-out sequence. Eval: at k = 1 all 10 x num_ops lookups; at k >= 2 up to `eval_per_step`
    distinct problems whose operation sequence is held out."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    perms = make_permutations(num_ops, seed)
    ops = tuple(perms)
    rng = random.Random(seed)
    evals = [make_problem(perms, s, (o,)) for o in ops for s in range(10)]
    reserved: set[tuple[str, ...]] = set()
    for k in range(2, max_steps + 1):
        held = _held_out_sequences(ops, k, held_out_fraction, eval_per_step, rng)
        reserved |= held
        pairs = [(s, seq) for seq in sorted(held) for s in range(10)]
        evals += [make_problem(perms, s, seq) for s, seq in rng.sample(pairs, min(eval_per_step, len(pairs)))]
    train = []
    for k in range(1, max_steps + 1):
        made = 0
        while made < train_per_step:
            seq = tuple(rng.choice(ops) for _ in range(k))
            if seq not in reserved:
                train.append(make_problem(perms, rng.randrange(10), seq))
                made += 1
    rng.shuffle(train)
    return perms, train, evals


def write_corpus(problems: list[Problem], path: Path) -> Path:
    """JSONL with one document per problem ({"text": ...}), the input of retro.data.prepare."""
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps({"text": p.text}) + "\n")
    return path


def write_eval(problems: list[Problem], path: Path) -> Path:
    """JSONL of evaluation problems: steps, prompt (ends with '='), answer."""
    with path.open("w") as f:
        for p in problems:
            f.write(json.dumps({"steps": p.steps, "prompt": p.prompt, "answer": p.answer}) + "\n")
    return path


def read_eval(path: Path) -> list[dict]:
    """Rows of `write_eval`: {"steps", "prompt", "answer"}."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
