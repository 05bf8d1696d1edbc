"""The recipes' data: the procedurally generated world (built in) and loaders of real datasets by path."""

from .folders import CocoDetection, DepthFolder, ImageFolder, MaskFolder, detection_collate
from .world import COLOURS, SHAPES, TASKS, TEXTURES, Concept, Domain, Source, SourceDataset, World

__all__ = ["COLOURS", "SHAPES", "TASKS", "TEXTURES", "Concept", "Domain", "Source", "SourceDataset", "World",
           "CocoDetection", "DepthFolder", "ImageFolder", "MaskFolder", "detection_collate"]
