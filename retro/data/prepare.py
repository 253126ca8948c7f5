"""Tokenize text once into memory-mapped token shards: `python -m retro.data.prepare`.

Reads a Hugging Face hub dataset (streamed) or local .jsonl/.json/.parquet/.txt files and globs
through `datasets`, encodes batches with the tokenizer's fast batch encoder in K processes,
adds the tokenizer's special tokens to each document (what `add_special_tokens=True` adds: a BOS
for Llama-family tokenizers, nothing for GPT-2; `--no-add-special-tokens` turns it off), appends
EOS and writes `{split}-NNNNN.bin` token shards, `.idx` document offsets and `manifest.json` (see
`retro.data.manifest`). With `--chat` (`--loss-on assistant`, its default) a `.mask` file per shard
marks the assistant's tokens, the only ones the loss counts (`retro.data.encode`); the BOS and EOS
that prepare adds around each conversation are not loss tokens. Everything is written into
`.OUT.partial` and renamed to OUT at the end, so an interrupted or failed run never leaves a
half-written OUT behind; re-running starts over cleanly. `--overwrite` replaces only a previous
shard directory (one with a retro manifest) or an empty directory, never one that holds an input.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from retro.data.encode import encoded_batches, has_generation_prompt, load_tokenizer, special_tokens
from retro.data.manifest import (
    DOC_INDEX_DTYPE,
    FORMAT_NAME,
    LOSS_ON,
    MANIFEST_NAME,
    MASK_DTYPE,
    Manifest,
    ShardInfo,
    SplitInfo,
    token_dtype_for,
    vocab_hash,
)
from retro.data.sources import Source, resolve_inputs
from retro.hf.output_dir import check_not_a_run, staged_output

log = logging.getLogger("retro.data.prepare")


# --- writing -----------------------------------------------------------------------------------
class SplitWriter:
    """Appends documents to `{split}-NNNNN.bin/.idx` (and `.mask` when masked), hashing while writing;
    docs never span shards."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int, masked: bool) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.masked = masked
        self.shards: list[ShardInfo] = []
        self._open_new = True

    def _start(self) -> None:
        i = len(self.shards)
        self._name = f"{self.split}-{i:05d}"
        self._f = open(self.directory / f"{self._name}.bin", "wb")
        self._fi = open(self.directory / f"{self._name}.idx", "wb")
        self._fm = open(self.directory / f"{self._name}.mask", "wb") if self.masked else None
        self._h, self._hi, self._hm = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
        self._tokens = self._docs = self._loss_tokens = 0
        self._open_new = False

    def add(self, docs: list[np.ndarray], masks: list[np.ndarray] | None = None) -> None:
        """Append documents (and, in a masked split, their loss masks, one per document)."""
        if self.masked != (masks is not None):
            raise ValueError(f"{self.split}: documents {'without' if self.masked else 'with'} loss masks")
        for k, d in enumerate(docs):
            if self._open_new:
                self._start()
            b = d.astype(self.dtype, copy=False).tobytes()
            off = np.array([self._tokens], dtype=DOC_INDEX_DTYPE).tobytes()
            self._f.write(b)
            self._h.update(b)
            self._fi.write(off)
            self._hi.update(off)
            if masks is not None:
                m = masks[k].astype(MASK_DTYPE, copy=False)
                self._fm.write(m.tobytes())
                self._hm.update(m.tobytes())
                self._loss_tokens += int(np.count_nonzero(m))
            self._tokens += len(d)
            self._docs += 1
            if self._tokens >= self.shard_tokens:
                self._close()

    def _close(self) -> None:
        self._f.close()
        self._fi.close()
        mask = {}
        if self._fm is not None:
            self._fm.close()
            mask = dict(mask_file=f"{self._name}.mask", mask_sha256=self._hm.hexdigest(), loss_tokens=self._loss_tokens)
        self.shards.append(
            ShardInfo(
                f"{self._name}.bin",
                f"{self._name}.idx",
                self._tokens,
                self._docs,
                self._h.hexdigest(),
                self._hi.hexdigest(),
                **mask,
            )
        )
        self._open_new = True

    def finish(self) -> SplitInfo:
        if not self._open_new:
            self._close()
        return SplitInfo(self.shards)


