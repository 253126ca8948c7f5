"""Distributed checkpoints (torch.distributed.checkpoint) that are only trusted once complete.

Layout: OUT/checkpoints/step_00000100/ holds the DCP files of model + optimizer (every rank writes
its shards), `rank_<r>.pt` with that rank's scheduler, data-loader and RNG state, `job_config.json`
(rank 0: the job config and model shape it was written with, compared on resume by resume_check.py),
and `COMPLETE`, written by rank 0 only after every rank has finished, with every file's size and CRC-32
(each rank checksums the files it wrote). A crash mid-save leaves a directory without `COMPLETE`, which
resume ignores, so the previous checkpoint stays usable; a complete one whose files no longer match the
recorded sizes or checksums is skipped with a warning (and when every one is damaged, the run refuses to
start rather than silently starting over).

Each run line (a fresh start and every resume that follows from its checkpoints) has a `run_id`, kept in
each checkpoint's record: pruning deletes only checkpoints named `step_<8 digits>` whose record carries
this line's id, and nothing of an earlier run is deleted: `--resume none --force` moves it into
OUT/superseded/<time>/ (supersede()).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import time
import uuid
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from retro.data.loader import sampler_state_of
from retro.data.mixture import reshard_states
from retro.hf.output_dir import LINK_CLAIM_NAME
from retro.training.errors import ConfigError

MARKER = "COMPLETE"
RECORD = "job_config.json"  # the job config a checkpoint was written with (resume_check.py compares it)
STEP_NAME = re.compile(r"step_\d{8}")  # checkpoint_dir's names; anything else under checkpoints/ is not ours
SUPERSEDED = "superseded"  # OUT/superseded/<UTC time>/: an earlier run's files, set aside by a fresh start
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.json", "model_config", "tensorboard")  # what a run writes


@dataclass
class CheckpointSettings:
    """The run's `[checkpoint]` section."""

    every: int = 0  # steps between checkpoints; 0 = only at the end and on signals
    keep_last: int = 2
    resume: str = "auto"  # auto: newest complete checkpoint in out_dir if any | none | a checkpoint path
    lock_stale_s: int = 600  # a lock from another host whose heartbeat is older is stale (retro/training/run_lock.py)

    def validate(self) -> None:
        if self.every < 0:
            raise ValueError(
                f"checkpoint.every must be >= 0 (steps between checkpoints; 0 = only at the end and on signals), "
                f"got {self.every}"
            )
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        if self.lock_stale_s < 120:  # the holder refreshes its heartbeat every 30 s; shared filesystems lag
            raise ValueError(f"checkpoint.lock_stale_s must be >= 120 (seconds), got {self.lock_stale_s}")


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step_{step:08d}"


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints (named `step_<8 digits>`, holding COMPLETE), oldest first."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = (p for p in root.iterdir() if STEP_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink())
    return sorted(p for p in found if (p / MARKER).is_file())


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def run_id_of(path: Path) -> str | None:
    """The run line that wrote checkpoint `path` (None: a checkpoint from before run ids, or no record)."""
    try:
        value = json.loads((path / RECORD).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def crc32(file: Path) -> int:
    """CRC-32 of a file's bytes, read in 16 MiB chunks (zlib: several GB/s; finds damage, not tampering)."""
    value = 0
    with file.open("rb") as f:
        while chunk := f.read(1 << 24):
            value = zlib.crc32(chunk, value)
    return value


def own_files(path: Path, rank: int) -> list[str]:
    """The files of checkpoint `path` that rank `rank` wrote: DCP's `__<rank>_*.distcp` and `rank_<rank>.pt`;
    rank 0 also DCP's `.metadata` and the job record. Each rank checksums its own, right after writing them."""
    names = [p.name for p in path.glob(f"__{rank}_*.distcp")] + [f"rank_{rank}.pt"]
    ours = [name for name in (".metadata", RECORD) if rank == 0 and (path / name).is_file()]
    return sorted(names + ours)


def gathered_checksums(path: Path, rank: int) -> dict[str, int]:
    """{file: CRC-32} of every rank's own files (each rank hashes what it wrote, in parallel)."""
    mine = {name: crc32(path / name) for name in own_files(path, rank)}
    if not dist.is_initialized():
        return mine
    every: list[dict[str, int]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(every, mine)
    return {name: value for part in every for name, value in part.items()}


def damage(path: Path) -> str | None:
    """What is wrong with a COMPLETE checkpoint's files against the sizes (and CRC-32s) recorded at save
    time (None: intact).

    Checkpoints written before sizes (or checksums) were recorded carry none and are trusted as before.
    The checksum check re-reads the checkpoint's files once.
    """
    try:
        marker = json.loads((path / MARKER).read_text())
        recorded, sums = marker.get("files", {}), marker.get("crc32", {})
    except (OSError, ValueError, AttributeError) as error:
        return f"unreadable {MARKER} marker ({error})"
    for name, size in recorded.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    for name, value in sums.items():
        if (path / name).is_file() and crc32(path / name) != value:
            return f"{name} has other bytes than were written (CRC-32 mismatch)"
    return None


def find_resume(out_dir: Path, resume: str, warn=print) -> Path | None:
    """`auto`: the newest intact complete checkpoint (or none); `none`; or an explicit checkpoint path.

    Under `auto` a damaged checkpoint (a truncated or missing file) is skipped with a warning naming
    it, and the previous complete one is used; an explicit path must be intact.
    """
    if resume == "none":
        return None
    if resume == "auto":
        found, problems = complete_checkpoints(out_dir), []
        for path in reversed(found):
            problem = damage(path)
            if problem is None:
                return path
            problems.append(f"{path.name}: {problem}")
            warn(f"retro.train: warning: checkpoint {path} is damaged ({problem}); trying the previous one")
        if found:  # starting over here would silently repeat the steps the damaged checkpoints hold
            raise FileNotFoundError(
                f"every complete checkpoint in {out_dir / 'checkpoints'} is damaged ({'; '.join(problems)}): "
                "restore them, resume another checkpoint (--resume PATH), or start over with --resume none --force "
                f"(they move to {out_dir / SUPERSEDED}/)"
            )
        return None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"checkpoint.resume = {resume}: not a complete checkpoint (no {MARKER} file)")
    problem = damage(path)
    if problem is not None:
        raise FileNotFoundError(f"checkpoint.resume = {resume}: the checkpoint is damaged ({problem})")
    return path


def check_fresh_start(out_dir: Path, resume: str, keep_last: int, force: bool, say=print) -> None:
    """`resume = none` into a directory holding complete checkpoints: refused (ConfigError) unless `force`.

    Starting over there mixes two runs: metrics.jsonl gets both, and pruning by step number may keep
    the old run's checkpoints over the new one's, which a later `auto` resume or export would pick.
    """
    done = complete_checkpoints(out_dir) if resume == "none" else []
    if not done:
        return
    held = f"{len(done)} complete checkpoint(s) of an earlier run ({done[0].name} ... {done[-1].name})"
    if not force:
        raise ConfigError(
            f"checkpoint.resume = none, but {out_dir} holds {held}: resume them (--resume auto), "
            "choose another train.out_dir, or pass --force to start over in this one"
        )
    say(
        f"retro.train: --force: starting over in {out_dir}, which holds {held}; once every check has passed, "
        f"they and the earlier run's {', '.join(RUN_FILES[1:])} move to {out_dir / SUPERSEDED}/<UTC time>/ "
        "(nothing is deleted; delete that folder when you no longer need it)"
    )


def _unused(path: Path) -> Path:
    """`path`, or `path-1`, `path-2`, ... if taken (two set-asides within one second)."""
    candidate = path
    for suffix in range(1, 1000):
        if not candidate.exists():
            break
        candidate = path.with_name(f"{path.name}-{suffix}")
    return candidate


def supersede(out_dir: Path, say=print) -> Path | None:
    """Move an earlier run's files (RUN_FILES) into OUT/superseded/<UTC time>/, so a fresh start in
    out_dir neither mixes with them nor deletes them; returns where they went (None: there were none)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    link = out_dir / "checkpoints"
    linked = link.is_symlink() and link.is_dir()  # a folder elsewhere: the link stays, its contents move aside
    if linked:
        _set_aside_in_linked_folder(link, stamp, say)
    present = [
        out_dir / name
        for name in RUN_FILES
        if ((out_dir / name).exists() or (out_dir / name).is_symlink()) and not (linked and name == "checkpoints")
    ]
    if not present:
        return None
    target = _unused(out_dir / SUPERSEDED / stamp)
    target.mkdir(parents=True)
    for path in present:
        path.rename(target / path.name)
    say(f"retro.train: fresh start: the earlier run's {', '.join(p.name for p in present)} moved to {target}")
    return target


def _set_aside_in_linked_folder(link: Path, stamp: str, say) -> None:
    """A fresh start over a linked checkpoints folder: its earlier entries move into FOLDER/superseded-<stamp>/,
    on the folder's own filesystem (a rename to OUT/superseded could cross filesystems), the link kept."""
    folder = link.resolve()
    earlier = [p for p in folder.iterdir() if p.name != LINK_CLAIM_NAME and not p.name.startswith("superseded-")]
    if not earlier:
        return
    target = _unused(folder / f"superseded-{stamp}")
    target.mkdir()
    for path in earlier:
        path.rename(target / path.name)
    say(f"retro.train: fresh start: the earlier run's checkpoints in the linked folder {folder} moved to {target}")


def set_aside_other_branches(out_dir: Path, run_id: str | None, step: int, say=print) -> Path | None:
    """On a resume from step `step` of run line `run_id`: move every complete checkpoint of another line, or
    of this line past `step` (an explicit resume of an older checkpoint forks the line), into
    OUT/superseded/<UTC time>/, so that neither `--resume auto` nor export picks them later; with another
    line's checkpoints its metrics.jsonl goes too. Returns where they went (None: nothing to move)."""
    others = [
        path
        for path in complete_checkpoints(out_dir)
        if run_id_of(path) != run_id or int(path.name.removeprefix("step_")) > step
    ]
    if not others:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = _unused(out_dir / SUPERSEDED / stamp)
    (target / "checkpoints").mkdir(parents=True)
    for path in others:
        path.rename(target / "checkpoints" / path.name)
    moved = [p.name for p in others]
    if (
        any(run_id_of(target / "checkpoints" / name) != run_id for name in moved)
        and (out_dir / "metrics.jsonl").exists()
    ):
        (out_dir / "metrics.jsonl").rename(target / "metrics.jsonl")  # the other line's record of its steps
        moved.append("metrics.jsonl")
    say(
        f"retro.train: note: resuming step {step} of run {run_id or '(unrecorded)'}: {', '.join(moved)} of another "
        f"run line or past this step moved to {target}, so that neither --resume auto nor export picks them"
    )
    return target


def prune(out_dir: Path, keep_last: int, run_id: str | None) -> None:
    """Delete all but the newest `keep_last` complete checkpoints of run line `run_id` (by name pattern
    and record; any other checkpoint is left alone), the COMPLETE marker first, so a kill mid-deletion
    leaves an incomplete directory (ignored by resume), never a complete one with files missing."""
    ours = [path for path in complete_checkpoints(out_dir) if run_id_of(path) == run_id]
    for old in ours[:-keep_last]:
        (old / MARKER).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """DCP warns on every single-process save/load that it assumes one process; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(
    out_dir: Path,
    step: int,
    model,
    optimizer,
    extra: dict[str, Any],
    rank: int,
    keep_last: int,
    record: dict[str, Any] | None = None,
) -> Path:
    """Save on every rank; mark complete only after all ranks finished; prune old checkpoints.

    `record` (the run's job config and model shape) goes to `job_config.json`, written by rank 0 before
    `COMPLETE`, so its size is recorded and checked like the other files'."""
    path = checkpoint_dir(out_dir, step)
    run_id = (record or {}).get("run_id")
    if rank == 0 and (path.exists() or path.is_symlink()):
        if path.is_dir() and not path.is_symlink() and (path / MARKER).is_file() and run_id_of(path) != run_id:
            aside = out_dir / SUPERSEDED / f"{path.name}-of-run-{run_id_of(path) or 'unknown'}-{new_run_id()}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            path.rename(aside)  # another run line's complete checkpoint at this step: kept, not replaced
            print(f"retro.train: note: {path} belonged to another run; moved to {aside}", file=sys.stderr, flush=True)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # a stale incomplete attempt at the same step, or this line's own older save
        else:
            path.unlink()
    _barrier()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    with _single_process_is_intended():
        dcp.save(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    torch.save(extra, path / f"rank_{rank}.pt")
    if rank == 0 and record is not None:
        (path / RECORD).write_text(json.dumps(record, indent=2))
    sums = gathered_checksums(path, rank)  # also the barrier: every rank has written its files
    if rank == 0:
        files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
        (path / MARKER).write_text(json.dumps({"step": step, "time": time.time(), "files": files, "crc32": sums}))
        prune(out_dir, keep_last, run_id)
    _barrier()
    return path


def saved_world_size(path: Path) -> int:
    """Number of ranks that wrote checkpoint `path` (its rank_0.pt ... rank_<N-1>.pt files)."""
    ranks = sorted(int(f.stem.split("_")[1]) for f in path.glob("rank_*.pt"))
    if not ranks or ranks != list(range(len(ranks))):
        raise FileNotFoundError(
            f"{path}: rank files {[f'rank_{r}.pt' for r in ranks]} are not rank_0.pt ... "
            f"rank_<N-1>.pt; the checkpoint is incomplete"
        )
    return len(ranks)


def load(path: Path, model, optimizer, rank: int, world_size: int) -> dict[str, Any]:
    """Load model + optimizer (resharded as needed) and return this rank's extra state.

    From a checkpoint written by another number of ranks the extra state comes from
    `reshard_extra`: it holds "sampler" and "reshard" instead of "loader".
    """
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    saved = saved_world_size(path)
    if saved == world_size:
        return torch.load(path / f"rank_{rank}.pt", weights_only=False)
    extras = [torch.load(path / f"rank_{r}.pt", weights_only=False) for r in range(saved)]
    return reshard_extra(extras, rank, world_size, path)


RESHARDABLE = ("step", "scheduler", "loader", "rng", "tokens")


def reshard_extra(extras: list[dict[str, Any]], rank: int, world_size: int, path: Path) -> dict[str, Any]:
    """Rank `rank` of `world_size`'s extra state from the N saved ones (N != world_size).

    step and scheduler are the same on every rank (checked); the data position is rebuilt from all
    ranks' sampler states ("sampler": this rank's, "reshard": the whole plan, for the log); the
    CPU RNG state, which no training sample depends on, is taken from old rank `rank mod N`.
    """
    unknown = sorted(set().union(*extras) - set(RESHARDABLE))
    if unknown:
        raise ValueError(f"{path}: extra state {unknown} cannot be resharded from {len(extras)} to {world_size} ranks")
    for key in ("step", "scheduler", "tokens"):
        for r, extra in enumerate(extras):
            if extra.get(key) != extras[0].get(key):
                raise ValueError(
                    f"{path / f'rank_{r}.pt'}: {key} differs from rank_0.pt's; cannot reshard a "
                    "checkpoint whose ranks disagree on it"
                )
    try:
        plan = reshard_states([sampler_state_of(e["loader"]) for e in extras], world_size)
    except ValueError as error:
        raise ValueError(f"{path}: cannot reshard the data-loader state to {world_size} ranks: {error}") from error
    return {
        "step": extras[0]["step"],
        "scheduler": extras[0]["scheduler"],
        "tokens": extras[0].get("tokens"),
        "rng": extras[rank % len(extras)]["rng"],
        "sampler": plan.states[rank],
        "reshard": plan,
    }


def load_model_only(path: Path, model) -> None:
    """Model weights from a training checkpoint into a plain (unsharded) model, one process."""
    state = {"model": get_model_state_dict(model, options=StateDictOptions())}
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"])


class Checkpointer:
    """The run's checkpoint policy: where to resume from, when to save, and the saving itself."""

    def __init__(
        self,
        settings: CheckpointSettings,
        out_dir: Path,
        rank: int,
        world_size: int,
        record: dict[str, Any] | None = None,
    ) -> None:
        self.settings, self.out_dir, self.rank, self.world_size = settings, out_dir, rank, world_size
        self.record = dict(record or {})  # the run's job config + model shape, saved into each checkpoint

    def resume_path(self) -> Path | None:
        """The checkpoint to resume (None: a fresh start); this run continues its run line (run_id), or
        starts a new one."""
        warn = (lambda text: print(text, file=sys.stderr, flush=True)) if self.rank == 0 else (lambda text: None)
        path = find_resume(self.out_dir, self.settings.resume, warn)
        self.record["run_id"] = run_id_of(path) if path is not None else new_run_id()
        return path

    def due(self, step: int, last_step: int) -> bool:
        """Save after this step? Every `every` steps and always after the last one."""
        return step == last_step or bool(self.settings.every and step % self.settings.every == 0)

    def save(self, step: int, model, optimizer, train_state) -> Path:
        extra = train_state.state_dict()
        return save(self.out_dir, step, model, optimizer, extra, self.rank, self.settings.keep_last, self.record)

    def load(self, path: Path, model, optimizer, train_state) -> None:
        train_state.load_state_dict(load(path, model, optimizer, self.rank, self.world_size))
