"""Task heads over a backbone's feature pyramid: classification, an FPN neck, a dense anchor-free
detector (FCOS-style) with decoding and NMS, semantic segmentation and depth.

Every head takes the backbone's list of stage features (``[B, C_i, H_i, W_i]``, strides doubling)
and is never shared between tasks (each dataset keeps its own, RECIPES.md 5.2).

* :class:`ClassificationHead`: global average pool of the last stage + one linear layer.
* :class:`FPN`: lateral 1x1 convs, top-down sum, 3x3 output convs (Lin et al., "Feature Pyramid
  Networks for Object Detection", arXiv:1612.03144).
* :class:`DetectionHead`: per FPN level and location, class logits, a distance to each box side and
  a centerness (Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection",
  arXiv:1904.01355); :meth:`DetectionHead.loss` (focal + GIoU + centerness BCE, each target assigned
  to the smallest box that contains the location within the level's size range) and
  :meth:`DetectionHead.decode` (scores, the top candidates, class-wise NMS).
* :class:`DenseHead`: the FPN levels upsampled to the finest, summed, two convs and a 1x1 predictor,
  upsampled to the input size: semantic segmentation logits (``out_channels`` = classes) or depth
  (``out_channels=1`` with ``positive=True``).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class ClassificationHead(nn.Module):
    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_channels)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.fc(self.norm(features[-1].mean(dim=(2, 3))))


class FPN(nn.Module):
    """``in_channels`` per used stage (the last ``len(in_channels)`` stages) -> as many maps of ``channels``."""

    def __init__(self, in_channels: Sequence[int], channels: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        feats = list(features)[-len(self.lateral):]
        laterals = [lat(f) for lat, f in zip(self.lateral, feats)]
        for i in range(len(laterals) - 2, -1, -1):
            laterals[i] = laterals[i] + F.interpolate(laterals[i + 1], size=laterals[i].shape[-2:], mode="nearest")
        return [out(lat) for out, lat in zip(self.output, laterals)]


def _groups(channels: int) -> int:
    """GroupNorm groups: up to 8, at least 2 channels each (a 1x1 map of one channel per group cannot
    be normalised)."""
    return max(1, min(8, channels // 2))


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix of boxes ``x0 y0 x1 y1``: [n, 4] x [m, 4] -> [n, m]."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: the indices kept, by decreasing score (ties: lower index first)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    boxes = boxes[order]
    iou = box_iou(boxes, boxes)
    keep = torch.ones(len(order), dtype=torch.bool)
    for i in range(len(order)):
        if keep[i]:
            later = torch.arange(len(order)) > i
            keep &= ~(later & (iou[i] > iou_threshold))
    return order[keep]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each class: boxes of different classes never suppress each other."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    shift = classes.to(boxes.dtype)[:, None] * (boxes.max() - boxes.min() + 1)  # classes far apart
    return nms(boxes + shift, scores, iou_threshold)


def _giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - generalised IoU of matching boxes [n, 4] (Rezatofighi et al., arXiv:1902.09630)."""
    area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    lt, rb = torch.maximum(pred[:, :2], target[:, :2]), torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area_p + area_t - inter
    hull = (torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2])).prod(-1)
    return 1 - (inter / union.clamp(min=1e-9) - (hull - union) / hull.clamp(min=1e-9))


