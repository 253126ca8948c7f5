"""What every evaluation task shares: lm-eval's prompt delimiters, the shipped lm-eval task folder,
loading problems (jsonl, a MATH release directory, a hub dataset), and the Task / Example types."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

LM_EVAL_TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
"""lm-eval task YAMLs shipped with retro (pass it as --include_path; retro.lm_eval_model adds it itself)."""

TARGET_DELIMITER = " "  # lm-eval's default between a few-shot question and its answer
FEWSHOT_DELIMITER = "\n\n"  # and between few-shot examples
LM_EVAL_VERSIONS = ("0.4.13", "0.4.11")


def load_jsonl(path: str | Path, fields: tuple[str, ...], limit: int | None = None) -> list[dict]:
    """Records of a local jsonl file, each checked for `fields` (errors name the file and line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    records = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            _check_fields(record, fields, f"{path}:{line_no}")
            records.append(record)
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise ValueError(f"data file {path} has no records")
    return records


def _check_fields(record, fields: tuple[str, ...], where: str) -> None:
    missing = [k for k in fields if k not in record] if isinstance(record, dict) else list(fields)
    if missing:
        have = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: missing field(s) {missing}; the record has {have}")


# Hub datasets and the configs read by default (all test splits): `hf:NAME` or `hf:NAME:CONFIG[,CONFIG]`.
MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
HUB_DEFAULT_CONFIGS = {
    "openai/gsm8k": ("main",),
    "gsm8k": ("main",),
    "EleutherAI/hendrycks_math": MATH_SUBJECTS,
}


def load_records(source: str | Path, fields: tuple[str, ...], limit: int | None = None) -> list[dict]:
    """Records from a jsonl file, a directory (every *.jsonl, and *.json files holding one record or a
    list, e.g. the original MATH release's test/<subject>/<n>.json), or a hub dataset `hf:NAME[:CONFIGS]`
    (its test split, through `datasets`: from the local cache when offline). The first `limit` records."""
    text = str(source)
    if text.startswith("hf:"):
        records = _load_hub(text[3:])
    else:
        path = Path(source)
        if path.is_file():
            return load_jsonl(path, fields, limit)
        if not path.is_dir():
            raise FileNotFoundError(f"data file {path} does not exist")
        records = []
        for file in sorted(path.rglob("*.jsonl")) + sorted(path.rglob("*.json")):
            if file.suffix == ".jsonl":
                records += load_jsonl(file, fields)
                continue
            try:
                data = json.loads(file.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}: not valid JSON ({e.msg})") from None
            for i, record in enumerate(data if isinstance(data, list) else [data]):
                _check_fields(record, fields, f"{file}[{i}]")
                records.append(record)
        if not records:
            raise ValueError(f"data directory {path} has no *.jsonl or *.json records")
    for i, record in enumerate(records):
        _check_fields(record, fields, f"{source} record {i}")
    return records[:limit] if limit is not None else records


def _load_hub(spec: str) -> list[dict]:
    import datasets

    name, _, configs = spec.partition(":")
    names = configs.split(",") if configs else HUB_DEFAULT_CONFIGS.get(name, (None,))
    records = []
    for config in names:
        for row in datasets.load_dataset(name, config, split="test"):
            row = dict(row)
            if config is not None and len(names) > 1:
                row.setdefault("subject", config)
            records.append(row)
    if not records:
        raise ValueError(f"hub dataset {name} has no test records")
    return records


@dataclass
class Example:
    prompt: str  # the full prompt text (few-shot exemplars included), before BOS is added
    reference: str  # the reference answer as the main metric compares it
    doc: dict = field(default_factory=dict)  # extra fields scoring needs (solution, answer, subject)


class Task:
    name: str
    stop_strings: tuple[str, ...]
    metrics: tuple[str, ...]
    examples: list[Example]

    def score(self, completion: str, example: Example) -> dict:
        raise NotImplementedError


def fewshot_pool(fewshot: int, builtin, fewshot_path, fields: tuple[str, ...], convert) -> list[tuple[str, str]]:
    pool = list(builtin) if fewshot_path is None else [convert(r) for r in load_records(fewshot_path, fields)]
    if not 0 <= fewshot <= len(pool):
        raise ValueError(f"--fewshot must be between 0 and {len(pool)} (exemplars available), got {fewshot}")
    return pool[:fewshot]