def check_output(out: Path, sources: list[Source], tokenizer_name: str, overwrite: bool) -> None:
    """--out may be new, or with --overwrite an empty directory or a previous shard directory (one with a
    retro manifest); never a file, and never a directory that holds an input."""
    where = out.resolve()
    inputs = [("--input", Path(s.name)) for s in sources if s.builder is not None]
    if Path(tokenizer_name).expanduser().exists():
        inputs.append(("--tokenizer", Path(tokenizer_name).expanduser()))
    for flag, path in inputs:
        if path.resolve().is_relative_to(where):
            raise ValueError(f"{flag} {path} is inside --out {out}; write the shards to another directory")
        if path.is_dir() and where.is_relative_to(path.resolve()):
            raise ValueError(f"--out {out} is inside {flag} {path}; write the shards outside it")
    check_not_a_run(out)  # never into a training run's directory or its folders, even with --overwrite
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a directory")
    if not overwrite:
        raise FileExistsError(f"{out}: output exists; pass --overwrite to replace it")
    if any(out.iterdir()) and not _is_shard_directory(out):
        raise FileExistsError(
            f"--overwrite: {out} is not empty and has no retro {MANIFEST_NAME}: not a shard directory written by "
            f"prepare, so it is not replaced; choose another --out"
        )


def _is_shard_directory(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST_NAME).read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def prepare(args: argparse.Namespace) -> Manifest:
    """Run the whole pipeline; returns the manifest written to args.out."""
    out = Path(args.out)
    if args.loss_on is None:
        args.loss_on = "assistant" if args.chat else "all"
    if not 0.0 <= args.val_fraction <= 0.5:
        raise ValueError(f"--val-fraction must be in [0, 0.5], got {args.val_fraction}")
    sources = resolve_inputs(args.input)
    check_output(out, sources, args.tokenizer, args.overwrite)
    tokenizer = load_tokenizer(args.tokenizer)
    if args.append_eos and tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {args.tokenizer!r} has no EOS token; pass --no-append-eos")
    if args.chat and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"--chat: tokenizer {args.tokenizer!r} has no chat template")
    if args.loss_on == "assistant":
        if not args.chat:
            raise ValueError("--loss-on assistant needs --chat (plain text has no assistant turns)")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"--loss-on assistant: tokenizer {args.tokenizer!r} is not a fast tokenizer (no character offsets to "
                "find the assistant's tokens); pass --loss-on all"
            )
        if not has_generation_prompt(tokenizer):
            log.warning(
                "--loss-on assistant: the chat template writes no generation prompt, so each assistant turn's "
                "header (whatever it writes before the content) counts as loss tokens"
            )
    prefix, suffix = special_tokens(tokenizer, args.tokenizer) if args.add_special_tokens else ([], [])
    if prefix or suffix:
        log.info("the tokenizer's special tokens around each document: %s ... %s", prefix, suffix)

    with staged_output(out) as tmp:
        _write_shards(tmp, sources, tokenizer, prefix, suffix, args)
    return Manifest.load(out)


