"""Real data by path (moe_recipes.data.folders), on tiny files written here: ImageFolder, COCO JSON with
polygons, RLE and crowd annotations, PNG label maps with an ignore value, 16-bit depth PNGs."""

import json

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (bash scripts/setup.sh test)")
mask_utils = pytest.importorskip("pycocotools.mask", reason="pycocotools is not installed (bash scripts/setup.sh test)")

from moe_recipes.data import (CocoDetection, DepthFolder, ImageFolder, MaskFolder,  # noqa: E402
                              detection_collate)


def _rgb(path, h, w, value):
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[...] = value
    Image.fromarray(arr).save(path)
    return arr


def test_image_folder_labels_by_sorted_class_name(tmp_path):
    for cls, n in (("zebra", 2), ("ant", 1), ("moth", 3)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            _rgb(tmp_path / cls / f"{i}.png", 5, 7, (10 * i, 100, 200))
    (tmp_path / "moth" / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path, source="toy")
    assert ds.classes == ("ant", "moth", "zebra") and len(ds) == 6
    labels = [ds[i]["label"] for i in range(6)]
    assert labels == [0, 1, 1, 1, 2, 2]
    s = ds[2]
    assert s["source"] == "toy" and s["image"].shape == (3, 5, 7) and s["image"].dtype == torch.float32
    assert torch.allclose(s["image"][:, 0, 0], torch.tensor([10, 100, 200]) / 255.0)
    with pytest.raises(IndexError, match="out of range"):
        ds[6]


def test_image_folder_errors_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="argument 'root'"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path)


def _coco(tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    _rgb(imgs / "a.png", 20, 30, (0, 0, 0))
    _rgb(imgs / "b.png", 20, 30, (255, 255, 255))
    rle = np.zeros((20, 30), dtype=np.uint8, order="F")
    rle[2:6, 10:20] = 1
    encoded = mask_utils.encode(rle)
    encoded["counts"] = encoded["counts"].decode()
    data = {
        "images": [{"id": 7, "file_name": "b.png", "height": 20, "width": 30},
                   {"id": 3, "file_name": "a.png", "height": 20, "width": 30}],
        "categories": [{"id": 90, "name": "kite"}, {"id": 1, "name": "person"}],
        "annotations": [
            # a polygon: the rectangle x 4..12, y 5..15
            {"id": 1, "image_id": 3, "category_id": 90, "bbox": [4, 5, 8, 10], "iscrowd": 0,
             "segmentation": [[4, 5, 12, 5, 12, 15, 4, 15]], "area": 80},
            {"id": 2, "image_id": 3, "category_id": 1, "bbox": [10, 2, 10, 4], "iscrowd": 0,
             "segmentation": encoded, "area": 40},
            {"id": 3, "image_id": 3, "category_id": 1, "bbox": [0, 0, 30, 20], "iscrowd": 1,
             "segmentation": encoded, "area": 600},  # crowd: not a target
            {"id": 4, "image_id": 3, "category_id": 1, "bbox": [1, 1, 0, 3], "iscrowd": 0,
             "segmentation": [[1, 1, 1, 4, 1, 1]], "area": 0},  # zero width: left out
        ],
    }
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(data))
    return imgs, ann, rle


def test_coco_detection_targets_and_masks(tmp_path):
    imgs, ann, rle = _coco(tmp_path)
    ds = CocoDetection(imgs, ann, masks=True)
    assert ds.category_ids == (1, 90) and ds.classes == ("person", "kite") and len(ds) == 2
    s = ds[0]  # image id 3 (images are sorted by id)
    assert s["image_id"] == 3 and s["source"] == "instances"
    assert torch.equal(s["labels"], torch.tensor([1, 0]))
    assert torch.equal(s["boxes"], torch.tensor([[4.0, 5.0, 12.0, 15.0], [10.0, 2.0, 20.0, 6.0]]))
    m = s["masks"]
    assert m.dtype == torch.bool and m.shape == (2, 20, 30)
    assert torch.equal(m[1], torch.from_numpy(rle.astype(bool)))  # RLE decoded exactly
    ys, xs = torch.nonzero(m[0], as_tuple=True)  # the polygon's pixels lie inside its box
    assert int(xs.min()) >= 4 and int(xs.max()) < 13 and int(ys.min()) >= 5 and int(ys.max()) < 16
    empty = ds[1]  # image id 7 has no annotations
    assert empty["boxes"].shape == (0, 4) and empty["labels"].numel() == 0 and empty["masks"].shape == (0, 20, 30)
    batch = detection_collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 20, 30) and len(batch["boxes"]) == 2


def test_coco_detection_rejects_inconsistent_files(tmp_path):
    imgs, ann, _ = _coco(tmp_path)
    data = json.loads(ann.read_text())
    data["annotations"][0]["category_id"] = 5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="category 5"):
        CocoDetection(imgs, bad)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="lacks the COCO keys"):
        CocoDetection(imgs, bad)
    with pytest.raises(FileNotFoundError, match="argument 'annotations'"):
        CocoDetection(imgs, tmp_path / "none.json")


def test_mask_folder_pairs_by_stem_and_maps_ignore(tmp_path):
    imgs, masks = tmp_path / "img", tmp_path / "lab"
    imgs.mkdir()
    masks.mkdir()
    for name in ("x", "y"):
        _rgb(imgs / f"{name}.jpg", 4, 6, (50, 60, 70))
    lab = np.array([[0, 1, 2, 255, 3, 0]] * 4, dtype=np.uint8)
    Image.fromarray(lab).save(masks / "x.png")
    Image.fromarray(np.zeros((4, 6), dtype=np.uint8)).save(masks / "y.png")
    ds = MaskFolder(imgs, masks, num_classes=4)
    s = ds[0]
    assert s["mask"].dtype == torch.int64
    assert torch.equal(s["mask"][0], torch.tensor([0, 1, 2, -1, 3, 0]))
    with pytest.raises(ValueError, match="value 3 is neither a class in \\[0, 3\\)"):
        MaskFolder(imgs, masks, num_classes=3)[0]
    (masks / "y.png").unlink()
    with pytest.raises(ValueError, match="1 images have no PNG"):
        MaskFolder(imgs, masks)
    Image.fromarray(np.zeros((4, 5), dtype=np.uint8)).save(masks / "y.png")
    with pytest.raises(ValueError, match="differs from its image"):
        MaskFolder(imgs, masks)[1]


def test_depth_folder_reads_16_bit_values_with_scale_and_validity(tmp_path):
    imgs, depths = tmp_path / "img", tmp_path / "depth"
    imgs.mkdir()
    depths.mkdir()
    _rgb(imgs / "0001.png", 3, 4, (1, 2, 3))
    raw = np.array([[0, 1000, 2500, 65535]] * 3, dtype=np.uint16)
    Image.fromarray(raw).save(depths / "0001.png")
    s = DepthFolder(imgs, depths, scale=1000.0)[0]
    assert s["depth"].dtype == torch.float32
    assert torch.equal(s["depth"][0], torch.tensor([0.0, 1.0, 2.5, 65.535], dtype=torch.float32))
    assert torch.equal(s["valid"][0], torch.tensor([False, True, True, True]))
    with pytest.raises(ValueError, match="argument 'scale'"):
        DepthFolder(imgs, depths, scale=0)
    Image.fromarray(np.zeros((3, 4, 3), dtype=np.uint8)).save(depths / "0001.png")
    with pytest.raises(ValueError, match="must have one channel"):
        DepthFolder(imgs, depths)[0]
