"""retro.convert from a GGUF file: a tiny llama written with the `gguf` package's own writer (F32 tensors,
a byte-level BPE tokenizer in llama.cpp's metadata keys), read back through transformers' GGUF loader."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from tiny import make_source

import retro
from retro.convert import convert, main

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: pad, bos, eos
MERGES = ["Ġ t", "h e", "i n", "Ġ a", "e r", "o n", "Ġ s", "Ġt he"]
LAYER_TENSORS = {  # transformers' name -> llama.cpp's, per layer
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _needs_gguf():
    for name in ("gguf", "accelerate"):
        pytest.importorskip(name)


def _vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]


def _rope_rows_interleaved(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k layout: each head's rotate-half row pairs (i, i + d/2) become neighbours."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path, tokenizer: bool = True, tied: bool = True, layers: int = 4, seed: int = 0):
    """A random llama as llama.cpp's converter writes it; returns the transformers source model."""
    import gguf

    tokens = _vocab()
    source = make_source("llama-tied" if tied else "llama", seed, vocab_size=len(tokens), num_hidden_layers=layers)
    c = source.config
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-gguf-llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(len(tokens))
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))  # 3: control, 1: normal
        w.add_token_merges(MERGES)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
    state = {k: v.numpy() for k, v in source.state_dict().items()}
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        for theirs, ours in LAYER_TENSORS.items():
            t = state[f"model.layers.{i}.{theirs}.weight"]
            if ours == "attn_q":
                t = _rope_rows_interleaved(t, c.num_attention_heads)
            elif ours == "attn_k":
                t = _rope_rows_interleaved(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{ours}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not tied:
        w.add_tensor("output.weight", state["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return source


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
