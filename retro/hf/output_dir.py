"""Output directories of the commands that write models, shards or results (convert, export, prepare,
select_layers, eval): refuse one that overlaps an input, and write into a `.partial` sibling swapped
into place only when complete."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def check_apart(out_dir: Path, keep: dict[str, Path]) -> None:
    """Refuse an --out that is, holds or lies inside a path of `keep` ({what: path}: inputs the command
    must not replace or write into)."""
    out = out_dir.resolve()
    for what, path in keep.items():
        other = path.resolve()
        if out == other:
            raise ValueError(f"--out {out_dir} is {what} {path}; write the output to a separate directory")
        if other.is_relative_to(out):
            raise ValueError(f"--out {out_dir} contains {what} {path}; replacing it would delete it")
        if out.is_relative_to(other):
            raise ValueError(f"--out {out_dir} is inside {what} {path}; write the output outside it")


def check_output_dir(out_dir: Path, force: bool, keep: dict[str, Path]) -> None:
    """Refuse an --out that is a file, non-empty without --force, or that is, holds or lies inside a
    directory of `keep` ({what: path}: inputs the command must not replace or write into)."""
    check_apart(out_dir, keep)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} is a file, not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"output directory {out_dir} exists and is not empty; pass --force to overwrite it")


@contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """Yield `.OUT.partial` beside OUT to write into; on success it replaces OUT, on failure it is removed
    and OUT stays as it was."""
    out_dir = out_dir.resolve()
    tmp = out_dir.parent / f".{out_dir.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted run
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old"
        if old.exists():
            shutil.rmtree(old)
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)
