"""Every `python -m retro.*` command documents every option in --help (each module exposes build_parser())."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

RETRO = Path(__file__).resolve().parents[2] / "retro"
# retro.lm_eval_model hands its whole command line to lm-eval's own CLI: it has no parser of its own.
NO_PARSER = {"retro.lm_eval_model"}


def _commands() -> list[str]:
    """Modules runnable as `python -m`: retro/**/__main__.py packages and modules with a __main__ guard."""
    found = set()
    for path in RETRO.rglob("*.py"):
        text = path.read_text()
        if path.name == "__main__.py" or 'if __name__ == "__main__"' in text:
            module = ".".join(path.relative_to(RETRO.parent).with_suffix("").parts)
            found.add(module)
    return sorted(found - NO_PARSER)


COMMANDS = _commands()


def test_the_known_commands_are_found():
    expected = {
        "retro.convert",
        "retro.eval",
        "retro.export",
        "retro.plan",
        "retro.select_layers",
        "retro.train",
        "retro.data.prepare",
        "retro.data.inspect_shards",
        "retro.demo.__main__",
    }
    assert expected <= set(COMMANDS)


@pytest.mark.parametrize("module", COMMANDS)
def test_every_option_has_help(module):
    parser = importlib.import_module(module).build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    missing = [
        "/".join(action.option_strings) or action.dest
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()
    ]
    assert missing == [], f"python -m {module}: options without --help text: {missing}"
    parser.format_help()  # every help string formats (no stray % placeholders)
