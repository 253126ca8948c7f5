"""`python -m retro.convert`: turn a local Hugging Face decoder into a depth-recurrent checkpoint.

Everything that can be wrong with the request is checked before any weight is read. The output is
written into `.OUT.partial` beside OUT and renamed to OUT only once complete, so a failed (re-)convert
leaves the previous OUT as it was; OUT may not be, contain or lie inside the source model.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig

from retro.hf.archs import Architecture, architecture_for
from retro.hf.gguf import open_gguf
from retro.hf.output_dir import TOKENIZER_FILES, check_output_dir, staged_output
from retro.hf.surgery import LayerPlan, build_state_dict, plan_from_ranges, plan_from_shape, static_plan
from retro.hf.weights import WeightReader, save_sharded
from retro.model.adapter import Adapter
from retro.model.config import STATE_INITS, RetroConfig


def load_source_config(model_dir: Path):
    """(transformers config, Architecture) of a local Hugging Face checkpoint directory; no weights read."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"source model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a Hugging Face checkpoint directory")
    try:
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{model_dir / 'config.json'}: not a JSON object ({error})") from None
    arch = architecture_for(model_type)
    return AutoConfig.from_pretrained(model_dir), arch


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--shape must be three integers P,R,C (e.g. 4,8,4), got {text!r}") from None
    if len(values) != 3:
        raise ValueError(f"--shape must be three integers P,R,C (e.g. 4,8,4), got {text!r}")
    return values  # type: ignore[return-value]


def conversion_config(
    hf_config, arch: Architecture, plan: LayerPlan, state_init: str = "trunc_normal", default_recurrences: int = 1
) -> RetroConfig:
    """The RetroConfig of a source config cut by `plan` (no weights read; the planner uses it too)."""
    config = RetroConfig(
        **arch.config_fields(hf_config),
        n_prelude=len(plan.prelude),
        n_recurrent=len(plan.block),
        n_coda=len(plan.coda),
        state_init=state_init,
        default_recurrences=default_recurrences,
        source_layers={"prelude": plan.prelude, "block": plan.block, "coda": plan.coda},
        tie_word_embeddings=False,
    )
    config.architectures = ["RetroForCausalLM"]
    return config


@dataclass
class Conversion:
    """A converted model in memory: what `convert` writes, and what a distillation teacher loads."""

    config: RetroConfig
    tensors: dict[str, torch.Tensor]
    summary: dict
    gguf: object | None  # the open GGUF source (its tokenizer is rebuilt from metadata), or None
    tokenizer_files: list[str] = field(default_factory=list)  # copied from the source directory


