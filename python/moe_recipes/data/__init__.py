"""The recipes' data: the procedurally generated world (built in) and, later, loaders of real data by path."""

from .world import COLOURS, SHAPES, TASKS, TEXTURES, Concept, Domain, Source, SourceDataset, World

__all__ = ["COLOURS", "SHAPES", "TASKS", "TEXTURES", "Concept", "Domain", "Source", "SourceDataset", "World"]
