"""Training machinery: the Trainer, its job config, recurrence sampling, LR schedule, checkpoints, metrics."""
