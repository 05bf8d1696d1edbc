"""Modules composed from the ops: no kernel code here."""

from .losses import MutualInformationLoss
from .moe import MoE, MoEOutput

__all__ = ["MoE", "MoEOutput", "MutualInformationLoss"]
