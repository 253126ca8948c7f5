"""A tiny llama written as a GGUF file with the `gguf` package's own writer (F32 tensors, a byte-level BPE
tokenizer in llama.cpp's metadata keys), for the tests that read GGUF sources (convert, select_layers)."""

from __future__ import annotations

import numpy as np
from tiny import make_source

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