def build_conversion(
    model_dir: str | Path,
    shape: tuple[int, int, int] | None = None,
    layers: str | None = None,
    static: bool = False,
    adapter_init: str = "identity",
    state_init: str = "trunc_normal",
    default_recurrences: int = 1,
    seed: int = 0,
    gguf_file: str | None = None,
) -> Conversion:
    """The RetroForCausalLM config and tensors for a source model and a layer choice, nothing written."""
    model_dir = Path(model_dir)
    if sum(x is not None and x is not False for x in (shape, layers, static)) != 1:
        raise ValueError("give exactly one of --shape P,R,C, --layers a-b,c-d,e-f or --static")
    if adapter_init not in ("identity", "default"):
        raise ValueError(f"--adapter-init must be identity or default, got {adapter_init!r}")
    if state_init not in STATE_INITS:
        raise ValueError(f"--state-init must be one of {STATE_INITS}, got {state_init!r}")
    gguf = open_gguf(model_dir, gguf_file)  # None: a safetensors checkpoint directory
    hf_config, arch = gguf.config_and_architecture() if gguf else load_source_config(model_dir)
    num_layers = hf_config.num_hidden_layers
    plan: LayerPlan = (
        static_plan(num_layers)
        if static
        else plan_from_ranges(num_layers, layers)
        if layers
        else plan_from_shape(num_layers, *shape)
    )
    reader = gguf.weights() if gguf else WeightReader(model_dir)
    config = conversion_config(hf_config, arch, plan, state_init, default_recurrences)
    fields = arch.config_fields(hf_config)
    tensors = build_state_dict(reader.get, arch, fields, plan, bool(getattr(hf_config, "tie_word_embeddings", False)))
    if config.is_recurrent:
        adapter = Adapter(config.hidden_size)  # [0 | I] on construction
        if adapter_init == "default":
            adapter.reset_default(torch.Generator().manual_seed(seed))
        tensors["model.recurrent.adapter.weight"] = adapter.weight.detach().to(
            tensors["model.embed_tokens.weight"].dtype
        )

    config.dtype = str(tensors["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    copied = [name for name in TOKENIZER_FILES if not gguf and (model_dir / name).is_file()]
    zero_rows = (tensors["model.embed_tokens.weight"].abs().sum(dim=1) == 0).nonzero().flatten().tolist()
    source_params = sum(math.prod(reader.shape(n)) for n in reader.file_of)
    summary = {
        "source": str(model_dir),
        "model_type": arch.model_type,
        "source_layers": num_layers,
        "prelude": plan.prelude,
        "block": plan.block,
        "coda": plan.coda,
        "dropped": plan.dropped(num_layers),
        "source_parameters": source_params,
        "parameters": sum(t.numel() for t in tensors.values()),
        "adapter_init": adapter_init,
        "state_init": state_init,
        "tokenizer_files": copied,
        "zero_embedding_rows": zero_rows,
    }
    return Conversion(config, tensors, summary, gguf, copied)


def convert(model_dir: str | Path, out_dir: str | Path, force: bool = False, **request) -> dict:
    """Write a RetroForCausalLM checkpoint (config, safetensors, tokenizer files); return a summary.

    `request`: build_conversion's keywords (shape, layers or static; adapter_init, state_init, ...).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_output_dir(out_dir, force, {"the source model": model_dir})
    done = build_conversion(model_dir, **request)
    summary = {"out": str(out_dir), **done.summary}
    with staged_output(out_dir) as tmp:
        done.config.save_pretrained(tmp)
        save_sharded(done.tensors, tmp)
        for name in done.tokenizer_files:
            shutil.copy2(model_dir / name, tmp / name)
        if done.gguf:  # the tokenizer is rebuilt from the GGUF's metadata
            summary.update(done.gguf.save_tokenizer(tmp))
        (tmp / "conversion.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(s: dict) -> str:
    def rng(layers):
        return f"{layers[0]}..{layers[-1]}" if layers else "-"

    lines = [
        f"converted {s['model_type']} ({s['source_layers']} layers) from {s['source']} -> {s['out']}",
        f"  prelude {rng(s['prelude'])}  block {rng(s['block'])}  coda {rng(s['coda'])}  dropped "
        f"{s['dropped'] or 'none'}",
        f"  unique parameters: {s['source_parameters']:,} -> {s['parameters']:,} (head untied, adapter "
        f"{s['adapter_init']})",
        f"  tokenizer files copied: {', '.join(s['tokenizer_files']) or 'none'}",
    ]
    if s.get("tokenizer_note"):
        lines.append(f"  WARNING: {s['tokenizer_note']}")
    if s["zero_embedding_rows"]:
        # A token whose embedding is exactly zero keeps a zero residual stream at the start of a row;
        # every RMSNorm then multiplies its gradient by 1/sqrt(eps), and training steps overflow.
        lines.append(
            f"  WARNING: embedding rows {s['zero_embedding_rows'][:10]} are all zeros (e.g. an untrained pad "
            "token); keep those tokens out of the training data or give them non-zero embeddings"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m retro.convert", description=__doc__)
    parser.add_argument("--model", required=True, help="local Hugging Face checkpoint directory or a .gguf file")
    parser.add_argument("--gguf-file", help="read this GGUF file inside the --model directory (needs retro[gguf])")
    parser.add_argument("--out", required=True, help="output directory for the recurrent checkpoint")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--shape", help="P,R,C: first P layers, last C layers, the R layers before the coda")
    group.add_argument("--layers", help="explicit inclusive ranges prelude,block,coda, e.g. 0-3,10-17,18-21")
    group.add_argument("--static", action="store_true", help="keep every layer, no recurrence (the static baseline)")
    parser.add_argument("--adapter-init", default="identity", choices=["identity", "default"])
    parser.add_argument("--state-init", default="trunc_normal", choices=list(STATE_INITS))
    parser.add_argument("--default-recurrences", type=int, default=1, help="r used when a caller passes none")
    parser.add_argument("--seed", type=int, default=0, help="seed of the default adapter init")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)
    try:
        summary = convert(
            args.model,
            args.out,
            shape=parse_shape(args.shape) if args.shape else None,
            layers=args.layers,
            static=args.static,
            adapter_init=args.adapter_init,
            state_init=args.state_init,
            default_recurrences=args.default_recurrences,
            force=args.force,
            seed=args.seed,
            gguf_file=args.gguf_file,
        )
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as error:
        print(f"retro.convert: error: {error}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
