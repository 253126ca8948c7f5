"""Data pipeline throughput: prepare tokens/s and loader tokens/s, against the model's step tokens/s.

Builds a synthetic corpus (Zipf-distributed pseudo-words) and trains a byte-level BPE tokenizer on
it locally (no downloads), then measures:
  - prepare: `retro.data.prepare` end to end (read jsonl, encode, write shards), 1 and 2 processes;
  - loader: batches of B x (T+1) tokens from `build_train_loader`, 0 and 2 workers, with and
    without document position ids.
Medians of several repeats, candidates interleaved. If benchmarks/results/model_throughput.json
exists, the table adds loader tokens/s divided by the fastest model training step's tokens/s.

    python benchmarks/data_throughput.py [--docs 6000] [--seq 1024] [--batch 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, write_results  # noqa: E402


def make_corpus(directory: Path, docs: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(20000)]
    p = 1 / np.arange(1, len(words) + 1) ** 1.1
    p /= p.sum()
    path = directory / "corpus.jsonl"
    with open(path, "w") as f:
        for _ in range(docs):
            n = int(rng.integers(50, 600))
            text = " ".join(words[i] for i in rng.choice(len(words), size=n, p=p))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def make_tokenizer(directory: Path, corpus: Path, vocab: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [json.loads(line)["text"] for line in open(corpus)][:2000]
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    out = directory / "tok"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(str(out))
    return out


def bench_prepare(corpus: Path, tok: Path, work: Path, num_proc: int, repeats: int) -> tuple[float, int]:
    from retro.data.prepare import main

    times, tokens = [], 0
    for r in range(repeats):
        out = work / f"prep{num_proc}_{r}"
        start = time.perf_counter()
        assert (
            main(
                [
                    "--input",
                    str(corpus),
                    "--tokenizer",
                    str(tok),
                    "--out",
                    str(out),
                    "--quiet",
                    "--num-proc",
                    str(num_proc),
                    "--val-fraction",
                    "0.01",
                ]
            )
            == 0
        )
        times.append(time.perf_counter() - start)
        from retro.data.shards import TokenShards

        tokens = TokenShards(out).num_tokens + TokenShards(out, "val").num_tokens
    return statistics.median(times), tokens


def bench_loader(
    data: Path, seq: int, batch: int, workers: int, doc_positions: bool, batches: int, repeats: int
) -> float:
    from retro.data.loader import build_train_loader

    times = []
    for r in range(repeats):
        loader = build_train_loader(
            [data], None, seq, batch, 0, 1, seed=r, num_workers=workers, doc_positions=doc_positions
        )
        it = iter(loader)
        next(it)  # worker start-up is a one-off cost, not throughput
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        times.append(time.perf_counter() - start)
        del it, loader
    return batches * batch * seq / statistics.median(times)


def model_tokens_per_s() -> tuple[str, float] | None:
    path = RESULTS / "model_throughput.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text()).get("rows", [])
    best = max(rows, key=lambda r: r.get("tokens_per_s", 0), default=None)
    return (best["model"], float(best["tokens_per_s"])) if best else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=6000)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import logging

    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = make_corpus(work, args.docs)
        tok = make_tokenizer(work, corpus, args.vocab)
        rows = []
        for num_proc in (1, 2):
            secs, tokens = bench_prepare(corpus, tok, work, num_proc, args.repeats)
            rows.append(
                {
                    "stage": "prepare",
                    "config": f"--num-proc {num_proc}",
                    "tokens_per_s": tokens / secs,
                    "median_s": secs,
                    "tokens": tokens,
                }
            )
        data = work / "prep1_0"
        for workers in (0, 2):
            for doc_positions in (False, True):
                tps = bench_loader(data, args.seq, args.batch, workers, doc_positions, args.batches, args.repeats)
                rows.append(
                    {
                        "stage": "loader",
                        "config": f"workers={workers} doc_positions={doc_positions}",
                        "tokens_per_s": tps,
                        "tokens": args.batches * args.batch * args.seq,
                    }
                )
    model = model_tokens_per_s()
    for r in rows:
        if model and r["stage"] == "loader":
            r["x_model_step"] = r["tokens_per_s"] / model[1]
    print(f"{'stage':<8} {'config':<36} {'tokens/s':>12} {'x model step':>13}")
    for r in rows:
        ratio = f"{r['x_model_step']:.0f}x" if "x_model_step" in r else "-"
        print(f"{r['stage']:<8} {r['config']:<36} {r['tokens_per_s']:>12,.0f} {ratio:>13}")
    if model:
        print(f"model step reference: {model[0]} at {model[1]:.0f} tokens/s (benchmarks/results/model_throughput.json)")
    path = write_results(
        "data_throughput",
        {
            "args": vars(args),
            "rows": rows,
            "model_reference": {"model": model[0], "tokens_per_s": model[1]} if model else None,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
