"""The recipes' metrics (moe_recipes.metrics) against hand-computed values; COCO AP through pycocotools."""

import math

import pytest
import torch

from moe_recipes.metrics import (ConfusionMatrix, depth_metrics, mean_per_class_accuracy, plain_mean,
                                 task_type_mean, topk_accuracy)


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    labels = torch.tensor([1, 2, 0, 1])  # top-1 right: sample 0; top-2: 0, 1 and 3; top-3: all
    acc = topk_accuracy(logits, labels, ks=(1, 2, 5))
    assert acc == {"top1": 25.0, "top2": 75.0, "top5": 100.0}
    with pytest.raises(ValueError, match="'logits'"):
        topk_accuracy(logits, labels[:3])


def test_mean_per_class_accuracy_weights_classes_equally():
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    pred = torch.tensor([0, 0, 0, 0, 0, 2, 1])  # class accuracies 1, 0, 1/2; plain accuracy 5/7
    assert mean_per_class_accuracy(pred, labels, 4) == pytest.approx(100.0 * 1.5 / 3)


def test_confusion_matrix_miou_macc_aacc():
    cm = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 1, 1], [2, 2, -1, -1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])  # the -1 pixels are ignored whatever is predicted
    cm.update(pred[:1], target[:1])
    cm.update(pred[1:], target[1:])
    # class 0: tp 1, gt 2, pred 2 -> IoU 1/3, acc 1/2; class 1: tp 2, gt 2, pred 3 -> 2/3, 1;
    # class 2: tp 1, gt 2, pred 1 -> 1/2, 1/2
    out = cm.compute()
    assert out["mIoU"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert out["mAcc"] == pytest.approx(100 * (1 / 2 + 1 + 1 / 2) / 3)
    assert out["aAcc"] == pytest.approx(100 * 4 / 6)
    with pytest.raises(ValueError, match="outside \\[0, 3\\)"):
        cm.update(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match="no labelled pixel"):
        ConfusionMatrix(2).compute()


def test_depth_metrics():
    t = torch.tensor([1.0, 2.0, 4.0, 0.0])  # the 0 is not a measurement
    p = torch.tensor([1.0, 3.0, 2.0, 9.0])
    out = depth_metrics(p, t)
    assert out["RMSE"] == pytest.approx(math.sqrt((0 + 1 + 4) / 3))
    assert out["AbsRel"] == pytest.approx((0 + 0.5 + 0.5) / 3)
    assert out["SqRel"] == pytest.approx((0 + 0.5 + 1.0) / 3)
    assert out["RMSElog"] == pytest.approx(math.sqrt((0 + math.log(1.5) ** 2 + math.log(2) ** 2) / 3))
    # ratios 1, 1.5, 2: under 1.25 one, under 1.5625 one, under 1.953 still one... 1.5 < 1.5625: two
    assert (out["delta1"], out["delta2"], out["delta3"]) == pytest.approx((100 / 3, 200 / 3, 200 / 3))
    with pytest.raises(ValueError, match="must be > 0"):
        depth_metrics(torch.zeros(4), t)


def test_aggregates_follow_the_papers():
    # MTHL Tab. 2, Swin-B MTHL: (mean of 5 cls, det, mean of 2 seg) / 3 = 80.4 (RECIPES.md 5.4)
    cls = {f"c{i}": ("cls", v) for i, v in enumerate([60.0, 80.0, 90.0, 85.0, 92.2])}
    res = dict(cls, det=("det", 79.1), pascal=("seg", 85.0), city=("seg", 76.2))
    assert task_type_mean(res) == pytest.approx((81.44 + 79.1 + 80.6) / 3)
    assert plain_mean([1.0, 2.0, 6.0]) == 3.0


pytest.importorskip("pycocotools", reason="pycocotools is not installed (bash scripts/setup.sh test)")
from moe_recipes.metrics import CocoEvaluator  # noqa: E402


def _box_mask(h, w, box):
    m = torch.zeros(h, w, dtype=torch.bool)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = True
    return m


def test_coco_ap_perfect_shifted_and_missing_detections():
    gt = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 30.0], [40.0, 5.0, 60.0, 25.0]]), "labels": torch.tensor([0, 1])}
    perfect = CocoEvaluator(2)
    perfect.add((64, 64), gt, dict(gt, scores=torch.tensor([0.9, 0.8])))
    assert perfect.compute() == pytest.approx({"mAP": 100.0, "mAP50": 100.0, "mAP75": 100.0})

    # each box shifted by 4 px: IoU = 16*20 / (2*400 - 320) = 2/3 -> right at 0.5 .. 0.65, not at 0.75
    shifted = {"boxes": gt["boxes"] + torch.tensor([4.0, 0.0, 4.0, 0.0]), "labels": gt["labels"],
               "scores": torch.tensor([0.9, 0.8])}
    ev = CocoEvaluator(2)
    ev.add((64, 64), gt, shifted)
    out = ev.compute()
    assert out["mAP50"] == pytest.approx(100.0) and out["mAP75"] == pytest.approx(0.0)
    assert out["mAP"] == pytest.approx(100.0 * 4 / 10)  # 4 of the 10 thresholds 0.50:0.05:0.95

    none = CocoEvaluator(2)
    none.add((64, 64), gt, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                            "scores": torch.zeros(0)})
    assert none.compute() == {"mAP": 0.0, "mAP50": 0.0, "mAP75": 0.0}
    with pytest.raises(ValueError, match="no ground-truth"):
        CocoEvaluator(2).compute()
    with pytest.raises(ValueError, match="iou_type"):
        CocoEvaluator(2, "keypoints")


def test_coco_mask_ap_uses_the_masks_not_the_boxes():
    box = (8, 8, 24, 24)
    gt = {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([0]),
          "masks": _box_mask(32, 32, box)[None]}
    half = _box_mask(32, 32, (8, 8, 18, 24))  # the same box, 10/16 of the mask: mask IoU 0.625
    ev = CocoEvaluator(1, "segm")
    ev.add((32, 32), gt, {"boxes": gt["boxes"], "labels": gt["labels"], "masks": half[None],
                          "scores": torch.tensor([0.9])})
    segm = ev.compute()
    ev_box = CocoEvaluator(1, "bbox")
    ev_box.add((32, 32), gt, {"boxes": gt["boxes"], "labels": gt["labels"], "scores": torch.tensor([0.9])})
    assert ev_box.compute()["mAP75"] == pytest.approx(100.0)
    assert segm["mAP75"] == pytest.approx(0.0) and segm["mAP50"] == pytest.approx(100.0)
