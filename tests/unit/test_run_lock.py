"""A run directory belongs to one live run (retro/training/run_lock.py), and `--resume none` does not
start over silently in a directory holding checkpoints (checkpoint.check_fresh_start).

Before: no lock existed, so every case here that expects a refusal or a takeover note failed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest
import torch

from retro.distributed.setup import DistInfo
from retro.training import run_lock
from retro.training.checkpoint import MARKER, check_fresh_start, checkpoint_dir
from retro.training.errors import ConfigError
from retro.training.run_lock import LOCK_NAME, Holder, RunDirBusy, RunLock, hold_run_dir

ONE_PROCESS = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def write_lock(out, pid: int, host: str, age_s: float = 0.0, **slurm: str) -> bytes:
    """A lock file as another run would have left it, its heartbeat `age_s` seconds old."""
    out.mkdir(parents=True, exist_ok=True)
    holder = Holder("other-token", pid, host, time.time() - age_s - 5, slurm.get("job"), slurm.get("restart"))
    raw = holder.to_bytes()
    (out / LOCK_NAME).write_bytes(raw)
    os.utime(out / LOCK_NAME, (time.time() - age_s, time.time() - age_s))
    return raw


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_live_holder_is_named_and_its_lock_left_alone(tmp_path):
    out = tmp_path / "run"
    raw = write_lock(out, os.getpid(), socket.gethostname())  # this very process: alive
    with pytest.raises(RunDirBusy) as refused:
        RunLock(out, 600).acquire()
    text = str(refused.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}, started " in text and " UTC" in text
    assert str(out) in text and "\n" not in text
    assert (out / LOCK_NAME).read_bytes() == raw


def test_a_lock_whose_process_is_gone_is_taken_over_with_a_note(tmp_path):
    out = tmp_path / "run"
    pid = dead_pid()
    write_lock(out, pid, socket.gethostname())
    notes: list[str] = []
    lock = RunLock(out, 600, notes.append)
    lock.acquire()
    try:
        assert len(notes) == 1 and f"pid {pid}" in notes[0] and "no longer exists" in notes[0]
        assert json.loads((out / LOCK_NAME).read_bytes())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (out / LOCK_NAME).exists()
    assert sorted(p.name for p in out.iterdir()) == []  # the stale lock was not left beside it


def test_another_hosts_lock_is_stale_only_once_its_heartbeat_is_old(tmp_path):
    out = tmp_path / "run"
    write_lock(out, 1, "some-other-node", age_s=30)
    with pytest.raises(RunDirBusy, match="pid 1 on host some-other-node"):
        RunLock(out, 600).acquire()
    write_lock(out, 1, "some-other-node", age_s=700)
    notes: list[str] = []
    lock = RunLock(out, 600, notes.append)
    lock.acquire()
    lock.release()
    assert len(notes) == 1 and "heartbeat is 700 s old" in notes[0] and "lock_stale_s = 600" in notes[0]


def test_a_requeued_slurm_job_takes_over_its_own_lock_at_once(tmp_path, monkeypatch):
    """Killed at the time limit on node A, requeued onto node B: the lock's heartbeat is fresh."""
    out = tmp_path / "run"
    write_lock(out, 1, "node-a", job="4242", restart="0")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    notes: list[str] = []
    lock = RunLock(out, 600, notes.append)
    lock.acquire()
    lock.release()
    assert len(notes) == 1 and "earlier start of this SLURM job" in notes[0]
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job: the heartbeat rule applies
    write_lock(out, 1, "node-a", job="4242", restart="0")
    with pytest.raises(RunDirBusy, match="SLURM job 4242"):
        RunLock(out, 600).acquire()


