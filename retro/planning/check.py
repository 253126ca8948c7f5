"""The planner's memory and FLOP model against what a small CPU model really allocates and computes.

`python -m retro.plan --check` (tests/unit/test_plan.py holds it to 15%). What is counted:
- parameters, gradients and optimizer state: bytes of the tensors a real optimizer holds after one
  step (unique storages);
- activations: bytes of every tensor storage created during the forward that is still alive when
  the forward returns (what the autograd graph keeps for backward, including what per-recurrence
  checkpointing keeps: each pass's input), tracked with a TorchDispatchMode and storage weakrefs.
  The token ids (created before the forward) are not seen; the plan counts them (8 bytes/token);
- FLOPs: torch.utils.flop_counter.FlopCounterMode over forward + backward, taught CPU's fused SDPA
  and in-place addmm_ (EXTRA_FORMULAS). It counts matmuls and attention only, as FlopModel does;
  norms, RoPE, SiLU, the loss's softmax and the optimizer step are excluded from both. FlopModel
  charges 6 FLOPs per weight in every grad pass, but the first grad pass's W_state needs no input
  gradient (its input s_0 or the no-grad state has none): 2 h^2 per token too many, < 1% here.
  With checkpointing the counter also sees the recomputed forwards, which the plan adds as
  executed (hardware) FLOPs on top of the model FLOPs used for MFU.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from retro.distributed.parallelize import apply_activation_checkpointing
from retro.model.config import RetroConfig
from retro.model.flops import FlopModel
from retro.model.modeling import RetroForCausalLM
from retro.optim import build_optimizer
from retro.planning.memory import activation_bytes, memory_per_gpu
from retro.training.job_config import JobConfig

TOLERANCE = 0.15
CHECK_SHAPE = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=352,
    num_attention_heads=4,
    num_key_value_heads=2,
    n_prelude=2,
    n_recurrent=2,
    n_coda=2,
    max_position_embeddings=256,
)


class LiveStorages(TorchDispatchMode):
    """Records every storage an op produces; `live_bytes()` sums those not yet freed."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.storages[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
        return out

    def live_bytes(self, exclude: set[int]) -> int:
        return sum(n for ptr, (ref, n) in self.storages.items() if not ref.expired() and ptr not in exclude)


def _sdpa_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    batch, heads, q_len, dim = query
    return 4 * batch * heads * q_len * key[-2] * dim  # QK^T and AV, full (non-causal) count as in FlopModel


def _sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * _sdpa_forward(query, key, value)


def _addmm_inplace(self, mat1, mat2, *args, out_shape=None, **kwargs) -> int:
    return 2 * mat1[0] * mat1[1] * mat2[1]


# FlopCounterMode has no formula for CPU's fused SDPA or for the in-place addmm_ (the chunked loss's
# head-gradient accumulation); without them it would miss real matmul work on this machine.
EXTRA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
    torch.ops.aten.addmm_: _addmm_inplace,
}


def recompute_per_token(flops: FlopModel, k: int, checkpointing: str) -> float:
    """Forward FLOPs re-executed in backward by activation checkpointing (not model FLOPs)."""
    attn = flops.seq_len * flops.attn_dim
    passes = (
        k * (2 * flops.pass_params + 4 * attn * flops.n_block_layers) if checkpointing in ("recurrence", "full") else 0
    )
    stages = 2 * flops.stage_params + 4 * attn * flops.n_stage_layers if checkpointing == "full" else 0
    return float(passes + stages)


def check_config(optimizer: str = "muon", micro_batch: int = 2, seq_len: int = 64) -> tuple[JobConfig, RetroConfig]:
    job = JobConfig()
    job.optim.name, job.train.micro_batch, job.data.seq_len, job.train.dtype = optimizer, micro_batch, seq_len, "fp32"
    return job, RetroConfig(**CHECK_SHAPE)


def _model(model_config: RetroConfig, checkpointing: str) -> RetroForCausalLM:
    torch.manual_seed(0)
    model = RetroForCausalLM(model_config)
    apply_activation_checkpointing(model, checkpointing)
    return model


def _batch(model_config: RetroConfig, job: JobConfig) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(
        0,
        model_config.vocab_size,
        (job.train.micro_batch, job.data.seq_len),
        generator=torch.Generator().manual_seed(0),
    )
    return ids, torch.roll(ids, -1, 1)


