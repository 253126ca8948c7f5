"""`RetroForCausalLM`: embed -> prelude -> adapter + recurrent block (r passes) -> coda -> norm -> head.

Single-device code: sharding, activation checkpointing and compile are applied from outside
(retro/distributed/parallelize.py); `RecurrentCore.checkpoint_passes` is the hook for per-recurrence
checkpointing. Each stage is one method (`RetroModel.embed_and_prelude`, `RecurrentCore.start` +
`recurrence_pass`, `RetroModel.coda_and_norm`) that `RetroModel.forward` and the adaptive-exit decoder
(retro/inference/adaptive.py, which runs the passes one by one on the rows still iterating) share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from retro.model.adapter import Adapter
from retro.model.config import RetroConfig
from retro.model.layers import DecoderLayer, KVSlot, RMSNorm
from retro.model.loss import linear_cross_entropy, plain_cross_entropy
from retro.model.precision import to_autocast_dtype
from retro.model.rope import inverse_frequencies, rope_cos_sin

Recurrences = int | tuple[int, int] | None
# (final hidden states [B, T, h], head weight [V, h], shift_labels) -> loss: called inside the forward,
# where FSDP2 has the head gathered (distillation passes one; the default is chunked CE).
HeadLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class KVCache(Protocol):
    """A cache keyed per (stage, pass, layer); see retro/inference/generate.py for the implementation."""

    past_length: int

    def slot(self, key: tuple) -> KVSlot: ...


class Prelude(NamedTuple):
    """What `RetroModel.embed_and_prelude` hands to the later stages."""

    e: torch.Tensor  # prelude output [B, T, h], in the compute dtype
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin for the positions
    mask: torch.Tensor | None  # bool [B, 1, T, S], or None for plain causal attention


def _kv_slot(cache: KVCache | None, key: tuple) -> KVSlot | None:
    return cache.slot(key) if cache is not None else None


def split_recurrences(num_recurrences: Recurrences, default: int) -> tuple[int, int]:
    """(n no-grad passes, k passes with grad) from an int r (all with grad) or an explicit pair."""
    if num_recurrences is None:
        num_recurrences = default
    if isinstance(num_recurrences, int):
        n, k = 0, num_recurrences
    else:
        n, k = (int(v) for v in num_recurrences)
    if n < 0 or k < 0 or n + k < 1:
        raise ValueError(f"num_recurrences must give at least one pass and no negative count, got {num_recurrences!r}")
    return n, k


def attention_mask_4d(
    attention_mask: torch.Tensor | None, query_len: int, past_len: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean [B, 1, T, S] mask: causal, keys that are padding hidden. None means plain causal.

    Each query may always see its own position, so padded rows stay finite (their outputs are
    never used) instead of turning into NaN.
    """
    if attention_mask is None and past_len == 0:
        return None
    total = past_len + query_len
    query_pos = torch.arange(past_len, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    mask = (key_pos <= query_pos)[None, None]
    if attention_mask is not None:
        if attention_mask.size(-1) != total:
            raise ValueError(
                f"attention_mask has {attention_mask.size(-1)} positions, expected past {past_len} + new {query_len}"
            )
        mask = mask & attention_mask[:, None, None, :].bool()
        mask = mask | (key_pos == query_pos)[None, None]
    return mask


class RetroPreTrainedModel(PreTrainedModel):
    config_class = RetroConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, Adapter):
            module.reset_identity()
        elif isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, RetroModel):
            module.inv_freq.copy_(inverse_frequencies(self.config.head_dim, self.config.rope_parameters))