def test_an_unreadable_lock_counts_as_live_until_its_heartbeat_is_old(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_bytes(b"")  # its writer died between create and write, or is writing now
    with pytest.raises(RunDirBusy, match="unreadable"):
        RunLock(out, 600).acquire()
    os.utime(out / LOCK_NAME, (time.time() - 700, time.time() - 700))
    lock = RunLock(out, 600, lambda text: None)
    lock.acquire()
    lock.release()


def test_the_lock_is_released_after_a_normal_end_and_after_an_error(tmp_path):
    out = tmp_path / "run"
    with hold_run_dir(out, ONE_PROCESS, 600) as lock:
        assert json.loads((out / LOCK_NAME).read_bytes())["token"] == lock.me.token
        (out / "metrics.jsonl").write_text("{}\n")
    assert not (out / LOCK_NAME).exists()
    with pytest.raises(RuntimeError, match="boom"), hold_run_dir(out, ONE_PROCESS, 600):
        raise RuntimeError("boom")
    assert not (out / LOCK_NAME).exists() and (out / "metrics.jsonl").is_file()
    fresh = tmp_path / "new"
    with pytest.raises(ConfigError, match="refused"), hold_run_dir(fresh, ONE_PROCESS, 600, checks=_refuse):
        pass
    assert not fresh.exists()  # a refused run leaves no trace of itself


def _refuse() -> None:
    raise ConfigError("refused")


def test_an_output_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(ConfigError, match="train.out_dir = .*run: cannot take the run directory's lock"):
        with hold_run_dir(tmp_path / "run", ONE_PROCESS, 600):
            pass


def test_the_heartbeat_refreshes_the_lock_and_never_touches_another_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.02)
    out = tmp_path / "run"
    lock = RunLock(out, 600)
    lock.acquire()
    os.utime(lock.path, (time.time() - 500, time.time() - 500))
    time.sleep(0.2)
    assert time.time() - lock.path.stat().st_mtime < 10
    raw = write_lock(out, 1, "usurper")  # someone deleted ours and took it
    time.sleep(0.2)
    lock.release()
    assert (out / LOCK_NAME).read_bytes() == raw  # not ours: left in place
    assert "no longer this run's" in capsys.readouterr().err


def test_resume_none_over_checkpoints_needs_force(tmp_path):
    out = tmp_path / "run"
    check_fresh_start(out, "none", 2, force=False)  # nothing there: a plain fresh start
    for step in (2, 4):
        checkpoint_dir(out, step).mkdir(parents=True)
        (checkpoint_dir(out, step) / MARKER).write_text("{}")
    check_fresh_start(out, "auto", 2, force=False)  # resuming them is fine
    with pytest.raises(ConfigError) as refused:
        check_fresh_start(out, "none", 2, force=False)
    text = str(refused.value)
    assert str(out) in text and "2 complete checkpoint(s)" in text and "--force" in text
    said: list[str] = []
    check_fresh_start(out, "none", 2, force=True, say=said.append)
    assert (
        len(said) == 1
        and "step_00000002 ... step_00000004" in said[0]
        and "superseded" in said[0]
        and "nothing is deleted" in said[0]
    )


def test_a_checkpoints_folder_linked_from_two_run_dirs_is_refused(tmp_path):
    """Probe 29 of issue 24: RUN_A/checkpoints and RUN_B/checkpoints linked to one folder made B resume from and
    prune A's checkpoints. The folder now records its run directory; another is refused while the owner links
    to it, and takes it over (with a note) once the owner is gone."""
    shared = tmp_path / "scratch" / "ckpts"
    shared.mkdir(parents=True)
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    for run in (run_a, run_b):
        run.mkdir()
        (run / "checkpoints").symlink_to(shared)
    notes: list[str] = []
    run_lock.claim_linked_checkpoints(run_a, notes.append)
    run_lock.claim_linked_checkpoints(run_a, notes.append)  # its own claim: accepted again
    assert (shared / run_lock.CLAIM_NAME).read_text().strip() == str(run_a.resolve()) and not notes
    with pytest.raises(ConfigError, match=f"holds the checkpoints of the run directory {run_a.resolve()}"):
        run_lock.claim_linked_checkpoints(run_b, notes.append)
    (run_a / "checkpoints").unlink()  # A no longer links there: B may have the folder
    run_lock.claim_linked_checkpoints(run_b, notes.append)
    assert (shared / run_lock.CLAIM_NAME).read_text().strip() == str(run_b.resolve())
    assert len(notes) == 1 and f"belonged to {run_a.resolve()}" in notes[0]
    plain = tmp_path / "c"
    (plain / "checkpoints").mkdir(parents=True)
    run_lock.claim_linked_checkpoints(plain)  # a folder of its own: nothing recorded
    assert not (plain / "checkpoints" / run_lock.CLAIM_NAME).exists()
