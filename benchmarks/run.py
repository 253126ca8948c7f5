"""The benchmark suite: every benchmark with small settings, one JSON + one Markdown report.

    python -m benchmarks.run                      # all, CPU settings -> benchmarks/results/suite_cpu.{json,md}
    python -m benchmarks.run --only muon,kernels  # a subset
    python -m benchmarks.run --list               # what would run, with which arguments

Each benchmark still runs alone (`python -m benchmarks.<name>`). Here each runs in its own
process with the suite's small settings and writes its JSON into a scratch folder (so the
full-size results under benchmarks/results/ are left alone); the suite gathers those into one
report with machine info, library versions, each benchmark's arguments and its rows. Benchmark
modules are discovered from the folder; one the suite has no settings for runs with its
defaults, and a listed one that is missing is reported as missing, not as an error.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, machine_info

HERE = Path(__file__).parent
# Not timings but experiments, run by hand: optimizer_convergence needs a demo run's model and shards
# (--model, --data); distill_and_layers trains on a real model for about an hour.
NOT_BENCHMARKS = {"__init__", "common", "run", "optimizer_convergence", "distill_and_layers"}

# Small settings: the whole suite in < 10 minutes on 2 CPU cores. "{out}" is the scratch folder.
CPU_SETTINGS: dict[str, list[str]] = {
    "model_throughput": [
        "--hidden",
        "128",
        "--layers",
        "6",
        "--vocab",
        "2048",
        "--batch",
        "2",
        "--seq",
        "128",
        "--repeats",
        "3",
    ],
    "data_throughput": [
        "--docs",
        "1500",
        "--vocab",
        "2048",
        "--seq",
        "256",
        "--batch",
        "4",
        "--batches",
        "40",
        "--repeats",
        "2",
    ],
    "train_throughput": [
        "--hidden",
        "128",
        "--shape",
        "1,2,1",
        "--vocab",
        "2048",
        "--batch",
        "2",
        "--seq",
        "64",
        "--repeats",
        "2",
        "--recurrences",
        "1,8",
    ],
    "muon": [
        "--hidden",
        "128",
        "--layers",
        "4",
        "--intermediate",
        "344",
        "--vocab",
        "2048",
        "--batch",
        "2",
        "--seq",
        "128",
        "--repeats",
        "3",
        "--ns-repeats",
        "2",
        "--no-torch-muon",
    ],
    "kernels": ["--repeats", "2", "--scale", "8", "--out", "{out}/kernels.json"],
    "scaling": [
        "--hidden",
        "128",
        "--shape",
        "1,2,1",
        "--vocab",
        "2048",
        "--batch",
        "8",
        "--seq",
        "64",
        "--recurrences",
        "1,8",
        "--repeats",
        "3",
        "--warmup",
        "1",
    ],
}
VERSIONED = ("torch", "transformers", "triton", "numpy", "datasets", "torchdata", "safetensors")


def discover() -> list[str]:
    """The suite's benchmarks in its own order, then any other module found in benchmarks/."""
    found = sorted(p.stem for p in HERE.glob("*.py") if p.stem not in NOT_BENCHMARKS)
    return list(CPU_SETTINGS) + [name for name in found if name not in CPU_SETTINGS]


def versions() -> dict[str, str | None]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True, text=True
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def child(name: str, out: str, args: list[str]) -> None:
    """Run benchmarks.<name> as __main__ with its results folder pointed at `out`."""
    import benchmarks.common

    benchmarks.common.RESULTS = Path(out)
    sys.argv = [f"benchmarks/{name}.py", *args]
    runpy.run_module(f"benchmarks.{name}", run_name="__main__", alter_sys=True)


def drop_unknown(args: list[str], stderr: str) -> tuple[list[str], list[str]]:
    """Remove the flags argparse rejected (and their values), so a renamed option costs a note, not the row."""
    match = re.search(r"unrecognized arguments: (.*)", stderr)
    if not match:
        return args, []
    rejected = set(match.group(1).split())
    kept, dropped, i = [], [], 0
    while i < len(args):
        if args[i].startswith("--") and args[i] in rejected:
            takes_value = i + 1 < len(args) and not args[i + 1].startswith("--") and args[i + 1] in rejected
            dropped += args[i : i + 1 + takes_value]
            i += 1 + takes_value
        else:
            kept.append(args[i])
            i += 1
    return kept, dropped


