"""Tokenizing documents for `retro.data.prepare`: the tokenizer, its per-document special tokens,
and batch encoding in K processes with bounded memory."""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from retro.data.sources import InputError, Source, iter_batches

_TOKENIZER: Any = None
_CHAT = False


def load_tokenizer(name: str) -> Any:
    """AutoTokenizer for a local directory or hub name; an error naming --tokenizer if that fails."""
    from transformers import AutoTokenizer

    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"--tokenizer {name}: is a file; pass the directory holding the tokenizer files")
    if not path.exists() and (path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1):
        raise FileNotFoundError(f"--tokenizer {name}: no such directory")
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # transformers raises OSError, ValueError, TypeError, ... for unusable directories
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--tokenizer {name}: cannot load a tokenizer ({type(e).__name__}: {first})") from None


def special_tokens(tokenizer: Any, name: str) -> tuple[list[int], list[int]]:
    """(ids before, ids after) the text that `tokenizer(text, add_special_tokens=True)` adds to every
    document: ([bos], []) for Llama-family tokenizers, ([], []) for GPT-2. Found by encoding a probe
    with and without special tokens, so documents are encoded once, without them."""
    probe = "hello world"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if plain and full[k : k + len(plain)] == plain:
            return full[:k], full[k + len(plain) :]
    raise ValueError(
        f"--tokenizer {name}: cannot tell which special tokens it adds to a text ({probe!r} -> {full} with, "
        f"{plain} without); pass --no-add-special-tokens"
    )


def _init_encoder(tokenizer_name: str, chat: bool, in_pool: bool) -> None:
    global _TOKENIZER, _CHAT
    if in_pool:  # K processes already; the tokenizer's own thread pool would oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    _TOKENIZER = AutoTokenizer.from_pretrained(tokenizer_name)
    _CHAT = chat


def _encode(values: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """-> (all ids concatenated as int64, per-document lengths). Flat arrays pickle fast.

    Special tokens are added by the caller (see `special_tokens`), so an empty text stays empty."""
    if _CHAT:
        texts = [_TOKENIZER.apply_chat_template(m, tokenize=False) for m in values]
    else:
        texts = values
    ids = _TOKENIZER(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def encoded_batches(
    sources: list[Source], args: argparse.Namespace, tokenizer_name: str
) -> Iterator[tuple[Source, int, np.ndarray, np.ndarray]]:
    """Encode batches in order, with at most 2*K batches in flight (bounded memory on huge inputs)."""

    def tasks() -> Iterator[tuple[Source, int, list[Any]]]:
        for src in sources:
            for row, values in iter_batches(src, args):
                yield src, row, values

    def encoded(src: Source, row: int, n: int, encode) -> tuple[Source, int, np.ndarray, np.ndarray]:
        try:
            return (src, row, *encode())
        except Exception as e:  # e.g. a chat template that cannot render a row's messages
            raise InputError(
                f"{src.name}: rows {row}..{row + n - 1} cannot be encoded ({type(e).__name__}: {e})"
            ) from e

    if args.num_proc <= 1:
        _init_encoder(tokenizer_name, args.chat, in_pool=False)
        for src, row, values in tasks():
            yield encoded(src, row, len(values), lambda: _encode(values))
        return
    # fork (where available) before any dataset reader thread starts: workers inherit the imports
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(args.num_proc, initializer=_init_encoder, initargs=(tokenizer_name, args.chat, True)) as pool:
        pending: deque = deque()
        for src, row, values in tasks():
            pending.append((src, row, len(values), pool.apply_async(_encode, (values,))))
            if len(pending) >= 2 * args.num_proc:
                s, r, n, res = pending.popleft()
                yield encoded(s, r, n, res.get)
        while pending:
            s, r, n, res = pending.popleft()
            yield encoded(s, r, n, res.get)
