"""The recipes' evaluation metrics and the papers' aggregates (RECIPES.md 6.2).

* classification: :func:`topk_accuracy` (top-1/top-5), :func:`mean_per_class_accuracy`;
* detection and instance segmentation: :class:`CocoEvaluator`, COCO mAP / mAP50 / mAP75 computed by
  ``pycocotools`` (the COCO reference implementation), for boxes (``bbox``) or masks (``segm``);
* semantic segmentation: :class:`ConfusionMatrix` -> mIoU / mAcc / aAcc;
* depth: :func:`depth_metrics` (RMSE, AbsRel, SqRel, RMSElog, δ < 1.25, 1.25², 1.25³);
* aggregates: :func:`task_type_mean` (MTHL Tab. 2's "Mean": the mean of the task types' means) and
  :func:`plain_mean` (MTHL Tab. 4's "Average", GPPF's UODB mean).

Every metric is in percent except the depth errors, which are in the depth's units.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Top-k accuracy in percent for each k (k larger than the class count counts every sample right)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"topk_accuracy: arguments 'logits' [N, C] and 'labels' [N] must match, got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("topk_accuracy: argument 'logits' has no samples")
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels.view(-1, 1)
    return {f"top{k}": 100.0 * hit[:, :min(k, kmax)].any(1).float().mean().item() for k in ks}


def mean_per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """The mean over the classes present in ``labels`` of each class's accuracy, in percent (Pets,
    Flowers, Caltech and Aircraft report this)."""
    if pred.shape != labels.shape or pred.dim() != 1:
        raise ValueError(f"mean_per_class_accuracy: arguments 'pred' and 'labels' must be [N] alike, got "
                         f"{tuple(pred.shape)} and {tuple(labels.shape)}")
    total = torch.bincount(labels, minlength=num_classes).double()
    right = torch.bincount(labels[pred == labels], minlength=num_classes).double()
    present = total > 0
    if not bool(present.any()):
        raise ValueError("mean_per_class_accuracy: argument 'labels' is empty")
    return 100.0 * (right[present] / total[present]).mean().item()


class ConfusionMatrix:
    """Semantic segmentation, accumulated over batches: mIoU, mAcc and aAcc in percent.

    ``update(pred, target)`` with integer maps of one shape; target pixels equal to ``ignore_index``
    (default -1, what :class:`moe_recipes.data.MaskFolder` gives unlabelled pixels) are left out.
    A class that appears in neither the predictions nor the targets has no IoU and is left out of
    the means (a class never labelled but predicted has IoU 0).
    """

    def __init__(self, num_classes: int, ignore_index: int = -1):
        if num_classes < 1:
            raise ValueError(f"ConfusionMatrix: argument 'num_classes' must be >= 1, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # [target, pred]

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"ConfusionMatrix.update: arguments 'pred' and 'target' must have one shape, got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}")
        keep = target != self.ignore_index
        t, p = target[keep].long(), pred[keep].long()
        bad = (t < 0) | (t >= self.num_classes) | (p < 0) | (p >= self.num_classes)
        if bool(bad.any()):
            raise ValueError(f"ConfusionMatrix.update: a class id outside [0, {self.num_classes}) "
                             f"(target {int(t[bad][0])}, pred {int(p[bad][0])})")
        self.matrix += torch.bincount(t * self.num_classes + p, minlength=self.num_classes ** 2).view(
            self.num_classes, self.num_classes)

    def compute(self) -> Dict[str, float]:
        m = self.matrix.double()
        tp, gt, pr = m.diag(), m.sum(1), m.sum(0)
        if gt.sum() == 0:
            raise ValueError("ConfusionMatrix.compute: no labelled pixel has been seen")
        union = gt + pr - tp
        iou = tp[union > 0] / union[union > 0]
        acc = tp[gt > 0] / gt[gt > 0]
        return {"mIoU": 100.0 * iou.mean().item(), "mAcc": 100.0 * acc.mean().item(),
                "aAcc": 100.0 * (tp.sum() / gt.sum()).item()}


def depth_metrics(pred: torch.Tensor, target: torch.Tensor, valid: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """The standard depth errors over the valid pixels (target > 0 unless ``valid`` is given).

    RMSE, AbsRel = mean |p - t| / t, SqRel = mean (p - t)² / t, RMSElog = RMSE of log p - log t, and
    δ1/δ2/δ3 = percent of pixels with max(p/t, t/p) < 1.25, 1.25², 1.25³. Predictions must be > 0.
    """
    if pred.shape != target.shape:
        raise ValueError(f"depth_metrics: arguments 'pred' and 'target' must have one shape, got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    v = (target > 0) if valid is None else (valid.bool() & (target > 0))
    p, t = pred[v].double(), target[v].double()
    if t.numel() == 0:
        raise ValueError("depth_metrics: no valid pixel")
    if bool((p <= 0).any()):
        raise ValueError("depth_metrics: argument 'pred' must be > 0 on the valid pixels (clamp it first)")
    ratio = torch.maximum(p / t, t / p)
    out = {"RMSE": math.sqrt(((p - t) ** 2).mean().item()), "AbsRel": ((p - t).abs() / t).mean().item(),
           "SqRel": (((p - t) ** 2) / t).mean().item(),
           "RMSElog": math.sqrt(((p.log() - t.log()) ** 2).mean().item())}
    for i in (1, 2, 3):
        out[f"delta{i}"] = 100.0 * (ratio < 1.25 ** i).double().mean().item()
    return out


class CocoEvaluator:
    """COCO mAP / mAP50 / mAP75 (percent) by ``pycocotools``, for boxes or instance masks.

    ``add(image_size, target, prediction)`` once per image: ``target`` has ``boxes`` (float [n, 4],
    x0 y0 x1 y1 in pixels), ``labels`` (int [n]) and, for ``segm``, ``masks`` (bool [n, H, W]);
    ``prediction`` has the same plus ``scores`` (float [m]). Labels are the contiguous class ids
    (categories 0 .. num_classes-1). ``compute()`` runs COCOeval quietly and returns its first three
    statistics; with no ground truth at all it raises, and with no prediction every AP is 0.
    """

    def __init__(self, num_classes: int, iou_type: str = "bbox"):
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"CocoEvaluator: argument 'iou_type' must be 'bbox' or 'segm', got {iou_type!r}")
        self.num_classes, self.iou_type = int(num_classes), iou_type
        self.images: list = []
        self.gts: list = []
        self.dts: list = []

    def add(self, image_size: Tuple[int, int], target: Mapping, prediction: Mapping) -> None:
        from pycocotools import mask as mask_utils

        h, w = int(image_size[0]), int(image_size[1])
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "height": h, "width": w})

        def records(d: Mapping, with_scores: bool):
            boxes = torch.as_tensor(d["boxes"], dtype=torch.float64).reshape(-1, 4)
            labels = torch.as_tensor(d["labels"]).reshape(-1)
            if labels.numel() != boxes.shape[0]:
                raise ValueError("CocoEvaluator.add: 'boxes' and 'labels' differ in length")
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(f"CocoEvaluator.add: a label outside [0, {self.num_classes})")
            scores = torch.as_tensor(d["scores"]).reshape(-1) if with_scores else None
            masks = d.get("masks") if self.iou_type == "segm" else None
            if self.iou_type == "segm" and masks is None:
                raise ValueError("CocoEvaluator.add: iou_type 'segm' needs 'masks'")
            out = []
            for j in range(labels.numel()):
                x0, y0, x1, y1 = boxes[j].tolist()
                r = {"image_id": image_id, "category_id": int(labels[j]) + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}
                if masks is not None:
                    m = np.asfortranarray(torch.as_tensor(masks[j]).numpy().astype(np.uint8))
                    rle = mask_utils.encode(m)
                    r["segmentation"], r["area"] = rle, float(mask_utils.area(rle))
                if scores is not None:
                    r["score"] = float(scores[j])
                out.append(r)
            return out

        self.gts.extend(records(target, False))
        self.dts.extend(records(prediction, True))

    def compute(self) -> Dict[str, float]:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        if not self.gts:
            raise ValueError("CocoEvaluator.compute: no ground-truth object has been added")
        if not self.dts:
            return {"mAP": 0.0, "mAP50": 0.0, "mAP75": 0.0}
        gts = [dict(g, id=i + 1) for i, g in enumerate(self.gts)]
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet):
            coco = COCO()
            coco.dataset = {"images": self.images, "annotations": gts,
                            "categories": [{"id": c + 1} for c in range(self.num_classes)]}
            coco.createIndex()
            dets = coco.loadRes([dict(d) for d in self.dts])
            ev = COCOeval(coco, dets, self.iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        s = ev.stats
        return {"mAP": 100.0 * max(float(s[0]), 0.0), "mAP50": 100.0 * max(float(s[1]), 0.0),
                "mAP75": 100.0 * max(float(s[2]), 0.0)}


def plain_mean(values: Iterable[float]) -> float:
    """The plain mean (MTHL Tab. 4's "Average", GPPF's UODB mean)."""
    vals = list(values)
    if not vals:
        raise ValueError("plain_mean: no values")
    return sum(vals) / len(vals)


def task_type_mean(results: Mapping[str, Tuple[str, float]]) -> float:
    """MTHL Tab. 2's "Mean": the mean over task types of each type's mean over its datasets.

    ``results`` maps a dataset to ``(task type, its metric)``; e.g. 5 classification, 1 detection and
    2 segmentation datasets give (mean of 5 + det + mean of 2) / 3 (RECIPES.md 5.4).
    """
    by_type: Dict[str, list] = {}
    for _name, (task, value) in results.items():
        by_type.setdefault(task, []).append(float(value))
    if not by_type:
        raise ValueError("task_type_mean: no results")
    return plain_mean(plain_mean(v) for v in by_type.values())
