"""Expand a SLURM node list (`gpu[001-004,007],login1`) into one hostname per line.

Used by the launchers when `scontrol show hostnames` is unavailable (tests, some containers).
"""

from __future__ import annotations

import re
import sys


def _split_top_level(nodelist: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, current = [], 0, ""
    for char in nodelist:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if depth != 0:
        raise ValueError(f"unbalanced brackets in node list {nodelist!r}")
    parts.append(current)
    return [p for p in parts if p]


def _expand_range(spec: str, nodelist: str) -> list[str]:
    """`001-004` -> 001 002 003 004 (zero padding kept); `7` -> 7."""
    if "-" not in spec:
        return [spec]
    low, high = spec.split("-", 1)
    if not (low.isdigit() and high.isdigit()) or int(high) < int(low):
        raise ValueError(f"bad range {spec!r} in node list {nodelist!r}")
    return [str(i).zfill(len(low)) for i in range(int(low), int(high) + 1)]


def expand(nodelist: str) -> list[str]:
    """All hostnames of a node list, in SLURM's order (the first one hosts the rendezvous)."""
    hosts = []
    for part in _split_top_level(nodelist.strip()):
        match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\](.*)", part)
        if match is None:
            if "[" in part or "]" in part:
                raise ValueError(f"cannot parse {part!r} in node list {nodelist!r}")
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        tails = expand(suffix) if suffix else [""]
        for spec in ranges.split(","):
            for value in _expand_range(spec, nodelist):
                hosts.extend(prefix + value + tail for tail in tails)
    return hosts


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python nodelist.py NODELIST")
    try:
        print("\n".join(expand(sys.argv[1])))
    except ValueError as error:
        raise SystemExit(f"nodelist.py: {error}") from None
