"""Read and write Hugging Face weight files (safetensors, single or sharded with an index)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class WeightReader:
    """Lazy access to a checkpoint's tensors: only the tensors asked for are read from disk."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        index, single = self.model_dir / INDEX_NAME, self.model_dir / SINGLE_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{index}: not a safetensors index with a weight_map ({error})") from None
            missing = sorted({f for f in weight_map.values() if not (self.model_dir / f).is_file()})
            if missing:
                raise FileNotFoundError(f"{index} names shard files that are missing: {', '.join(missing)}")
            self.file_of = {name: self.model_dir / f for name, f in weight_map.items()}
        elif single.is_file():
            self.file_of = {name: single for name in self._open(single).keys()}
        else:
            raise FileNotFoundError(
                f"{self.model_dir} has no {SINGLE_NAME} or {INDEX_NAME} (only safetensors checkpoints are read)"
            )

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(path, framework="pt")
            except (SafetensorError, OSError) as error:
                raise ValueError(f"{path}: truncated or corrupted safetensors file ({error})") from None
        return self._handles[path]

    def _handle(self, name: str):
        if name not in self.file_of:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint in {self.model_dir}")
        return self._open(self.file_of[name])

    def get(self, name: str) -> torch.Tensor:
        handle = self._handle(name)
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{self.file_of[name]}: truncated or corrupted safetensors file ({error})") from None

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor, read without loading the rest (a rank's FSDP shard)."""
        return self._handle(name).get_slice(name)[start:stop]


def save_sharded(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write tensors as model.safetensors, or as numbered shards plus an index when they are large."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], out_dir / SINGLE_NAME, metadata=metadata)
        return [out_dir / SINGLE_NAME]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = out_dir / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path, metadata=metadata)
        paths.append(path)
        weight_map.update({name: path.name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out_dir / INDEX_NAME).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return paths
