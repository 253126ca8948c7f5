"""The benchmark suite: every benchmark with small settings, one JSON + one Markdown report.

    python -m benchmarks.run                      # all, CPU settings -> benchmarks/results/suite_cpu.{json,md}
    python -m benchmarks.run --only muon,kernels  # a subset
    python -m benchmarks.run --list               # what would run, with which arguments

Each benchmark still runs alone (`python -m benchmarks.<name>`). Here each runs in its own
process with the suite's small settings and writes its JSON into a scratch folder (so the
full-size results under benchmarks/results/ are left alone); the suite gathers those into one
report with machine info, library versions, each benchmark's arguments and its rows. Benchmark
modules are discovered from the folder; one the suite has no settings for runs with its
defaults. Drift between the suite and the benchmarks is an error, not a note: a benchmark listed
in CPU_SETTINGS that does not exist stops the suite before anything runs (exit 2), and one that
rejects a flag the suite passes fails its row with the flag named (no retry without it).
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

from benchmarks.common import RESULTS, machine_info, markdown_table

HERE = Path(__file__).parent
# Not timings but experiments, run by hand: optimizer_convergence needs a demo run's model and shards
# (--model, --data); distill_and_layers trains on a real model for about an hour; trainable_modes needs
# the SmolLM2 GGUF and runs for minutes; adaptive_exit needs a demo run; gpu_trainer_check is
# gpu_check.sh's trainer step (GPU only; its --dry-run is tested with the script).
NOT_BENCHMARKS = {
    *("__init__", "common", "run", "optimizer_convergence", "distill_and_layers", "trainable_modes", "adaptive_exit"),
    "gpu_trainer_check",
}

# Small settings, one command line per benchmark: the whole suite in < 10 minutes on 2 CPU cores. "{out}" is
# the scratch folder. A benchmark listed here must exist, and must accept every flag given to it.
CPU_SETTINGS: dict[str, str] = {
    "model_throughput": "--hidden 128 --layers 6 --vocab 2048 --batch 2 --seq 128 --repeats 3",
    "data_throughput": "--docs 1500 --vocab 2048 --seq 256 --batch 4 --batches 40 --repeats 2",
    "train_throughput": "--hidden 128 --shape 1,2,1 --vocab 2048 --batch 2 --seq 64 --repeats 2 --recurrences 1,8",
    "muon": (
        "--hidden 128 --layers 4 --intermediate 344 --vocab 2048 --batch 2 --seq 128 --repeats 3"
        " --ns-repeats 2 --no-torch-muon"
    ),
    "kernels": "--repeats 2 --scale 8 --out {out}/kernels.json",
    "scaling": "--hidden 128 --shape 1,2,1 --vocab 2048 --batch 8 --seq 64 --recurrences 1,8 --repeats 3 --warmup 1",
}
VERSIONED = ("torch", "transformers", "triton", "numpy", "datasets", "torchdata", "safetensors")


def discover() -> list[str]:
    """The suite's benchmarks in its own order, then any other module found in benchmarks/."""
    found = sorted(p.stem for p in HERE.glob("*.py") if p.stem not in NOT_BENCHMARKS)
    return list(CPU_SETTINGS) + [name for name in found if name not in CPU_SETTINGS]


def missing_benchmarks() -> list[str]:
    """The benchmarks CPU_SETTINGS lists that have no module in benchmarks/ (renamed or removed)."""
    return [name for name in CPU_SETTINGS if not (HERE / f"{name}.py").is_file()]


def suite_args(name: str, out: str) -> list[str] | None:
    """The suite's command-line arguments for `name` with "{out}" set to `out`; None if it has no settings."""
    settings = CPU_SETTINGS.get(name)
    return None if settings is None else [a.replace("{out}", out) for a in settings.split()]


def rejected_flags(stderr: str) -> list[str]:
    """The options an argparse error names: "unrecognized arguments: --a 1 --b" -> [--a, --b];
    "argument --a: invalid int value" -> [--a]."""
    unrecognized = re.search(r"unrecognized arguments: (.*)", stderr)
    if unrecognized:
        return [word for word in unrecognized.group(1).split() if word.startswith("-")]
    return re.findall(r"error: argument (-[^\s:/]+)", stderr)


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


def run_one(name: str, out: str, timeout: float) -> dict:
    """One benchmark in a child process; the JSON it wrote, wall time and what went wrong if anything.

    All benchmarks of a suite run share the scratch folder `out`, so one that reads another's
    results (data_throughput reads model_throughput's) sees the suite's own numbers.
    """
    before = {p: p.stat().st_mtime_ns for p in Path(out).glob("*.json")}
    args = suite_args(name, out)
    notes = [] if args is not None else ["no small settings in benchmarks/run.py: ran with its defaults"]
    args = args or []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
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
    seconds = time.perf_counter() - started
    rejected = rejected_flags(proc.stderr) if proc.returncode == 2 else []  # argparse's exit status
    if rejected:
        notes.append(f"it rejects {', '.join(rejected)}, given by CPU_SETTINGS in benchmarks/run.py")
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
    ]
    lines += markdown_table(
        ["benchmark", "status", "seconds", "arguments", "note"],
        [
            [
                b["name"],
                b["status"],
                b.get("seconds", ""),
                f"`{' '.join(b.get('args', [])) or '(defaults)'}`",
                fmt(b.get("note") or ""),
            ]
            for b in report["benchmarks"]
        ],
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
            lines += ["", f"{title}:", ""]
            lines += markdown_table(columns, [[fmt(r.get(c, "")) for c in columns] for r in rows])
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
    missing = missing_benchmarks()
    if missing:
        print(
            "[suite] error: CPU_SETTINGS in benchmarks/run.py lists "
            + ", ".join(f"{name} (no benchmarks/{name}.py)" for name in missing)
            + ": rename or remove the entry",
            file=sys.stderr,
        )
        return 2
    if args.list:
        for name in names:
            settings = CPU_SETTINGS.get(name)
            print(f"{name:<18} {settings if settings is not None else '(defaults)'}")
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
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
