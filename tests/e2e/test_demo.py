"""The built-in demo: the task generator, FLOP matching, the claim read-out, and a shortened demo
run end to end (python -m retro.demo --quick) whose artefacts must exist and agree with each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retro.demo.pipeline import matched_static_steps
from retro.demo.report import claims
from retro.demo.task import apply, build_splits, make_permutations, make_problem, solve
from retro.demo.tokenizer import build_tokenizer


def test_problems_are_solvable_held_out_and_tokenize_exactly(tmp_path):
    perms, train, evals = build_splits(max_steps=5, train_per_step=300, eval_per_step=30, seed=3, num_ops=4)
    assert len(train) == 5 * 300
    by_k = {k: [p for p in evals if p.steps == k] for k in range(1, 6)}
    assert len(by_k[1]) == 40  # every (start, operation) lookup
    assert {(p.start, p.ops) for p in by_k[1]} == {(s, (o,)) for o in "abcd" for s in range(10)}
    assert len(by_k[2]) == 30 and all(len(by_k[k]) == 30 for k in range(3, 6))
    assert len({p.prompt for p in evals}) == len(evals)  # no duplicates
    # k >= 2: no training document uses a held-out operation sequence, with any start digit
    held = {p.ops for p in evals if p.steps >= 2}
    assert not held & {p.ops for p in train}
    assert {p.steps for p in train} == set(range(1, 6))
    for p in train + evals:
        assert solve(p.prompt, perms) == p.answer
    tok = build_tokenizer(tmp_path / "tok")
    lengths: dict[int, set[int]] = {}
    for p in evals + train[:200]:
        ids = tok(p.text)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == p.text
        assert len(tok(p.answer)["input_ids"]) == 1
        lengths.setdefault(p.steps, set()).add(len(tok(p.prompt)["input_ids"]))
    assert all(len(v) == 1 for v in lengths.values())  # one prompt length per k: batches need no padding


def test_permutation_composition_by_hand():
    perms = make_permutations(4, seed=0)
    assert perms == make_permutations(4, seed=0) and perms != make_permutations(4, seed=1)
    for p in perms.values():
        assert sorted(p) == list(range(10)) and p != tuple(range(10))
    a, b = perms["a"], perms["b"]
    assert make_problem(perms, 3, ("a", "b")).answer == str(b[a[3]])
    assert make_problem(perms, 3, ("a", "b")).text == f"3 a b = {b[a[3]]}"
    # some pair of operations does not commute, so order matters (no sum-like shortcut)
    assert any(apply(perms, s, (x, y)) != apply(perms, s, (y, x)) for x in perms for y in perms for s in range(10))
    with pytest.raises(ValueError, match="at least one step"):
        make_problem(perms, 3, ())
    with pytest.raises(ValueError, match="unknown operations"):
        make_problem(perms, 3, ("z",))


def test_answer_loss_counts_only_the_answer_positions():
    import torch

    from retro.demo.pretrain import answer_loss

    torch.manual_seed(0)
    ids = torch.tensor([[1, 3, 20, 21, 7, 1, 4, 21, 5]])  # 21 plays "="
    labels = torch.roll(ids, -1, 1)
    logits = torch.randn(1, 9, 22)
    expected = torch.nn.functional.cross_entropy(logits[0, [3, 7]], labels[0, [3, 7]])
    assert torch.allclose(answer_loss(logits, ids, labels, 21), expected, atol=1e-6)
    with pytest.raises(ValueError, match="no token id 99"):
        answer_loss(logits, ids, labels, 99)


def _retro_dir(path: Path, n_recurrent: int, n_layers: int) -> Path:
    from retro.model.config import RetroConfig

    prelude = 2 if n_recurrent else n_layers
    coda = 2 if n_recurrent else 0
    RetroConfig(
        vocab_size=44,
        hidden_size=64,
        intermediate_size=256,
        num_attention_heads=4,
        n_prelude=prelude,
        n_recurrent=n_recurrent,
        n_coda=coda,
    ).save_pretrained(path)
    return path


def test_static_steps_match_the_recurrent_flops(tmp_path):
    rec = _retro_dir(tmp_path / "rec", 2, 0)
    sta = _retro_dir(tmp_path / "sta", 0, 8)
    records = [
        {"step": i + 1, "n": n, "k": k, "r": n + k, "mean_recurrence": 4}
        for i, (n, k) in enumerate([(0, 1), (0, 3), (2, 4), (0, 5), (6, 4)])
    ]
    out = matched_static_steps(records, rec, sta, seq_len=128, tokens_per_step=2048)
    # by hand: 6 FLOPs per weight per token for passes with grad, 2 without; attention 12 / 4 * T * d per layer
    h, i, T = 64, 256, 128
    layer = 4 * h * h + 3 * h * i
    head = 44 * h

    def rec_tok(n, k):
        grad = 6 * (4 * layer + head + h * h + k * (2 * layer + h * h)) + 12 * T * h * (4 + 2 * k)
        return grad + n * (2 * (2 * layer + h * h) + 4 * T * h * 2)

    total = sum(rec_tok(r["n"], r["k"]) for r in records) * 2048
    assert out["recurrent_flops"] == pytest.approx(total, rel=1e-12)
    static_step = (6 * (8 * layer + head) + 12 * T * h * 8) * 2048
    assert out["static_steps"] == round(total / static_step)
    assert abs(out["static_flops"] - total) <= static_step / 2
    assert out["recurrent_max_r"] == 10 and out["recurrent_mean_r"] == pytest.approx(25 / 5)
    with pytest.raises(ValueError, match="every step"):
        matched_static_steps(records[1:], rec, sta, 128, 2048)


def _results(by_r: dict[int, float], static: float, pretrained: float = 0.1) -> dict:
    def model(means, params):
        return {"mean": means, "unique_parameters": params, "accuracy": {}}

    return {
        "models": {
            "recurrent": model({str(r): a for r, a in by_r.items()}, 400),
            "static": model({"static": static}, 500),
            "pretrained": model({"static": pretrained}, 500),
        },
        "flops": {"recurrent_final_mean": 4},
    }


def test_claims_are_read_from_the_numbers():
    c = claims(_results({1: 0.2, 2: 0.4, 4: 0.5, 8: 0.49, 16: 0.3}, static=0.45))
    assert c["rises_with_r"] and c["monotone_up_to_train_mean"]
    assert c["r_at_train_mean"] == 4 and c["best_r"] == 4
    assert c["matches_or_beats_static"] and c["recurrent_minus_static_at_train_mean"] == pytest.approx(0.05)
    assert c["holds_up_to_r"] == 8 and c["extrapolation"]["16"] == pytest.approx(-0.2)
    assert c["informative"]
    assert not claims(_results({1: 0.1, 2: 0.12, 4: 0.09, 8: 0.1, 16: 0.1}, static=0.11))["informative"]
    c = claims(_results({1: 0.5, 2: 0.3, 4: 0.3, 8: 0.5, 16: 0.5}, static=0.6))
    assert not c["rises_with_r"] and not c["monotone_up_to_train_mean"]
    assert not c["matches_or_beats_static"] and c["best_r"] == 1
    assert c["holds_up_to_r"] == 16


def test_quick_demo_end_to_end(tmp_path):
    """A shortened demo (few steps, 2 ranks): every artefact exists and the numbers agree with each other."""
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "retro.demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    wall = time.perf_counter() - start
    assert proc.returncode == 0, f"STDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-4000:]}"
    assert wall < 180, f"quick demo took {wall:.0f} s"
    for stage in range(1, 9):
        assert f"[{stage}/8]" in proc.stdout  # the per-stage progress display
    # no library warnings in the output: torchdata's set_vital deprecation (filtered where the loader is built),
    # transformers' "model of type `retro` to instantiate a model of type ``" (the tokenizer gets the config)
    logs = "".join(path.read_text() for path in sorted((out / "logs").glob("*.log")))
    for name, text in (("stdout", proc.stdout), ("stderr", proc.stderr), ("logs", logs)):
        for noise in ("Warning:", "set_vital", "to instantiate a model of type", "[transformers]"):
            assert noise not in text, f"{noise!r} in the demo's {name}"

    results = json.loads((out / "results.json").read_text())
    settings = results["settings"]
    assert set(results["stage_seconds"]) == {
        "task",
        "prepare",
        "pretrain",
        "convert",
        "retrofit",
        "static",
        "export",
        "eval",
    }
    # held-out set and per-k accuracies
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    counts = results["eval_counts"]
    assert sum(counts.values()) == len(rows) and counts["1"] == 10 * settings["num_ops"]
    assert all(0 < counts[str(k)] <= settings["eval_per_step"] for k in range(2, settings["max_steps"] + 1))
    assert len(json.loads((out / "task.json").read_text())["permutations"]) == settings["num_ops"]
    ks = {str(k) for k in range(1, settings["max_steps"] + 1)}
    models = results["models"]
    assert set(models["recurrent"]["accuracy"]) == {str(r) for r in settings["test_recurrences"]}
    assert set(models["static"]["accuracy"]) == set(models["pretrained"]["accuracy"]) == {"static"}
    for model in models.values():
        for r, by_k in model["accuracy"].items():
            assert set(by_k) == ks
            for k, acc in by_k.items():
                assert 0 <= acc <= 1 and acc * counts[k] == pytest.approx(round(acc * counts[k]))
            assert model["mean"][r] == pytest.approx(sum(by_k.values()) / len(by_k))
    assert results["claims"]["accuracy_by_r"] == {
        r: models["recurrent"]["mean"][r] for r in results["claims"]["accuracy_by_r"]
    }
    # the recurrent model has fewer unique parameters (two layers dropped, one adapter added)
    assert models["recurrent"]["unique_parameters"] < models["static"]["unique_parameters"]

    # training runs: every step logged; the static run got the FLOP-matched number of steps
    def metrics(name):
        return [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]

    rec, sta = metrics("recurrent"), metrics("static")
    assert [r["step"] for r in rec] == list(range(1, settings["retrofit_steps"] + 1))
    assert len(sta) == results["flops"]["static_steps"]
    recomputed = matched_static_steps(
        rec,
        out / "recurrent_init",
        out / "static_init",
        results["train_config"]["data"]["seq_len"],
        results["train_config"]["train"]["global_batch"] * results["train_config"]["data"]["seq_len"],
    )
    assert recomputed == results["flops"]
    assert (
        abs(results["flops"]["static_flops"] - results["flops"]["recurrent_flops"])
        <= results["flops"]["static_flops_per_step"] / 2
    )
    assert json.loads((out / "runs" / "recurrent" / "config.json").read_text())["optim"]["name"] == "muon"

    # exported models load, and the Markdown table has one row per (model, r)
    from retro.model.modeling import RetroForCausalLM

    assert RetroForCausalLM.from_pretrained(out / "recurrent").config.n_recurrent == settings["shape"][1]
    assert RetroForCausalLM.from_pretrained(out / "static").config.n_recurrent == 0
    table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 2 + len(settings["test_recurrences"])
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
