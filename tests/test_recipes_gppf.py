"""The GPPF recipe (moe_recipes.recipes.gppf, RECIPES.md section 3): presets, a micro run end to end,
SIMT over 2 gloo processes (task-averaged gradients over slots, cross-task SyncBN), extracted paths."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

import moe_kernels as mk
from moe_recipes import config
from moe_recipes.config import SourceConfig
from moe_recipes.models.resnet import ResNet
from moe_recipes.recipes import gppf
from moe_recipes.trainer import Trainer

MICRO_SOURCES = [
    SourceConfig("cls/shapes", weight=4.0, batch_size=6, image_size=32),
    SourceConfig("det/streets", weight=2.5, batch_size=2, image_size=32),
    SourceConfig("seg/street", weight=1.0, batch_size=2, image_size=32),
]


def micro_config(**over) -> gppf.GPPFConfig:
    """cpu-tiny with tiny sizes: 3 tasks (cls, det with masks, seg) at 32 px, a 1-block-per-stage lego
    ResNet, a few steps."""
    cfg = config.load(gppf.GPPFConfig, "gppf", "cpu-tiny", [
        "procs=1", "world.size=60", "world.image_size=32", "model.depths=[1,1,1,1]", "model.head_channels=8",
        "train.steps=4", "train.virtual_devices=2", "train.eval_samples=8", "train.eval_batch_size=8",
        "train.checkpoint_every=2", "train.log_every=1", "train.progress=false", "simt.probs_every=2",
        "downstream.steps=2", "downstream.eval_samples=8"])
    cfg.sources = [dataclasses.replace(s) for s in MICRO_SOURCES]
    cfg.downstream.sources = [SourceConfig("down/cls_near_shapes", batch_size=4, image_size=32)]
    cfg.studies.paper_analogues = {"cls/shapes": "IN21K", "det/streets": "COCO", "seg/street": "COCO-Stuff"}
    for k, v in over.items():
        section, _, key = k.partition("__")
        if key:
            setattr(getattr(cfg, section), key, v)
        else:
            setattr(cfg, section, v)
    return cfg


# ----------------------------------------------------------------------------- presets

@pytest.mark.parametrize("preset", config.preset_names("gppf"))
def test_every_preset_loads(preset):
    cfg = config.load(gppf.GPPFConfig, "gppf", preset)
    assert cfg.preset == preset and cfg.recipe == "gppf"
    assert cfg.optim.name == "sgd" and cfg.schedule.kind == "cosine"
    assert cfg.gumbel.start == 5.0 and cfg.gumbel.end == 0.01
    assert cfg.model.lego_units >= 2 and cfg.simt.reduction == "task_average"
    tasks = {s.name.split("/")[0] for s in cfg.sources}
    assert {"cls", "det", "seg"} <= tasks
    assert all(s.loss_weight == 1.0 for s in cfg.sources)  # w_t = 1 for every task
    assert set(cfg.studies.paper_analogues) <= {s.name for s in cfg.sources}


def test_presets_are_the_recipes_settings():
    assert set(config.preset_names("gppf")) >= {"cpu-tiny", "cpu-small", "paper"}
    tiny = config.load(gppf.GPPFConfig, "gppf", "cpu-tiny")
    assert tiny.procs == 2 and tiny.train.virtual_devices == 4 and tiny.simt.sync_bn
    assert [s.name.split("/")[0] for s in tiny.sources].count("det") == 3
    paper = config.load(gppf.GPPFConfig, "gppf", "paper")
    assert paper.model.backbone == "resnet50" and paper.train.steps == 500_000 and paper.optim.lr == 0.16
    assert paper.optim.weight_decay == 5e-4 and paper.gumbel.decay_fraction == 0.9
    assert [s.weight for s in paper.sources] == [4.0, 2.5, 2.5, 4.0, 4.0, 1.0, 2.0, 1.0]  # Tab. D.1
    assert [s.batch_size for s in paper.sources] == [96, 8, 8, 12, 12, 8, 8, 8]
    with pytest.raises(config.ConfigError, match="unknown key"):
        config.load(gppf.GPPFConfig, "gppf", "cpu-tiny", ["simt.nope=1"])


def test_paper_preset_builds_a_reduced_width_model_and_trains_one_step(tmp_path):
    cfg = config.load(gppf.GPPFConfig, "gppf", "paper", [
        "model.widths=[16,32,64,128]", "model.stem_width=8", "world.image_size=32", "world.size=40",
        "train.eval_samples=4", "train.virtual_devices=2", "model.head_channels=8", "train.progress=false"])
    cfg.sources = [dataclasses.replace(s, batch_size=2, image_size=32) for s in cfg.sources]
    cfg.downstream.sources = []
    data = gppf.Data(cfg)
    model = gppf.build_model(cfg, data, data.pretraining)
    assert len(model.backbone.lego_layers()) == 17  # ResNet-50: the stem and 3 + 4 + 6 + 3 blocks
    assert all(layer.num_tasks == 8 for layer in model.backbone.lego_layers())
    one = dataclasses.replace(cfg.train, steps=1, checkpoint_every=0, eval_every=0)
    tr = Trainer(model, gppf.train_sources(data, model, data.pretraining), one, cfg.optim, cfg.schedule,
                 str(tmp_path), reduction="task_average")
    rec = tr.train_step()
    assert torch.isfinite(torch.tensor(rec["loss"])) and len(rec["losses"]) >= 1


# ----------------------------------------------------------------------------- the recipe end to end

@pytest.mark.slow
def test_micro_run_end_to_end_writes_everything_and_resumes(tmp_path):
    out = str(tmp_path / "run")
    cfg = micro_config()
    cfg.studies.baselines = ["single", "static", "global", "no_syncbn"]
    res = gppf.run(cfg, out)
    for f in ("report.md", "config.json", "results.json", "paths.json", "paths.png", "selection_curves.png",
              "loss_curves.png", "dynet/metrics.jsonl", "dynet/selection.jsonl", "static/eval.json",
              "finetune/dyfinetune.json", "finetune/path_near.json"):
        assert os.path.exists(os.path.join(out, f)), f
    ck = os.path.join(out, "dynet", "checkpoints")
    assert any(os.path.exists(os.path.join(ck, d, "COMPLETE")) for d in os.listdir(ck))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["recipe"] == "gppf"
    recs = [json.loads(line) for line in open(os.path.join(out, "dynet", "metrics.jsonl"))]
    train = [r for r in recs if r["kind"] == "train"]
    assert len(train) == 4 and all(len(r["slots"]) == 2 for r in train)
    sched = mk.nn.GumbelTemperature(5.0, 0.01, round(0.9 * 4))  # linear over 90% of the steps
    assert [r["tau"] for r in train] == pytest.approx([sched(s) for s in range(4)])
    assert {r["source"] for r in recs if r["kind"] == "eval"} == {s.name for s in MICRO_SOURCES}
    assert set(res["pretrain"]["single"]) == {s.name for s in MICRO_SOURCES}
    # single budgets sum to the joint run's slot-steps (4 steps x 2 slots)
    singles = [res["runs"][f"single:{s.name}"]["steps"] for s in MICRO_SOURCES]
    assert abs(sum(singles) - 8) <= len(singles)
    assert res["runs"]["no_syncbn"].get("skipped")  # one process: not a distinct row
    assert all(v["plain"] and v["max_abs_diff"] == 0.0 for v in res["paths"]["per_task"].values())
    assert set(res["finetune"]) == {"static", "path_near", "path_cls", "dyfinetune"}
    report = open(os.path.join(out, "report.md")).read()
    for s in ("Tab. 1", "paper: DyNet N=2", "Fig. 3", "Fig. 11", "Directional claims", "Dyfinetune",
              "reproduced"):
        assert s in report, s
    # a second call finds every stage's result in the folder
    again = gppf.run(cfg, out)
    assert again["pretrain"]["dynet"] == res["pretrain"]["dynet"]
    assert again["finetune"]["dyfinetune"] == res["finetune"]["dyfinetune"]


def test_bad_stage_or_baseline_names_itself(tmp_path):
    with pytest.raises(ValueError, match="unknown stage"):
        gppf.run(micro_config(), str(tmp_path), stages=("pretrain", "nope"))
    with pytest.raises(ValueError, match="unknown baseline"):
        gppf.run(micro_config(studies__baselines=["nope"]), str(tmp_path))


# ----------------------------------------------------------------------------- SIMT over 2 processes

def _layout_worker(rank, world, out, lego, sync_bn, V):
    """Train a few steps of the micro config in this process layout; returns the final parameters
    and the BN running statistics of the backbone."""
    torch.set_num_threads(1)
    cfg = micro_config(train__virtual_devices=V, train__steps=3, train__checkpoint_every=0)
    cfg.simt.sync_bn = sync_bn
    data = gppf.Data(cfg)
    model = gppf.build_model(cfg, data, data.pretraining, lego=lego)
    tr = Trainer(model, gppf.train_sources(data, model, data.pretraining), cfg.train, cfg.optim, cfg.schedule,
                 out, reduction="task_average")
    for _ in range(cfg.train.steps):
        tr.train_step()
    syncbn = [type(m).__name__ for m in model.backbone.modules() if "BatchNorm" in type(m).__name__]
    return {"params": {k: v.detach().clone() for k, v in model.named_parameters()},
            "running": {k: v.clone() for k, v in model.backbone.named_buffers() if "running_mean" in k},
            "bn": sorted(set(syncbn)), "slots": [tr.assignment(s) for s in range(3)]}


def _two_process_worker(rank, world, out):
    """One spawn of 2 gloo ranks for the SIMT tests: (plain ResNet, no SyncBN, 2 slots per rank),
    (lego, SyncBN) and (lego, per-rank BN)."""
    return {"plain": _layout_worker(rank, world, os.path.join(out, "plain"), False, False, 2),
            "sync": _layout_worker(rank, world, os.path.join(out, "sync"), True, True, 2),
            "nosync": _layout_worker(rank, world, os.path.join(out, "nosync"), True, False, 2)}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("simt"))
    return mk.distributed.run_processes(_two_process_worker, 2, args=(out,), timeout=300)


@pytest.mark.slow
def test_slot_task_average_is_the_same_for_2_processes_x_2_slots_and_1_process_x_4_slots(two_processes, tmp_path):
    """The slot task average does not depend on how the slots are laid over processes: 2 gloo ranks x
    2 virtual devices and 1 process x 4 virtual devices (same draws, same batches, per-slot BN) end
    with the same weights, heads included (the trainer alone would scale heads by their slot count)."""
    two = [r["plain"] for r in two_processes]
    one = _layout_worker(0, 1, str(tmp_path / "b"), False, False, 4)
    assert two[0]["slots"] == one["slots"]
    assert len({s for step in one["slots"] for s in step}) >= 2  # the steps mix tasks
    for k, v in one["params"].items():
        torch.testing.assert_close(two[0]["params"][k], v, rtol=1e-4, atol=1e-5, msg=k)
        torch.testing.assert_close(two[1]["params"][k], two[0]["params"][k], rtol=0, atol=0)


@pytest.mark.slow
def test_two_process_simt_with_cross_task_syncbn(two_processes):
    """2 gloo ranks x 2 slots of the lego model: BN layers are SyncBatchNorm, ranks training different
    tasks end with identical weights and identical BN running statistics (cross-task statistics), and
    without SyncBN the running statistics differ per rank."""
    res = [r["sync"] for r in two_processes]
    assert res[0]["bn"] == ["SyncBatchNorm"]
    slots = res[0]["slots"]
    assert any(step[:2] != step[2:] for step in slots)  # the ranks ran different tasks
    for k in res[0]["params"]:
        torch.testing.assert_close(res[1]["params"][k], res[0]["params"][k], rtol=0, atol=0, msg=k)
    for k in res[0]["running"]:
        torch.testing.assert_close(res[1]["running"][k], res[0]["running"][k], rtol=1e-5, atol=1e-6, msg=k)
    plain = [r["nosync"] for r in two_processes]
    assert plain[0]["bn"] == ["BatchNorm2d"]
    assert any(not torch.allclose(plain[0]["running"][k], plain[1]["running"][k]) for k in plain[0]["running"])


@pytest.mark.slow
def test_the_recipe_starts_its_own_two_gloo_processes(tmp_path):
    """``procs = 2`` without a launcher: run() spawns 2 gloo workers (what `moe-kernels pretrain gppf
    --preset cpu-tiny` does) and returns rank 0's results."""
    out = str(tmp_path / "run2")
    cfg = micro_config(procs=2, train__steps=2)
    cfg.studies.baselines = []
    cfg.downstream.sources = []
    res = gppf.run(cfg, out, stages=("pretrain", "extract"))
    assert res["world_size"] == 2 and res["runs"]["dynet"]["sync_bn"]
    assert res["runs"]["dynet"]["world_size"] == 2
    st = torch.load(os.path.join(out, "dynet", "checkpoints", "step_0000002", "state.pt"), weights_only=False)
    assert st["world_size"] == 2 and st["virtual_devices"] == 2


