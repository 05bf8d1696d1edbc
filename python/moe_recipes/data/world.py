"""The built-in data of the recipes: a procedurally generated world of multi-source, multi-task images.

Every paper the recipes serve makes claims that rest on sources that differ in domain and label space
within one task (RECIPES.md 0.6 and 6.1). No dataset can be downloaded here, so the recipes default to
this world, and take real datasets by path instead.

The pieces:

* a :class:`Concept` is what a class looks like: a shape, a texture and a colour;
* a :class:`Domain` is how a source's images look apart from their objects: the background family and
  palette, pixel noise, the range of object sizes and the image size;
* a :class:`Source` is one dataset: a task (``cls``, ``det``, ``seg``, ``depth`` or ``attr``), a domain,
  a label space (its concepts, in label order; for a scene-layout source its layouts) with class
  frequencies, and a size;
* a :class:`World` is a seed and its sources, pre-training and downstream (held out).

``World.sample(source, index)`` draws one image with its labels. It is deterministic in (world seed,
source name, index) alone: the same triple gives the same bits in any process and in any order of
calls, so a sampler or a resumed run needs to keep nothing but indices. The labels are exact, not
estimated: objects are painted far to near, and every label is read off the same painted pixels, so
a box is the extent of its instance's visible mask, the segmentation map is the union of the visible
masks and the depth map is the painted depth.

Example:
    >>> w = World.default(seed=0)
    >>> s = w.sample("det/streets", 3)
    >>> s["image"].shape, s["boxes"].shape[1], s["labels"].dtype
    (torch.Size([3, 64, 64]), 4, torch.int64)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch

TASKS = ("cls", "det", "seg", "depth", "attr")
SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond", "bar", "half_disc")
TEXTURES = ("solid", "stripes", "checker", "dots")
BACKGROUNDS = ("plain", "gradient", "stripes", "checker", "blobs")
#: named colours (RGB in [0, 1]); concepts and palettes pick from these
COLOURS: Dict[str, Tuple[float, float, float]] = {
    "red": (0.86, 0.15, 0.15), "green": (0.15, 0.70, 0.25), "blue": (0.15, 0.30, 0.85),
    "yellow": (0.92, 0.85, 0.15), "magenta": (0.80, 0.20, 0.75), "cyan": (0.15, 0.80, 0.85),
    "orange": (0.95, 0.55, 0.10), "white": (0.95, 0.95, 0.95), "black": (0.08, 0.08, 0.08),
    "brown": (0.50, 0.32, 0.15), "grey": (0.50, 0.50, 0.50), "olive": (0.50, 0.55, 0.15),
    "navy": (0.10, 0.12, 0.45), "pink": (0.95, 0.60, 0.70), "teal": (0.10, 0.50, 0.50),
    "sand": (0.85, 0.75, 0.55),
}


@dataclass(frozen=True)
class Concept:
    """What a class looks like: a shape, a texture and a colour (names from SHAPES, TEXTURES, COLOURS)."""

    shape: str
    texture: str
    colour: str

    def __post_init__(self):
        for value, allowed, what in ((self.shape, SHAPES, "shape"), (self.texture, TEXTURES, "texture"),
                                     (self.colour, tuple(COLOURS), "colour")):
            if value not in allowed:
                raise ValueError(f"Concept: argument '{what}' must be one of {allowed}, got {value!r}")

    @property
    def name(self) -> str:
        return f"{self.colour}-{self.texture}-{self.shape}"


@dataclass(frozen=True)
class Domain:
    """How a source's images look apart from their objects."""

    background: str = "plain"  # one of BACKGROUNDS
    palette: Tuple[str, ...] = ("grey", "white")  # background colours (names of COLOURS)
    noise: float = 0.02  # std of the additive Gaussian pixel noise
    scale: Tuple[float, float] = (0.18, 0.35)  # object radius range, as a fraction of the image side
    image_size: int = 64

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"Domain: argument 'background' must be one of {BACKGROUNDS}, got {self.background!r}")
        bad = [c for c in self.palette if c not in COLOURS]
        if not self.palette or bad:
            raise ValueError(f"Domain: argument 'palette' must name colours of COLOURS, got {self.palette!r}")
        if not (self.noise >= 0):
            raise ValueError(f"Domain: argument 'noise' must be >= 0, got {self.noise!r}")
        lo, hi = self.scale
        if not (0 < lo <= hi <= 0.5):
            raise ValueError(f"Domain: argument 'scale' must satisfy 0 < lo <= hi <= 0.5, got {self.scale!r}")
        if int(self.image_size) != self.image_size or self.image_size < 8:
            raise ValueError(f"Domain: argument 'image_size' must be an integer >= 8, got {self.image_size!r}")


