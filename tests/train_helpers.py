"""A tiny converted model + prepared shards for trainer tests, and a way to run torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from data_helpers import (
    prepare_dir,
    random_chats,
    random_docs,
    turn_tokenizer,
    word_tokenizer,
    write_chats,
    write_jsonl,
)
from tiny import save_source

from retro.convert import convert

NUM_WORDS = 95  # + [UNK], [EOS] = 97 = the tiny source model's vocabulary


def make_assets(root: Path, shape=(1, 2, 1), docs: int = 400) -> tuple[Path, Path]:
    """(converted model dir, prepared data dir) under root; built once per test module."""
    tok = word_tokenizer(root / "tok", NUM_WORDS)
    save_source(root / "src", "llama", eos_token_id=1)
    for name in os.listdir(tok):
        (root / "src" / name).write_bytes((tok / name).read_bytes())
    convert(root / "src", root / "model", shape=shape, adapter_init="default")
    corpus = write_jsonl(root / "corpus.jsonl", random_docs(docs, NUM_WORDS, seed=1, min_len=5, max_len=60))
    data = prepare_dir(root / "data", [corpus], tok, "--val-fraction", "0.1")
    return root / "model", data


def make_chat_assets(root: Path, shape=(1, 2, 1), chats: int = 300) -> tuple[Path, Path]:
    """(converted model dir, chat shards with the loss on the assistant's tokens) under root."""
    tok = turn_tokenizer(root / "tok", NUM_WORDS - 4)  # + 4 role/end tokens: the same 97 ids
    save_source(root / "src", "llama", eos_token_id=1)
    for name in os.listdir(tok):
        (root / "src" / name).write_bytes((tok / name).read_bytes())
    convert(root / "src", root / "model", shape=shape, adapter_init="default")
    corpus = write_chats(root / "chats.jsonl", random_chats(chats, NUM_WORDS - 4, seed=1))
    data = prepare_dir(root / "data", [corpus], tok, "--chat", "--val-fraction", "0.1")
    return root / "model", data


TINY_CONFIG = Path(__file__).parents[1] / "configs" / "tiny-cpu.toml"


def base_overrides(model: Path, data: Path, out: Path, **extra) -> list[str]:
    """configs/tiny-cpu.toml plus the run's paths and any extra section.key values."""
    values = {"model.path": model, "data.train": data, "train.out_dir": out, **extra}
    return ["--config", str(TINY_CONFIG)] + [f"--{k}={v}" for k, v in values.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(
    overrides: list[str], nproc: int = 1, timeout: int = 240, check: bool = True
) -> subprocess.CompletedProcess:
    """Run retro.train as a single process (nproc=1, no torchrun) or under torchrun with gloo."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    if nproc == 1:
        cmd = [sys.executable, "-m", "retro.train", *overrides]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
            "-m",
            "retro.train",
            *overrides,
        ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(
            f"train exited {result.returncode}\nSTDOUT\n{result.stdout[-3000:]}\nSTDERR\n{result.stderr[-5000:]}"
        )
    return result


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
