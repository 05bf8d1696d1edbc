"""The recipes' built-in world (moe_recipes.data.world): deterministic, exact labels, the sources
RECIPES.md 6.1 asks for, and clear errors."""

import pytest
import torch

from moe_recipes.data import Concept, Domain, Source, SourceDataset, World

WORLD = World.default(seed=0)
ALL = sorted(WORLD.sources)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("name", ALL)
def test_a_sample_depends_only_on_seed_source_and_index(name):
    other = World.default(seed=0)  # a second world: nothing carried over from earlier calls
    first = [WORLD.sample(name, i) for i in (0, 1, 7)]
    later = [other.sample(name, i) for i in (7, 1, 0)][::-1]  # other order
    assert all(_equal(a, b) for a, b in zip(first, later))
    assert not torch.equal(first[0]["image"], first[1]["image"])
    assert not torch.equal(World.default(seed=1).sample(name, 0)["image"], first[0]["image"])


@pytest.mark.parametrize("name", ALL)
def test_images_and_labels_have_the_documented_types(name):
    src = WORLD.source(name)
    n = src.domain.image_size
    for i in range(5):
        s = WORLD.sample(name, i)
        img = s["image"]
        assert img.dtype == torch.float32 and img.shape == (3, n, n)
        assert float(img.min()) >= 0 and float(img.max()) <= 1
        if src.task == "cls":
            assert isinstance(s["label"], int) and 0 <= s["label"] < src.num_classes
        elif src.task == "seg":
            assert s["mask"].dtype == torch.int64 and s["mask"].shape == (n, n)
            assert 0 <= int(s["mask"].min()) and int(s["mask"].max()) <= src.num_classes
            assert bool((s["mask"] > 0).any())  # every image shows an object
        elif src.task == "attr":
            a = s["attributes"]
            assert a.dtype == torch.float32 and a.shape == (src.num_classes,)
            assert set(a.unique().tolist()) <= {0.0, 1.0} and 1 <= int(a.sum()) <= src.objects[1]
        elif src.task == "depth":
            d = s["depth"]
            assert d.dtype == torch.float32 and d.shape == (n, n)
            objects = d < 8.0  # objects lie at depth 1..7, the background plane at 8..12
            assert bool(objects.any()) and bool((~objects).any())
            assert float(d.min()) >= 1.0 and float(d.max()) <= 12.0
        else:
            k = s["labels"].numel()
            assert 1 <= k <= src.objects[1] and s["boxes"].shape == (k, 4)
            assert s["labels"].dtype == torch.int64 and int(s["labels"].max()) < src.num_classes
            b = s["boxes"]
            assert bool((b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= n).all()
                        and (b[:, 3] <= n).all())
            assert bool((b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all())


def test_boxes_are_the_extents_of_disjoint_visible_masks():
    src = WORLD.source("det/streets")
    assert src.masks
    seen = 0
    for i in range(20):
        s = WORLD.sample("det/streets", i)
        m = s["masks"]
        assert m.dtype == torch.bool and m.shape[0] == s["labels"].numel()
        assert int(m.sum(0).max()) <= 1  # an occluded pixel belongs to the nearer object only
        for box, mask in zip(s["boxes"], m):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            expect = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert torch.equal(box, expect)
        seen += m.shape[0]
    assert seen > 40


def test_segmentation_marks_exactly_the_objects_pixels():
    """A seg map is the union of the visible object masks, read off the painted pixels: on a
    noise-free plain white domain its background is exactly the white pixels, and class 1 (a red
    square) exactly the red ones."""
    concepts = (Concept("square", "solid", "red"), Concept("disc", "solid", "blue"))
    dom = Domain("plain", ("white",), 0.0, (0.15, 0.3), 32)
    w = World([Source("seg/x", "seg", dom, concepts, objects=(2, 4))], seed=3)
    for i in range(10):
        s = w.sample("seg/x", i)
        img = s["image"]
        assert torch.equal(s["mask"] == 0, (img == 0.95).all(0))
        assert torch.equal(s["mask"] == 1, img[0] > img[2] + 0.2)
        assert torch.equal(s["mask"] == 2, img[2] > img[0] + 0.2)


def test_long_tailed_source_follows_its_class_weights():
    src = WORLD.source("cls/longtail")
    counts = torch.bincount(torch.tensor([WORLD.sample(src.name, i)["label"] for i in range(400)]),
                            minlength=src.num_classes)
    p = torch.tensor(src.class_weights) / sum(src.class_weights)
    assert abs(counts[0].item() / 400 - p[0].item()) < 0.08
    assert counts[0] > 2 * counts[3] > 0


def test_default_world_has_the_sources_recipes_need():
    cls = WORLD.pretraining("cls")
    coarse = [WORLD.source(n) for n in ("cls/shapes", "cls/textures", "cls/colours")]
    spaces = [set(s.concepts) for s in coarse]
    assert not (spaces[0] & spaces[1] or spaces[0] & spaces[2] or spaces[1] & spaces[2])  # disjoint
    assert len({(s.domain.background, s.domain.palette, s.domain.image_size) for s in cls}) == len(cls)
    det = [set(WORLD.source(n).concepts) for n in ("det/small", "det/medium", "det/streets")]
    assert det[0] < det[1] < det[2]  # nested label spaces of different sizes
    assert WORLD.source("det/streets").masks
    assert len(WORLD.pretraining("seg")) >= 3 and len(WORLD.pretraining("depth")) >= 2
    assert len({s.domain.image_size for s in WORLD.pretraining()}) > 1  # per-task input sizes differ
    seen = {c for s in WORLD.pretraining() for c in s.concepts}
    for task in ("cls", "det", "seg", "depth"):
        down = WORLD.downstream(task)
        assert down, task
        for s in down:
            assert not (set(s.concepts) & seen), s.name  # unseen concept combinations
            near = [p for p in WORLD.pretraining(task) if p.domain.background == s.domain.background]
            assert near, s.name  # near some pre-training source's domain


def test_source_dataset_in_a_dataloader():
    ds = SourceDataset(WORLD, "seg/scene", length=6)
    assert len(ds) == 6
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 3, 64, 64) and batch["mask"].shape == (3, 64, 64)
    assert torch.equal(batch["mask"][1], WORLD.sample("seg/scene", 1)["mask"])
    with pytest.raises(IndexError, match="out of range"):
        ds[6]


