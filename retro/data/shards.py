"""Memory-mapped read access to one split of a prepared directory, as one token stream.

Shards are concatenated logically; a read at any offset is a couple of numpy slices, with no
per-token Python work. Memory maps open lazily per process, so the object pickles cheaply
into DataLoader workers (spawn or fork) without copying data.

How much is checked (`Verify`):
- "size" (the default, no data read): every file exists with the size the manifest implies;
  catches truncated, missing and swapped files.
- while reading, always: the loader checks each batch's ids against the vocabulary (one max()
  per batch, `retro.data.loader.PackedWindows`), so an id that a same-size corruption pushed
  beyond the vocabulary stops the run with the shard file and offset, not an IndexError in the
  embedding hours in.
- "full": also every SHA-256 checksum, the id range of every shard and, in a masked set, that
  every mask byte is 0 or 1 and their sum is the manifest's loss-token count, before the first
  step (reads all data once). Use it for long runs: a same-size corruption whose ids stay inside the
  vocabulary is otherwise trained on silently. `python -m retro.data.inspect_shards DIR --verify`
  runs the same check by hand.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from retro.data.manifest import (
    DOC_INDEX_DTYPE,
    MASK_DTYPE,
    Manifest,
    ShardFormatError,
    ShardInfo,
    file_sha256,
    vocab_hash,
)

Verify = Literal["none", "size", "full"]


class TokenShards:
    """One split (`train` or `val`) of a prepared directory.

    verify: "size" (default) checks every file exists with the size the manifest implies;
    "full" also checks SHA-256 checksums and that every id is below vocab_size (reads all data).
    """

    def __init__(self, path: str | Path, split: str = "train", verify: Verify = "size") -> None:
        self.manifest = Manifest.load(path)
        self.directory = self.manifest.directory
        self.split = split
        if split not in self.manifest.splits:
            raise ShardFormatError(f"{self.manifest.path}: no split {split!r} (has {sorted(self.manifest.splits)})")
        self.shards = self.manifest.splits[split].shards
        self.dtype = self.manifest.np_dtype
        counts = np.array([s.num_tokens for s in self.shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_tokens = int(self.shard_starts[-1])
        self.num_docs = sum(s.num_docs for s in self.shards)
        self._tokens: list[np.memmap] | None = None
        self._masks: list[np.memmap] | None = None
        self._doc_index: list[np.ndarray] | None = None
        if verify != "none":
            self.verify_sizes()
        if verify == "full":
            self.verify_checksums()
            self.verify_token_range()

    # --- facts the trainer checks ----------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def eos_id(self) -> int | None:
        return self.manifest.eos_id

    @property
    def tokenizer_name(self) -> str:
        return self.manifest.tokenizer_name

    @property
    def vocab_hash(self) -> str:
        return self.manifest.vocab_hash

    @property
    def masked(self) -> bool:
        """Whether a per-token loss mask is stored (`read_mask`); without one every token counts."""
        return self.manifest.masked

    @property
    def num_loss_tokens(self) -> int:
        return self.manifest.splits[self.split].num_loss_tokens

    def __repr__(self) -> str:
        return (
            f"TokenShards({str(self.directory)!r}, split={self.split!r}, tokens={self.num_tokens}, dtype={self.dtype})"
        )

    # --- validation ----------------------------------------------------------------------------
    def verify_sizes(self) -> None:
        """Cheap check (no data read) that catches truncated, missing or swapped files."""
        for s in self.shards:
            files = [
                (s.file, s.num_tokens * self.dtype.itemsize),
                (s.index_file, s.num_docs * DOC_INDEX_DTYPE.itemsize),
            ]
            if s.mask_file is not None:
                files.append((s.mask_file, s.num_tokens * MASK_DTYPE.itemsize))
            for name, expect in files:
                p = self.directory / name
                if not p.is_file():
                    raise ShardFormatError(f"{p}: file listed in {self.manifest.path} is missing")
                got = os.path.getsize(p)
                if got != expect:
                    raise ShardFormatError(
                        f"{p}: size {got} bytes, manifest says {expect} bytes; the shard is truncated or "
                        f"altered, re-run prepare"
                    )

    def verify_checksums(self) -> None:
        """Reads every byte: catches altered files whose size is unchanged."""
        for s in self.shards:
            files = [(s.file, s.sha256), (s.index_file, s.index_sha256)]
            if s.mask_file is not None:
                files.append((s.mask_file, s.mask_sha256))
            for name, expect in files:
                p = self.directory / name
                got = file_sha256(p)
                if got != expect:
                    raise ShardFormatError(
                        f"{p}: SHA-256 {got[:16]}... does not match the manifest ({expect[:16]}...); "
                        f"the shard is corrupted or altered, re-run prepare"
                    )

    def locate(self, offset: int) -> tuple[ShardInfo, int]:
        """The shard holding token `offset` of the concatenated split, and the offset inside it."""
        i = int(np.searchsorted(self.shard_starts, offset, side="right")) - 1
        return self.shards[i], offset - int(self.shard_starts[i])

    def out_of_vocabulary(self, offset: int, token: int, limit: int) -> ShardFormatError:
        """The error for token `token` >= `limit` found at `offset` of the split, naming file and offset."""
        shard, local = self.locate(offset)
        return ShardFormatError(
            f"{self.directory / shard.file}: token id {token} at token offset {local} (byte "
            f"{local * self.dtype.itemsize}) is beyond the vocabulary size {limit}: the shard is corrupted (its "
            f"size is right, so the cheap check passed); check every shard with verify='full' or `python -m "
            f"retro.data.inspect_shards {self.directory} --verify`, and re-run prepare"
        )

    def verify_token_range(self, vocab_size: int | None = None) -> None:
        """Every id must index the embedding; an id beyond it would crash (or worse, not) on GPU."""
        limit = self.vocab_size if vocab_size is None else vocab_size
        for i, s in enumerate(self.shards):
            if s.num_tokens == 0:
                continue
            top = int(self._maps()[i].max())
            if top >= limit:
                raise ShardFormatError(
                    f"{self.directory / s.file}: token id {top} is beyond the vocabulary size {limit}"
                )
            if s.mask_file is not None:
                self._verify_mask(i, s)

    def _verify_mask(self, i: int, s: ShardInfo) -> None:
        mask = self._mask_maps()[i]
        if int(mask.max()) > 1:
            raise ShardFormatError(f"{self.directory / s.mask_file}: holds {int(mask.max())}; a loss mask is 0 or 1")
        ones = int(np.count_nonzero(mask))
        if ones != s.loss_tokens:
            raise ShardFormatError(
                f"{self.directory / s.mask_file}: {ones} loss tokens, the manifest says {s.loss_tokens}; re-run prepare"
            )

    # --- reading -------------------------------------------------------------------------------
    def _maps(self) -> list[np.memmap]:
        if self._tokens is None:
            self._tokens = [
                np.memmap(self.directory / s.file, dtype=self.dtype, mode="r", shape=(s.num_tokens,))
                if s.num_tokens
                else np.zeros(0, dtype=self.dtype)
                for s in self.shards
            ]
        return self._tokens

    def _mask_maps(self) -> list[np.memmap]:
        if self._masks is None:
            self._masks = [
                np.memmap(self.directory / s.mask_file, dtype=MASK_DTYPE, mode="r", shape=(s.num_tokens,))
                if s.num_tokens
                else np.zeros(0, dtype=MASK_DTYPE)
                for s in self.shards
            ]
        return self._masks

    def _docs(self) -> list[np.ndarray]:
        if self._doc_index is None:
            self._doc_index = [
                np.memmap(self.directory / s.index_file, dtype=DOC_INDEX_DTYPE, mode="r", shape=(s.num_docs,))
                if s.num_docs
                else np.zeros(0, dtype=DOC_INDEX_DTYPE)
                for s in self.shards
            ]
        return self._doc_index

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokens"] = None
        state["_masks"] = None
        state["_doc_index"] = None
        return state

    def read(self, start: int, length: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens [start, start+length) of the concatenated split, copied into `out` (any int dtype)."""
        return self._read(self._maps(), start, length, np.empty(length, self.dtype) if out is None else out)

    def read_mask(self, start: int, length: int, out: np.ndarray | None = None) -> np.ndarray:
        """Loss mask of tokens [start, start+length) (1 = counts in the loss); all ones without a mask."""
        out = np.empty(length, dtype=MASK_DTYPE) if out is None else out
        if self.masked:
            return self._read(self._mask_maps(), start, length, out)
        self._check_range(start, length)
        out[:length] = 1
        return out

    def _check_range(self, start: int, length: int) -> None:
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"read [{start}, {start + length}) outside {self!r}")

    def _read(self, maps: list[np.ndarray], start: int, length: int, out: np.ndarray) -> np.ndarray:
        """Elements [start, start+length) of the per-shard arrays `maps` read as one stream, into `out`."""
        self._check_range(start, length)
        i = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        pos, done = start, 0
        while done < length:
            local = pos - int(self.shard_starts[i])
            take = min(length - done, self.shards[i].num_tokens - local)
            out[done : done + take] = maps[i][local : local + take]
            done += take
            pos += take
            i += 1
        return out

    def doc_starts(self, start: int, end: int) -> np.ndarray:
        """Global offsets of documents that begin in [start, end), ascending."""
        docs = self._docs()
        first = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        pieces = []
        i = max(first, 0)
        while i < len(self.shards) and self.shard_starts[i] < end:
            base = int(self.shard_starts[i])
            d = docs[i]
            lo = int(np.searchsorted(d, start - base, side="left"))
            hi = int(np.searchsorted(d, end - base, side="left"))
            if hi > lo:
                pieces.append(np.asarray(d[lo:hi]) + base)
            i += 1
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)

    def document(self, k: int) -> np.ndarray:
        """The k-th document (with its EOS if appended), for inspection and tests."""
        return self._document(self._maps(), k)

    def document_mask(self, k: int) -> np.ndarray:
        """The loss mask of the k-th document (all ones without a mask)."""
        if not self.masked:
            return np.ones(len(self.document(k)), dtype=MASK_DTYPE)
        return self._document(self._mask_maps(), k)

    def _document(self, maps: list[np.ndarray], k: int) -> np.ndarray:
        docs = self._docs()
        for i, s in enumerate(self.shards):
            if k < s.num_docs:
                begin = int(docs[i][k])
                end = int(docs[i][k + 1]) if k + 1 < s.num_docs else s.num_tokens
                return np.asarray(maps[i][begin:end])
            k -= s.num_docs
        raise IndexError(f"document index out of range for {self!r}")

    def num_windows(self, seq_len: int) -> int:
        """Windows of seq_len+1 tokens with stride seq_len: every token but the first is a label once."""
        return max(self.num_tokens - 1, 0) // seq_len


