"""The cost planner behind `python -m retro.plan`: FLOPs, memory, communication, and its check."""
