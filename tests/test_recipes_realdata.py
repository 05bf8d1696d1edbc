"""The recipes take real datasets by path: an ImageFolder tree and a PNG mask folder written here
(from world images, at another size) replace world sources in an MTHL run, resized to one size."""

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (bash scripts/setup.sh test)")

from moe_recipes.config import OptimConfig, ScheduleConfig, SourceConfig, TrainConfig, WorldConfig  # noqa: E402
from moe_recipes.data import World  # noqa: E402
from moe_recipes.recipes import mthl  # noqa: E402
from moe_recipes.recipes.common import open_source  # noqa: E402


def _png(img: torch.Tensor, path, size):
    arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).resize((size, size), Image.BILINEAR).save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    w = World.default(0)
    for c in range(2):  # two classes of a world source, as an ImageFolder tree at 40 px
        (root / "cls" / f"class{c}").mkdir(parents=True)
    n = 0
    i = 0
    while n < 24:
        s = w.sample("down/cls_near_shapes", i)
        i += 1
        if s["label"] < 2:
            _png(s["image"], root / "cls" / f"class{s['label']}" / f"{i}.png", 40)
            n += 1
    (root / "seg" / "img").mkdir(parents=True)
    (root / "seg" / "lab").mkdir(parents=True)
    for i in range(12):  # seg images with label maps; the top row unlabelled (255)
        s = w.sample("down/seg_near_street", i)
        _png(s["image"], root / "seg" / "img" / f"{i}.png", 64)
        lab = s["mask"].numpy().astype(np.uint8)
        lab[0] = 255
        Image.fromarray(lab).save(root / "seg" / "lab" / f"{i}.png")
    return root


def test_sources_by_path_resize_and_count_classes(folders):
    w = World.default(0, image_size=32)
    ds, task, n = open_source(w, SourceConfig("my/cls", path=str(folders / "cls"), task="cls", image_size=32))
    assert (task, n, len(ds)) == ("cls", 2, 24)
    assert ds[0]["image"].shape == (3, 32, 32)
    seg, task, n = open_source(w, SourceConfig("my/seg", path=str(folders / "seg" / "img"),
                                               labels=str(folders / "seg" / "lab"), task="seg", image_size=32))
    assert task == "seg" and n == 3  # values 0..3: background + 3 classes, as the world's layout
    m = seg[0]["mask"]
    assert m.shape == (32, 32) and bool((m[0] == -1).all()) and int(m.max()) <= 3
    with pytest.raises(ValueError, match="needs 'task'"):
        open_source(w, SourceConfig("x", path=str(folders / "cls")))


def test_an_mthl_row_fine_tunes_on_real_folders(folders, tmp_path):
    cfg = mthl.MTHLConfig(
        world=WorldConfig(0, 32, 120),
        model=mthl.MTHLModelConfig(embed_dim=16, depths=[1, 1, 1, 1], heads=[1, 1, 2, 2], num_experts=12, k=4,
                                   head_channels=16),
        sources=[SourceConfig("cls/textures", 3.0, 1.0, 4), SourceConfig("det/medium", 2.0, 0.6, 1),
                 SourceConfig("seg/street", 1.0, 0.2, 1)],
        optim=OptimConfig(), schedule=ScheduleConfig(),
        train=TrainConfig(steps=2, eval_samples=8, progress=False, checkpoint_every=0),
        downstream=mthl.DownstreamConfig(
            sources=[SourceConfig("my/cls", batch_size=4, path=str(folders / "cls"), task="cls", image_size=32),
                     SourceConfig("my/seg", batch_size=2, path=str(folders / "seg" / "img"),
                                  labels=str(folders / "seg" / "lab"), task="seg", image_size=32)],
            steps=2, eval_samples=4))
    data = mthl.Data(cfg)
    base = mthl.build_model(cfg, data, data.pretraining)
    res = mthl.run_row(cfg, data, base, "router_only", str(tmp_path))
    assert set(res["per_source"]) == {"my/cls", "my/seg"}
    assert all(np.isfinite(v["metric"]) for v in res["per_source"].values())
    assert res["per_source"]["my/seg"]["task"] == "seg"