@dataclass(frozen=True)
class Source:
    """One dataset of the world.

    Args:
        name: unique, by convention ``"<task>/<name>"``.
        task: ``cls`` (one object, its class; or, with ``layouts``, a scene and its layout class),
            ``det`` (objects: boxes, classes, instance masks), ``seg`` (a class per pixel, 0 =
            background), ``depth`` (a depth per pixel) or ``attr`` (multi-label: which concepts an
            image shows, as a multi-hot vector).
        domain: the look of the images.
        concepts: the label space, in label order (label i is ``concepts[i]``).
        size: the number of images (indices 0 .. size-1).
        class_weights: relative class frequencies (default uniform); a long-tailed source has
            decreasing weights.
        objects: (min, max) objects per image for det, seg and depth (cls always has one).
        masks: whether a det sample carries its instance masks.
        downstream: a held-out source (not for pre-training).
        layouts: scene-layout classification: class i is the scene ``layouts[i]``, a tuple of
            ``(concept index, cell)`` with cell 0..8 of a 3x3 grid (row-major): those objects, each
            in its cell (jittered); the class is the arrangement, not any one object.
    """

    name: str
    task: str
    domain: Domain
    concepts: Tuple[Concept, ...]
    size: int = 10_000
    class_weights: Optional[Tuple[float, ...]] = None
    objects: Tuple[int, int] = (1, 4)
    masks: bool = False
    downstream: bool = False
    layouts: Optional[Tuple[Tuple[Tuple[int, int], ...], ...]] = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"Source {self.name!r}: argument 'task' must be one of {TASKS}, got {self.task!r}")
        if not self.concepts:
            raise ValueError(f"Source {self.name!r}: argument 'concepts' must not be empty")
        if len(set(self.concepts)) != len(self.concepts):
            raise ValueError(f"Source {self.name!r}: argument 'concepts' repeats a concept")
        if self.class_weights is not None and self.layouts is None and (len(self.class_weights) != len(self.concepts)
                                                                        or min(self.class_weights) <= 0):
            raise ValueError(f"Source {self.name!r}: argument 'class_weights' must give a positive weight "
                             f"per concept ({len(self.concepts)}), got {self.class_weights!r}")
        lo, hi = self.objects
        if not (1 <= lo <= hi):
            raise ValueError(f"Source {self.name!r}: argument 'objects' must satisfy 1 <= min <= max, "
                             f"got {self.objects!r}")
        if self.size < 1:
            raise ValueError(f"Source {self.name!r}: argument 'size' must be >= 1, got {self.size!r}")
        if self.layouts is not None:
            if self.task != "cls" or not self.layouts:
                raise ValueError(f"Source {self.name!r}: argument 'layouts' needs task 'cls' and at least one layout")
            for i, lay in enumerate(self.layouts):
                if not lay or any(not (0 <= c < len(self.concepts)) or not (0 <= cell < 9) for c, cell in lay):
                    raise ValueError(f"Source {self.name!r}: layout {i} must be (concept index, cell 0..8) pairs, "
                                     f"got {lay!r}")
                if len({cell for _, cell in lay}) != len(lay):
                    raise ValueError(f"Source {self.name!r}: layout {i} puts two objects in one cell")
            if len(set(self.layouts)) != len(self.layouts):
                raise ValueError(f"Source {self.name!r}: argument 'layouts' repeats a layout")
            if self.class_weights is not None and len(self.class_weights) != len(self.layouts):
                raise ValueError(f"Source {self.name!r}: argument 'class_weights' must give a weight per layout")

    @property
    def num_classes(self) -> int:
        return len(self.concepts) if self.layouts is None else len(self.layouts)

    @property
    def class_names(self) -> Tuple[str, ...]:
        if self.layouts is not None:
            return tuple("+".join(f"{self.concepts[c].name}@{cell}" for c, cell in lay) for lay in self.layouts)
        return tuple(c.name for c in self.concepts)