def _write_shards(
    tmp: Path, sources: list[Source], tokenizer: Any, prefix: list[int], suffix: list[int], args: argparse.Namespace
) -> None:
    """Encode every source into shards under `tmp` and write the manifest there."""
    vocab_size = len(tokenizer)
    dtype = token_dtype_for(vocab_size)
    eos_id = tokenizer.eos_token_id
    # Each document: prefix (e.g. BOS), its ids, suffix, EOS (once, if the tokenizer's suffix lacks it).
    tail = suffix + ([eos_id] if args.append_eos and suffix[-1:] != [eos_id] else [])
    head_ids, tail_ids = np.array(prefix, dtype=np.int64), np.array(tail, dtype=np.int64)
    head_mask, tail_mask = np.zeros(len(prefix), dtype=MASK_DTYPE), np.zeros(len(tail), dtype=MASK_DTYPE)
    period = round(1 / args.val_fraction) if args.val_fraction > 0 else 0
    masked = args.loss_on == "assistant"
    writers = {s: SplitWriter(tmp, s, dtype, args.shard_tokens, masked) for s in ("train", "val")}
    doc_index = skipped = 0
    bar = tqdm(unit="tok", unit_scale=True, desc=f"prepare {Path(args.out).name}", disable=args.quiet or None)
    try:
        for src, row, flat, lengths, flat_mask in encoded_batches(sources, args, args.tokenizer):
            if flat.size and (flat.max() >= vocab_size or flat.min() < 0):
                bad = int(flat.max() if flat.max() >= vocab_size else flat.min())
                raise ValueError(
                    f"{src.name}: rows {row}..{row + len(lengths) - 1} encode to token id {bad}, outside the "
                    f"vocabulary of {args.tokenizer!r} (len {vocab_size}); the tokenizer is inconsistent"
                )
            split_docs: dict[str, list[np.ndarray]] = {"train": [], "val": []}
            split_masks: dict[str, list[np.ndarray]] = {"train": [], "val": []}
            written = 0
            cuts = np.cumsum(lengths)[:-1]
            doc_masks = np.split(flat_mask, cuts) if masked else [None] * len(lengths)
            for d, m in zip(np.split(flat, cuts), doc_masks):
                if d.size == 0:
                    skipped += 1
                    continue
                head = head_ids
                if args.chat and np.array_equal(d[: head.size], head):
                    head = head_ids[:0]  # the chat template wrote the BOS itself: never two
                if head.size or tail_ids.size:
                    d = np.concatenate([head, d, tail_ids])
                    m = np.concatenate([head_mask[: head.size], m, tail_mask]) if masked else None
                split = "val" if period and doc_index % period == period - 1 else "train"
                split_docs[split].append(d)
                split_masks[split].append(m)
                written += d.size
                doc_index += 1
            for split, docs in split_docs.items():
                writers[split].add(docs, split_masks[split] if masked else None)
            bar.update(written)
    finally:
        bar.close()
        splits = {s: w.finish() for s, w in writers.items()}
    if splits["train"].num_tokens == 0:
        raise ValueError(f"{', '.join(s.name for s in sources)}: empty input, no tokens to write")
    if masked and splits["train"].num_loss_tokens == 0:
        raise ValueError(
            f"{', '.join(s.name for s in sources)}: no assistant tokens in the train split (no message has role "
            "'assistant'?); nothing to train on with --loss-on assistant"
        )
    if period and splits["val"].num_docs == 0:
        log.warning("val split is empty: fewer than %d documents (val_fraction %s)", period, args.val_fraction)
    bos_id = tokenizer.bos_token_id
    manifest = Manifest(
        dtype=dtype.str,
        vocab_size=vocab_size,
        eos_id=eos_id,
        tokenizer_name=args.tokenizer,
        vocab_hash=vocab_hash(tokenizer),
        append_eos=args.append_eos,
        source=" ".join(args.input),
        text_field=args.text_field,
        splits=splits,
        chat=args.chat,
        val_fraction=args.val_fraction,
        skipped_empty_docs=skipped,
        add_special_tokens=args.add_special_tokens,
        bos_id=bos_id if bos_id is not None and bos_id in prefix else None,
        loss_on=args.loss_on,
    )
    manifest.save(tmp)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m retro.data.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--input", nargs="+", required=True, help="hub dataset name, or local .jsonl/.json/.parquet/.txt files or globs"
    )
    p.add_argument("--tokenizer", required=True, help="local tokenizer directory or hub name (AutoTokenizer)")
    p.add_argument("--out", required=True, help="output directory (created atomically)")
    p.add_argument("--text-field", default=None, help="field holding the text (default: text; messages with --chat)")
    p.add_argument("--split", default="train", help="split of a hub dataset to read")
    p.add_argument("--config", default=None, help="config (subset) of a hub dataset, e.g. sample-10BT")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.001,
        help="every round(1/f)-th document goes to the val split (0 disables)",
    )
    p.add_argument("--shard-tokens", type=int, default=2**28, help="close a shard after this many tokens")
    p.add_argument("--num-proc", type=int, default=1, help="encoding processes")
    p.add_argument("--batch-docs", type=int, default=1000, help="documents per encoding batch")
    p.add_argument(
        "--append-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="append the tokenizer's EOS id after each document",
    )
    p.add_argument(
        "--add-special-tokens",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add the special tokens the tokenizer puts around a text (add_special_tokens=True: a BOS for "
        "Llama-family tokenizers, nothing for GPT-2) to each document",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="render a list of {role, content} messages with the tokenizer's chat template",
    )
    p.add_argument(
        "--loss-on",
        choices=LOSS_ON,
        default=None,
        help="which tokens the loss counts: with --chat, 'assistant' (the default) stores a mask of the "
        "assistant's tokens beside the ids; 'all' counts every token (the only choice without --chat)",
    )
    p.add_argument(
        "--txt-sample-by",
        choices=("line", "paragraph", "document"),
        default="line",
        help=".txt inputs: what one document is",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.text_field is None:
        args.text_field = "messages" if args.chat else "text"
    if args.shard_tokens <= 0 or args.num_proc <= 0 or args.batch_docs <= 0:
        parser.error("--shard-tokens, --num-proc and --batch-docs must be positive")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        manifest = prepare(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"retro.data.prepare: error: {msg}", file=sys.stderr)
        return 2
    print(manifest.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
