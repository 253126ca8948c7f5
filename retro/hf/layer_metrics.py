"""Per-layer redundancy metrics of a Hugging Face decoder, measured with forward hooks on its layers.

- Block Influence (ShortGPT): BI_l = 1 - mean_tokens cos(x_in_l, x_out_l); a layer that barely turns the
  residual stream has a low BI.
- Angular distance (Gromov et al., "The unreasonable ineffectiveness of the deeper layers"):
  d(l, n) = mean_tokens arccos(cos(x_l, x_{l+n})) / pi, x_l the input of layer l and x_L the output of the last
  layer (before the final norm, which `output_hidden_states` would include). A small d(a, n) says layers
  a..a+n-1 together move the state little, so dropping them should cost little.

Hooks capture the states of one batch at a time; only token-weighted sums are kept across batches, in fp32.
`keep_only_layers` and `window_loss` measure the source with some layers removed: at r = 1 with the identity
adapter that is exactly what a `retro.convert` checkpoint computes (tests/unit/test_layer_selection.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list (`model.model.layers` for the llama / qwen / olmo2 families)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers list of decoder layers")
    return layers


@contextmanager
def capture_layer_states(layers: nn.ModuleList) -> Iterator[tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]]:
    """Yield ({layer: input}, {layer: output}) dicts, refilled (detached, fp32) on every forward."""
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def pre(index):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs[index] = hidden.detach().float()

        return hook

    def post(index):
        def hook(_module, _args, _kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            outputs[index] = hidden.detach().float()

        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post(i), with_kwargs=True))
    try:
        yield inputs, outputs
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class LayerMetrics:
    """BI per layer and the angular distance table; `angular[l][n]` = d(l, n) for n = 0..L-l."""

    block_influence: list[float]
    angular: list[list[float]]
    tokens: int

    @property
    def num_layers(self) -> int:
        return len(self.block_influence)

    def distance(self, start: int, n: int) -> float:
        return self.angular[start][n]

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "block_influence": self.block_influence, "angular_distance": self.angular}


class MetricSums:
    """Token-weighted sums of cos(in_l, out_l) and arccos(cos(x_a, x_b)) / pi over every batch added."""

    def __init__(self, num_layers: int, token_chunk: int = 1024) -> None:
        self.num_layers, self.token_chunk = num_layers, token_chunk
        self.cos_io = torch.zeros(num_layers, dtype=torch.float64)
        self.angle = torch.zeros(num_layers + 1, num_layers + 1, dtype=torch.float64)
        self.tokens = 0

    def add(self, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        """inputs[l], outputs[l]: layer l's input and output states, [..., h] (every token counts once)."""
        h = inputs[0].shape[-1]
        ins = torch.stack([x.reshape(-1, h) for x in inputs])  # [L, N, h]
        outs = torch.stack([x.reshape(-1, h) for x in outputs])
        self.cos_io += torch.cosine_similarity(ins, outs, dim=-1).sum(dim=1).double()
        states = nn.functional.normalize(torch.cat([ins, outs[-1:]]), dim=-1)  # x_0..x_L, unit length
        for lo in range(0, states.shape[1], self.token_chunk):
            chunk = states[:, lo : lo + self.token_chunk].transpose(0, 1)  # [n, L+1, h]
            cos = (chunk @ chunk.transpose(1, 2)).clamp(-1.0, 1.0)  # [n, L+1, L+1]
            self.angle += (torch.arccos(cos) / torch.pi).sum(dim=0).double()
        self.tokens += ins.shape[1]

    def result(self) -> LayerMetrics:
        if self.tokens == 0:
            raise ValueError("no calibration tokens were seen")
        bi = (1.0 - self.cos_io / self.tokens).tolist()
        mean = self.angle / self.tokens
        n_layers = self.num_layers
        angular = [[0.0] + [float(mean[a, a + n]) for n in range(1, n_layers - a + 1)] for a in range(n_layers + 1)]
        return LayerMetrics(bi, angular, self.tokens)


@torch.no_grad()
def collect_layer_metrics(
    model: nn.Module, batches: Iterable[torch.Tensor], on_batch: Callable[[int], None] | None = None
) -> LayerMetrics:
    """Run `model` over batches of input ids [B, T] (no padding) and return BI and angular distances."""
    layers = decoder_layers(model)
    sums = MetricSums(len(layers))
    with capture_layer_states(layers) as (inputs, outputs):
        for ids in batches:
            inputs.clear()
            outputs.clear()
            model.model(input_ids=ids, use_cache=False)  # the decoder only: no [B, T, vocab] logits needed
            if len(inputs) != len(layers) or len(outputs) != len(layers):
                raise RuntimeError(f"hooks saw {len(inputs)} of {len(layers)} decoder layers run")
            sums.add([inputs[i] for i in range(len(layers))], [outputs[i] for i in range(len(layers))])
            if on_batch is not None:
                on_batch(int(ids.numel()))
    return sums.result()


@contextmanager
def keep_only_layers(model: nn.Module, kept: list[int]) -> Iterator[nn.Module]:
    """The model with only the `kept` decoder layers (in order), restored afterwards.

    Per-layer config entries (`layer_types`: full or sliding attention) follow their layer.
    """
    inner, config = model.model, model.config
    layers, layer_types = inner.layers, getattr(config, "layer_types", None)
    inner.layers = nn.ModuleList(layers[i] for i in kept)
    if layer_types is not None:
        config.layer_types = [layer_types[i] for i in kept]
    try:
        yield model
    finally:
        inner.layers = layers
        if layer_types is not None:
            config.layer_types = layer_types


@torch.no_grad()
def window_loss(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    on_batch: Callable[[int], None] | None = None,
) -> float:
    """Token-weighted mean next-token cross entropy (nats) over (input ids, aligned labels) batches."""
    total, tokens = 0.0, 0
    for ids, labels in batches:
        logits = model(input_ids=ids, use_cache=False).logits.float()
        total += float(nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum"))
        tokens += labels.numel()
        if on_batch is not None:
            on_batch(int(labels.numel()))
    if tokens == 0:
        raise ValueError("no tokens to measure the loss on")
    return total / tokens


def kept_layer_losses(
    model: nn.Module,
    kept: dict[str, list[int]],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    on_batch: Callable[[str], Callable[[int], None]] | None = None,
) -> dict[str, float]:
    """{name: loss of the model with only those layers}; equal layer lists are measured once."""
    losses: dict[str, float] = {}
    seen: dict[tuple[int, ...], float] = {}
    for name, layers in kept.items():
        if tuple(layers) not in seen:
            with keep_only_layers(model, layers):
                seen[tuple(layers)] = window_loss(model, batches, on_batch(name) if on_batch else None)
        losses[name] = seen[tuple(layers)]
    return losses
