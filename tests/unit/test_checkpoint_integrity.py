"""Checkpoint integrity (single process): sizes recorded at save time, damaged checkpoints skipped
by `auto` resume with a warning, refused when named explicitly, and pruning that can be killed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import retro
from retro.training import checkpoint


def _save(tmp_path, step: int, keep_last: int = 3, run_id: str | None = None):
    config = retro.RetroConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_attention_heads=2, n_prelude=1, n_recurrent=1, n_coda=1
    )
    model = retro.RetroForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters())
    record = {"run_id": run_id} if run_id else None
    return checkpoint.save(tmp_path, step, model, optimizer, {"step": step}, rank=0, keep_last=keep_last, record=record)


def _truncate_largest(path):
    biggest = max(
        (p for p in path.rglob("*") if p.is_file() and p.name != checkpoint.MARKER), key=lambda p: p.stat().st_size
    )
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    return biggest


def test_marker_records_every_file_size(tmp_path):
    path = _save(tmp_path, 2)
    files = json.loads((path / checkpoint.MARKER).read_text())["files"]
    on_disk = {
        str(p.relative_to(path)): p.stat().st_size
        for p in path.rglob("*")
        if p.is_file() and p.name != checkpoint.MARKER
    }
    assert files == on_disk and "rank_0.pt" in files
    assert checkpoint.damage(path) is None


def test_auto_resume_skips_a_truncated_checkpoint_with_a_warning(tmp_path):
    first, second = _save(tmp_path, 2), _save(tmp_path, 4)
    broken = _truncate_largest(second)
    warnings = []
    assert checkpoint.find_resume(tmp_path, "auto", warnings.append) == first
    assert len(warnings) == 1 and str(second) in warnings[0] and broken.name in warnings[0]


def test_explicit_resume_of_a_damaged_checkpoint_is_an_error(tmp_path):
    path = _save(tmp_path, 2)
    (path / "rank_0.pt").unlink()
    with pytest.raises(FileNotFoundError, match="rank_0.pt is missing"):
        checkpoint.find_resume(tmp_path, str(path))


def test_pruning_removes_the_marker_before_the_files(tmp_path, monkeypatch):
    old = _save(tmp_path, 2, keep_last=1)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the job is killed while the old checkpoint's files are being deleted

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 4, keep_last=1)
    monkeypatch.undo()
    assert old.exists() and not (old / checkpoint.MARKER).exists()  # half-deleted: never COMPLETE
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_00000004"]


def _corrupt_payload(path):
    """Flip bytes in the middle of the largest .distcp file, keeping its size (the size check passes)."""
    payload = max(path.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(payload.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    payload.write_bytes(bytes(data))
    return payload


def test_auto_resume_skips_a_corrupted_payload_of_the_same_size_with_a_warning(tmp_path):
    first, second = _save(tmp_path, 2), _save(tmp_path, 4)
    assert set(json.loads((second / checkpoint.MARKER).read_text())["crc32"]) >= {".metadata", "rank_0.pt"}
    broken = _corrupt_payload(second)
    warnings = []
    assert checkpoint.find_resume(tmp_path, "auto", warnings.append) == first
    assert len(warnings) == 1 and str(second) in warnings[0] and f"{broken.name} has other bytes" in warnings[0]


def test_explicit_resume_of_a_corrupted_payload_names_the_file(tmp_path):
    path = _save(tmp_path, 2)
    broken = _corrupt_payload(path)
    with pytest.raises(FileNotFoundError, match=f"damaged \\({broken.name} has other bytes"):
        checkpoint.find_resume(tmp_path, str(path))


def test_auto_resume_refuses_when_every_checkpoint_is_damaged(tmp_path):
    """Used to return None: the run silently started over and repeated the checkpointed steps."""
    first, second = _save(tmp_path, 2), _save(tmp_path, 4)
    (first / "rank_0.pt").unlink()
    _truncate_largest(second)
    with pytest.raises(FileNotFoundError, match="every complete checkpoint .* is damaged") as error:
        checkpoint.find_resume(tmp_path, "auto", lambda text: None)
    assert "step_00000002: rank_0.pt is missing" in str(error.value) and "step_00000004: " in str(error.value)
    assert checkpoint.find_resume(tmp_path / "elsewhere", "auto") is None  # no checkpoint at all: a fresh start


def test_pruning_touches_only_this_run_lines_checkpoints(tmp_path):
    """Only `step_<8 digits>` directories whose record carries this line's run_id are pruned: another line's
    checkpoint and a look-alike directory (a user's backup copy) survive keep_last = 1."""
    foreign = _save(tmp_path, 1, run_id="earlier")
    backup = tmp_path / "checkpoints" / "step_00000001.bak"
    shutil.copytree(foreign, backup)
    mine = [_save(tmp_path, step, keep_last=1, run_id="this") for step in (2, 4, 6)]
    assert not mine[0].exists() and not mine[1].exists() and (mine[2] / checkpoint.MARKER).is_file()
    assert (foreign / checkpoint.MARKER).is_file() and (backup / checkpoint.MARKER).is_file()
    assert checkpoint.run_id_of(foreign) == "earlier" and checkpoint.run_id_of(mine[2]) == "this"
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_00000001", "step_00000006"]


def test_a_save_never_replaces_another_lines_checkpoint_at_its_step(tmp_path):
    """A complete checkpoint of another run line at the step being saved is moved aside, not deleted."""
    foreign = _save(tmp_path, 4, run_id="earlier")
    files = {p.name: p.read_bytes() for p in foreign.iterdir()}
    _save(tmp_path, 4, run_id="this")
    assert checkpoint.run_id_of(foreign) == "this"
    (aside,) = (tmp_path / checkpoint.SUPERSEDED).iterdir()
    assert aside.name.startswith("step_00000004-of-run-earlier-")
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == files
    _save(tmp_path, 4, run_id="this")  # this line's own checkpoint at the step: replaced, nothing more set aside
    assert len(list((tmp_path / checkpoint.SUPERSEDED).iterdir())) == 1


def test_supersede_moves_an_earlier_run_whole(tmp_path):
    _save(tmp_path, 2)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "notes.txt").write_text("the user's own")
    said = []
    target = checkpoint.supersede(tmp_path, said.append)
    assert sorted(p.name for p in target.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert (tmp_path / "notes.txt").is_file() and not (tmp_path / "checkpoints").exists()
    assert str(target) in said[0]
    assert checkpoint.supersede(tmp_path, said.append) is None


def test_supersede_keeps_a_linked_checkpoints_folder_and_sets_its_contents_aside_in_it(tmp_path):
    """A fresh start used to move the link itself into OUT/superseded, so the run then wrote its checkpoints
    into OUT instead of the linked folder. Now the link stays and the folder's earlier entries move aside inside
    it (same filesystem); the folder's claim record stays."""
    folder, run = tmp_path / "scratch", tmp_path / "run"
    (folder / "step_00000002").mkdir(parents=True)
    (folder / ".retro-run-dir").write_text(f"{run}\n")
    run.mkdir()
    (run / "checkpoints").symlink_to(folder)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    said = []
    target = checkpoint.supersede(run, said.append)
    assert (run / "checkpoints").is_symlink() and (run / "checkpoints").resolve() == folder
    (aside,) = folder.glob("superseded-*")
    assert [p.name for p in aside.iterdir()] == ["step_00000002"] and (folder / ".retro-run-dir").is_file()
    assert [p.name for p in target.iterdir()] == ["metrics.jsonl"] and str(aside) in said[0]
    assert checkpoint.supersede(run, said.append) is None and len(said) == 2  # nothing left to move


def test_export_reads_the_checkpoints_own_record_and_its_cwd(tmp_path):
    """export used to read max_mean from RUN/config.json (which a later run may rewrite) and resolve a
    relative model.path against the cwd of the export, not of the run."""
    from retro.export import read_run_config

    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"recurrence": {"max_mean": 9.0}, "model": {"path": "elsewhere"}}))
    job = {"recurrence": {"max_mean": 3.0}, "model": {"path": "assets/model"}}
    (ckpt / checkpoint.RECORD).write_text(json.dumps({"job": job, "cwd": "/where/it/ran"}))
    assert read_run_config(run, ckpt) == (3.0, Path("/where/it/ran/assets/model"))
    (ckpt / checkpoint.RECORD).unlink()  # a checkpoint from before records: the run's config.json, as before
    assert read_run_config(run, ckpt) == (9.0, Path("elsewhere"))