def _seed(*parts) -> int:
    """A 63-bit seed from the parts: the same in every process (unlike ``hash``)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _grid(n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    c = torch.arange(n, dtype=torch.float32) + 0.5  # pixel centres
    return c.view(n, 1).expand(n, n), c.view(1, n).expand(n, n)  # (y, x)


def _shape_mask(shape: str, u: torch.Tensor, v: torch.Tensor, r: float) -> torch.Tensor:
    """Inside-test of a shape of radius ``r`` in its own rotated frame (u, v)."""
    au, av = u.abs(), v.abs()
    d2 = u * u + v * v
    if shape == "disc":
        return d2 <= r * r
    if shape == "square":
        return (au <= 0.8 * r) & (av <= 0.8 * r)
    if shape == "triangle":  # equilateral, apex up in its frame
        return (v >= -0.5 * r) & (math.sqrt(3) * u + v <= r) & (-math.sqrt(3) * u + v <= r)
    if shape == "ring":
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "cross":
        return ((au <= 0.3 * r) & (av <= r)) | ((av <= 0.3 * r) & (au <= r))
    if shape == "diamond":
        return au + av <= r
    if shape == "bar":
        return (au <= r) & (av <= 0.35 * r)
    if shape == "half_disc":
        return (d2 <= r * r) & (v >= 0)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, u: torch.Tensor, v: torch.Tensor, r: float) -> torch.Tensor:
    """A shading factor in (0, 1] per pixel: 1 where the texture shows the concept's colour."""
    if texture == "solid":
        return torch.ones_like(u)
    period = max(2.0, r / 2.0)
    if texture == "stripes":
        return torch.where(torch.remainder(u, period) < period / 2, 1.0, 0.45)
    if texture == "checker":
        a = torch.floor(u / period) + torch.floor(v / period)
        return torch.where(torch.remainder(a, 2) == 0, 1.0, 0.45)
    if texture == "dots":
        du = torch.remainder(u, period) - period / 2
        dv = torch.remainder(v, period) - period / 2
        return torch.where(du * du + dv * dv <= (period / 3) ** 2, 0.45, 1.0)
    raise ValueError(f"unknown texture {texture!r}")


def _background(domain: Domain, g: torch.Generator) -> torch.Tensor:
    n = domain.image_size
    y, x = _grid(n)
    cols = [torch.tensor(COLOURS[c]) for c in domain.palette]
    pick = lambda: cols[int(torch.randint(len(cols), (1,), generator=g))]  # noqa: E731
    a, b = pick(), pick()
    if domain.background == "plain":
        w = torch.zeros(n, n)
    elif domain.background == "gradient":
        theta = float(torch.rand((), generator=g)) * 2 * math.pi
        w = ((x * math.cos(theta) + y * math.sin(theta)) / n + 1) / 2
        w = (w - w.min()) / (w.max() - w.min() + 1e-6)
    elif domain.background == "stripes":
        period = n / (3 + int(torch.randint(5, (1,), generator=g)))
        w = (torch.remainder(y + x * float(torch.rand((), generator=g)), period) < period / 2).float()
    elif domain.background == "checker":
        period = n / (2 + int(torch.randint(4, (1,), generator=g)))
        w = (torch.remainder(torch.floor(y / period) + torch.floor(x / period), 2)).float()
    else:  # blobs: a few soft discs of the second colour
        w = torch.zeros(n, n)
        for _ in range(3):
            cy, cx = (torch.rand(2, generator=g) * n).tolist()
            rad = n * (0.1 + 0.2 * float(torch.rand((), generator=g)))
            w = torch.maximum(w, torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * rad * rad)))
    return a.view(3, 1, 1) * (1 - w) + b.view(3, 1, 1) * w


