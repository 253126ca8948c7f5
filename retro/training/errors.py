"""Errors the commands turn into one clear line and exit code 2 (no traceback)."""


class ConfigError(ValueError):
    """A setting or input that cannot work, named by its key or path."""


class TrainingError(RuntimeError):
    """A run that cannot continue, with what exists on disk."""


class SharedVerdict(ConfigError):
    """Rank 0's ConfigError, received by another rank: rank 0 prints it, the others exit 2 silently, so a
    refused run shows its one line once, not once per rank."""
