"""Real datasets by path, as ``Dataset`` objects whose samples look like the built-in world's.

Nothing is downloaded: each loader reads files already on disk, in the layout its task's datasets
commonly ship in.

* :class:`ImageFolder` (classification): ``root/<class name>/<image>``; classes in sorted order.
* :class:`CocoDetection` (detection, instance masks): a COCO-format JSON and its image folder;
  masks decoded with ``pycocotools`` (polygons and RLE alike).
* :class:`MaskFolder` (semantic segmentation): PNG label maps beside the images, one class index
  per pixel.
* :class:`DepthFolder` (depth): 16-bit PNG depth maps beside the images, ``depth = value / scale``,
  0 = no measurement.

Every sample is a dict with ``image`` (float32 [3, H, W] in [0, 1]), ``source``, ``index`` and the
task's labels under the keys :meth:`moe_recipes.data.world.World.sample` uses (``label``; ``boxes``,
``labels``, ``masks``; ``mask``; ``depth``), so a recipe trains on either without a branch.
Images keep their size; resizing and augmentation are the recipe's transforms.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow is a dependency of the recipes
        raise ImportError("moe_recipes' real-data loaders read images with Pillow: pip install pillow") from exc
    return Image


def read_image(path) -> torch.Tensor:
    """An image file as float32 [3, H, W] in [0, 1] (grey and RGBA converted to RGB)."""
    with _pil().open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)


def read_label_png(path) -> torch.Tensor:
    """A PNG of integer labels (8- or 16-bit, one channel, or a palette PNG's indices) as int64 [H, W]."""
    with _pil().open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise ValueError(f"{path}: a label or depth PNG must have one channel (mode L, P, I or I;16), "
                             f"got mode {im.mode}")
        arr = np.asarray(im)
    return torch.from_numpy(arr.astype(np.int64))


def _images(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _check_dir(path, what: str, op: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{op}: argument '{what}' must be a directory, got {str(path)!r}")
    return p


class _Base(torch.utils.data.Dataset):
    source: str

    def __init__(self, source: Optional[str], transform: Optional[Callable[[dict], dict]]):
        self.source = source
        self.transform = transform

    def _finish(self, out: dict) -> dict:
        return self.transform(out) if self.transform is not None else out

    def _check_index(self, index: int) -> int:
        if not (0 <= index < len(self)):
            raise IndexError(f"{type(self).__name__}: index {index} out of range [0, {len(self)})")
        return int(index)


class ImageFolder(_Base):
    """Classification images in ``root/<class name>/<image>``; labels are the sorted class names' order.

    Args:
        root: the folder of class folders.
        source: the name the samples carry (default: the folder's name).
        transform: applied to each sample dict.
    """

    def __init__(self, root, source: Optional[str] = None, transform=None):
        root = _check_dir(root, "root", "ImageFolder")
        super().__init__(source or root.name, transform)
        self.classes: Tuple[str, ...] = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
        if not self.classes:
            raise ValueError(f"ImageFolder: argument 'root' ({root}) has no class folders")
        self.items: List[Tuple[Path, int]] = [(f, c) for c, name in enumerate(self.classes)
                                              for f in _images(root / name)]
        if not self.items:
            raise ValueError(f"ImageFolder: argument 'root' ({root}) has no images ({', '.join(IMAGE_SUFFIXES)})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        i = self._check_index(index)
        path, label = self.items[i]
        return self._finish({"image": read_image(path), "label": label, "source": self.source, "index": i})


class CocoDetection(_Base):
    """Detection (and instance masks) from a COCO-format annotation file.

    Labels are contiguous: ``labels`` = the position of the category id among the file's sorted
    category ids (:attr:`category_ids` maps back). Boxes are ``x0 y0 x1 y1`` in pixels (COCO's
    ``x y w h`` converted). Crowd annotations (``iscrowd: 1``) are not training targets and are left
    out, as are boxes of zero area; an image without annotations gives empty targets.

    Args:
        images: the image folder (``file_name`` of each image is relative to it).
        annotations: the JSON file.
        masks: decode each annotation's ``segmentation`` into ``masks`` (bool [n, H, W]).
        source: the name the samples carry (default: the JSON file's stem).
        transform: applied to each sample dict.
    """

    def __init__(self, images, annotations, masks: bool = False, source: Optional[str] = None, transform=None):
        self.root = _check_dir(images, "images", "CocoDetection")
        ann_path = Path(annotations)
        if not ann_path.is_file():
            raise FileNotFoundError(f"CocoDetection: argument 'annotations' must be a file, got {str(annotations)!r}")
        super().__init__(source or ann_path.stem, transform)
        with open(ann_path) as f:
            data = json.load(f)
        missing = [k for k in ("images", "annotations", "categories") if k not in data]
        if missing:
            raise ValueError(f"CocoDetection: argument 'annotations' ({ann_path}) lacks the COCO keys {missing}")
        self.category_ids: Tuple[int, ...] = tuple(sorted(int(c["id"]) for c in data["categories"]))
        names = {int(c["id"]): c.get("name", str(c["id"])) for c in data["categories"]}
        self.classes: Tuple[str, ...] = tuple(names[i] for i in self.category_ids)
        self._label = {cid: i for i, cid in enumerate(self.category_ids)}
        self.images = sorted(data["images"], key=lambda im: int(im["id"]))
        self._anns = {int(im["id"]): [] for im in self.images}
        for a in data["annotations"]:
            if int(a["image_id"]) not in self._anns:
                raise ValueError(f"CocoDetection: annotation {a.get('id')} refers to image {a['image_id']}, "
                                 "which the file does not list")
            if int(a["category_id"]) not in self._label:
                raise ValueError(f"CocoDetection: annotation {a.get('id')} has category {a['category_id']}, "
                                 "which the file does not list")
            self._anns[int(a["image_id"])].append(a)
        self.masks = bool(masks)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        i = self._check_index(index)
        info = self.images[i]
        image = read_image(self.root / info["file_name"])
        h, w = image.shape[1:]
        anns = [a for a in self._anns[int(info["id"])]
                if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        out = {"image": image, "boxes": boxes, "source": self.source, "index": i,
               "labels": torch.tensor([self._label[int(a["category_id"])] for a in anns], dtype=torch.int64),
               "image_id": int(info["id"])}
        if self.masks:
            out["masks"] = (torch.stack([self._decode(a, h, w) for a in anns]) if anns
                            else torch.zeros(0, h, w, dtype=torch.bool))
        return self._finish(out)

    @staticmethod
    def _decode(ann: dict, h: int, w: int) -> torch.Tensor:
        from pycocotools import mask as mask_utils

        seg = ann.get("segmentation")
        if not seg:
            raise ValueError(f"CocoDetection: annotation {ann.get('id')} has no 'segmentation' (masks=True)")
        if isinstance(seg, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = seg
        return torch.from_numpy(mask_utils.decode(rle).astype(bool))


class _PairedFolder(_Base):
    """Images in one folder, a one-channel PNG per image in another, paired by file stem."""

    _what = "labels"

    def __init__(self, images, labels, source, transform, op: str):
        img_dir = _check_dir(images, "images", op)
        lab_dir = _check_dir(labels, self._what, op)
        super().__init__(source or img_dir.name, transform)
        by_stem = {p.stem: p for p in lab_dir.iterdir() if p.suffix.lower() == ".png"}
        self.items: List[Tuple[Path, Path]] = []
        unpaired = []
        for p in _images(img_dir):
            if p.stem in by_stem:
                self.items.append((p, by_stem[p.stem]))
            else:
                unpaired.append(p.name)
        if unpaired:
            raise ValueError(f"{op}: {len(unpaired)} images have no PNG of the same name in argument "
                             f"'{self._what}' ({lab_dir}), e.g. {unpaired[:3]}")
        if not self.items:
            raise ValueError(f"{op}: argument 'images' ({img_dir}) has no images")

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, index: int) -> Tuple[int, torch.Tensor, torch.Tensor]:
        i = self._check_index(index)
        img_path, lab_path = self.items[i]
        image, lab = read_image(img_path), read_label_png(lab_path)
        if tuple(lab.shape) != tuple(image.shape[1:]):
            raise ValueError(f"{lab_path}: size {tuple(lab.shape)} differs from its image's {tuple(image.shape[1:])}")
        return i, image, lab


class MaskFolder(_PairedFolder):
    """Semantic segmentation: a PNG label map per image (same file stem), one class index per pixel.

    Args:
        images: the image folder.
        masks: the folder of label PNGs (8-bit, 16-bit or palette indices).
        ignore_index: the value that marks unlabelled pixels in the files (255 in most datasets); it
            becomes -1 in ``mask``, so no class id can collide with it.
        num_classes: when given, a pixel value outside ``[0, num_classes)`` other than
            ``ignore_index`` is an error naming the file.
    """

    _what = "masks"

    def __init__(self, images, masks, ignore_index: int = 255, num_classes: Optional[int] = None,
                 source: Optional[str] = None, transform=None):
        super().__init__(images, masks, source, transform, "MaskFolder")
        self.ignore_index = int(ignore_index)
        self.num_classes = num_classes

    def __getitem__(self, index: int) -> dict:
        i, image, lab = self._read(index)
        ignore = lab == self.ignore_index
        if self.num_classes is not None:
            bad = ~ignore & ((lab < 0) | (lab >= self.num_classes))
            if bool(bad.any()):
                raise ValueError(f"{self.items[i][1]}: value {int(lab[bad][0])} is neither a class in "
                                 f"[0, {self.num_classes}) nor ignore_index {self.ignore_index}")
        mask = torch.where(ignore, torch.full_like(lab, -1), lab)
        return self._finish({"image": image, "mask": mask, "source": self.source, "index": i})


class DepthFolder(_PairedFolder):
    """Depth: a 16-bit PNG per image (same file stem), ``depth = value / scale``; 0 means no measurement.

    Args:
        images: the image folder.
        depths: the folder of depth PNGs.
        scale: file units per depth unit (1000 for millimetres to metres, 256 for KITTI's format).

    Samples carry ``depth`` (float32 [H, W]) and ``valid`` (bool [H, W], where a value was measured).
    """

    _what = "depths"

    def __init__(self, images, depths, scale: float = 1000.0, source: Optional[str] = None, transform=None):
        if not (scale > 0):
            raise ValueError(f"DepthFolder: argument 'scale' must be > 0, got {scale!r}")
        super().__init__(images, depths, source, transform, "DepthFolder")
        self.scale = float(scale)

    def __getitem__(self, index: int) -> dict:
        i, image, raw = self._read(index)
        return self._finish({"image": image, "depth": raw.to(torch.float32) / self.scale, "valid": raw > 0,
                             "source": self.source, "index": i})


def detection_collate(batch: Sequence[dict]) -> dict:
    """Collate detection samples: images stacked (they must share a size), targets as lists."""
    out = {"image": torch.stack([b["image"] for b in batch])}
    for key in batch[0]:
        if key != "image":
            out[key] = [b[key] for b in batch]
    return out


__all__ = ["ImageFolder", "CocoDetection", "MaskFolder", "DepthFolder", "detection_collate", "read_image",
           "read_label_png", "IMAGE_SUFFIXES"]
