"""Loading a retro checkpoint the way retro.eval and the demo's eval stage do logs no transformers warning.

AutoTokenizer without a config re-reads config.json through AutoConfig and, where "retro" does not resolve
there, through the base PreTrainedConfig, which warns "You are using a model of type `retro` to instantiate
a model of type ``". Passing the loaded RetroConfig avoids that second, wrong-class load.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from tiny import tiny_recurrent
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import logging as hf_logging

from retro.demo.evaluate import evaluate_checkpoint
from retro.demo.tokenizer import build_tokenizer
from retro.inference.loading import load_model, load_tokenizer


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def transformers_warnings() -> Iterator[list[str]]:
    """Every transformers log record at WARNING or above, plus every Python warning, as text."""
    handler = _Collect()
    root = logging.getLogger("transformers")  # transformers' loggers do not propagate to the root logger
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield handler.messages
        handler.messages.extend(str(w.message) for w in caught)
    finally:
        root.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    tiny_recurrent().save_pretrained(path)
    build_tokenizer(path)
    return path


@pytest.mark.parametrize("retro_registered", [True, False], ids=["registered", "autoconfig-without-retro"])
def test_eval_model_and_tokenizer_load_without_transformers_warnings(checkpoint, monkeypatch, retro_registered):
    if not retro_registered:  # a process where AutoConfig does not know model_type "retro"
        monkeypatch.delitem(CONFIG_MAPPING._extra_content, "retro")
    with transformers_warnings() as messages:
        model = load_model(checkpoint, None, "cpu", torch.float32)
        tokenizer = load_tokenizer(checkpoint, add_bos=True, config=model.config)
        load_tokenizer(checkpoint, add_bos=False, config=model.config)
    assert messages == []
    assert model.config.model_type == "retro" and tokenizer.eos_token == "[EOS]"


def test_without_the_config_autotokenizer_warns_where_retro_is_unregistered(checkpoint, monkeypatch):
    """The guard above is not vacuous: the old call (no config) does log the wrong-class warning."""
    monkeypatch.delitem(CONFIG_MAPPING._extra_content, "retro")
    with transformers_warnings() as messages:
        load_tokenizer(checkpoint, add_bos=False)
    assert any("instantiate a model of type ``" in m for m in messages)


def test_demo_eval_stage_logs_no_transformers_warning(checkpoint):
    rows = [{"steps": 1, "prompt": "3 a =", "answer": "4"}, {"steps": 2, "prompt": "5 a b =", "answer": "1"}]
    with transformers_warnings() as messages:
        result = evaluate_checkpoint(checkpoint, rows, [1, 2])
    assert messages == []
    assert set(result["accuracy"]) == {"1", "2"}
