"""Input text for `retro.data.prepare`: local files and globs or a hub dataset, read in batches,
with bad rows, bad JSON and bad UTF-8 named by file and row."""

from __future__ import annotations

import argparse
import glob
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("retro.data.prepare")

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


class InputError(ValueError):
    """A bad input, its message already naming the file (and row or line)."""


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


def _first_bad_line(path: Path, as_json: bool) -> str | None:
    """'line N: what is wrong' for the first line of a local text/JSON file that is not UTF-8 (or not
    JSON); None when every line reads. Runs only after `datasets` failed, whose errors name no row."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"line {n}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
            if as_json and line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    if n == 1 and path.suffix.lower() == ".json":
                        return _bad_json_document(path)  # one JSON document (a list of records), not lines
                    return f"line {n}: invalid JSON ({e.msg} at column {e.colno})"
    return None


def _bad_json_document(path: Path) -> str | None:
    data = path.read_bytes()
    try:
        json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return f"line {line}: invalid UTF-8 (byte 0x{data[e.start]:02x})"
    except json.JSONDecodeError as e:
        return f"line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})"
    return None


def _check_values(src: Source, row: int, field: str, values: list[Any], chat: bool) -> None:
    """Each document must be a string (a list of message dicts with --chat); errors name the row."""
    for j, v in enumerate(values):
        if v is None:
            raise InputError(f"{src.name}: row {row + j} has no value in field {field!r}")
        if chat:
            if not (isinstance(v, list) and all(isinstance(m, dict) for m in v)):
                raise InputError(
                    f"{src.name}: row {row + j}: field {field!r} is {type(v).__name__}, not a list of "
                    f"{{role, content}} messages (--chat)"
                )
        elif not isinstance(v, str):
            raise InputError(f"{src.name}: row {row + j}: field {field!r} is {type(v).__name__}, not a string")


def iter_batches(src: Source, args: argparse.Namespace) -> Iterator[tuple[int, list[Any]]]:
    """Yield (first row index, field values) in batches, streamed; errors name the file and row."""
    import datasets

    # its parse failures are logged before they are raised; they are reported here, naming the line
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
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
            _check_values(src, row, args.text_field, values, args.chat)
            yield row, values
            row += len(values)
    except (KeyError, InputError):
        raise
    except Exception as e:  # datasets' parse errors do not say which file or row
        where = None
        if src.builder in ("json", "text"):
            where = _first_bad_line(Path(src.name), as_json=src.builder == "json")
        if where is None:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            where = f"could not be read near row {row}: {type(e).__name__}: {first}"
        raise InputError(f"{src.name}: {where}") from e
