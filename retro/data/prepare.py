"""Tokenize text once into memory-mapped token shards: `python -m retro.data.prepare`.

Reads a Hugging Face hub dataset (streamed) or local .jsonl/.json/.parquet/.txt files and globs
through `datasets`, encodes batches with the tokenizer's fast batch encoder in K processes,
appends EOS to each document and writes `{split}-NNNNN.bin` token shards, `.idx` document
offsets and `manifest.json` (see `retro.data.manifest`). Everything is written into
`.OUT.partial` and renamed to OUT at the end, so an interrupted run never leaves a
half-written OUT behind; re-running starts over cleanly.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import itertools
import logging
import multiprocessing as mp
import os
import shutil
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from retro.data.manifest import (
    DOC_INDEX_DTYPE,
    Manifest,
    ShardInfo,
    SplitInfo,
    token_dtype_for,
    vocab_hash,
)

log = logging.getLogger("retro.data.prepare")

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


@dataclass
class Source:
    """One input: a local file (builder from its extension) or a hub dataset name."""

    name: str
    builder: str | None  # None: hub dataset


def resolve_inputs(inputs: list[str]) -> list[Source]:
    """Expand globs; anything that is neither an existing file nor a glob is a hub dataset name."""
    sources: list[Source] = []
    for spec in inputs:
        has_glob = any(c in spec for c in "*?[")
        ext = Path(spec).suffix.lower()
        if has_glob:
            files = sorted(glob.glob(spec, recursive=True))
            if not files:
                raise FileNotFoundError(f"--input {spec!r}: no files match this pattern")
        elif Path(spec).exists() or ext in LOCAL_BUILDERS:
            files = [spec]
        else:
            sources.append(Source(spec, None))
            continue
        for f in files:
            p = Path(f)
            if p.is_dir():
                raise ValueError(f"{f}: is a directory; pass files or a glob such as '{f}/*.jsonl'")
            if not p.is_file():
                raise FileNotFoundError(f"{f}: input file does not exist")
            builder = LOCAL_BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise ValueError(f"{f}: unsupported extension {p.suffix!r} (use {sorted(LOCAL_BUILDERS)})")
            if p.stat().st_size == 0:
                raise ValueError(f"{f}: input file is empty")
            sources.append(Source(f, builder))
    if not sources:
        raise ValueError("no inputs given")
    return sources


def iter_batches(src: Source, args: argparse.Namespace) -> Iterator[tuple[int, list[Any]]]:
    """Yield (first row index, field values) in batches, streamed; errors name the file and row."""
    import datasets

    if src.builder is None:
        ds = datasets.load_dataset(src.name, args.config, split=args.split, streaming=True)
    elif src.builder == "text":
        ds = datasets.load_dataset(
            "text", data_files=[src.name], split="train", streaming=True, sample_by=args.txt_sample_by
        )
    else:
        ds = datasets.load_dataset(src.builder, data_files=[src.name], split="train", streaming=True)
    row = 0
    try:
        for batch in ds.iter(batch_size=args.batch_docs):
            if args.text_field not in batch:
                raise KeyError(f"{src.name}: no field {args.text_field!r} (fields: {sorted(batch)}); pass --text-field")
            values = batch[args.text_field]
            for j, v in enumerate(values):
                if v is None:
                    raise ValueError(f"{src.name}: row {row + j} has no value in field {args.text_field!r}")
            yield row, values
            row += len(values)
    except (KeyError, ValueError):
        raise
    except Exception as e:  # datasets' parse errors do not say which file
        raise ValueError(f"{src.name}: could not be read near row {row}: {type(e).__name__}: {e}") from e


# --- encoding (runs in worker processes when --num-proc > 1) -----------------------------------
_TOKENIZER: Any = None
_CHAT = False
_ADD_SPECIAL = False


def _init_encoder(tokenizer_name: str, chat: bool, add_special: bool, in_pool: bool) -> None:
    global _TOKENIZER, _CHAT, _ADD_SPECIAL
    if in_pool:  # K processes already; the tokenizer's own thread pool would oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    _TOKENIZER = AutoTokenizer.from_pretrained(tokenizer_name)
    _CHAT, _ADD_SPECIAL = chat, add_special


def _encode(values: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """-> (all ids concatenated as int64, per-document lengths). Flat arrays pickle fast."""
    if _CHAT:
        texts = [_TOKENIZER.apply_chat_template(m, tokenize=False) for m in values]
    else:
        texts = values
    ids = _TOKENIZER(texts, add_special_tokens=_ADD_SPECIAL, return_attention_mask=False)["input_ids"]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


# --- writing -----------------------------------------------------------------------------------
class SplitWriter:
    """Appends documents to `{split}-NNNNN.bin/.idx`, hashing while writing; docs never span shards."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[ShardInfo] = []
        self._open_new = True

    def _start(self) -> None:
        i = len(self.shards)
        self._name = f"{self.split}-{i:05d}"
        self._f = open(self.directory / f"{self._name}.bin", "wb")
        self._fi = open(self.directory / f"{self._name}.idx", "wb")
        self._h, self._hi = hashlib.sha256(), hashlib.sha256()
        self._tokens = self._docs = 0
        self._open_new = False

    def add(self, docs: list[np.ndarray]) -> None:
        for d in docs:
            if self._open_new:
                self._start()
            b = d.astype(self.dtype, copy=False).tobytes()
            off = np.array([self._tokens], dtype=DOC_INDEX_DTYPE).tobytes()
            self._f.write(b)
            self._h.update(b)
            self._fi.write(off)
            self._hi.update(off)
            self._tokens += len(d)
            self._docs += 1
            if self._tokens >= self.shard_tokens:
                self._close()

    def _close(self) -> None:
        self._f.close()
        self._fi.close()
        self.shards.append(
            ShardInfo(
                f"{self._name}.bin",
                f"{self._name}.idx",
                self._tokens,
                self._docs,
                self._h.hexdigest(),
                self._hi.hexdigest(),
            )
        )
        self._open_new = True

    def finish(self) -> SplitInfo:
        if not self._open_new:
            self._close()
        return SplitInfo(self.shards)


