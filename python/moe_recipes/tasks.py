"""One task head per source: its head modules, how its samples batch, its loss and its evaluation.

Every recipe trains one shared backbone and a head per source (RECIPES.md 0.1: "each source has its
own task, label space and head; losses only on the labels an image has"). A :class:`TaskHead` owns
what is specific to its task type:

* ``collate(samples)`` -> a batch dict (``images`` [B, 3, S, S] and the targets);
* ``loss(features, batch)`` -> ``{"loss": total, <parts>...}`` from the backbone's feature maps;
* ``evaluator()`` -> an object with ``update(features, batch)`` and ``compute()`` -> metrics (percent,
  except depth errors), and ``primary``, the one metric a table reports for the task type.

The heads (RECIPES.md 5.2, scaled down): cls = global pool + linear (``ClassificationHead``); det = FPN +
an FCOS-style anchor-free dense detector with decoding and NMS, scored by pycocotools (mAP); seg =
FPN + a semantic-FPN dense head, mIoU over the background and the source's classes (the world's
background is a real, labelled class, as VOC's); depth = FPN + a positive dense head trained with the
scale-invariant log loss (Eigen et al. 2014, lambda 0.85 as BTS), scored by RMSE/AbsRel/delta.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .metrics import CocoEvaluator, ConfusionMatrix, depth_metrics, mean_per_class_accuracy, topk_accuracy
from .models.heads import FPN, ClassificationHead, DenseHead, DetectionHead

#: the metric each task type reports in a table (MTHL Tab. 2: top-1, mAP, mIoU; depth: RMSE, lower is better)
PRIMARY = {"cls": "top1", "det": "mAP", "seg": "mIoU", "depth": "RMSE"}
#: whether larger is better for the primary metric
HIGHER_IS_BETTER = {"cls": True, "det": True, "seg": True, "depth": False}


def _images(samples: Sequence[dict]) -> torch.Tensor:
    sizes = {tuple(s["image"].shape) for s in samples}
    if len(sizes) != 1:
        raise ValueError(f"collate: a batch must have one image size, got {sorted(sizes)}")
    return torch.stack([s["image"] for s in samples])


class TaskHead(nn.Module):
    """Base class (see the module doc). ``widths``: the backbone's channels per stage; ``strides``:
    the stages' strides in input pixels."""

    task: str = ""

    def __init__(self, num_classes: int, widths: Sequence[int], strides: Sequence[int]):
        super().__init__()
        self.num_classes = int(num_classes)
        self.widths, self.strides = tuple(widths), tuple(strides)

    @property
    def primary(self) -> str:
        return PRIMARY[self.task]

    def collate(self, samples: Sequence[dict]) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    def loss(self, features: Sequence[torch.Tensor], batch: dict) -> Dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def evaluator(self):  # pragma: no cover - overridden
        raise NotImplementedError


class ClsTask(TaskHead):
    task = "cls"

    def __init__(self, num_classes, widths, strides, label_smoothing: float = 0.0):
        super().__init__(num_classes, widths, strides)
        self.head = ClassificationHead(self.widths[-1], self.num_classes)
        self.label_smoothing = float(label_smoothing)

    def collate(self, samples):
        return {"images": _images(samples), "labels": torch.tensor([int(s["label"]) for s in samples])}

    def forward(self, features):
        return self.head(features)

    def loss(self, features, batch):
        ce = F.cross_entropy(self(features), batch["labels"], label_smoothing=self.label_smoothing)
        return {"loss": ce, "ce": ce}

    def evaluator(self):
        return _ClsEval(self)


class _ClsEval:
    def __init__(self, task: ClsTask):
        self.task, self.logits, self.labels = task, [], []

    @torch.no_grad()
    def update(self, features, batch):
        self.logits.append(self.task(features).float())
        self.labels.append(batch["labels"])

    def compute(self) -> Dict[str, float]:
        logits, labels = torch.cat(self.logits), torch.cat(self.labels)
        out = topk_accuracy(logits, labels, (1, 5))
        out["mean_per_class"] = mean_per_class_accuracy(logits.argmax(1), labels, self.task.num_classes)
        return out


class DetTask(TaskHead):
    """FPN over the backbone's stages + :class:`DetectionHead`; AP by pycocotools (boxes, and masks of
    the boxes' visible pixels are not predicted: box AP only)."""

    task = "det"

    def __init__(self, num_classes, widths, strides, channels: int = 32):
        super().__init__(num_classes, widths, strides)
        self.fpn = FPN(self.widths, channels)
        self.head = DetectionHead(channels, self.num_classes, self.strides)

    def collate(self, samples):
        return {"images": _images(samples),
                "targets": [{"boxes": s["boxes"], "labels": s["labels"]} for s in samples]}

    def forward(self, features):
        return self.head(self.fpn(features))

    def loss(self, features, batch):
        parts = self.head.loss(self(features), batch["targets"])
        return {"loss": parts["cls"] + parts["box"] + parts["centerness"], **parts}

    def evaluator(self):
        return _DetEval(self)


