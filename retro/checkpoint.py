"""Distributed checkpoints (torch.distributed.checkpoint) that are only trusted once complete.

Layout: OUT/checkpoints/step_00000100/ holds the DCP files of model + optimizer (every rank writes
its shards), `rank_<r>.pt` with that rank's scheduler, data-loader and RNG state, and `COMPLETE`,
written by rank 0 only after every rank has finished. A crash mid-save leaves a directory without
`COMPLETE`, which resume ignores, so the previous checkpoint stays usable.
"""

from __future__ import annotations

import json
import shutil
import time
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

MARKER = "COMPLETE"


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step_{step:08d}"


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / MARKER).is_file())


def find_resume(out_dir: Path, resume: str) -> Path | None:
    """`auto`: newest complete checkpoint (or none); `none`; or an explicit checkpoint path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"checkpoint.resume = {resume}: not a complete checkpoint (no {MARKER} file)")
    return path


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(out_dir: Path, step: int, model, optimizer, extra: dict[str, Any], rank: int, keep_last: int) -> Path:
    """Save on every rank; mark complete only after all ranks finished; prune old checkpoints."""
    path = checkpoint_dir(out_dir, step)
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # a stale incomplete attempt at the same step
    _barrier()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(path))
    torch.save(extra, path / f"rank_{rank}.pt")
    _barrier()
    if rank == 0:
        (path / MARKER).write_text(json.dumps({"step": step, "time": time.time()}))
        for old in complete_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def load(path: Path, model, optimizer, rank: int, world_size: int) -> dict[str, Any]:
    """Load model + optimizer (resharded as needed) and return this rank's extra state."""
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    saved = len(list(path.glob("rank_*.pt")))
    if saved != world_size:
        raise RuntimeError(f"{path} was written by {saved} ranks; resuming with {world_size} ranks is not supported "
                           "(data-loader positions are per rank)")
    return torch.load(path / f"rank_{rank}.pt", weights_only=False)


def load_model_only(path: Path, model) -> None:
    """Model weights from a training checkpoint into a plain (unsharded) model, one process."""
    state = {"model": get_model_state_dict(model, options=StateDictOptions())}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
