"""The model shape a plan is for: a preset of the paper's models, a config.json, or a run's model.path."""

from __future__ import annotations

import json
from pathlib import Path

from retro.model.config import RetroConfig
from retro.training.job_config import ConfigError, JobConfig

# Shapes of the paper's three models after surgery (public HF configs; embeddings untied by convert).
PRESETS = {
    "tinyllama-484": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_attention_heads=32,
        num_key_value_heads=4,
        n_prelude=4,
        n_recurrent=8,
        n_coda=4,
    ),
    "llama32-464": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        n_prelude=4,
        n_recurrent=6,
        n_coda=4,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "olmo2-464": dict(
        vocab_size=100352,
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=16,
        num_key_value_heads=16,
        n_prelude=4,
        n_recurrent=6,
        n_coda=4,
        norm_position="post",
        qk_norm="full",
    ),
}


def model_shape(job: JobConfig, config_json: str | None = None, preset: str | None = None) -> RetroConfig:
    """The model's shape: a preset, a config.json given directly, or the one under model.path."""
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
        return RetroConfig(**PRESETS[preset])
    path = Path(config_json) if config_json else Path(job.model.path) / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"no model config at {path}: set model.path to a retro.convert directory, or pass "
            f"--model-config FILE.json or --preset {{{','.join(PRESETS)}}}"
        )
    try:
        fields = json.loads(path.read_text())
    except ValueError as error:
        raise ConfigError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(fields, dict) or fields.get("model_type") != "retro":
        found = fields.get("model_type") if isinstance(fields, dict) else type(fields).__name__
        raise ConfigError(
            f"{path} has model_type {found!r}, not 'retro': give the config.json of a retro.convert or retro.export "
            "directory, or --preset"
        )
    return RetroConfig(**{k: v for k, v in fields.items() if k not in ("architectures", "model_type")})
