"""`python -m retro.convert`: turn a local Hugging Face decoder into a depth-recurrent checkpoint.

Everything that can be wrong with the request is checked before any weight is read. The output is
written into `.OUT.partial` beside OUT and renamed to OUT only once complete, so a failed (re-)convert
leaves the previous OUT as it was; OUT may not be, contain or lie inside the source model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from retro.hf.conversion import build_conversion, parse_shape
from retro.hf.output_dir import check_output_dir, staged_output
from retro.hf.weights import save_sharded
from retro.model.config import STATE_INITS


def convert(model_dir: str | Path, out_dir: str | Path, force: bool = False, **request) -> dict:
    """Write a RetroForCausalLM checkpoint (config, safetensors, tokenizer files); return a summary.

    `request`: build_conversion's keywords (shape, layers or static; adapter_init, state_init, ...).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_output_dir(out_dir, force, {"the source model": model_dir})
    done = build_conversion(model_dir, **request)
    check_shapes(done.config, done.tensors)  # a config.json that disagrees with the weights: nothing written
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


def check_shapes(config, tensors: dict) -> None:
    """Every tensor to be written has the shape the RetroConfig implies (the model built on the meta device,
    so no memory is allocated); ValueError naming the first that does not, with both shapes."""
    import torch

    from retro.model.modeling import RetroForCausalLM

    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in RetroForCausalLM(config).state_dict().items()}
    for name, tensor in tensors.items():
        if name not in expected:
            raise ValueError(f"tensor {name} has no place in the model the converted config describes")
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"tensor {name} has shape {list(tensor.shape)}, but the source's config.json implies "
                f"{list(expected[name])}: the config disagrees with the weights; nothing written"
            )


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


def build_parser() -> argparse.ArgumentParser:
    """The CLI's options (main parses them; tests read their help)."""
    parser = argparse.ArgumentParser(prog="python -m retro.convert", description=__doc__)
    parser.add_argument("--model", required=True, help="local Hugging Face checkpoint directory or a .gguf file")
    parser.add_argument("--gguf-file", help="read this GGUF file inside the --model directory (needs retro[gguf])")
    parser.add_argument("--out", required=True, help="output directory for the recurrent checkpoint")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--shape", help="P,R,C: first P layers, last C layers, the R layers before the coda")
    group.add_argument("--layers", help="explicit inclusive ranges prelude,block,coda, e.g. 0-3,10-17,18-21")
    group.add_argument("--static", action="store_true", help="keep every layer, no recurrence (the static baseline)")
    parser.add_argument(
        "--adapter-init",
        default="identity",
        choices=["identity", "default"],
        help="adapter weights: identity = [0 | I], passes the prelude output through, so a conversion that drops no "
        "layer reproduces the source at r = 1; default = PyTorch's Linear init (the paper's), seeded by --seed "
        "(default: identity)",
    )
    parser.add_argument(
        "--state-init",
        default="trunc_normal",
        choices=list(STATE_INITS),
        help="initial recurrent state s0 stored in the config: trunc_normal (std 0.0087 cut at 3 std, the paper's), "
        "zeros, or embed (the prelude output) (default: trunc_normal)",
    )
    parser.add_argument(
        "--default-recurrences", type=int, default=1, help="r used when a caller passes none (default: 1)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --adapter-init default (default: 0)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
