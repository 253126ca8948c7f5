"""lm-evaluation-harness adapter: the `retro` model class (`RetroLM`), registered with lm-eval on import.

`python -m retro.lm_eval_model` imports this module and runs lm-eval's CLI, so `--model retro` resolves
(the `lm_eval` console script would not import retro); `with_default_include_path` adds retro's task folder
(retro/inference/lm_eval_tasks/, with the paper's GSM8K task `gsm8k_cot_sean`) as --include_path when none
is given. From Python, pass `RetroLM(pretrained=..., recurrences=8)` to `lm_eval.simple_evaluate`.

Log-likelihood requests call the model with `num_recurrences=r`; generation requests use
retro.inference.generate (KV cache across passes, left-padding masks; optional `adaptive_exit=RULE`, RULE being
`{kl,state,entropy}:THRESHOLD` or a bare KL threshold as `retro.eval --adaptive-exit` takes one, with
`adaptive_min_r=N`, and `share_kv_cache=True`). `state_init=zeros|embed|trunc_normal` overrides the
checkpoint's s0 init; `seed` seeds the s0 draws. Needs the `[eval]` extra.
"""

from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

import retro  # noqa: F401  (registers RetroConfig / RetroForCausalLM with the Auto classes)
from retro.inference.adaptive import parse_exit_rule
from retro.inference.generate import GenerationSettings, StopStrings, generate
from retro.inference.task_base import LM_EVAL_TASKS_DIR


@register_model("retro")
class RetroLM(HFLM):
    """HFLM whose forward and generation run the recurrent block `recurrences` times."""

    def __init__(
        self,
        pretrained: str,
        recurrences: int = 8,
        state_init: str | None = None,
        adaptive_exit: str | float | None = None,
        adaptive_min_r: int = 1,
        share_kv_cache: bool = False,
        seed: int = 0,
        **kwargs,
    ) -> None:
        if int(recurrences) < 1:
            raise ValueError(f"recurrences must be >= 1, got {recurrences}")
        # Checked before the weights load; 'kl:1e-3' and '1e-3' alike (lm-eval passes model_args as strings).
        rule = None if adaptive_exit in (None, "None") else parse_exit_rule(str(adaptive_exit), int(adaptive_min_r))
        if state_init is not None:
            kwargs["state_init"] = state_init  # forwarded to from_pretrained, which overrides the config field
        super().__init__(pretrained=pretrained, **kwargs)
        if self.model.config.model_type != "retro":
            raise ValueError(
                f"{pretrained} is a {self.model.config.model_type!r} checkpoint, not a retro one; use --model hf"
            )
        self.recurrences = int(recurrences)
        self.adaptive_exit = rule
        self.share_kv_cache = str(share_kv_cache).lower() in ("1", "true")
        self.seed = int(seed)
        self._s0_generator = torch.Generator(self.model.lm_head.weight.device).manual_seed(self.seed)

    def _r(self) -> int | None:
        return self.recurrences if self.model.config.is_recurrent else None

    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        with torch.no_grad():
            return self.model(inps, num_recurrences=self._r(), generator=self._s0_generator).logits

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs
    ) -> torch.Tensor:
        """Context [B, T] arrives left-padded, with lm-eval's attention mask (or without: leading pads are padding)."""
        pad = self.tokenizer.pad_token_id
        mask = generation_kwargs.pop("attention_mask", None)
        if mask is None:
            mask = (context != pad).cumsum(-1) > 0 if pad is not None else torch.ones_like(context, dtype=torch.bool)
        temperature = float(generation_kwargs.get("temperature", 0.0) or 0.0)
        do_sample = bool(generation_kwargs.get("do_sample", False)) and temperature > 0
        settings = GenerationSettings(
            max_new_tokens=max(1, max_length - context.size(1)),
            num_recurrences=self.recurrences,
            do_sample=do_sample,
            temperature=temperature if do_sample else 1.0,
            top_k=int(generation_kwargs.get("top_k") or 0),
            top_p=float(generation_kwargs.get("top_p") or 1.0),
            share_block_cache=self.share_kv_cache,
            adaptive_exit=self.adaptive_exit,
            seed=self.seed,
        )
        eos = self.tokenizer.eos_token_id
        out = generate(
            self.model,
            context,
            mask,
            settings,
            [eos] if eos is not None else [],
            pad if pad is not None else 0,
            StopStrings(self.tokenizer, stop) if stop else None,
        )
        return torch.cat([context.to(out.tokens.device), out.tokens], dim=1)


def with_default_include_path(argv: list[str]) -> list[str]:
    """argv plus `--include_path <retro's task folder>` unless it names one (lm-eval takes a single path)."""
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        return list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        return list(argv)
    return [*argv, "--include_path", str(LM_EVAL_TASKS_DIR)]
