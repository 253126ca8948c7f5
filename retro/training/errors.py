"""Errors the commands turn into one clear line and exit code 2 (no traceback)."""


class ConfigError(ValueError):
    """A setting or input that cannot work, named by its key or path."""


class TrainingError(RuntimeError):
    """A run that cannot continue, with what exists on disk."""
