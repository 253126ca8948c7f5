"""Ownership of a run directory: one live run at a time, so two runs never interleave metrics,
rewrite each other's config or prune each other's checkpoints.

Rank 0 creates `OUT/.retro-lock` atomically (`O_CREAT | O_EXCL`, honoured by local filesystems and
NFS v3+) before anything is written, pruned or loaded there, and removes it when the run exits
(done, error, signal/requeue). The file records the holder (pid, host, start time, SLURM job); a
background thread refreshes its mtime, the heartbeat, every `HEARTBEAT_S` seconds. An existing lock
is stale, and taken over with a note, when
- it was written by an earlier start of this SLURM job (same `SLURM_JOB_ID`, another
  `SLURM_RESTART_COUNT`): SLURM runs one start of a job at a time, so a requeued job takes over its
  own lock at once, on whichever node its rank 0 now runs;
- it is from this host and its pid no longer exists;
- it is from another host, whose pid cannot be checked, and its heartbeat is older than
  `checkpoint.lock_stale_s` (default 600 s).
Otherwise the run exits 2 naming the holder. Every rank learns rank 0's outcome (one broadcast)
before going on, so a refusal is the same error on every rank and no rank waits for a peer that left.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch.distributed as dist

from retro.distributed.setup import DistInfo
from retro.hf.output_dir import LINK_CLAIM_NAME, RUN_LOCK_NAME
from retro.training.errors import ConfigError, SharedVerdict

LOCK_NAME = RUN_LOCK_NAME
HEARTBEAT_S = 30.0  # how often a live holder refreshes the lock's mtime; checkpoint.lock_stale_s must exceed it well


class RunDirBusy(ConfigError):
    """Another live run holds the run directory (exit 2)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: enough to name it to a person and to judge whether it is still alive."""

    token: str  # unique per run start: tells our own lock from any other
    pid: int
    host: str
    started: float  # time.time() when taken
    slurm_job_id: str | None = None
    slurm_restart: str | None = None

    @classmethod
    def me(cls) -> Holder:
        env = os.environ
        return cls(
            uuid.uuid4().hex,
            os.getpid(),
            socket.gethostname(),
            time.time(),
            env.get("SLURM_JOB_ID"),
            env.get("SLURM_RESTART_COUNT"),
        )

    @classmethod
    def parse(cls, raw: bytes) -> Holder | None:
        """The holder a lock file names, or None when it is unreadable (e.g. empty: its writer died mid-create)."""
        try:
            data = json.loads(raw)
            return cls(
                str(data["token"]),
                int(data["pid"]),
                str(data["host"]),
                float(data["started"]),
                data.get("slurm_job_id"),
                data.get("slurm_restart"),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        when = datetime.fromtimestamp(self.started, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"pid {self.pid} on host {self.host}, started {when}{job}"

    def to_bytes(self) -> bytes:
        started_at = datetime.fromtimestamp(self.started, timezone.utc).isoformat()
        return json.dumps({**asdict(self), "started_at": started_at}).encode()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one owned by another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(holder: Holder | None, age: float, stale_s: float, me: Holder) -> str | None:
    """Why an existing lock (heartbeat `age` seconds old) no longer protects a live run; None: it does."""
    if holder is None:
        return f"it is unreadable and its heartbeat is {age:.0f} s old" if age > stale_s else None
    if holder.slurm_job_id and holder.slurm_job_id == me.slurm_job_id and holder.slurm_restart != me.slurm_restart:
        return f"it is an earlier start of this SLURM job (restart {holder.slurm_restart}, now {me.slurm_restart})"
    if holder.host == me.host:
        return None if pid_alive(holder.pid) else f"its process {holder.pid} no longer exists"
    if age > stale_s:
        return f"its heartbeat is {age:.0f} s old, over checkpoint.lock_stale_s = {stale_s:g}"
    return None


class RunLock:
    """Rank 0's lock on one run directory: `acquire` (or RunDirBusy), a heartbeat while held, `release`."""

    def __init__(self, out_dir: Path, stale_s: float, say: Callable[[str], None] | None = None) -> None:
        self.out_dir, self.stale_s = out_dir, stale_s
        self.say = say or (lambda text: print(text, flush=True))
        self.path = out_dir / LOCK_NAME
        self.me = Holder.me()
        self.raw = self.me.to_bytes()
        self.held = False
        self.created_dir = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; RunDirBusy naming the holder when a live run has it."""
        self.created_dir = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # each pass either takes the lock, refuses, or loses a race and looks again
            if self._create():
                self.held = True
                self._thread = threading.Thread(target=self._beat, name="retro-lock-heartbeat", daemon=True)
                self._thread.start()
                return
            try:
                age = time.time() - self.path.stat().st_mtime
                raw = self.path.read_bytes()
            except FileNotFoundError:
                continue  # released meanwhile
            holder = Holder.parse(raw)
            why = stale_reason(holder, age, self.stale_s, self.me)
            who = holder.describe() if holder is not None else "an unreadable lock"
            if why is None:
                raise RunDirBusy(
                    f"{self.out_dir} is in use by another run ({who}; lock {self.path}, heartbeat {age:.0f} s ago): "
                    f"wait for it to end or choose another train.out_dir; delete the lock only if that run is gone"
                )
            if self._set_aside(raw):
                self.say(f"retro.train: note: taking over the stale lock {self.path} of {who}: {why}")
        raise RunDirBusy(f"{self.out_dir}: another run is taking over its lock {self.path} at the same time")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, self.raw)
        finally:
            os.close(fd)
        return True

    def _set_aside(self, raw: bytes) -> bool:
        """Remove the stale lock whose bytes are `raw`; False (nothing removed) if another run replaced it first."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.me.token}")
        try:
            os.rename(self.path, aside)  # atomic: of two runs taking over, one gets the file
        except FileNotFoundError:
            return False
        if aside.read_bytes() != raw:  # a live lock taken in between: put it back unless yet another exists
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def still_mine(self) -> bool:
        try:
            return self.path.read_bytes() == self.raw
        except OSError:
            return False

    def _beat(self) -> None:
        """Refresh the heartbeat until released; stop with a warning if the lock stops being ours."""
        while not self._stop.wait(HEARTBEAT_S):
            if not self.still_mine():
                print(
                    f"retro.train: warning: {self.path} is no longer this run's (removed or taken over); "
                    "this run stops at the end of its current step without writing anything more",
                    file=sys.stderr,
                    flush=True,
                )
                return
            with contextlib.suppress(OSError):  # a transient filesystem error: the next beat retries
                os.utime(self.path)

    def release(self) -> None:
        """Remove our lock (never another run's), and the directory if this run created it and left it empty."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held and self.still_mine():
            self.path.unlink(missing_ok=True)
        self.held = False
        if self.created_dir:
            with contextlib.suppress(OSError):  # not empty: the run wrote something, keep it
                self.out_dir.rmdir()


CLAIM_NAME = LINK_CLAIM_NAME


def claim_linked_checkpoints(out_dir: Path, say: Callable[[str], None] = print) -> None:
    """`OUT/checkpoints` may be a link to a folder elsewhere (a scratch filesystem). Two run directories linked
    to one folder would resume from and prune each other's checkpoints, so the folder records the run directory
    it belongs to (created atomically, in the folder) and another run directory is refused, while the owner
    still exists. Rank 0, run-directory lock held, before anything is written."""
    link = out_dir / "checkpoints"
    if not link.is_symlink():
        return
    folder, me = link.resolve(), str(out_dir.resolve())
    if not folder.is_dir():
        raise ConfigError(f"{link} links to {folder}, which is not a folder: create it or remove the link")
    claim = folder / CLAIM_NAME
    for _ in range(3):  # each pass claims the folder, accepts our own claim, or refuses
        try:
            fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            fd = None
        if fd is not None:
            try:
                os.write(fd, (me + "\n").encode())
            finally:
                os.close(fd)
            return
        try:
            owner = claim.read_text().strip()
        except FileNotFoundError:
            continue  # removed meanwhile: claim it
        if owner == me:
            return
        owner_link = Path(owner) / "checkpoints"
        if owner_link.is_symlink() and owner_link.resolve() == folder:
            raise ConfigError(
                f"{link} links to {folder}, which holds the checkpoints of the run directory {owner}: give "
                "each run directory its own checkpoints folder (two would resume from and prune each other's)"
            )
        say(f"retro.train: note: {folder} belonged to {owner}, which no longer links to it; it is now {me}'s")
        claim.unlink(missing_ok=True)
    raise ConfigError(f"{folder}: another run is claiming it at the same time")


def _from_rank0(error: str | None) -> str | None:
    """Rank 0's outcome on every rank (one broadcast; a no-op in one process)."""
    if not dist.is_initialized():
        return error
    box = [error]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def hold_run_dir(
    out_dir: Path, info: DistInfo, stale_s: float, checks: Callable[[], None] | None = None
) -> Iterator[RunLock | None]:
    """Hold `out_dir` for the body: rank 0 takes the lock, then runs `checks` (start-up checks that need
    it held); every rank raises the same ConfigError, or all go on together. Released however the body ends."""
    lock = RunLock(out_dir, stale_s) if info.is_main else None
    error: str | None = None
    unexpected: BaseException | None = None
    if lock is not None:
        try:
            lock.acquire()
            if checks is not None:
                checks()
        except ValueError as failure:  # ConfigError, RunDirBusy
            error = str(failure)
        except OSError as failure:  # a read-only or file-shaped out_dir
            error = f"train.out_dir = {out_dir}: cannot take the run directory's lock ({failure})"
        except Exception as failure:  # a bug: tell the other ranks, then show its traceback here
            unexpected, error = failure, f"rank 0 failed while locking {out_dir}: {failure!r}"
    error = _from_rank0(error)
    if error is not None:
        if lock is not None:
            lock.release()
        if unexpected is not None:
            raise unexpected
        raise ConfigError(error) if info.is_main else SharedVerdict(error)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