class RecurrentCore(nn.Module):
    """Adapter + recurrent block, and the loop over passes.

    The whole loop is one module call so FSDP2 can shard it as one unit: its weights are gathered
    once per forward and once per backward however many passes run (not once per pass).
    """

    def __init__(self, config: RetroConfig) -> None:
        super().__init__()
        self.adapter = Adapter(config.hidden_size)
        self.block = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_recurrent))
        self.checkpoint_passes = False  # per-recurrence activation checkpointing, set by retro.distributed.parallelize

    def start(self, e: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(injection, s0) for the passes: W_inject·e once for all of them, and the state in the injection's
        dtype (the compute dtype: bf16 under autocast or with FSDP2's bf16 parameters), so an fp32 s0
        handed in does not mix dtypes."""
        injection = self.adapter.injection(e)
        return injection, state.to(injection.dtype)

    def recurrence_pass(
        self,
        state: torch.Tensor,
        injection: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None,
        pass_index: int,
    ) -> torch.Tensor:
        """One pass: adapter then the block's layers. The unit of activation checkpointing, and the step
        of the adaptive-exit decoder (which calls it outside `forward`: single-device eval, not sharded)."""
        state = self.adapter(state, injection)
        for i, layer in enumerate(self.block):
            state = layer(state, rope, mask, _kv_slot(cache, ("block", pass_index, i)))
        return state

    def _run_pass(self, state, injection, rope, mask, cache, pass_index):
        if self.checkpoint_passes and cache is None and torch.is_grad_enabled():
            return checkpoint(self.recurrence_pass, state, injection, rope, mask, None, pass_index, use_reentrant=False)
        return self.recurrence_pass(state, injection, rope, mask, cache, pass_index)

    def forward(self, e, state, rope, mask, cache: KVCache | None, n: int, k: int) -> torch.Tensor:
        """n passes under no_grad (truncated backprop), then k passes with grad; e is the prelude output.

        Training calls this as one module (one FSDP2 unit), never pass by pass.
        """
        injection, state = self.start(e, state)
        with torch.no_grad():
            for p in range(n):
                state = self._run_pass(state, injection, rope, mask, cache, p)
        for p in range(n, n + k):
            state = self._run_pass(state, injection, rope, mask, cache, p)
        return state


class RetroModel(RetroPreTrainedModel):
    def __init__(self, config: RetroConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.prelude = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_prelude))
        self.recurrent = RecurrentCore(config) if config.is_recurrent else None
        self.coda = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_coda))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.register_buffer("inv_freq", inverse_frequencies(config.head_dim, config.rope_parameters), persistent=False)
        # Checkpoint each prelude/coda layer too ("full" AC), set by retro.distributed.parallelize.
        self.checkpoint_layers = False
        self.post_init()

    def _run_layer(self, layer: DecoderLayer, x, rope, mask, kv_slot):
        if self.checkpoint_layers and kv_slot is None and torch.is_grad_enabled():
            return checkpoint(layer, x, rope, mask, use_reentrant=False)
        return layer(x, rope, mask, kv_slot)

    def initial_state(self, e: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """s0: truncated normal (paper: std 0.0087 cut at 3 std), zeros, or the prelude output."""
        kind = self.config.state_init
        if kind == "zeros":
            return torch.zeros_like(e)
        if kind == "embed":
            return e
        std = self.config.state_init_std
        state = torch.empty(e.shape, dtype=torch.float32, device=e.device)
        nn.init.trunc_normal_(state, 0.0, std, -3 * std, 3 * std, generator=generator)
        return state.to(e.dtype)

    def embed_and_prelude(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Prelude:
        """Embeddings, RoPE, the 4D mask and the prelude layers: e and what the later stages need."""
        batch, seq = input_ids.shape
        past = cache.past_length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=input_ids.device).expand(batch, -1)
        # Under autocast the activations are in the autocast dtype from here on, as with FSDP2's
        # bf16 parameters (retro/model/precision.py); a no-op otherwise.
        x = to_autocast_dtype(self.embed_tokens(input_ids))
        rope = rope_cos_sin(self.inv_freq, position_ids, x.dtype)
        mask = attention_mask_4d(attention_mask, seq, past, x.device)
        if mask is None and cache is not None:
            mask = attention_mask_4d(
                torch.ones(batch, past + seq, dtype=torch.bool, device=x.device), seq, past, x.device
            )
        for i, layer in enumerate(self.prelude):
            x = self._run_layer(layer, x, rope, mask, _kv_slot(cache, ("prelude", i)))
        return Prelude(x, rope, mask)

    def coda_and_norm(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The coda layers and the final norm on the recurrent state: the hidden states the head reads."""
        for i, layer in enumerate(self.coda):
            x = self._run_layer(layer, x, rope, mask, _kv_slot(cache, ("coda", i)))
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        num_recurrences: Recurrences = None,
        cache: KVCache | None = None,
        initial_state: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states [B, T, h]: the stages in order, the recurrent core as one module call."""
        e, rope, mask = self.embed_and_prelude(input_ids, attention_mask, position_ids, cache)
        x = e
        if self.recurrent is not None:
            n, k = split_recurrences(num_recurrences, self.config.default_recurrences)
            state = initial_state if initial_state is not None else self.initial_state(e, generator)
            x = self.recurrent(e, state, rope, mask, cache, n, k)
        return self.coda_and_norm(x, rope, mask, cache)


class RetroForCausalLM(RetroPreTrainedModel):
    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: RetroConfig) -> None:
        super().__init__(config)
        self.model = RetroModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        num_recurrences: Recurrences = None,
        cache: KVCache | None = None,
        initial_state: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_logits: bool = True,
        loss_fn: HeadLossFn | None = None,
        **_: object,
    ) -> CausalLMOutputWithPast:
        """Logits and, with `labels` (HF convention, shifted here) or `shift_labels` (already
        aligned with the inputs, what the trainer passes), the mean CE over targets != -100.

        `num_recurrences`: r (all passes with grad) or (n, k): n no-grad passes then k with grad.
        With logits returned the loss is computed from them (one head pass, as transformers does);
        `return_logits=False` skips the [B, T, V] logits and computes the loss in chunks
        (retro/model/loss.py), what training and evaluation use; `loss_fn` replaces that loss.
        """
        hidden = self.model(input_ids, attention_mask, position_ids, num_recurrences, cache, initial_state, generator)
        if labels is not None and shift_labels is None:
            shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        if not return_logits:
            head_loss = loss_fn or linear_cross_entropy
            loss = head_loss(hidden, self.lm_head.weight, shift_labels) if shift_labels is not None else None
            return CausalLMOutputWithPast(loss=loss, logits=None)
        logits = self.lm_head(hidden)
        loss = plain_cross_entropy(logits, shift_labels) if shift_labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits)
