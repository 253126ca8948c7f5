"""retro: retrofit depth recurrence into pretrained language models."""
