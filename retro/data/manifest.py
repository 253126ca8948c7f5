"""The on-disk format of prepared token shards: `manifest.json` beside raw token files.

A prepared directory holds, per split (`train`, `val`), shards named `{split}-{i:05d}.bin`
(raw little-endian token ids, uint16 when the vocabulary fits, else uint32) and
`{split}-{i:05d}.idx` (raw int64 start offsets of each document inside that shard), and, in a set
prepared with a loss mask (`--chat`, `loss_on = "assistant"`), `{split}-{i:05d}.mask` (one uint8 per
token: 1 where the token counts in the loss). The manifest records what a reader needs to trust
those bytes: dtype, vocabulary size and hash, EOS id, tokenizer name, whether the tokenizer's
special tokens (e.g. a BOS) start each document, and per-shard token/document counts with SHA-256
checksums. Fields added later have defaults, so older manifests still load (a manifest without
`add_special_tokens` was written without them).

Format version 2 adds the loss mask; a set without one is still written as version 1, byte for byte
what older readers expect (they refuse a version-2 set in one line rather than train on every token).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_NAME = "retro-token-shards"
FORMAT_VERSION = 2  # 2: optional per-token loss masks (`loss_on`); 1: ids only
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
DOC_INDEX_DTYPE = np.dtype("<i8")
MASK_DTYPE = np.dtype("u1")
LOSS_ON = ("all", "assistant")  # which tokens count in the loss: every token, or the mask's
SPLITS = ("train", "val")


class ShardFormatError(ValueError):
    """A prepared dataset is malformed, corrupted, or does not match what the run expects."""


def token_dtype_for(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every id below `vocab_size` (why: halves disk and I/O)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def vocab_hash(tokenizer: Any) -> str:
    """SHA-256 of the (token, id) table, so two tokenizers can be compared without their files."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    payload = json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()


def file_sha256(path: Path, chunk_bytes: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ShardInfo:
    """One shard: its token file, document-offset file, counts and checksums."""

    file: str
    index_file: str
    num_tokens: int
    num_docs: int
    sha256: str
    index_sha256: str
    mask_file: str | None = None  # uint8 per token, 1 = a loss token (only with loss_on = "assistant")
    mask_sha256: str | None = None
    loss_tokens: int | None = None  # tokens whose mask is 1


@dataclass
class SplitInfo:
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.shards)

    @property
    def num_docs(self) -> int:
        return sum(s.num_docs for s in self.shards)

    @property
    def num_loss_tokens(self) -> int:
        """Tokens that count in the loss: the mask's ones, or every token without a mask."""
        return sum(s.num_tokens if s.loss_tokens is None else s.loss_tokens for s in self.shards)


