"""retro.convert from a GGUF file: a tiny llama written with the `gguf` package's own writer (F32 tensors,
a byte-level BPE tokenizer in llama.cpp's metadata keys), read back through transformers' GGUF loader."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from gguf_helpers import write_tiny_gguf

import retro
from retro.convert import convert, main


def _needs_gguf():
    for name in ("gguf", "accelerate"):
        pytest.importorskip(name)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    _needs_gguf()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    source = write_tiny_gguf(path)
    return path, source


def _ids(vocab: int, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("how", ["static", "no-drop-recurrent"])
def test_no_drop_conversion_reproduces_transformers_gguf_model(tiny_gguf, tmp_path, how):
    from transformers import AutoModelForCausalLM

    path, source = tiny_gguf
    kwargs = {"static": True} if how == "static" else {"layers": "0,1-2,3"}
    summary = convert(path, tmp_path / "out", **kwargs)
    assert summary["source_parameters"] == sum(p.numel() for p in source.parameters())  # tied head counted once
    ours = retro.RetroForCausalLM.from_pretrained(tmp_path / "out").eval()
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        expected = ref(ids, labels=ids)
        got = ours(ids, labels=ids, num_recurrences=1)
        assert (expected.logits - got.logits).abs().max() < 1e-5
        assert abs(expected.loss.item() - got.loss.item()) < 1e-5
        # and the GGUF round trip itself undid llama.cpp's q/k row order: the model it was written from
        assert (source(ids).logits - got.logits).abs().max() < 1e-5


def test_tokenizer_is_saved_and_matches_the_gguf_one(tiny_gguf, tmp_path):
    from transformers import AutoTokenizer

    path, _ = tiny_gguf
    summary = convert(path, tmp_path / "out", static=True)
    assert "tokenizer.json" in summary["tokenizer_files"]
    assert "tokenizer_note" not in summary
    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    original = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "the cat sat on the mat in the sun"
    assert saved(text)["input_ids"] == original(text)["input_ids"]
    assert saved.decode(saved(text)["input_ids"]) == text
    assert (saved.bos_token_id, saved.eos_token_id) == (1, 2)
    conversion = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert conversion["tokenizer_files"] == summary["tokenizer_files"]


def test_surgery_from_a_gguf_through_the_cli(tiny_gguf, tmp_path, capsys):
    path, _ = tiny_gguf
    args = ["--model", str(path), "--shape", "1,1,1", "--adapter-init", "default", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "prelude 0..0  block 2..2  coda 3..3  dropped [1]" in out
    model = retro.RetroForCausalLM.from_pretrained(tmp_path / "o").eval()
    assert model.config.source_layers == {"prelude": [0], "block": [2], "coda": [3]}
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        logits = [model(ids, num_recurrences=r, generator=torch.Generator().manual_seed(0)).logits for r in (1, 3)]
    assert all(torch.isfinite(x).all() for x in logits)
    assert (logits[0] - logits[1]).abs().max() > 1e-4
    # the same file named as a folder plus --gguf-file
    assert main(["--model", str(path.parent), "--gguf-file", path.name, "--static", "--out", str(tmp_path / "s")]) == 0


def test_untied_gguf_keeps_its_own_head(tmp_path):
    _needs_gguf()
    path = tmp_path / "src" / "untied.gguf"
    source = write_tiny_gguf(path, tied=False, layers=2)
    convert(path, tmp_path / "out", static=True)
    ours = retro.RetroForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(ours.lm_head.weight, source.lm_head.weight)
    assert not torch.equal(ours.lm_head.weight, ours.model.embed_tokens.weight)


def test_gguf_without_tokenizer_converts_with_a_warning(tmp_path, capsys):
    _needs_gguf()
    path = tmp_path / "src" / "bare.gguf"
    write_tiny_gguf(path, tokenizer=False, layers=2)
    assert main(["--model", str(path), "--static", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "tokenizer files copied: none" in out
    assert "WARNING: bare.gguf holds no usable tokenizer" in out
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    assert retro.RetroForCausalLM.from_pretrained(tmp_path / "out").config.n_prelude == 2


def test_bad_gguf_requests_fail_before_any_tensor_is_read(tiny_gguf, tmp_path, monkeypatch, capsys):
    from retro.hf.gguf import GGUFSource

    path, _ = tiny_gguf

    def no_weights(self):
        raise AssertionError("tensors were read before the request was checked")

    monkeypatch.setattr(GGUFSource, "weights", no_weights)
    cases = [
        (["--model", str(path), "--shape", "2,2,2"], "needs 6 layers but the source model has 4"),
        (["--model", str(path), "--layers", "0-1,1-2,3"], "overlaps"),
        (["--model", str(path.parent), "--gguf-file", "missing.gguf", "--static"], "does not exist"),
        (["--model", str(path), "--gguf-file", "tiny.gguf", "--static"], "needs --model to be the directory"),
        (["--model", str(path.parent), "--static"], f"--gguf-file {path.name}"),
    ]
    for args, message in cases:
        assert main([*args, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (args, err)
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"not a gguf file")
    assert main(["--model", str(not_gguf), "--static", "--out", str(tmp_path / "o")]) == 2
    assert "is not a GGUF file" in capsys.readouterr().err


def test_missing_gguf_package_is_a_one_line_install_hint(tmp_path, monkeypatch, capsys):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(64))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    assert main(["--model", str(path), "--static", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == "retro.convert: error: reading a GGUF file needs the gguf package(s): pip install 'retro[gguf]'\n"
