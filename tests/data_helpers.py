"""Tiny local tokenizers and corpora for the data tests (no downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
# A ChatML-like template: each turn ends with <|end|>, and the generation prompt is the assistant's header.
TURN_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def word_tokenizer(directory: Path, num_words: int, chat: bool = False) -> Path:
    """WordLevel tokenizer over words w0..w{num_words-1} plus [UNK], [EOS]; saved as an HF dir.

    num_words > 65534 makes a vocabulary that needs uint32 ids.
    """
    vocab = {"[UNK]": 0, "[EOS]": 1}
    for i in range(num_words):
        vocab[f"w{i}"] = i + 2
    if chat:
        for role in ("user", "assistant"):
            vocab[f"<|{role}|>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    return directory


def turn_tokenizer(directory: Path, num_words: int) -> Path:
    """word_tokenizer's words w0.. at ids 2.. plus <|system|>, <|user|>, <|assistant|>, <|end|> and TURN_TEMPLATE."""
    vocab = {"[UNK]": 0, "[EOS]": 1} | {f"w{i}": i + 2 for i in range(num_words)}
    for token in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        vocab[token] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")
    fast.chat_template = TURN_TEMPLATE
    fast.save_pretrained(str(directory))
    return directory


def random_chats(n: int, num_words: int, seed: int = 0, turns: int = 2) -> list[list[dict]]:
    """Conversations of `turns` (user, assistant) pairs of 1..8 random words each, some with a system turn."""
    rng = random.Random(seed)

    def words() -> str:
        return " ".join(f"w{rng.randrange(num_words)}" for _ in range(rng.randint(1, 8)))

    chats = []
    for _ in range(n):
        chat = [{"role": "system", "content": words()}] if rng.random() < 0.3 else []
        for _ in range(turns):
            chat += [{"role": "user", "content": words()}, {"role": "assistant", "content": words()}]
        chats.append(chat)
    return chats


def write_chats(path: Path, chats: list[list[dict]]) -> Path:
    with open(path, "w") as f:
        for chat in chats:
            f.write(json.dumps({"messages": chat}) + "\n")
    return path


def reversed_word_tokenizer(directory: Path, num_words: int) -> Path:
    """word_tokenizer's vocabulary size and words with the word ids reversed: another tokenizer of the same size."""
    vocab = {"[UNK]": 0, "[EOS]": 1} | {f"w{i}": num_words + 1 - i for i in range(num_words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(str(directory))
    return directory


def random_docs(n: int, num_words: int, seed: int = 0, min_len: int = 1, max_len: int = 40, low: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(f"w{rng.randrange(low, num_words)}" for _ in range(rng.randint(min_len, max_len))) for _ in range(n)
    ]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({field: d}) + "\n")
    return path


def prepare_dir(out: Path, inputs: list[Path], tokenizer: Path, *extra: str) -> Path:
    """Run `retro.data.prepare` in-process (single encoder process) and return OUT."""
    from retro.data.prepare import main

    rc = main(["--input", *map(str, inputs), "--tokenizer", str(tokenizer), "--out", str(out), "--quiet", *extra])
    assert rc == 0, f"prepare failed for {inputs}"
    return out
