"""Tokenizing documents for `retro.data.prepare`: the tokenizer, its per-document special tokens,
chat rendering with the assistant's loss mask, and batch encoding in K processes with bounded memory.

The loss mask of a chat conversation (`--loss-on assistant`) comes from rendering it prefix by
prefix: assistant turn i covers the characters that `messages[:i + 1]` adds to `messages[:i]`
rendered with the generation prompt (the assistant's header), i.e. its content and whatever the
template writes after it (the end-of-turn token). Every token of the full rendering that overlaps
such a span (the fast tokenizer's character offsets) is a loss token, so the ids are exactly those
of `--loss-on all`. Why not `return_assistant_tokens_mask`: it needs a template with
`{% generation %}` markers, which few chat templates carry. Limits: a template that renders a turn
differently once later turns follow (e.g. one that drops the reasoning of earlier turns) is refused
with an error naming the row; a template without a generation prompt makes the assistant's header
count as loss tokens (prepare warns).
"""

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
_MASK = False  # --loss-on assistant: also return the assistant's loss mask


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


def render(tokenizer: Any, messages: list[dict], generation_prompt: bool = False) -> str:
    """The chat template's text of `messages` (with the assistant's header after them if `generation_prompt`)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, [start, end) character spans of each assistant turn's content and end-of-turn text).

    Raises ValueError when the template does not render the conversation prefix by prefix."""
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before, through = render(tokenizer, messages[:i], True), render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(
                f"the chat template does not render this conversation prefix by prefix (assistant message {i}), so "
                "its assistant tokens cannot be found; pass --loss-on all"
            )
        spans.append((len(before), len(through)))
    return text, spans


def has_generation_prompt(tokenizer: Any) -> bool:
    """Whether the template writes an assistant header for add_generation_prompt (else the header is a loss token)."""
    probe = [{"role": "user", "content": "hello"}]
    return render(tokenizer, probe, True) != render(tokenizer, probe)


def spans_to_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """uint8 per token: 1 where the token's characters [start, end) overlap a span."""
    mask = np.zeros(len(offsets), dtype=np.uint8)
    if offsets and spans:
        bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        for a, b in spans:
            mask |= (bounds[:, 0] < b) & (bounds[:, 1] > a)
    return mask


def _init_encoder(tokenizer_name: str, chat: bool, mask: bool, in_pool: bool) -> None:
    global _TOKENIZER, _CHAT, _MASK
    if in_pool:  # K processes already; the tokenizer's own thread pool would oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    _TOKENIZER = AutoTokenizer.from_pretrained(tokenizer_name)
    _CHAT, _MASK = chat, mask


def _encode(values: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """-> (all ids concatenated as int64, per-document lengths, their uint8 loss mask or None). Flat
    arrays pickle fast.

    Special tokens are added by the caller (see `special_tokens`), so an empty text stays empty."""
    spans: list[list[tuple[int, int]]] = []
    if _MASK:
        rendered = [assistant_spans(_TOKENIZER, m) for m in values]
        texts, spans = [text for text, _ in rendered], [span for _, span in rendered]
    elif _CHAT:
        texts = [render(_TOKENIZER, m) for m in values]
    else:
        texts = values
    enc = _TOKENIZER(texts, add_special_tokens=False, return_attention_mask=False, return_offsets_mapping=_MASK)
    ids = enc["input_ids"]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    if not _MASK:
        return flat, lengths, None
    masks = [spans_to_mask(o, s) for o, s in zip(enc["offset_mapping"], spans)]
    return flat, lengths, np.concatenate(masks) if masks else np.zeros(0, dtype=np.uint8)


def encoded_batches(
    sources: list[Source], args: argparse.Namespace, tokenizer_name: str
) -> Iterator[tuple[Source, int, np.ndarray, np.ndarray, np.ndarray | None]]:
    """Encode batches in order, with at most 2*K batches in flight (bounded memory on huge inputs).

    Yields (source, first row, ids, lengths, loss mask or None); the mask with args.loss_on == "assistant"."""
    mask = args.loss_on == "assistant"

    def tasks() -> Iterator[tuple[Source, int, list[Any]]]:
        for src in sources:
            for row, values in iter_batches(src, args):
                yield src, row, values

    def encoded(src: Source, row: int, n: int, encode) -> tuple[Source, int, np.ndarray, np.ndarray, np.ndarray | None]:
        try:
            return (src, row, *encode())
        except Exception as e:  # e.g. a chat template that cannot render a row's messages
            raise InputError(
                f"{src.name}: rows {row}..{row + n - 1} cannot be encoded ({type(e).__name__}: {e})"
            ) from e

    if args.num_proc <= 1:
        _init_encoder(tokenizer_name, args.chat, mask, in_pool=False)
        for src, row, values in tasks():
            yield encoded(src, row, len(values), lambda: _encode(values))
        return
    # fork (where available) before any dataset reader thread starts: workers inherit the imports
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(args.num_proc, initializer=_init_encoder, initargs=(tokenizer_name, args.chat, mask, True)) as pool:
        pending: deque = deque()
        for src, row, values in tasks():
            pending.append((src, row, len(values), pool.apply_async(_encode, (values,))))
            if len(pending) >= 2 * args.num_proc:
                s, r, n, res = pending.popleft()
                yield encoded(s, r, n, res.get)
        while pending:
            s, r, n, res = pending.popleft()
            yield encoded(s, r, n, res.get)
