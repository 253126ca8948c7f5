"""`python -m retro.export RUN_OR_CHECKPOINT --out HF_DIR`: a training checkpoint -> a Hugging Face
directory (config.json + safetensors + tokenizer files) that `RetroForCausalLM.from_pretrained` and
`AutoModelForCausalLM.from_pretrained` (after `import retro`) load.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

from retro.convert import TOKENIZER_FILES
from retro.model.config import RetroConfig
from retro.model.modeling import RetroForCausalLM
from retro.training import checkpoint


def resolve_checkpoint(path: Path) -> tuple[Path, Path]:
    """(checkpoint dir, run dir) from either a run directory or one of its checkpoints."""
    if (path / checkpoint.MARKER).is_file():
        return path, path.parent.parent
    found = checkpoint.complete_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path} is neither a complete checkpoint nor a run directory with one")
    return found[-1], path


def export(source: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    ckpt, run = resolve_checkpoint(Path(source))
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"output directory {out_dir} exists and is not empty; pass --force to overwrite it")
    config = RetroConfig.from_pretrained(run / "model_config")
    run_config = json.loads((run / "config.json").read_text())
    config.default_recurrences = max(1, math.ceil(run_config["recurrence"]["max_mean"]))
    model = RetroForCausalLM(config)
    checkpoint.load_model_only(ckpt, model)
    model.save_pretrained(out_dir)
    source_model = Path(run_config["model"]["path"])
    for name in TOKENIZER_FILES:
        if (source_model / name).is_file():
            shutil.copy2(source_model / name, out_dir / name)
    return ckpt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retro.export", description=__doc__)
    parser.add_argument("source", help="a run directory (its newest complete checkpoint) or a checkpoint directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    try:
        ckpt = export(args.source, args.out, args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"retro.export: error: {error}", file=sys.stderr)
        return 2
    print(f"exported {ckpt} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