def _encoded_batches(
    sources: list[Source], args: argparse.Namespace, tokenizer_name: str
) -> Iterator[tuple[Source, int, np.ndarray, np.ndarray]]:
    """Encode batches in order, with at most 2*K batches in flight (bounded memory on huge inputs)."""

    def tasks() -> Iterator[tuple[Source, int, list[Any]]]:
        for src in sources:
            for row, values in iter_batches(src, args):
                yield src, row, values

    if args.num_proc <= 1:
        _init_encoder(tokenizer_name, args.chat, args.add_special_tokens, in_pool=False)
        for src, row, values in tasks():
            yield (src, row, *_encode(values))
        return
    # fork (where available) before any dataset reader thread starts: workers inherit the imports
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(
        args.num_proc, initializer=_init_encoder, initargs=(tokenizer_name, args.chat, args.add_special_tokens, True)
    ) as pool:
        pending: deque = deque()
        for src, row, values in tasks():
            pending.append((src, row, pool.apply_async(_encode, (values,))))
            if len(pending) >= 2 * args.num_proc:
                s, r, res = pending.popleft()
                yield (s, r, *res.get())
        while pending:
            s, r, res = pending.popleft()
            yield (s, r, *res.get())


def prepare(args: argparse.Namespace) -> Manifest:
    """Run the whole pipeline; returns the manifest written to args.out."""
    from transformers import AutoTokenizer

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out}: output exists; pass --overwrite to replace it")
    if not 0.0 <= args.val_fraction <= 0.5:
        raise ValueError(f"--val-fraction must be in [0, 0.5], got {args.val_fraction}")
    sources = resolve_inputs(args.input)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab_size = len(tokenizer)
    dtype = token_dtype_for(vocab_size)
    eos_id = tokenizer.eos_token_id
    if args.append_eos and eos_id is None:
        raise ValueError(f"tokenizer {args.tokenizer!r} has no EOS token; pass --no-append-eos")
    if args.chat and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"--chat: tokenizer {args.tokenizer!r} has no chat template")

    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted run
    tmp.mkdir(parents=True)
    period = round(1 / args.val_fraction) if args.val_fraction > 0 else 0
    writers = {s: SplitWriter(tmp, s, dtype, args.shard_tokens) for s in ("train", "val")}
    doc_index = skipped = 0
    eos = np.array([eos_id if eos_id is not None else 0], dtype=np.int64)
    bar = tqdm(unit="tok", unit_scale=True, desc=f"prepare {out.name}", disable=args.quiet or None)
    for src, row, flat, lengths in _encoded_batches(sources, args, args.tokenizer):
        if flat.size and (flat.max() >= vocab_size or flat.min() < 0):
            bad = int(flat.max() if flat.max() >= vocab_size else flat.min())
            raise ValueError(
                f"{src.name}: rows {row}..{row + len(lengths) - 1} encode to token id {bad}, outside the "
                f"vocabulary of {args.tokenizer!r} (len {vocab_size}); the tokenizer is inconsistent"
            )
        split_docs: dict[str, list[np.ndarray]] = {"train": [], "val": []}
        written = 0
        for d in np.split(flat, np.cumsum(lengths)[:-1]):
            if d.size == 0:
                skipped += 1
                continue
            if args.append_eos:
                d = np.concatenate([d, eos])
            split = "val" if period and doc_index % period == period - 1 else "train"
            split_docs[split].append(d)
            written += d.size
            doc_index += 1
        for split, docs in split_docs.items():
            writers[split].add(docs)
        bar.update(written)
    bar.close()
    splits = {s: w.finish() for s, w in writers.items()}
    if splits["train"].num_tokens == 0:
        shutil.rmtree(tmp)
        raise ValueError(f"{', '.join(s.name for s in sources)}: empty input, no tokens to write")
    if period and splits["val"].num_docs == 0:
        log.warning("val split is empty: fewer than %d documents (val_fraction %s)", period, args.val_fraction)
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
    )
    manifest.save(tmp)
    if out.exists():
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return Manifest.load(out)


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
        action="store_true",
        help="let the tokenizer add its special tokens (e.g. BOS) to each document",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="render a list of {role, content} messages with the tokenizer's chat template",
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
    args = build_parser().parse_args(argv)
    if args.text_field is None:
        args.text_field = "messages" if args.chat else "text"
    if args.shard_tokens <= 0 or args.num_proc <= 0 or args.batch_docs <= 0:
        raise SystemExit("--shard-tokens, --num-proc and --batch-docs must be positive")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        manifest = prepare(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(manifest.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