class DetectionHead(nn.Module):
    """FCOS-style dense detector over FPN levels of strides ``strides`` (see the module doc).

    Args:
        channels: FPN width.
        num_classes: classes (contiguous ids 0 .. num_classes-1).
        strides: the FPN levels' strides in input pixels, finest first.
        size_ranges: per level, the range of max(l, t, r, b) a level is responsible for (default:
            ``[0, 4s_0], [4s_0, 8s_0], ...``, the last open): objects of each size go to one level.
        convs: shared 3x3 conv layers of each tower.
    """

    def __init__(self, channels: int, num_classes: int, strides: Sequence[int],
                 size_ranges: Optional[Sequence[Tuple[float, float]]] = None, convs: int = 2):
        super().__init__()
        self.num_classes, self.strides = int(num_classes), tuple(int(s) for s in strides)
        if size_ranges is None:
            s0 = self.strides[0]
            edges = [0.0] + [4.0 * s0 * 2 ** i for i in range(len(self.strides) - 1)] + [math.inf]
            size_ranges = list(zip(edges[:-1], edges[1:]))
        if len(size_ranges) != len(self.strides):
            raise ValueError(f"DetectionHead: argument 'size_ranges' must have one range per stride "
                             f"({len(self.strides)}), got {len(size_ranges)}")
        self.size_ranges = [tuple(map(float, r)) for r in size_ranges]

        def tower():
            layers = []
            for _ in range(convs):
                layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(_groups(channels), channels),
                           nn.ReLU()]
            return nn.Sequential(*layers)

        self.cls_tower, self.box_tower = tower(), tower()
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.box_pred = nn.Conv2d(channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(self.strides)))
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - 0.01) / 0.01))  # prior 0.01 (focal loss)

    def forward(self, levels: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Per location of every level, flattened finest level first: ``logits`` [B, N, classes],
        ``ltrb`` [B, N, 4] (distances in pixels, > 0), ``centerness`` [B, N] (logits), ``points`` [N, 2]
        (x, y in pixels) and ``level`` [N]."""
        if len(levels) != len(self.strides):
            raise ValueError(f"DetectionHead: expected {len(self.strides)} levels, got {len(levels)}")
        logits, ltrb, ctr, points, level = [], [], [], [], []
        for i, (f, s) in enumerate(zip(levels, self.strides)):
            B, _, H, W = f.shape
            c, b = self.cls_tower(f), self.box_tower(f)
            logits.append(self.cls_logits(c).flatten(2).transpose(1, 2))
            ltrb.append((F.softplus(self.box_pred(b) * self.scales[i]) * s).flatten(2).transpose(1, 2))
            ctr.append(self.centerness(b).flatten(2).squeeze(1))
            ys, xs = torch.meshgrid(torch.arange(H, device=f.device), torch.arange(W, device=f.device), indexing="ij")
            points.append(torch.stack([xs.flatten(), ys.flatten()], -1).to(f.dtype) * s + s // 2)
            level.append(torch.full((H * W,), i, dtype=torch.int64, device=f.device))
        return {"logits": torch.cat(logits, 1), "ltrb": torch.cat(ltrb, 1), "centerness": torch.cat(ctr, 1),
                "points": torch.cat(points), "level": torch.cat(level)}

    def assign(self, points: torch.Tensor, level: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor):
        """Targets of one image: per location the class (-1 = background) and the box it regresses.

        A location is positive for a box that contains it and whose largest distance to a side lies in
        the location's level range; of several, the smallest box wins."""
        n = points.shape[0]
        if boxes.numel() == 0:
            return torch.full((n,), -1, dtype=torch.int64), torch.zeros(n, 4)
        x, y = points[:, 0:1], points[:, 1:2]
        d = torch.stack([x - boxes[None, :, 0], y - boxes[None, :, 1], boxes[None, :, 2] - x, boxes[None, :, 3] - y], -1)
        inside = d.min(-1).values > 0
        ranges = torch.tensor(self.size_ranges, dtype=points.dtype)[level]
        m = d.max(-1).values
        ok = inside & (m >= ranges[:, 0:1]) & (m < ranges[:, 1:2])
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand(n, -1)
        area = torch.where(ok, area, torch.full_like(area, math.inf))
        best = area.argmin(1)
        pos = torch.isfinite(area.gather(1, best[:, None]).squeeze(1))
        cls = torch.where(pos, labels[best], torch.full_like(best, -1))
        return cls, boxes[best]

    def loss(self, out: Dict[str, torch.Tensor], targets: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Focal loss (alpha 0.25, gamma 2) over all locations, GIoU and centerness BCE over the positives;
        each normalised by the number of positives (at least 1)."""
        B = out["logits"].shape[0]
        if len(targets) != B:
            raise ValueError(f"DetectionHead.loss: {len(targets)} targets for a batch of {B}")
        cls_t, box_t = zip(*(self.assign(out["points"], out["level"], t["boxes"], t["labels"]) for t in targets))
        cls_t, box_t = torch.stack(cls_t), torch.stack(box_t)
        pos = cls_t >= 0
        npos = max(int(pos.sum()), 1)
        onehot = torch.zeros_like(out["logits"])
        onehot[pos] = F.one_hot(cls_t[pos], self.num_classes).to(onehot.dtype)
        focal = sigmoid_focal_loss(out["logits"], onehot).sum() / npos
        if not bool(pos.any()):
            zero = out["ltrb"].sum() * 0 + out["centerness"].sum() * 0
            return {"cls": focal, "box": zero, "centerness": zero}
        pts = out["points"][None].expand(B, -1, -1)[pos]
        ltrb = out["ltrb"][pos]
        pred = torch.cat([pts - ltrb[:, :2], pts + ltrb[:, 2:]], -1)
        tb = box_t[pos]
        d = torch.cat([pts - tb[:, :2], tb[:, 2:] - pts], -1)
        ctr_t = torch.sqrt((torch.minimum(d[:, 0], d[:, 2]) / torch.maximum(d[:, 0], d[:, 2]))
                           * (torch.minimum(d[:, 1], d[:, 3]) / torch.maximum(d[:, 1], d[:, 3])))
        return {"cls": focal, "box": _giou_loss(pred, tb).sum() / npos,
                "centerness": F.binary_cross_entropy_with_logits(out["centerness"][pos], ctr_t, reduction="sum") / npos}

    @torch.no_grad()
    def decode(self, out: Dict[str, torch.Tensor], image_size: Tuple[int, int], score_threshold: float = 0.05,
               top_k: int = 1000, iou_threshold: float = 0.6, max_detections: int = 100) -> List[Dict[str, torch.Tensor]]:
        """Detections per image: ``boxes`` [n, 4] (clipped to the image), ``scores`` [n] (sqrt of class
        probability times centerness), ``labels`` [n], after class-wise NMS, at most ``max_detections``."""
        H, W = image_size
        res = []
        for b in range(out["logits"].shape[0]):
            score = torch.sqrt(out["logits"][b].sigmoid() * out["centerness"][b].sigmoid()[:, None])
            flat = score.flatten()
            cand = torch.nonzero(flat > score_threshold).squeeze(1)
            if cand.numel() > top_k:
                cand = cand[flat[cand].topk(top_k).indices]
            loc, cls = cand // self.num_classes, cand % self.num_classes
            pts, ltrb = out["points"][loc], out["ltrb"][b][loc]
            boxes = torch.cat([pts - ltrb[:, :2], pts + ltrb[:, 2:]], -1)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
            keep = batched_nms(boxes, flat[cand], cls, iou_threshold)[:max_detections]
            res.append({"boxes": boxes[keep], "scores": flat[cand][keep], "labels": cls[keep]})
        return res


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                                        gamma: float = 2.0) -> torch.Tensor:
    """The focal loss of Lin et al. ("Focal Loss for Dense Object Detection", arXiv:1708.02002), per element."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    a_t = alpha * targets + (1 - alpha) * (1 - targets)
    return a_t * ce * (1 - p_t) ** gamma


class DenseHead(nn.Module):
    """Semantic-FPN-style dense prediction at the input resolution (segmentation logits or depth)."""

    def __init__(self, channels: int, out_channels: int, positive: bool = False, levels: int = 4):
        super().__init__()
        self.positive = positive
        self.reduce = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(levels))
        self.fuse = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(_groups(channels), channels),
                                  nn.ReLU(), nn.Conv2d(channels, out_channels, 1))

    def forward(self, levels: Sequence[torch.Tensor], image_size: Tuple[int, int]) -> torch.Tensor:
        if len(levels) != len(self.reduce):
            raise ValueError(f"DenseHead: expected {len(self.reduce)} levels, got {len(levels)}")
        size = levels[0].shape[-2:]
        x = sum(F.interpolate(r(f), size=size, mode="bilinear", align_corners=False) if f.shape[-2:] != size else r(f)
                for r, f in zip(self.reduce, levels))
        y = F.interpolate(self.fuse(x), size=tuple(image_size), mode="bilinear", align_corners=False)
        return F.softplus(y) + 1e-3 if self.positive else y


__all__ = ["ClassificationHead", "FPN", "DetectionHead", "DenseHead", "box_iou", "nms", "batched_nms",
           "sigmoid_focal_loss"]
