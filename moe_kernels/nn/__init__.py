"""Modules composed from the ops: no kernel code here."""

from .lego import (GumbelTemperature, LegoLayer, LegoSequential, extract_path, lego_layers,
                   selected_paths, selection_probs, set_task, set_temperature)
from .losses import MutualInformationLoss
from .moe import MoE, MoEOutput
from .usage import ExpertUsage
from .reconcile import (ExpandedBackbone, GammaA, GammaB, GammaC, GammaChain, Link,
                        ReconciliationLayer, TinyResNet, reconciliation_links)

__all__ = [
    "ExpandedBackbone", "ExpertUsage", "GammaA", "GammaB", "GammaC", "GammaChain", "GumbelTemperature", "LegoLayer",
    "LegoSequential", "Link", "MoE", "MoEOutput", "MutualInformationLoss", "ReconciliationLayer",
    "TinyResNet", "extract_path", "lego_layers", "reconciliation_links", "selected_paths",
    "selection_probs", "set_task", "set_temperature",
]
