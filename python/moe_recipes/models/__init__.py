"""The recipes' models: the Swin-style backbone with MoE MLPs and the task heads."""

from .heads import FPN, ClassificationHead, DenseHead, DetectionHead, batched_nms, box_iou, nms
from .transformer import PRESETS, BackboneOutput, HierarchicalTransformer, TransformerConfig, parameter_count

__all__ = ["PRESETS", "BackboneOutput", "HierarchicalTransformer", "TransformerConfig", "parameter_count",
           "FPN", "ClassificationHead", "DenseHead", "DetectionHead", "batched_nms", "box_iou", "nms"]
