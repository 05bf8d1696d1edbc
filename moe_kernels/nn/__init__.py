"""Modules composed from the ops: no kernel code here."""

from .backbone import ExpandedBackbone, Link, reconciliation_links
from .lego import (GumbelTemperature, LegoLayer, LegoSequential, extract_path, lego_layers,
                   selected_paths, selection_probs, set_task, set_temperature)
from .losses import MutualInformationLoss
from .moe import ExpertExecutor, LocalExperts, MoE, MoEOutput
from .reconcile import GammaA, GammaB, GammaC, GammaChain, ReconciliationLayer
from .usage import ExpertUsage

__all__ = [
    "ExpandedBackbone", "ExpertExecutor", "ExpertUsage", "GammaA", "GammaB", "GammaC", "GammaChain",
    "GumbelTemperature", "LegoLayer", "LegoSequential", "Link", "LocalExperts", "MoE", "MoEOutput",
    "MutualInformationLoss", "ReconciliationLayer", "extract_path", "lego_layers", "reconciliation_links",
    "selected_paths", "selection_probs", "set_task", "set_temperature",
]
