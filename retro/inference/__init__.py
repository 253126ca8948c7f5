"""Inference: KV-cached generation across recurrences, checkpoint loading, evaluation tasks and scorers, the
token-weighted validation loss, the lm-eval adapter, plots."""
