"""The recipes' models: backbones (so far the Swin-style hierarchical transformer with MoE MLPs)."""

from .transformer import PRESETS, BackboneOutput, HierarchicalTransformer, TransformerConfig, parameter_count

__all__ = ["PRESETS", "BackboneOutput", "HierarchicalTransformer", "TransformerConfig", "parameter_count"]
