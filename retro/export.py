"""`python -m retro.export RUN_OR_CHECKPOINT --out HF_DIR`: a training checkpoint -> a Hugging Face
directory (config.json + safetensors + tokenizer files) that `RetroForCausalLM.from_pretrained` and
`AutoModelForCausalLM.from_pretrained` (after `import retro`) load.

A run that trained LoRA updates (train.trainable = "lora") is exported with them merged into the base
weights (W += alpha / rank · B A): HF_DIR holds a plain model, no LoRA parameters.

A checkpoint is read together with its run directory (RUN/checkpoints/step_N beside RUN/config.json
and RUN/model_config/); the tokenizer files come from the run's model.path (the `retro.convert`
directory) or --tokenizer. HF_DIR is written beside itself and renamed into place once complete, and
may not be, contain or lie inside the run, the converted model or the tokenizer source.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from retro.hf.output_dir import TOKENIZER_FILES, check_output_dir, staged_output
from retro.model.config import RetroConfig
from retro.model.lora import LoraSettings, add_lora, merge_lora
from retro.model.modeling import RetroForCausalLM
from retro.training import checkpoint

VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # at least one makes a loadable tokenizer


def resolve_checkpoint(path: Path) -> tuple[Path, Path]:
    """(checkpoint dir, run dir) from either a run directory or one of its checkpoints."""
    if (path / checkpoint.MARKER).is_file():
        ckpt, run = path, path.parent.parent
        if path.parent.name != "checkpoints" or not (run / "config.json").is_file():
            raise FileNotFoundError(
                f"{path}: this checkpoint is not inside its run directory (RUN/checkpoints/{path.name} beside "
                f"RUN/config.json and RUN/model_config/), which holds the model's config; export the run directory, "
                f"or move the checkpoint back into it"
            )
        problem = checkpoint.damage(path)
        if problem is not None:
            raise FileNotFoundError(f"{path}: the checkpoint is damaged ({problem})")
    else:
        if not checkpoint.complete_checkpoints(path):
            raise FileNotFoundError(f"{path} is neither a complete checkpoint nor a run directory with one")
        warn = lambda text: print(text.replace("retro.train", "retro.export"), file=sys.stderr)  # noqa: E731
        ckpt, run = checkpoint.find_resume(path, "auto", warn), path  # the newest intact one
    for need in (run / "config.json", run / "model_config" / "config.json"):
        if not need.is_file():
            raise FileNotFoundError(f"{need} is missing: {run} is not a complete run directory")
    return ckpt, run


def read_run_config(run: Path, ckpt: Path) -> tuple[float, Path]:
    """(recurrence.max_mean, model.path) the checkpoint was trained with: from its own record
    (job_config.json), or for a checkpoint written before records from the run's config.json (which a
    later run with other settings may have rewritten); each named when absent."""
    path = ckpt / checkpoint.RECORD
    if not path.is_file():
        path = run / "config.json"
    try:
        record = json.loads(path.read_text())
        config = record.get("job", record) if path.name == checkpoint.RECORD else record
        model_path = Path(config["model"]["path"])
        if not model_path.is_absolute() and path.name == checkpoint.RECORD and record.get("cwd"):
            model_path = Path(record["cwd"]) / model_path  # relative to where the run was started, not to here
        return float(config["recurrence"]["max_mean"]), model_path
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path}: not the config a `retro.train` run wrote (no recurrence.max_mean or model.path: {error!r}); "
            f"was it overwritten?"
        ) from None


def read_lora(ckpt: Path, run: Path) -> LoraSettings | None:
    """The [lora] settings the checkpoint was trained with when it holds LoRA updates (train.trainable =
    "lora"), else None: from the checkpoint's own job record, else the run's config.json."""
    record = ckpt / checkpoint.RECORD
    path = record if record.is_file() else run / "config.json"
    config = json.loads(path.read_text())
    config = config.get("job", {}) if path == record else config
    if config.get("train", {}).get("trainable", "all") != "lora":
        return None
    try:
        return LoraSettings(**config["lora"])
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: train.trainable is lora but its [lora] section is unreadable ({error!r})") from None


def tokenizer_files(source: Path, named_by: str) -> list[str]:
    """The tokenizer files in `source`; an error when there are none (an export would not be usable)."""
    if not source.is_dir():
        raise FileNotFoundError(
            f"tokenizer source {source} ({named_by}) does not exist; pass --tokenizer DIR with the tokenizer files"
        )
    if not any((source / name).is_file() for name in VOCABULARY_FILES):
        raise FileNotFoundError(
            f"tokenizer source {source} ({named_by}) has no tokenizer files (none of {', '.join(VOCABULARY_FILES)}); "
            f"pass --tokenizer DIR with the tokenizer files"
        )
    return [name for name in TOKENIZER_FILES if (source / name).is_file()]


def export(source: str | Path, out_dir: str | Path, force: bool = False, tokenizer: str | Path | None = None) -> Path:
    ckpt, run = resolve_checkpoint(Path(source))
    out_dir = Path(out_dir)
    max_mean, model_path = read_run_config(run, ckpt)
    tok_source = Path(tokenizer) if tokenizer else model_path
    names = tokenizer_files(tok_source, "--tokenizer" if tokenizer else f"model.path of {run / 'config.json'}")
    keep = {"the run directory": run, "the checkpoint": ckpt, "the tokenizer source": tok_source}
    if model_path.is_dir():
        keep["the run's model.path"] = model_path
    check_output_dir(out_dir, force, keep)
    config = RetroConfig.from_pretrained(run / "model_config")
    config.default_recurrences = max(1, math.ceil(max_mean))
    model = RetroForCausalLM(config)
    lora = read_lora(ckpt, run)
    if lora is not None:  # load the updates beside the base weights, then fold them in: a plain model
        add_lora(model.model.recurrent.block, lora)
    checkpoint.load_model_only(ckpt, model)
    merge_lora(model)
    with staged_output(out_dir) as tmp:
        model.save_pretrained(tmp)
        for name in names:
            shutil.copy2(tok_source / name, tmp / name)
    return ckpt


def build_parser() -> argparse.ArgumentParser:
    """The CLI's options (main parses them; tests read their help)."""
    parser = argparse.ArgumentParser(prog="python -m retro.export", description=__doc__)
    parser.add_argument("source", help="a run directory (its newest complete checkpoint) or a checkpoint directory")
    parser.add_argument(
        "--out",
        required=True,
        help="output directory for the Hugging Face model (config.json, safetensors, tokenizer files), staged in "
        ".OUT.partial beside it and renamed when complete",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    parser.add_argument(
        "--tokenizer", help="directory to copy the tokenizer files from (default: the run's model.path)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ckpt = export(args.source, args.out, args.force, args.tokenizer)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"retro.export: error: {error}", file=sys.stderr)
        return 2
    print(f"exported {ckpt} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
