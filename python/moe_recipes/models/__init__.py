"""The recipes' models: the Swin-style backbone with MoE MLPs, the ResNet-style (lego) backbone, the task heads."""

from ._common import BackboneOutput, parameter_count
from .heads import FPN, ClassificationHead, DenseHead, DetectionHead, batched_nms, box_iou, nms
from .resnet import ResNet, ResNetConfig
from .transformer import PRESETS, HierarchicalTransformer, TransformerConfig

__all__ = ["PRESETS", "BackboneOutput", "HierarchicalTransformer", "TransformerConfig", "parameter_count",
           "ResNet", "ResNetConfig", "FPN", "ClassificationHead", "DenseHead", "DetectionHead", "batched_nms", "box_iou", "nms"]
