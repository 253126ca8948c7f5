"""A word-level tokenizer for the demo task, built locally (no download).

Every token of the task is a whitespace-separated word: digits, operation names and `=`. A
WordLevel model over exactly that vocabulary encodes problems losslessly, so the answer is one
token and the model's vocabulary stays tiny (22 ids).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from retro.demo.task import DIGITS, OPERATIONS, SYMBOLS

SPECIAL = ("[UNK]", "[EOS]", "[PAD]")


def build_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Save a Hugging Face tokenizer directory (tokenizer.json + config) and return it."""
    words = [*SPECIAL, *DIGITS, *OPERATIONS, *SYMBOLS]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", pad_token="[PAD]")
    fast.save_pretrained(str(directory))
    return fast