def check_tokenizer_matches(data: TokenShards | Manifest | str | Path, tokenizer: Any) -> None:
    """Fail early if the data were not tokenized with the tokenizer (or for the model) the run names.

    `tokenizer`: an int (the model's vocabulary size; data ids must fit), a tokenizer object, or a
    local directory / hub name loaded with AutoTokenizer (vocabulary hashes must be equal).
    """
    manifest = (
        data.manifest
        if isinstance(data, TokenShards)
        else (data if isinstance(data, Manifest) else Manifest.load(data))
    )
    where = manifest.path
    if isinstance(tokenizer, (int, np.integer)):
        if manifest.vocab_size > int(tokenizer):
            raise ShardFormatError(
                f"{where}: data/tokenizer vocab mismatch: data were tokenized with {manifest.tokenizer_name!r} "
                f"(vocab_size {manifest.vocab_size}) but the model's vocabulary has {int(tokenizer)} entries"
            )
        return
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        name = str(tokenizer)
        tokenizer = AutoTokenizer.from_pretrained(name)
    else:
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    got_hash, got_size = vocab_hash(tokenizer), len(tokenizer)
    if got_hash != manifest.vocab_hash or got_size != manifest.vocab_size:
        raise ShardFormatError(
            f"{where}: data/tokenizer vocab mismatch: data were tokenized with {manifest.tokenizer_name!r} "
            f"(vocab_size {manifest.vocab_size}, hash {manifest.vocab_hash[:12]}) but the run names {name!r} "
            f"(vocab_size {got_size}, hash {got_hash[:12]})"
        )


def tokenizer_dir(path: str | Path) -> Path | None:
    """A model directory when it carries tokenizer files (retro.convert copies the source's), else None."""
    path = Path(path)
    return path if any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")) else None
