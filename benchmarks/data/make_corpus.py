"""Write trainer_corpus.txt: seeded, English-like paragraphs for gpu_check.sh's trainer step (no downloads).

    python benchmarks/data/make_corpus.py   # rewrites benchmarks/data/trainer_corpus.txt, byte for byte

The trainer step measures throughput, so the text only has to tokenize into enough windows (10 steps x
8 x 1,025 tokens, plus a validation batch); what it says does not matter. Sentences are drawn from a
few templates over small word lists, one paragraph (document) per blank-line-separated block.
"""

from __future__ import annotations

import random
from pathlib import Path

NAMES = "Ada Ben Cleo Dara Eli Fern Gus Hana Ivo June Kai Lena Milo Nora Otto Pia Quin Rosa Sami Tess".split()
PLACES = "harbour valley library market garden station village forest bridge workshop river school".split()
NOUNS = (
    "lamp map letter river stone boat engine garden window clock bell song story ladder basket candle "
    "kettle field hill road cart coin shelf door book rope net seed cloud storm wheel tower path"
).split()
ADJECTIVES = "old quiet bright small heavy narrow warm cold green broken patient early careful distant".split()
VERBS = "found carried mended painted opened counted followed watched shared wrote built cleaned".split()
ADVERBS = "slowly gladly quietly early again carefully together soon twice finally".split()
TEMPLATES = (
    "{name} {verb} the {adj} {noun} near the {place}.",
    "In the {place}, {name} and {name2} {verb} a {adj} {noun} {adv}.",
    "The {noun} by the {place} was {adj}, so {name} {verb} it {adv}.",
    "Every morning {name} walked to the {place} and {verb} the {noun}.",
    "When the {adj} {noun} fell, {name} {verb} the {noun2} instead.",
    "{name} asked {name2} why the {noun} in the {place} looked so {adj}.",
)


def sentence(rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(
        name=rng.choice(NAMES),
        name2=rng.choice(NAMES),
        place=rng.choice(PLACES),
        noun=rng.choice(NOUNS),
        noun2=rng.choice(NOUNS),
        adj=rng.choice(ADJECTIVES),
        verb=rng.choice(VERBS),
        adv=rng.choice(ADVERBS),
    )


def corpus(paragraphs: int = 2000, seed: int = 0) -> str:
    """`paragraphs` blocks of 4-12 sentences, separated by blank lines."""
    rng = random.Random(seed)
    return "\n\n".join(" ".join(sentence(rng) for _ in range(rng.randint(4, 12))) for _ in range(paragraphs)) + "\n"


if __name__ == "__main__":
    out = Path(__file__).with_name("trainer_corpus.txt")
    out.write_text(corpus())
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
