"""Inference: KV-cached generation across recurrences, evaluation tasks and scorers, plots."""
