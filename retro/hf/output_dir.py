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


RUN_LOCK_NAME = ".retro-lock"  # retro/training/run_lock.py's lock file, named here to recognise a run directory
LINK_CLAIM_NAME = ".retro-run-dir"  # in a linked checkpoints folder: the run directory it belongs to
RUN_FOLDERS = ("checkpoints", "superseded", "model_config", "tensorboard")  # what a run writes below itself


def is_run_dir(path: Path) -> bool:
    """A retro.train run directory: locked by a live run, or holding a run's config.json and checkpoints/."""
    return (path / RUN_LOCK_NAME).is_file() or ((path / "config.json").is_file() and (path / "checkpoints").is_dir())


def run_dirs_below(path: Path, depth: int = 3) -> Iterator[Path]:
    """Run directories strictly below `path`, up to `depth` levels down (cheap on a large folder)."""
    if depth == 0 or not path.is_dir():
        return
    try:
        children = sorted(child for child in path.iterdir() if child.is_dir() and not child.is_symlink())
    except OSError:
        return
    own = RUN_FOLDERS if is_run_dir(path) else ()
    for child in children:
        if child.name in own:
            continue  # a run's own folders
        if is_run_dir(child):
            yield child
        else:
            yield from run_dirs_below(child, depth - 1)


def check_not_a_run(out_dir: Path, flag: str = "--out") -> None:
    """A training run's directory is never an output of another command, with or without --force: it
    would replace its checkpoints and metrics, or write into its folders. A new folder beside them
    (RUN/eval) is fine."""
    out = out_dir.resolve()
    inside = next((p for p in out.parents if is_run_dir(p) and out.relative_to(p).parts[0] in RUN_FOLDERS), None)
    found = out if is_run_dir(out) else inside or next(run_dirs_below(out), None)
    if found is not None:
        how = "is" if found == out else ("is inside" if out.is_relative_to(found) else "contains")
        raise ValueError(f"{flag} {out_dir} {how} the training run directory {found}; write the output somewhere else")


def check_apart(out_dir: Path, keep: dict[str, Path]) -> None:
    """Refuse an --out that is, holds or lies inside a path of `keep` ({what: path}: inputs the command
    must not replace or write into), or a training run's directory."""
    out = out_dir.resolve()
    for what, path in keep.items():
        other = path.resolve()
        if out == other:
            raise ValueError(f"--out {out_dir} is {what} {path}; write the output to a separate directory")
        if other.is_relative_to(out):
            raise ValueError(f"--out {out_dir} contains {what} {path}; replacing it would delete it")
        if out.is_relative_to(other):
            raise ValueError(f"--out {out_dir} is inside {what} {path}; write the output outside it")
    check_not_a_run(out_dir)


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
