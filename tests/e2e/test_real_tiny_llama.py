"""Integration check on a real pretrained model: Karpathy's stories260K Llama (llama2.c export).

Uses ../shared/data when present (skips cleanly otherwise): the llama2.c weights are converted to a
Hugging Face LlamaForCausalLM, then through `retro.convert`; the retrofitted model must reproduce
the source's greedy story and its NLL on real TinyStories text (1.266 nats/token, SOURCES.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import retro
from retro.convert import convert
from retro.inference.generate import GenerationSettings, generate

SHARED = Path(os.environ.get("RETRO_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
STORIES = SHARED / "llama2c_stories260K"
pytestmark = pytest.mark.skipif(not (STORIES / "stories260K.bin").is_file(), reason=f"no shared data at {SHARED}")


def _hf_from_llama2c(path: Path) -> LlamaForCausalLM:
    """llama2.c legacy export -> HF Llama (q/k rows permuted from interleaved to half-split RoPE)."""
    raw = path.read_bytes()
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = np.frombuffer(raw[:28], dtype=np.int32)
    floats = torch.from_numpy(np.frombuffer(raw[28:], dtype=np.float32).copy())
    head_dim = dim // heads
    offset = 0

    def take(*shape):
        nonlocal offset
        n = int(np.prod(shape))
        out = floats[offset : offset + n].view(*shape)
        offset += n
        return out

    def permute(w, n):  # interleaved (2i, 2i+1) pairs -> rotate_half layout, per head
        return w.view(n, head_dim // 2, 2, dim).transpose(1, 2).reshape(n * head_dim, dim)

    embed = take(vocab, dim)
    att_norm, wq, wk = take(layers, dim), take(layers, dim, dim), take(layers, kv_heads * head_dim, dim)
    wv, wo = take(layers, kv_heads * head_dim, dim), take(layers, dim, dim)
    ffn_norm, w1, w2, w3 = (
        take(layers, dim),
        take(layers, hidden, dim),
        take(layers, dim, hidden),
        take(layers, hidden, dim),
    )
    final_norm = take(dim)
    config = LlamaConfig(
        hidden_size=int(dim),
        intermediate_size=int(hidden),
        num_hidden_layers=int(layers),
        num_attention_heads=int(heads),
        num_key_value_heads=int(kv_heads),
        vocab_size=int(vocab),
        max_position_embeddings=int(seq_len),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    state = {"model.embed_tokens.weight": embed, "model.norm.weight": final_norm, "lm_head.weight": embed}
    for i in range(int(layers)):
        p = f"model.layers.{i}."
        state.update(
            {
                p + "input_layernorm.weight": att_norm[i],
                p + "post_attention_layernorm.weight": ffn_norm[i],
                p + "self_attn.q_proj.weight": permute(wq[i], int(heads)),
                p + "self_attn.k_proj.weight": permute(wk[i], int(kv_heads)),
                p + "self_attn.v_proj.weight": wv[i],
                p + "self_attn.o_proj.weight": wo[i],
                p + "mlp.gate_proj.weight": w1[i],
                p + "mlp.up_proj.weight": w3[i],
                p + "mlp.down_proj.weight": w2[i],
            }
        )
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("stories")
    source = _hf_from_llama2c(STORIES / "stories260K.bin")
    source.save_pretrained(root / "hf")
    convert(root / "hf", root / "static", static=True)
    convert(root / "hf", root / "recurrent", layers="0-1,2-2,3-4", state_init="zeros")  # no layer dropped
    return (
        source,
        retro.RetroForCausalLM.from_pretrained(root / "static").eval(),
        retro.RetroForCausalLM.from_pretrained(root / "recurrent").eval(),
    )


def _decode(ids: list[int]) -> str:
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_file=str(STORIES / "tok512.model")).decode(ids)


def test_greedy_story_is_reproduced(converted):
    source, static, recurrent = converted
    bos = torch.tensor([[1]])
    expected = source.generate(bos, max_new_tokens=60, do_sample=False)[0, 1:].tolist()
    assert _decode(expected).startswith("Once upon a time, there was a little girl named Lily.")
    for model in (static, recurrent):
        out = generate(model, bos, None, GenerationSettings(max_new_tokens=60, num_recurrences=1))
        assert out.tokens[0, : len(expected)].tolist() == expected


def test_nll_on_real_tinystories(converted):
    source, static, recurrent = converted
    text = (SHARED / "tinystories_sample" / "tinystories_sample.txt").read_text()
    stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
    spm = pytest.importorskip("sentencepiece").SentencePieceProcessor(model_file=str(STORIES / "tok512.model"))
    total, count = {}, 0
    for story in stories:
        ids = torch.tensor([[1] + spm.encode(story)])
        count += ids.size(1) - 1
        with torch.no_grad():
            for name, model, kwargs in (
                ("hf", source, {}),
                ("static", static, {}),
                ("recurrent", recurrent, {"num_recurrences": 1}),
            ):
                total[name] = total.get(name, 0.0) + model(ids, labels=ids, **kwargs).loss.item() * (ids.size(1) - 1)
    nll = {k: v / count for k, v in total.items()}
    assert abs(nll["hf"] - 1.266) < 0.01, nll  # SOURCES.md: 1.266 nats/token over 1804 tokens
    assert abs(nll["static"] - nll["hf"]) < 1e-4 and abs(nll["recurrent"] - nll["hf"]) < 1e-4, nll