def run_one(name: str, out: str, timeout: float) -> dict:
    """One benchmark in a child process; the JSON it wrote, wall time and what went wrong if anything.

    All benchmarks of a suite run share the scratch folder `out`, so one that reads another's
    results (data_throughput reads model_throughput's) sees the suite's own numbers.
    """
    if not (HERE / f"{name}.py").is_file():
        return {"name": name, "status": "missing", "note": f"benchmarks/{name}.py is not in this checkout"}
    before = {p: p.stat().st_mtime_ns for p in Path(out).glob("*.json")}
    settings = CPU_SETTINGS.get(name)
    args = [a.replace("{out}", out) for a in settings] if settings is not None else []
    notes = [] if settings is not None else ["no small settings in benchmarks/run.py: ran with its defaults"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    for attempt in range(2):
        cmd = [sys.executable, "-m", "benchmarks.run", "--child", name, out, "--", *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE.parent)
        except subprocess.TimeoutExpired:
            return {
                "name": name,
                "status": "timeout",
                "args": [a.replace(out, "<scratch>") for a in args],
                "seconds": timeout,
                "note": f"did not finish within {timeout:.0f} s",
            }
        if proc.returncode == 2 and "unrecognized arguments" in proc.stderr and attempt == 0:
            args, dropped = drop_unknown(args, proc.stderr)
            notes.append(f"it does not accept {' '.join(dropped)}: rerun without")
            continue
        break
    seconds = time.perf_counter() - started
    results = {
        p.stem: json.loads(p.read_text())
        for p in sorted(Path(out).glob("*.json"))
        if before.get(p) != p.stat().st_mtime_ns
    }
    shown = [a.replace(out, "<scratch>") for a in args]
    record = {
        "name": name,
        "args": shown,
        "seconds": round(seconds, 1),
        "stdout": proc.stdout[-4000:],
        "results": results,
        "note": "; ".join(notes) or None,
    }
    if proc.returncode != 0:
        record.update(status="failed", returncode=proc.returncode, stderr=proc.stderr[-4000:])
    else:
        record["status"] = "ok" if results else "no output"
    return record


def row_tables(results: dict) -> list[tuple[str, list[dict]]]:
    """Every list of row dicts in a benchmark's JSON (rows, optimizer_rows, ...)."""
    tables = []
    for stem, payload in results.items():
        for key, value in payload.items():
            if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                tables.append((f"{stem}.{key}", value))
    return tables


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value).replace("|", "\\|")


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Benchmark suite ({report['device']})",
        "",
        f"`{report['command']}` — {report['total_seconds']:.0f} s in all, {report['date']}, commit {report['commit']}",
        "",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, {m['threads']} torch threads, GPU {m['cuda']}, "
        f"Python {m['python']}",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v),
        "",
        "| benchmark | status | seconds | arguments | note |",
        "|---|---|---|---|---|",
    ]
    for b in report["benchmarks"]:
        lines.append(
            f"| {b['name']} | {b['status']} | {b.get('seconds', '')} | `{' '.join(b.get('args', [])) or '(defaults)'}` "
            f"| {fmt(b.get('note') or '')} |"
        )
    for b in report["benchmarks"]:
        if b["status"] != "ok":
            continue
        lines += ["", f"## {b['name']}", "", f"`python -m benchmarks.{b['name']} {' '.join(b['args'])}`"]
        for stem, payload in b["results"].items():
            config = payload.get("args")
            if config:
                lines += ["", f"Config ({stem}): " + ", ".join(f"{k}={v}" for k, v in config.items())]
        for title, rows in row_tables(b["results"]):
            columns = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["", f"{title}:", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(argv[1], argv[2], argv[4:] if argv[3:4] == ["--"] else argv[3:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated benchmark names")
    parser.add_argument("--skip", default="", help="comma-separated benchmark names to leave out")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per benchmark")
    parser.add_argument(
        "--out", type=Path, default=None, help="report stem (default benchmarks/results/suite_{cpu,gpu})"
    )
    parser.add_argument("--list", action="store_true", help="print the benchmarks and their arguments, run nothing")
    args = parser.parse_args(argv)
    names = discover()
    if args.only:
        unknown = [n for n in args.only.split(",") if n not in names]
        if unknown:
            parser.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(names)}")
        names = [n for n in names if n in args.only.split(",")]
    names = [n for n in names if n not in args.skip.split(",")]
    if args.list:
        for name in names:
            present = "" if (HERE / f"{name}.py").is_file() else "  (missing)"
            settings = CPU_SETTINGS.get(name)
            print(f"{name:<18} {' '.join(settings) if settings is not None else '(defaults)'}{present}")
        return 0
    device = "gpu" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory() as out:
        for name in names:
            print(f"[suite] {name} ...", flush=True)
            record = run_one(name, out, args.timeout)
            records.append(record)
            print(
                f"[suite] {name}: {record['status']} in {record.get('seconds', 0)} s"
                + (f" ({record['note']})" if record.get("note") else ""),
                flush=True,
            )
            if record["status"] == "failed":
                print(record["stderr"][-1500:], file=sys.stderr)
    report = {
        "command": " ".join(["python -m benchmarks.run", *argv]),
        "device": device,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": git_commit(),
        "machine": machine_info(),
        "versions": versions(),
        "total_seconds": round(time.perf_counter() - started, 1),
        "benchmarks": records,
    }
    stem = args.out or RESULTS / f"suite_{device}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(f"[suite] {report['total_seconds']:.0f} s; wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0 if all(r["status"] in ("ok", "missing") for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