def test_bad_arguments_name_themselves():
    with pytest.raises(IndexError, match="argument 'index'"):
        WORLD.sample("cls/shapes", WORLD.source("cls/shapes").size)
    with pytest.raises(KeyError, match="no source 'cls/nope'"):
        WORLD.sample("cls/nope", 0)
    with pytest.raises(ValueError, match="argument 'shape'"):
        Concept("blob", "solid", "red")
    with pytest.raises(ValueError, match="argument 'scale'"):
        Domain(scale=(0.4, 0.2))
    c = (Concept("disc", "solid", "red"),)
    with pytest.raises(ValueError, match="argument 'task'"):
        Source("x", "caption", Domain(), c)
    with pytest.raises(ValueError, match="argument 'class_weights'"):
        Source("x", "cls", Domain(), c, class_weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="repeats the names"):
        World([Source("x", "cls", Domain(), c), Source("x", "cls", Domain(), c)])


def test_scene_layout_sources_label_the_arrangement():
    """A scene's class is its layout: the same objects in the same cells; the concepts alone do not
    tell two layouts apart (some layouts share their objects)."""
    for name in ("cls/scenes", "down/cls_scene"):
        src = WORLD.source(name)
        assert src.layouts is not None and src.num_classes == len(src.layouts) == len(set(src.class_names))
        labels = [WORLD.sample(name, i)["label"] for i in range(200)]
        assert set(labels) == set(range(src.num_classes))
        objs = [tuple(sorted(c for c, _ in lay)) for lay in src.layouts]
        assert len(set(objs)) < len(objs) or name == "down/cls_scene"
        # an object of the scene lies in its cell: the cell's pixels differ from an empty cell's
        s = WORLD.sample(name, 0)
        n = src.domain.image_size
        for c, cell in src.layouts[s["label"]]:
            r0, c0 = (cell // 3) * n // 3, (cell % 3) * n // 3
            patch = s["image"][:, r0:r0 + n // 3, c0:c0 + n // 3]
            assert float(patch.std(dim=(1, 2)).max()) > 0.1, (name, cell)


def test_layouts_are_validated():
    dom = Domain()
    cs = (Concept("disc", "solid", "red"), Concept("square", "solid", "blue"))
    with pytest.raises(ValueError, match="two objects in one cell"):
        Source("x", "cls", dom, cs, layouts=(((0, 1), (1, 1)),))
    with pytest.raises(ValueError, match="cell 0..8"):
        Source("x", "cls", dom, cs, layouts=(((0, 9),),))
    with pytest.raises(ValueError, match="needs task 'cls'"):
        Source("x", "det", dom, cs, layouts=(((0, 1),),))
    with pytest.raises(ValueError, match="repeats a layout"):
        Source("x", "cls", dom, cs, layouts=(((0, 1),), ((0, 1),)))
