"""Task accuracy and validation loss of one retro checkpoint at several test recurrences (what `retro.eval` runs).

`EvalSettings` holds the knobs (the CLI's defaults); `evaluate_model` loads a checkpoint and runs it at each r:
`eval_generation` for a task (GSM8K, MATH), `eval_loss` for prepared token shards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from retro.data.manifest import ShardFormatError
from retro.inference.adaptive import ExitRule, parse_exit_rule
from retro.inference.depth_batching import generate_text_queued
from retro.inference.generate import GenerationSettings, generate_text, teacher_forced
from retro.inference.loading import load_model, load_tokenizer
from retro.inference.task_base import Task
from retro.inference.validation_loss import token_weighted_loss
from retro.model.config import RetroConfig


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class EvalSettings:
    """How a checkpoint is loaded and run; the defaults are `python -m retro.eval`'s (the paper's lm-eval settings)."""

    batch_size: int = 8  # prompts generated together, left-padded (loss: rows of seq_len tokens per forward)
    max_new_tokens: int = 256  # generation budget (lm-eval's max_gen_toks)
    max_length: int = 1024  # prompt + generation budget: prompts keep their last max_length - max_new_tokens; 0 = all
    add_bos: bool = True  # start every prompt with BOS (lm-eval's add_bos_token=True)
    adaptive_exit: str | None = None  # exit rules, comma-separated: {kl,state,entropy}:T, a bare KL threshold, fixed
    adaptive_min_r: int = 1  # no token exits before this many passes
    depth_batching: bool = False  # generation: rows at different depths share ticks, a queue refills free rows
    readout_share: float = 0.5  # depth batching: exited rows wait until this share of the rows waits
    share_kv_cache: bool = False  # keep only the last pass's block K/V
    state_init: str | None = None  # override the checkpoint's s0 init
    seed: int = 0  # seed of s0 draws (and sampling)
    seq_len: int = 1024  # loss: tokens per row
    limit: int | None = None  # loss: first N batches (a task takes its own limit of problems)
    device: str = field(default_factory=default_device)
    dtype: str = "float32"  # float32, bfloat16 or float16


def stop_strings(task: Task, tokenizer) -> tuple[str, ...]:
    """The task's stop strings plus the tokenizer's EOS text, as lm-eval adds it to `until`."""
    eos = tokenizer.eos_token
    return task.stop_strings + ((eos,) if eos and eos not in task.stop_strings else ())


def exit_rules(settings: EvalSettings) -> list[ExitRule | None]:
    """The runs per r: one per comma-separated rule of `adaptive_exit` ('fixed': fixed r), or fixed r alone."""
    if settings.adaptive_exit is None:
        return [None]
    parts = [p.strip() for p in str(settings.adaptive_exit).split(",") if p.strip()]
    if not parts:
        raise ValueError("--adaptive-exit needs at least one rule, e.g. state:0.05 or kl:1e-3,fixed")
    return [None if p.lower() == "fixed" else parse_exit_rule(p, settings.adaptive_min_r) for p in parts]


def eval_generation(
    model, tokenizer, task: Task, r: int, settings: EvalSettings, label: str, rule: ExitRule | None = None
) -> dict:
    """The task's metrics at r (the maximum r with an exit `rule`) over its examples, with a per-example record
    (prompt, completion, scores), the mean passes per generated token and generated tokens per second."""
    generation = GenerationSettings(
        max_new_tokens=settings.max_new_tokens,
        num_recurrences=r,
        share_block_cache=settings.share_kv_cache,
        adaptive_exit=rule,
        seed=settings.seed,
    )
    stops = stop_strings(task, tokenizer)
    examples = task.examples
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))  # less padding per batch
    records: list[dict | None] = [None] * len(examples)
    passes_sum = tokens_sum = 0.0
    batch_size = settings.batch_size
    seconds = 0.0
    # Depth batching decodes the whole queue in one stream (batch_size slots); a static model has no depth to
    # batch and decodes batch by batch as without it.
    queued = settings.depth_batching and model.config.is_recurrent
    chunk = len(order) if queued else batch_size
    for start in tqdm(range(0, len(order), chunk), desc=f"{label} r={r}", unit="batch", leave=False):
        idx = order[start : start + chunk]
        prompts = [examples[i].prompt for i in idx]
        began = time.perf_counter()
        if queued:
            completions = generate_text_queued(
                model,
                tokenizer,
                prompts,
                generation,
                batch_size,
                stops,
                settings.add_bos,
                settings.max_length or None,
                settings.readout_share,
            )
        else:
            completions = generate_text(
                model, tokenizer, prompts, generation, stops, settings.add_bos, settings.max_length or None
            )
        seconds += time.perf_counter() - began
        for i, c in zip(idx, completions):
            records[i] = {
                "index": i,
                "prompt": examples[i].prompt,
                "prompt_tokens": c.prompt_tokens,
                "truncated": c.truncated,
                "reference": examples[i].reference,
                **({"subject": examples[i].doc["subject"]} if "subject" in examples[i].doc else {}),
                "completion": c.text,
                "tokens": c.num_tokens,
                "mean_passes": c.mean_passes,
                **task.score(c.text, examples[i]),
            }
            passes_sum += c.mean_passes * c.num_tokens
            tokens_sum += c.num_tokens
    mean_passes = passes_sum / tokens_sum if tokens_sum else float(r)
    result = {
        "metrics": _means(records, task.metrics),
        "mean_passes": mean_passes if model.config.is_recurrent else 0,
        "tokens_per_s": tokens_sum / seconds if seconds else 0.0,
    }
    subjects = sorted({rec["subject"] for rec in records if "subject" in rec})
    if len(subjects) > 1:  # e.g. the 7 MATH subjects; "metrics" is their size-weighted mean, as lm-eval's group
        result["subjects"] = {
            s: {
                "n": sum(rec.get("subject") == s for rec in records),
                **_means([rec for rec in records if rec.get("subject") == s], task.metrics),
            }
            for s in subjects
        }
    result["examples"] = records
    return result


def _means(records: list[dict], metrics) -> dict[str, float]:
    return {m: sum(bool(rec[m]) for rec in records) / len(records) for m in metrics}


def eval_loss(
    model, data: str | Path, r: int, settings: EvalSettings, label: str, rule: ExitRule | None = None
) -> dict:
    """Token-weighted mean cross entropy over the validation batches of prepared shards. With an exit `rule`
    each row is decoded token by token as generation would (teacher-forced `teacher_forced`, r = r_max)."""
    from retro.data.loader import build_val_batches
    from retro.data.shards import check_tokenizer_matches

    check_tokenizer_matches(data, model.config.vocab_size)  # ids beyond the model's vocabulary fail here
    device = model.lm_head.weight.device
    generator = torch.Generator(device).manual_seed(settings.seed)  # one stream of s0 draws over all batches
    batches = build_val_batches(data, settings.seq_len, settings.batch_size, 0, 1, settings.limit)
    if rule is not None:
        return _adaptive_loss(model, batches, r, settings, rule, label)
    began = time.perf_counter()
    result = token_weighted_loss(
        model,
        tqdm(batches, desc=f"{label} r={r}", unit="batch", leave=False),
        r if model.config.is_recurrent else None,
        lambda i: generator,
        device,
    )
    if result.tokens == 0:
        raise ValueError(f"no validation tokens in {data}")
    return {
        "metrics": {"loss": result.loss},
        "mean_passes": r if model.config.is_recurrent else 0,
        "tokens": result.tokens,
        "tokens_per_s": result.tokens / (time.perf_counter() - began),
    }


def _adaptive_loss(model, batches, r: int, settings: EvalSettings, rule: ExitRule, label: str) -> dict:
    generation = GenerationSettings(
        num_recurrences=r, share_block_cache=settings.share_kv_cache, adaptive_exit=rule, seed=settings.seed
    )
    nll = tokens = passes = 0.0
    began = time.perf_counter()
    for batch in tqdm(batches, desc=f"{label} r<={r} {rule}", unit="batch", leave=False):
        scored = teacher_forced(model, batch["input_ids"], batch["labels"], generation)
        counted = batch["labels"].to(scored.nll.device) != -100
        nll += float(scored.nll.double().sum())
        tokens += float(counted.sum())
        passes += float(scored.passes[counted].double().sum())
    if tokens == 0:
        raise ValueError("no validation tokens")
    seconds = time.perf_counter() - began
    return {
        "metrics": {"loss": nll / tokens},
        "mean_passes": passes / tokens,
        "tokens": int(tokens),
        "tokens_per_s": tokens / seconds,
    }


def check_loss_data(path: str | Path, data: str | Path) -> None:
    """Before any weight is read: the shards in `data` were tokenized with the tokenizer of the model at `path`
    (the same vocabulary hash, as retro.train checks) and their ids fit its vocabulary."""
    import json

    from retro.data.shards import check_tokenizer_matches, tokenizer_dir

    config = Path(path) / "config.json"
    fields = json.loads(config.read_text()) if config.is_file() else {}
    if fields.get("model_type") != "retro" or "vocab_size" not in fields:
        return  # not a retro checkpoint: load_model names what is wrong
    check_tokenizer_matches(data, int(fields["vocab_size"]))
    directory = tokenizer_dir(path)
    if directory is not None:
        try:
            tokenizer = load_tokenizer(directory, add_bos=False, config=RetroConfig.from_pretrained(path))
            check_tokenizer_matches(data, tokenizer)
        except ShardFormatError as error:
            raise ShardFormatError(
                f"{error}. The model directory {directory} holds the tokenizer it was converted with; re-run "
                "retro.data.prepare with it"
            ) from None


def evaluate_model(
    path: str | Path,
    label: str,
    task: Task | None,
    data: str | Path,
    recurrences: list[int],
    settings: EvalSettings,
    on_run: Callable[[dict, dict], None] | None = None,
) -> dict:
    """{"model", "label", "static", "runs"} of the checkpoint at `path`: one run per r in `recurrences` (a static
    model runs once, at the first), on `task`, or the validation loss of the shards in `data` when task is None.
    `on_run(entry, run)` is called after each run."""
    model = load_model(path, settings.state_init, settings.device, getattr(torch, settings.dtype))
    tokenizer = load_tokenizer(path, settings.add_bos, model.config) if task is not None else None
    static = not model.config.is_recurrent
    entry = {"model": str(path), "label": label, "static": static, "runs": []}
    rules = [None] if static else exit_rules(settings)  # a static model has no depth to adapt: one plain run
    for r in recurrences[:1] if static else recurrences:
        for rule in rules:
            start = time.perf_counter()
            if task is None:
                run_result = eval_loss(model, data, r, settings, label, rule)
            else:
                run_result = eval_generation(model, tokenizer, task, r, settings, label, rule)
            n = run_result.get("tokens", len(run_result.get("examples", [])))
            run = {
                "recurrences": None if static else r,
                "exit": None if rule is None else str(rule),
                "n": n,
                "seconds": round(time.perf_counter() - start, 3),
                **run_result,
            }
            entry["runs"].append(run)
            if on_run is not None:
                on_run(entry, run)
    return entry