class _DetEval:
    def __init__(self, task: DetTask):
        self.task, self.coco = task, CocoEvaluator(task.num_classes, "bbox")

    @torch.no_grad()
    def update(self, features, batch):
        H, W = batch["images"].shape[-2:]
        preds = self.task.head.decode(self.task(features), (H, W))
        for t, p in zip(batch["targets"], preds):
            self.coco.add((H, W), t, p)

    def compute(self):
        return self.coco.compute()


class SegTask(TaskHead):
    """FPN + :class:`DenseHead` with ``num_classes + 1`` outputs (0 = background); pixels labelled -1
    (a real dataset's ignore label) are left out of the loss and the metrics."""

    task = "seg"

    def __init__(self, num_classes, widths, strides, channels: int = 32):
        super().__init__(num_classes, widths, strides)
        self.fpn = FPN(self.widths, channels)
        self.head = DenseHead(channels, self.num_classes + 1, levels=len(self.widths))

    def collate(self, samples):
        return {"images": _images(samples), "mask": torch.stack([s["mask"] for s in samples])}

    def forward(self, features, image_size):
        return self.head(self.fpn(features), image_size)

    def loss(self, features, batch):
        logits = self(features, batch["images"].shape[-2:])
        ce = F.cross_entropy(logits, batch["mask"], ignore_index=-1)
        return {"loss": ce, "ce": ce}

    def evaluator(self):
        return _SegEval(self)


class _SegEval:
    def __init__(self, task: SegTask):
        self.task, self.cm = task, ConfusionMatrix(task.num_classes + 1, ignore_index=-1)

    @torch.no_grad()
    def update(self, features, batch):
        self.cm.update(self.task(features, batch["images"].shape[-2:]).argmax(1), batch["mask"])

    def compute(self):
        return self.cm.compute()


class DepthTask(TaskHead):
    """FPN + a positive :class:`DenseHead`; the scale-invariant log loss (lambda 0.85, x10 as BTS)."""

    task = "depth"

    def __init__(self, num_classes, widths, strides, channels: int = 32, silog_lambda: float = 0.85):
        super().__init__(num_classes, widths, strides)
        self.fpn = FPN(self.widths, channels)
        self.head = DenseHead(channels, 1, positive=True, levels=len(self.widths))
        self.silog_lambda = float(silog_lambda)

    def collate(self, samples):
        return {"images": _images(samples), "depth": torch.stack([s["depth"] for s in samples])}

    def forward(self, features, image_size):
        return self.head(self.fpn(features), image_size).squeeze(1)

    def loss(self, features, batch):
        pred = self(features, batch["images"].shape[-2:])
        valid = batch["depth"] > 0
        d = torch.log(pred[valid]) - torch.log(batch["depth"][valid])
        silog = 10.0 * torch.sqrt((d ** 2).mean() - self.silog_lambda * d.mean() ** 2 + 1e-8)
        return {"loss": silog, "silog": silog}

    def evaluator(self):
        return _DepthEval(self)


class _DepthEval:
    def __init__(self, task: DepthTask):
        self.task, self.preds, self.targets = task, [], []

    @torch.no_grad()
    def update(self, features, batch):
        self.preds.append(self.task(features, batch["images"].shape[-2:]).float())
        self.targets.append(batch["depth"])

    def compute(self):
        return depth_metrics(torch.cat(self.preds), torch.cat(self.targets))


TASK_HEADS = {"cls": ClsTask, "det": DetTask, "seg": SegTask, "depth": DepthTask}


def make_task_head(task: str, num_classes: int, widths: Sequence[int], strides: Sequence[int], **options) -> TaskHead:
    """The head of a ``task`` (``cls``, ``det``, ``seg`` or ``depth``) for a backbone of ``widths`` and ``strides``."""
    if task not in TASK_HEADS:
        raise ValueError(f"make_task_head: argument 'task' must be one of {sorted(TASK_HEADS)}, got {task!r}")
    return TASK_HEADS[task](num_classes, widths, strides, **options)


@torch.no_grad()
def feature_strides(backbone: nn.Module, image_size: int = 64, task_id=None) -> List[int]:
    """The stride in input pixels of each stage of ``backbone`` (one dry forward of a zero image, with
    ``task_id`` as the backbone's second argument unless None)."""
    was = backbone.training
    backbone.eval()
    try:
        p = next(backbone.parameters())
        x = torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)
        feats = (backbone(x) if task_id is None else backbone(x, task_id)).features
    finally:
        backbone.train(was)
    return [image_size // f.shape[-1] for f in feats]


__all__ = ["PRIMARY", "HIGHER_IS_BETTER", "TaskHead", "ClsTask", "DetTask", "SegTask", "DepthTask", "TASK_HEADS",
           "make_task_head", "feature_strides"]
