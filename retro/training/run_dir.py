"""The run directory: everything a run writes besides its checkpoints, prepared in one place.

`OUT/config.json` (the resolved job config), `OUT/model_config/` (the model's config, for export) and
`OUT/metrics.jsonl` (one JSON line per logged step; TensorBoard scalars beside it when enabled).
Rank 0 prepares it once the resume point is known, so a resumed run drops the records of the steps
it is about to re-run, and a fresh start first moves an earlier run's files into OUT/superseded/<time>/
(checkpoint.supersede: `--resume none --force` over checkpoints, or the leftovers of a run that never
saved one) rather than mixing with or deleting them. retro.train holds the directory's lock
(run_lock.py) before any of this, so only one live run ever writes here.
"""

from __future__ import annotations

from pathlib import Path

from retro.model.config import RetroConfig
from retro.training.checkpoint import set_aside_other_branches, supersede
from retro.training.job_config import JobConfig, save_config
from retro.training.metrics import MetricsLog, truncate_after


def prepare_run_dir(
    out_dir: Path, job: JobConfig, model_config: RetroConfig, resumed_step: int | None, run_id: str | None = None
) -> MetricsLog:
    """Write the run's config files and open its metrics log (records after `resumed_step` dropped). A
    fresh start first sets an earlier run aside; a resume sets aside other run lines' checkpoints and
    this line's past `resumed_step`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if resumed_step is None:
        supersede(out_dir)
    else:
        set_aside_other_branches(out_dir, run_id, resumed_step)
    save_config(job, out_dir / "config.json")
    model_config.save_pretrained(out_dir / "model_config")
    metrics = out_dir / "metrics.jsonl"
    if resumed_step is not None:
        truncate_after(metrics, resumed_step)  # the steps after the checkpoint are re-run
    return MetricsLog(metrics, out_dir / "tensorboard" if job.train.tensorboard else None)