class World:
    """A seed and its sources. ``sample(source, index)`` draws one labelled image (see the module doc)."""

    def __init__(self, sources: Sequence[Source], seed: int = 0):
        names = [s.name for s in sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"World: argument 'sources' repeats the names {dup}")
        self.seed = int(seed)
        self.sources: Dict[str, Source] = {s.name: s for s in sources}

    def __repr__(self) -> str:
        return f"World(seed={self.seed}, sources={list(self.sources)})"

    def source(self, name: str) -> Source:
        try:
            return self.sources[name]
        except KeyError:
            raise KeyError(f"World: no source {name!r}; the sources are {list(self.sources)}") from None

    def pretraining(self, task: Optional[str] = None) -> Tuple[Source, ...]:
        return tuple(s for s in self.sources.values() if not s.downstream and task in (None, s.task))

    def downstream(self, task: Optional[str] = None) -> Tuple[Source, ...]:
        return tuple(s for s in self.sources.values() if s.downstream and task in (None, s.task))

    # ---- sampling

    def sample(self, source: str, index: int) -> dict:
        """One image of ``source`` with its labels, deterministic in (seed, source, index).

        Returns a dict with ``image`` (float32 [3, S, S] in [0, 1]), ``source``, ``index`` and, by task:
        ``cls``: ``label`` (int; a scene-layout source: the layout's index); ``attr``: ``attributes``
        (float32 multi-hot [num_classes]: the concepts visible); ``det``: ``boxes`` (float32 [n, 4], x0 y0 x1 y1 in pixels, the
        extent of the visible mask), ``labels`` (int64 [n]) and, where the source has masks,
        ``masks`` (bool [n, S, S], disjoint); ``seg``: ``mask`` (int64 [S, S], 0 = background,
        c + 1 = class c); ``depth``: ``depth`` (float32 [S, S], larger is farther).
        """
        src = self.source(source)
        if not (0 <= int(index) < src.size):
            raise IndexError(f"World.sample: argument 'index' must be in [0, {src.size}) for source "
                             f"{source!r}, got {index!r}")
        g = torch.Generator().manual_seed(_seed(self.seed, src.name, int(index)))
        d = src.domain
        n = d.image_size
        image = _background(d, g)
        y, x = _grid(n)
        # depth of the background: a tilted plane far behind every object
        tilt = float(torch.rand((), generator=g)) * 0.5
        depth = 8.0 + tilt * (y / n) * 4.0
        weights = torch.tensor(src.class_weights if src.class_weights is not None else [1.0] * src.num_classes)
        cells: list = []
        if src.layouts is not None:  # a scene: its layout's objects, each in its cell
            scene = int(torch.multinomial(weights, 1, generator=g))
            classes = [c for c, _ in src.layouts[scene]]
            cells = [cell for _, cell in src.layouts[scene]]
        else:
            count = 1 if src.task == "cls" else int(torch.randint(src.objects[0], src.objects[1] + 1, (1,), generator=g))
            classes = torch.multinomial(weights, count, replacement=True, generator=g).tolist()
        lo, hi = d.scale
        objs = []
        for j, c in enumerate(classes):
            r = n * (lo + (hi - lo) * float(torch.rand((), generator=g)))
            if cells:  # the cell's centre, jittered by up to a sixth of a cell
                jy, jx = ((torch.rand(2, generator=g) - 0.5) * (n / 9)).tolist()
                cy, cx = (cells[j] // 3 + 0.5) * n / 3 + jy, (cells[j] % 3 + 0.5) * n / 3 + jx
            else:
                margin = r if src.task == "cls" else 0.3 * r
                cy, cx = (margin + torch.rand(2, generator=g) * max(n - 2 * margin, 1.0)).tolist()
            theta = float(torch.rand((), generator=g)) * 2 * math.pi
            z = 1.0 + 6.0 * float(torch.rand((), generator=g))
            objs.append((c, r, cy, cx, theta, z))
        objs.sort(key=lambda o: -o[5])  # far to near: the nearer paints over
        owner = torch.full((n, n), -1, dtype=torch.int64)  # which object a pixel shows
        for i, (c, r, cy, cx, theta, z) in enumerate(objs):
            concept = src.concepts[c]
            u = (x - cx) * math.cos(theta) + (y - cy) * math.sin(theta)
            v = -(x - cx) * math.sin(theta) + (y - cy) * math.cos(theta)
            inside = _shape_mask(concept.shape, u, v, r)
            colour = torch.tensor(COLOURS[concept.colour]).view(3, 1, 1) * _texture(concept.texture, u, v, r)
            shade = 1.0 - 0.04 * z  # farther objects are a little darker: depth has a visual cue
            image = torch.where(inside, colour * shade, image)
            depth = torch.where(inside, torch.full_like(depth, z), depth)
            owner = torch.where(inside, torch.full_like(owner, i), owner)
        if d.noise > 0:
            image = image + d.noise * torch.randn(image.shape, generator=g)
        out = {"image": image.clamp(0, 1).to(torch.float32), "source": src.name, "index": int(index)}
        if src.task == "cls":
            out["label"] = scene if src.layouts is not None else int(objs[0][0])
            return out
        if src.task == "attr":  # the concepts that show (an object hidden behind nearer ones does not)
            attrs = torch.zeros(src.num_classes, dtype=torch.float32)
            for i, (c, *_rest) in enumerate(objs):
                if bool((owner == i).any()):
                    attrs[c] = 1.0
            out["attributes"] = attrs
            return out
        if src.task == "depth":
            out["depth"] = depth.to(torch.float32)
            return out
        if src.task == "seg":
            seg = torch.zeros(n, n, dtype=torch.int64)
            for i, (c, *_rest) in enumerate(objs):
                seg[owner == i] = c + 1
            out["mask"] = seg
            return out
        boxes, labels, masks = [], [], []
        for i, (c, *_rest) in enumerate(objs):
            m = owner == i
            if not bool(m.any()):  # hidden entirely behind nearer objects: not labelled
                continue
            ys, xs = torch.nonzero(m, as_tuple=True)
            boxes.append([float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1])
            labels.append(c)
            masks.append(m)
        out["boxes"] = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        out["labels"] = torch.tensor(labels, dtype=torch.int64)
        if src.masks:
            out["masks"] = torch.stack(masks) if masks else torch.zeros(0, n, n, dtype=torch.bool)
        return out

    # ---- the built-in world

    @classmethod
    def default(cls, seed: int = 0, image_size: int = 64, size: int = 10_000) -> "World":
        """The recipes' built-in world: RECIPES.md 6.1's sources at a CPU-friendly size.

        Pre-training: classification (three coarse sources with disjoint label spaces and distinct
        domains, a fine-grained one whose classes differ only in colour shade and texture, a
        long-tailed one with Zipf class weights), detection (three sources with nested label spaces
        of 3, 6 and 10 concepts, the largest with instance masks, plus a single-class small-object
        source), segmentation (three contexts), depth (two scales of objects), a scene-layout
        classification source (the class is the arrangement of objects over a 3x3 grid) and a
        multi-label attribute source (``attr``); images of ``image_size`` px, one classification
        source 1.25x that. Downstream (held out): for cls, det and seg one source near one
        pre-training source's domain and one near another's, plus for cls a scene-layout source, a
        fine-grained one near ``cls/fine`` and a long-tailed fine-grained one near ``cls/longtail``
        (MTHL's five: scene, fine-grained, long-tailed), for seg an indoor one (the NYU analogue), for
        depth one with a mixture of object scales; all with label spaces of unseen concept combinations.
        """
        S = image_size

        def dom(bg, pal, noise=0.02, scale=(0.18, 0.35), size_=S):
            return Domain(bg, tuple(pal), noise, scale, size_)

        def concepts(spec):
            return tuple(Concept(*c.split(":")) for c in spec)

        # the concept set the detection sources nest in ("same concept" across sources)
        det_all = concepts([f"{s}:solid:{c}" for s, c in zip(
            ("disc", "square", "triangle", "cross", "diamond", "ring", "bar", "half_disc", "disc", "square"),
            ("red", "blue", "green", "yellow", "magenta", "cyan", "orange", "white", "black", "pink"))])
        shades = ("red", "orange", "pink", "magenta", "brown")
        scene_objs = concepts(["disc:solid:red", "square:solid:blue", "triangle:solid:green", "bar:solid:black"])
        down_scene = concepts(["ring:solid:magenta", "cross:solid:orange", "diamond:solid:cyan"])
        zipf = tuple(1.0 / (i + 1) ** 1.3 for i in range(12))
        sources = [
            Source("cls/shapes", "cls", dom("plain", ["grey", "white"]),
                   concepts([f"{s}:solid:blue" for s in SHAPES]), size),
            Source("cls/textures", "cls", dom("gradient", ["sand", "brown"], 0.04),
                   concepts([f"square:{t}:{c}" for t in TEXTURES for c in ("green", "navy")]), size,
                   ),
            Source("cls/colours", "cls", dom("stripes", ["black", "grey"], 0.03, size_=S + S // 4),
                   concepts([f"disc:solid:{c}" for c in ("red", "green", "orange", "yellow", "cyan", "white")]),
                   size),
            Source("cls/fine", "cls", dom("checker", ["white", "sand"], 0.02, (0.25, 0.4)),
                   concepts([f"diamond:{t}:{c}" for c in shades for t in ("solid", "dots")]), size),
            Source("cls/longtail", "cls", dom("blobs", ["teal", "olive"], 0.05),
                   concepts([f"{s}:stripes:{c}" for s in ("triangle", "cross", "ring", "bar")
                             for c in ("yellow", "white", "magenta")]), size, class_weights=zipf),
            Source("det/small", "det", dom("gradient", ["navy", "teal"], 0.03, (0.15, 0.25)), det_all[:3],
                   size, objects=(1, 3)),
            Source("det/medium", "det", dom("plain", ["sand", "grey"], 0.02, (0.12, 0.25)), det_all[:6],
                   size, objects=(1, 5)),
            Source("det/streets", "det", dom("stripes", ["grey", "black"], 0.04, (0.1, 0.22)), det_all,
                   size, objects=(2, 6), masks=True),
            Source("det/faces", "det", dom("blobs", ["brown", "sand"], 0.03, (0.05, 0.09)),
                   concepts(["disc:dots:pink"]), size, objects=(1, 8)),
            Source("seg/street", "seg", dom("stripes", ["grey", "black"], 0.03, (0.12, 0.3)), det_all[:5],
                   size, objects=(2, 5)),
            Source("seg/scene", "seg", dom("gradient", ["sand", "white"], 0.02, (0.15, 0.35)),
                   concepts([f"{s}:checker:{c}" for s, c in (("square", "green"), ("bar", "brown"),
                                                             ("ring", "blue"), ("half_disc", "teal"))]),
                   size, objects=(1, 4)),
            Source("seg/aerial", "seg", dom("blobs", ["olive", "green"], 0.05, (0.08, 0.18)),
                   concepts(["square:solid:grey", "bar:solid:black", "disc:solid:blue"]), size, objects=(3, 8)),
            Source("depth/near", "depth", dom("gradient", ["grey", "white"], 0.02, (0.2, 0.4)),
                   concepts(["square:solid:red", "disc:solid:blue", "triangle:solid:green"]), size, objects=(1, 3)),
            Source("depth/far", "depth", dom("plain", ["sand", "grey"], 0.02, (0.06, 0.15)),
                   concepts(["square:solid:red", "disc:solid:blue", "triangle:solid:green"]), size, objects=(3, 8)),
            # scenes: the class is the arrangement of a few objects over a 3x3 grid (a scene-layout source)
            Source("cls/scenes", "cls", dom("plain", ["white", "sand"], 0.02, (0.07, 0.12)), scene_objs, size,
                   layouts=_layouts(len(scene_objs), 8, 3)),
            # multi-label attributes: which of 8 concepts an image shows (INTERN's excluded-from-eval kind)
            Source("attr/objects", "attr", dom("checker", ["grey", "navy"], 0.03, (0.1, 0.2)),
                   concepts([f"{sh}:{t}:pink" for sh in ("disc", "square", "triangle", "ring") for t in ("solid", "dots")]),
                   size, objects=(1, 4)),
            # held out: near one pre-training domain, or near another; unseen concept combinations
            Source("down/cls_near_shapes", "cls", dom("plain", ["grey", "white"], 0.02),
                   concepts([f"{s}:dots:orange" for s in SHAPES[:5]]), size, downstream=True),
            Source("down/cls_near_textures", "cls", dom("gradient", ["sand", "brown"], 0.04),
                   concepts([f"triangle:{t}:{c}" for t in TEXTURES for c in ("red", "cyan")]), size,
                   downstream=True),
            Source("down/det_near_medium", "det", dom("plain", ["sand", "white"], 0.02, (0.12, 0.25)),
                   concepts(["cross:stripes:blue", "ring:solid:red", "square:dots:yellow"]), size,
                   objects=(1, 4), downstream=True),
            Source("down/det_near_faces", "det", dom("blobs", ["brown", "sand"], 0.03, (0.05, 0.1)),
                   concepts(["disc:dots:white", "half_disc:dots:yellow"]), size, objects=(1, 6), downstream=True),
            Source("down/seg_near_street", "seg", dom("stripes", ["grey", "black"], 0.03, (0.12, 0.3)),
                   concepts(["bar:checker:orange", "disc:checker:white", "triangle:solid:orange"]), size,
                   objects=(2, 5), downstream=True),
            Source("down/seg_near_aerial", "seg", dom("blobs", ["olive", "green"], 0.05, (0.08, 0.18)),
                   concepts(["square:stripes:white", "ring:solid:navy"]), size, objects=(3, 8), downstream=True),
            Source("down/cls_scene", "cls", dom("gradient", ["sand", "white"], 0.02, (0.07, 0.12)), down_scene,
                   size, layouts=_layouts(len(down_scene), 6, 2, seed=1), downstream=True),
            Source("down/cls_fine_near_fine", "cls", dom("checker", ["white", "sand"], 0.02, (0.25, 0.4)),
                   concepts([f"half_disc:{t}:{c}" for c in shades for t in ("solid", "stripes")]), size, downstream=True),
            Source("down/cls_longtail_near_longtail", "cls", dom("blobs", ["teal", "olive"], 0.05),
                   concepts([f"{sh}:checker:{c}" for sh in ("square", "diamond", "half_disc")
                             for c in ("yellow", "white", "magenta", "orange")]), size,
                   class_weights=tuple(1.0 / (i + 1) ** 1.3 for i in range(12)), downstream=True),
            Source("down/seg_indoor", "seg", dom("gradient", ["grey", "white"], 0.02, (0.15, 0.35)),
                   concepts(["square:stripes:brown", "bar:solid:navy", "disc:dots:sand", "cross:solid:teal"]), size,
                   objects=(2, 5), downstream=True),
            Source("down/depth_mixed", "depth", dom("gradient", ["white", "sand"], 0.02, (0.06, 0.4)),
                   concepts(["diamond:dots:cyan", "cross:checker:magenta"]), size, objects=(1, 6), downstream=True),
        ]
        return cls(sources, seed)


def _layouts(num_concepts: int, num_layouts: int, objects: int, seed: int = 0) -> Tuple[Tuple[Tuple[int, int], ...], ...]:
    """``num_layouts`` distinct scenes of ``objects`` (concept, cell) pairs, in distinct cells, drawn once
    from a fixed seed (part of the world's definition, not of a sample)."""
    g = torch.Generator().manual_seed(7919 + seed)
    out: list = []
    while len(out) < num_layouts:
        cells = torch.randperm(9, generator=g)[:objects].tolist()
        cs = torch.randint(0, num_concepts, (objects,), generator=g).tolist()
        lay = tuple(sorted(zip(cs, cells), key=lambda t: t[1]))
        if lay not in out:
            out.append(lay)
    return tuple(out)


@dataclass
class SourceDataset(torch.utils.data.Dataset):
    """A :class:`Source` of a :class:`World` as a torch ``Dataset`` (optionally the first ``length``)."""

    world: World
    source: str
    length: Optional[int] = None
    _src: Source = field(init=False, repr=False)

    def __post_init__(self):
        self._src = self.world.source(self.source)
        if self.length is not None and not (0 <= self.length <= self._src.size):
            raise ValueError(f"SourceDataset: argument 'length' must be in [0, {self._src.size}], "
                             f"got {self.length!r}")

    def __len__(self) -> int:
        return self._src.size if self.length is None else self.length

    def __getitem__(self, index: int) -> dict:
        if not (0 <= index < len(self)):
            raise IndexError(f"SourceDataset: index {index} out of range [0, {len(self)})")
        return self.world.sample(self.source, index)
