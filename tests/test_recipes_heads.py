"""The recipes' task heads (moe_recipes.models.heads): NMS and IoU by hand, FCOS target assignment,
a detector that learns to find the world's objects, the dense and classification heads' shapes."""

import pytest
import torch
import torch.nn as nn

from moe_recipes.data import World
from moe_recipes.models.heads import (FPN, ClassificationHead, DenseHead, DetectionHead, batched_nms, box_iou,
                                      nms)


def test_box_iou_by_hand():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[50 / 150, 0.0, 1.0]]))


def test_nms_keeps_the_best_of_each_overlapping_group_per_class():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    scores = torch.tensor([0.8, 0.9, 0.5, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]  # 1 suppresses 0 and 3 (IoU 0.82, 0.82)
    classes = torch.tensor([0, 0, 0, 1])  # box 3 is another class: it stays
    assert batched_nms(boxes, scores, classes, 0.5).tolist() == [1, 3, 2]
    tie = nms(torch.tensor([[0.0, 0, 4, 4], [0, 0, 4, 4]]), torch.tensor([0.5, 0.5]), 0.5)
    assert tie.tolist() == [0]  # equal scores: the lower index is kept
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).numel() == 0


def test_assignment_gives_each_location_the_smallest_box_of_its_level():
    head = DetectionHead(8, 3, strides=(4, 8), size_ranges=[(0, 8), (8, float("inf"))])
    points = torch.tensor([[6.0, 6.0], [6.0, 6.0], [30.0, 30.0], [2.0, 2.0]])
    level = torch.tensor([0, 1, 1, 0])
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [4.0, 4.0, 10.0, 10.0]])  # big (class 2), small (class 1)
    labels = torch.tensor([2, 1])
    cls, box = head.assign(points, level, boxes, labels)
    # (6, 6) on level 0: inside both; max distances 34 (big, out of range [0, 8)) and 4 (small): small.
    # (6, 6) on level 1: only the big box is in range [8, inf). (30, 30) on level 1: big.
    # (2, 2) on level 0: inside the big box only, max distance 38, out of level 0's range: background.
    assert cls.tolist() == [1, 2, 2, -1]
    assert torch.equal(box[0], boxes[1]) and torch.equal(box[1], boxes[0])
    empty_cls, _ = head.assign(points, level, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert empty_cls.tolist() == [-1] * 4


class _ConvBackbone(nn.Module):
    """A small, fast conv net with stride-8 and stride-16 outputs (for a quick training check)."""

    def __init__(self):
        super().__init__()
        self.s8 = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU())
        self.s16 = nn.Sequential(nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU())

    def forward(self, x):
        a = self.s8(x)
        return [a, self.s16(a)]


def test_detector_learns_the_boxes_of_a_few_images():
    """Loss, assignment and decoding agree: trained on 2 images of the world, the decoded detections
    reach mAP50 = 100 on them (pycocotools)."""
    pytest.importorskip("pycocotools", reason="pycocotools is not installed (bash scripts/setup.sh test)")
    from moe_recipes.metrics import CocoEvaluator

    torch.manual_seed(0)
    w = World.default(0)
    samples = [w.sample("det/small", i) for i in range(2)]
    x = torch.stack([s["image"] for s in samples])
    net = nn.ModuleDict({"bb": _ConvBackbone(), "fpn": FPN([32, 64], 32),
                         "head": DetectionHead(32, 3, strides=(8, 16))})
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        out = net["head"](net["fpn"](net["bb"](x)))
        loss = sum(net["head"].loss(out, samples).values())
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.3 * first
    with torch.no_grad():
        dets = net["head"].decode(net["head"](net["fpn"](net["bb"](x))), (64, 64))
    ev = CocoEvaluator(3)
    for s, d in zip(samples, dets):
        assert d["boxes"].shape[1] == 4 and d["scores"].shape == d["labels"].shape
        assert bool((d["boxes"] >= 0).all() and (d["boxes"] <= 64).all())
        ev.add((64, 64), s, d)
    assert ev.compute()["mAP50"] == pytest.approx(100.0)


def test_dense_and_classification_heads_shapes():
    feats = [torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4), torch.randn(2, 64, 2, 2)]
    levels = FPN([16, 32, 64], 24)(feats)
    assert [tuple(f.shape) for f in levels] == [(2, 24, 8, 8), (2, 24, 4, 4), (2, 24, 2, 2)]
    seg = DenseHead(24, 5, levels=3)(levels, (30, 34))
    assert seg.shape == (2, 5, 30, 34)
    depth = DenseHead(24, 1, positive=True, levels=3)(levels, (32, 32))
    assert depth.shape == (2, 1, 32, 32) and bool((depth > 0).all())
    assert ClassificationHead(64, 7)(feats).shape == (2, 7)
    with pytest.raises(ValueError, match="expected 3 levels"):
        DenseHead(24, 5, levels=3)(levels[:2], (8, 8))
    with pytest.raises(ValueError, match="one range per stride"):
        DetectionHead(8, 2, strides=(8, 16), size_ranges=[(0, 1)])