# ----------------------------------------------------------------------------- extraction

def test_extracted_paths_are_plain_resnets_with_the_lego_models_eval_output():
    torch.manual_seed(0)
    cfg = micro_config()
    lego = gppf.build_backbone(cfg.model, num_tasks=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lego.lego_layers():
            for c in layer.controllers:
                c.copy_(torch.randn(c.shape, generator=g))
    # run a few training forwards so the BN running statistics are not the initial ones
    for t in range(3):
        lego(torch.randn(4, 3, 32, 32), t)
    lego.eval()
    paths = mk.nn.selected_paths(lego)
    assert len({tuple(p) for p in paths}) > 1  # the tasks chose different paths
    plain_count = sum(p.numel() for p in gppf.build_backbone(cfg.model, 1, lego=False).parameters())
    x = torch.randn(3, 3, 32, 32)
    for t in range(3):
        plain = mk.nn.extract_path(lego, t)
        assert isinstance(plain, ResNet)
        assert not any(isinstance(m, mk.nn.LegoLayer) for m in plain.modules())
        assert sum(p.numel() for p in plain.parameters()) == plain_count
        # the stem is the selected unit's copy
        k = lego.stem.selected(t)
        torch.testing.assert_close(plain.stem[0].weight, lego.stem.units[k][0].weight, rtol=0, atol=0)
        for a, b in zip(lego(x, t).features, plain.eval()(x).features):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_task_average_is_over_slots(tmp_path):
    """A head whose task n of the step's slots drew gets the mean of those n slots' gradients (not
    the sum / V); the shared backbone gets the mean over all V slots."""
    cfg = micro_config(train__virtual_devices=4, train__steps=1, train__checkpoint_every=0)
    data = gppf.Data(cfg)
    model = gppf.build_model(cfg, data, data.pretraining, lego=False)
    tr = Trainer(model, gppf.train_sources(data, model, data.pretraining), cfg.train,
                 dataclasses.replace(cfg.optim, lr=0.0, weight_decay=0.0, momentum=0.0, clip_grad=0.0), cfg.schedule, str(tmp_path),
                 reduction="task_average")
    slots = tr.assignment(0)
    cursors = dict(tr.cursors)
    expected = {}
    for src, idx in tr.batches_for(0):  # each slot's own gradient, one at a time
        s = tr.sources[src]
        model.zero_grad(set_to_none=True)
        (model.step_loss(src, s.collate([s.dataset[i] for i in idx]))["loss"] * s.loss_weight).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                expected.setdefault(n, []).append(p.grad.clone())
    model.zero_grad(set_to_none=True)
    tr.cursors = cursors
    tr._perm_cache.clear()
    seen = {}
    orig = tr._reduce_gradients

    def capture():  # the gradients the optimiser steps with
        orig()
        seen.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    tr._reduce_gradients = capture
    tr.train_step()
    assert set(seen) == set(expected)
    for n, gs in expected.items():
        torch.testing.assert_close(seen[n], sum(gs) / len(gs), rtol=1e-5, atol=1e-7)
    heads = {src: sum(1 for s in slots if s == src) for src in set(slots)}
    first = next(iter(heads))
    assert any(len(expected[n]) == heads[first] for n in expected if n.startswith(f"heads.{first}."))
