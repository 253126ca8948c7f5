"""Optimizers: Muon (FSDP2-aware, with AdamW groups) and the trainer's param-group builder."""

from retro.optim.build import build_optimizer, group_parameters
from retro.optim.muon import Muon, update_scale

__all__ = ["Muon", "build_optimizer", "group_parameters", "update_scale"]
