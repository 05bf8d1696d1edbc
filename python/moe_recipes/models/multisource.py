"""A shared backbone with one task head per source: what every recipe trains.

``MultiSourceModel(backbone, {source: (task, num_classes)}, task_ids={source: router/controller id})``:
``step_loss(source, batch)`` runs the backbone with the source's task id (an MoE backbone's router, a
lego backbone's controller; ``None`` for a plain backbone), the source's head loss, and adds the
backbone's auxiliary loss (the MoE layers' balancing / MI losses); ``evaluate(source, batches)`` runs
the head's evaluator. ``add_source`` adds a head for a new (downstream) source.
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import nn

from ..tasks import TaskHead, feature_strides, make_task_head


class MultiSourceModel(nn.Module):
    def __init__(self, backbone: nn.Module, sources: Mapping[str, Tuple[str, int]],
                 task_ids: Optional[Mapping[str, Optional[int]]] = None, image_size: int = 64,
                 head_options: Optional[Mapping[str, dict]] = None):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict()
        self.task_ids: Dict[str, Optional[int]] = {}
        self.tasks: Dict[str, str] = {}
        self.widths = tuple(backbone.widths)
        first = (task_ids or {}).get(next(iter(sources))) if sources else None
        self.strides = tuple(feature_strides(backbone, image_size, first))
        self.head_options = dict(head_options or {})
        for name, (task, num_classes) in sources.items():
            self.add_source(name, task, num_classes, None if task_ids is None else task_ids.get(name))

    def add_source(self, name: str, task: str, num_classes: int, task_id: Optional[int] = None) -> TaskHead:
        if name in self.heads:
            raise ValueError(f"MultiSourceModel.add_source: source {name!r} already has a head")
        head = make_task_head(task, num_classes, self.widths, self.strides, **self.head_options.get(task, {}))
        p = next(self.backbone.parameters())
        self.heads[name] = head.to(device=p.device)
        self.task_ids[name], self.tasks[name] = task_id, task
        return head

    def features(self, source: str, images: torch.Tensor):
        tid = self.task_ids[source]
        return self.backbone(images) if tid is None else self.backbone(images, tid)

    def step_loss(self, source: str, batch: dict) -> Dict[str, torch.Tensor]:
        out = self.features(source, batch["images"])
        parts = self.heads[source].loss(out.features, batch)
        parts["aux"] = out.aux_loss
        parts["loss"] = parts["loss"] + out.aux_loss
        return parts

    @torch.no_grad()
    def evaluate(self, source: str, batches: Iterable[dict]) -> Dict[str, float]:
        ev = self.heads[source].evaluator()
        for batch in batches:
            ev.update(self.features(source, batch["images"]).features, batch)
        return ev.compute()


__all__ = ["MultiSourceModel"]