@dataclass
class Manifest:
    """Everything needed to read and trust a prepared directory; written last, atomically."""

    dtype: str
    vocab_size: int
    eos_id: int | None
    tokenizer_name: str
    vocab_hash: str
    append_eos: bool
    source: str
    text_field: str
    splits: dict[str, SplitInfo]
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    chat: bool = False
    val_fraction: float = 0.0
    skipped_empty_docs: int = 0
    add_special_tokens: bool = False  # the tokenizer's special tokens (add_special_tokens=True) added per document
    bos_id: int | None = None  # the BOS id each document starts with, if the special tokens included one
    loss_on: str = "all"  # "assistant": every shard has a mask file (format version 2)
    path: Path | None = field(default=None, compare=False)

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def masked(self) -> bool:
        return self.loss_on != "all"

    def to_json(self) -> str:
        """The manifest file; a set without masks is written as version 1, without the mask keys."""
        d = asdict(self)
        d.pop("path")
        if not self.masked:
            d.pop("loss_on")
            d["format_version"] = 1
        for split in d["splits"].values():
            for shard in split["shards"]:
                for key in ("mask_file", "mask_sha256", "loss_tokens"):
                    if shard[key] is None:
                        shard.pop(key)
            split["num_tokens"] = sum(s["num_tokens"] for s in split["shards"])
            split["num_docs"] = sum(s["num_docs"] for s in split["shards"])
        return json.dumps(d, indent=2) + "\n"

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        """Read and validate `DIR/manifest.json` (or a path to the file itself)."""
        path = Path(directory)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise ShardFormatError(
                f"{path}: no manifest found; is this a directory written by `python -m retro.data.prepare`?"
            )
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ShardFormatError(f"{path}: manifest is not valid JSON ({e})") from e
        if raw.get("format") != FORMAT_NAME:
            raise ShardFormatError(f"{path}: format is {raw.get('format')!r}, expected {FORMAT_NAME!r}")
        if raw.get("format_version") not in READABLE_VERSIONS:
            raise ShardFormatError(
                f"{path}: format_version {raw.get('format_version')!r} is not supported (this reader: "
                f"{', '.join(map(str, READABLE_VERSIONS))})"
            )
        required = (
            "dtype",
            "vocab_size",
            "eos_id",
            "tokenizer_name",
            "vocab_hash",
            "append_eos",
            "source",
            "text_field",
            "splits",
        )
        missing = [k for k in required if k not in raw]
        if missing:
            raise ShardFormatError(f"{path}: manifest lacks keys {missing}")
        splits: dict[str, SplitInfo] = {}
        for name, split in raw["splits"].items():
            try:
                shards = [ShardInfo(**s) for s in split["shards"]]
            except TypeError as e:
                raise ShardFormatError(f"{path}: split {name!r} has a malformed shard entry ({e})") from e
            splits[name] = SplitInfo(shards)
        known = {f for f in cls.__dataclass_fields__ if f != "path"}
        unknown = set(raw) - known
        if unknown:
            raise ShardFormatError(f"{path}: unknown manifest keys {sorted(unknown)}")
        kwargs = {k: raw[k] for k in known if k in raw and k != "splits"}
        m = cls(splits=splits, path=path, **kwargs)
        if np.dtype(m.dtype) not in (np.dtype("<u2"), np.dtype("<u4")):
            raise ShardFormatError(f"{path}: dtype {m.dtype!r} is not uint16 or uint32")
        if np.dtype(m.dtype).itemsize < token_dtype_for(m.vocab_size).itemsize:
            raise ShardFormatError(f"{path}: dtype {m.dtype} cannot hold vocab_size {m.vocab_size}")
        m._check_masks()
        return m

    def _check_masks(self) -> None:
        """loss_on, the format version and each shard's mask entries must agree (a set is masked whole or not)."""
        if self.loss_on not in LOSS_ON:
            raise ShardFormatError(f"{self.path}: loss_on {self.loss_on!r} is not one of {list(LOSS_ON)}")
        if self.masked and self.format_version < 2:
            raise ShardFormatError(
                f"{self.path}: loss_on {self.loss_on!r} needs format_version 2 (the manifest says "
                f"{self.format_version}); the manifest was edited, re-run prepare"
            )
        for name, split in self.splits.items():
            for s in split.shards:
                has = (s.mask_file is not None, s.mask_sha256 is not None, s.loss_tokens is not None)
                if self.masked and not all(has):
                    raise ShardFormatError(
                        f"{self.path}: split {name!r} shard {s.file} lists no mask file, mask checksum or loss-token "
                        f"count, but loss_on is {self.loss_on!r}; re-run prepare"
                    )
                if not self.masked and any(has):
                    raise ShardFormatError(
                        f"{self.path}: split {name!r} shard {s.file} lists a mask, but loss_on is 'all'; re-run prepare"
                    )
                if self.masked and not 0 <= s.loss_tokens <= s.num_tokens:
                    raise ShardFormatError(
                        f"{self.path}: split {name!r} shard {s.file}: loss_tokens {s.loss_tokens} outside "
                        f"[0, {s.num_tokens}]"
                    )

    @property
    def directory(self) -> Path:
        if self.path is None:
            raise ValueError("manifest was not loaded from disk")
        return self.path.parent

    def summary(self) -> str:
        lines = [
            f"manifest      {self.path}",
            f"tokenizer     {self.tokenizer_name} (vocab {self.vocab_size}, hash {self.vocab_hash[:12]}, eos "
            f"{self.eos_id})",
            f"dtype         {self.np_dtype.name}   append_eos {self.append_eos}   add_special_tokens "
            f"{self.add_special_tokens} (bos {self.bos_id})   chat {self.chat}   loss_on {self.loss_on}",
            f"source        {self.source} (field {self.text_field!r}), val_fraction {self.val_fraction}",
        ]
        for name, split in self.splits.items():
            share = f"   loss tokens {split.num_loss_tokens / max(split.num_tokens, 1):.1%}" if self.masked else ""
            lines.append(
                f"split {name:<7} {split.num_tokens:>14,} tokens {split.num_docs:>11,} docs "
                f"{len(split.shards):>5} shards{share}"
            )
        if self.skipped_empty_docs:
            lines.append(f"skipped       {self.skipped_empty_docs} documents that encoded to no tokens")
        return "\n".join(lines)
