"""Look inside a prepared directory: `python -m retro.data.inspect_shards DIR [--samples N] [--verify]`.

Prints the manifest summary (with the share of loss tokens of a masked set) and decodes the first
documents of each split with the tokenizer the manifest names, so a human can see that the bytes
mean what they should; in a masked set the loss tokens are shown between [[ and ]].
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from retro.data.manifest import ShardFormatError
from retro.data.shards import TokenShards


def build_parser() -> argparse.ArgumentParser:
    """The CLI's options (main parses them; tests read their help)."""
    p = argparse.ArgumentParser(prog="python -m retro.data.inspect_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="directory written by retro.data.prepare")
    p.add_argument("--samples", type=int, default=3, help="documents to decode per split")
    p.add_argument("--max-chars", type=int, default=300, help="truncate decoded text to this length")
    p.add_argument("--verify", action="store_true", help="also check SHA-256 checksums and the id range")
    p.add_argument("--no-decode", action="store_true", help="print ids only (no tokenizer needed)")
    return p


def marked_text(tokenizer: Any, ids: np.ndarray, mask: np.ndarray) -> str:
    """The decoded document with each run of loss tokens between [[ and ]]."""
    cuts = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    pieces = []
    for run_ids, run_mask in zip(np.split(ids, cuts), np.split(mask, cuts)):
        text = tokenizer.decode(run_ids.tolist())
        pieces.append(f"[[{text}]]" if run_mask.size and run_mask[0] else text)
    return "".join(pieces)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        splits = {}
        for name in ("train", "val"):
            s = TokenShards(args.dir, split=name, verify="full" if args.verify else "size")
            splits[name] = s
    except ShardFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest = splits["train"].manifest
    print(manifest.summary())
    if args.verify:
        print("verify        checksums and id range OK")
    tokenizer = None
    if not args.no_decode:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(manifest.tokenizer_name)
        except (OSError, ValueError) as e:
            print(f"(cannot load tokenizer {manifest.tokenizer_name!r} to decode: {e})")
    for name, s in splits.items():
        for k in range(min(args.samples, s.num_docs)):
            ids = s.document(k)
            mask = s.document_mask(k) if s.masked else None
            loss = f", {int(mask.sum())} loss tokens" if mask is not None else ""
            head = f"[{name} doc {k}: {len(ids)} tokens{loss}]"
            if tokenizer is None:
                print(head, ids[:32].tolist(), "..." if len(ids) > 32 else "")
                if mask is not None:
                    print("  loss mask", mask[:32].tolist(), "..." if len(ids) > 32 else "")
            else:
                text = tokenizer.decode(ids.tolist()) if mask is None else marked_text(tokenizer, ids, mask)
                print(head, repr(text[: args.max_chars]) + ("..." if len(text) > args.max_chars else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