def measure_states(job: JobConfig, model_config: RetroConfig, n: int, k: int) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes after one real optimizer step."""
    model = _model(model_config, "none")
    optimizer = build_optimizer(model, name=job.optim.name)
    ids, targets = _batch(model_config, job)
    model(ids, shift_labels=targets, num_recurrences=(n, k), return_logits=False).loss.backward()
    optimizer.step()

    def unique_bytes(tensors) -> int:
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {
        "params": unique_bytes(model.parameters()),
        "grads": unique_bytes(p.grad for p in model.parameters()),
        "optimizer": unique_bytes(state),
    }


def measure_activations(job: JobConfig, model_config: RetroConfig, n: int, k: int, checkpointing: str) -> int:
    """Bytes alive after the forward (kept for backward), parameters excluded."""
    model = _model(model_config, checkpointing)
    ids, targets = _batch(model_config, job)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with LiveStorages() as tracker:
        loss = model(
            ids,
            shift_labels=targets,
            num_recurrences=(n, k),
            return_logits=False,
            generator=torch.Generator().manual_seed(0),
        ).loss
        held = tracker.live_bytes(params)
    loss.backward()
    return held


def measure_flops(job: JobConfig, model_config: RetroConfig, n: int, k: int, checkpointing: str) -> int:
    model = _model(model_config, checkpointing)
    ids, targets = _batch(model_config, job)
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as counter:
        model(ids, shift_labels=targets, num_recurrences=(n, k), return_logits=False).loss.backward()
    return counter.get_total_flops()


def saved_tensor_bytes(output: torch.Tensor, exclude: set[int]) -> int:
    """Unique storage bytes the autograd graph behind ``output`` saved for backward, minus ``exclude`` (data
    pointers). Reads each node's saved tensors: eager nodes' ``_saved_*`` fields and, for a compiled graph's
    one node, the tensors it saved (what the TorchDispatchMode of ``measure_activations`` cannot see: Inductor
    allocates its buffers outside the dispatcher)."""
    storages: dict[int, int] = {}
    seen: set[int] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        saved = [getattr(node, name) for name in dir(node) if name.startswith("_saved_")]
        if hasattr(node, "saved_tensors"):
            saved.append(node.saved_tensors)
        for value in tree_flatten(saved)[0]:
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        stack += [fn for fn, _ in node.next_functions]
    return sum(n for ptr, n in storages.items() if ptr not in exclude)


def measure_layer_bytes(model_config: RetroConfig, compiled: bool, batch: int = 2, seq_len: int = 256) -> float:
    """Bytes per token one bf16 decoder layer saves for backward, eager or through torch.compile as
    `parallel.compile` runs it (`dynamic=False`); parameters and the RoPE tables are not counted."""
    from retro.model.layers import DecoderLayer
    from retro.model.rope import inverse_frequencies, rope_cos_sin

    torch.manual_seed(0)
    layer = DecoderLayer(model_config).to(torch.bfloat16)
    inv_freq = inverse_frequencies(model_config.head_dim, model_config.rope_parameters)
    rope = rope_cos_sin(inv_freq, torch.arange(seq_len)[None], torch.bfloat16)
    x = torch.randn(batch, seq_len, model_config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    run = torch.compile(layer, dynamic=False) if compiled else layer
    out = run(x, rope)
    exclude = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), *rope)}
    return saved_tensor_bytes(out, exclude) / (batch * seq_len)


def compare(n: int = 3, k: int = 2, optimizer: str = "muon") -> list[dict]:
    """Rows of (quantity, planned, measured, relative error)."""
    job, model_config = check_config(optimizer)
    tokens = job.train.micro_batch * job.data.seq_len
    planned_mem = memory_per_gpu(model_config, job, shard=1, micro_batch=job.train.micro_batch, k=k, on_gpu=False)
    states = measure_states(job, model_config, n, k)
    rows = [
        ("params bytes", planned_mem["params (fp32, sharded)"], states["params"]),
        ("grads bytes", planned_mem["grads (fp32, sharded)"], states["grads"]),
        (f"optimizer state bytes ({optimizer})", planned_mem["optimizer state"], states["optimizer"]),
    ]
    flops = FlopModel.from_config(model_config, job.data.seq_len)
    for mode in ("none", "recurrence", "full"):
        planned = activation_bytes(model_config, tokens, k, mode, 4, fused_norm=False)["held"]
        rows.append(
            (f"activation bytes, checkpointing={mode}", planned, measure_activations(job, model_config, n, k, mode))
        )
        executed = (flops.per_token(n, k) + recompute_per_token(flops, k, mode)) * tokens
        rows.append(
            (f"step FLOPs (n={n}, k={k}), checkpointing={mode}", executed, measure_flops(job, model_config, n, k, mode))
        )
    return [{"quantity": q, "planned": float(p), "measured": float(m), "rel_error": (p - m) / m} for q, p, m in rows]


def main() -> int:
    rows = compare()
    job, model_config = check_config()
    print(
        f"CPU check model: h={model_config.hidden_size} I={model_config.intermediate_size} heads "
        f"{model_config.num_attention_heads}/"
        f"{model_config.num_key_value_heads} vocab {model_config.vocab_size} shape (2,2,2), micro-batch "
        f"{job.train.micro_batch} x "
        f"{job.data.seq_len}, fp32"
    )
    print(f"{'quantity':<48} {'planned':>14} {'measured':>14} {'error':>8}")
    for r in rows:
        print(f"{r['quantity']:<48} {r['planned']:>14,.0f} {r['measured']:>14,.0f} {r['rel_error']:>+8.1%}")
    bad = [r["quantity"] for r in rows if abs(r["rel_error"]) > TOLERANCE]
    if bad:
        print(f"outside {TOLERANCE:.0%}: {', '.join(bad)}")
    return 1 if bad else 0
