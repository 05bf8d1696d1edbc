"""The MTHL recipe: adaptation rows do what RECIPES.md 5.5 says, continual learning keeps old outputs
bit-identical, and the whole recipe runs end to end from the command line (micro sizes)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import moe_kernels as mk
from moe_recipes.config import OptimConfig, ScheduleConfig, SourceConfig, TrainConfig, WorldConfig
from moe_recipes.recipes import mthl

MICRO = ["world.size=120", "model.embed_dim=16", "model.depths=[1,1,1,1]", "model.heads=[1,1,2,2]",
         "model.num_experts=12", "model.k=4", "model.head_channels=16", "train.steps=6", "train.eval_samples=8",
         "train.checkpoint_every=3", "downstream.steps=3", "downstream.router_steps=2", "downstream.eval_samples=8",
         "sources.0.batch_size=4", "train.progress=false"]


def micro_cfg():
    return mthl.MTHLConfig(
        world=WorldConfig(0, 32, 120),
        model=mthl.MTHLModelConfig(embed_dim=16, depths=[1, 1, 1, 1], heads=[1, 1, 2, 2], num_experts=12, k=4,
                                   head_channels=16),
        sources=[SourceConfig("cls/textures", 3.0, 1.0, 4), SourceConfig("det/medium", 2.0, 0.6, 1),
                 SourceConfig("seg/street", 1.0, 0.2, 1)],
        optim=OptimConfig(), schedule=ScheduleConfig(),
        train=TrainConfig(steps=4, eval_samples=8, progress=False, checkpoint_every=0),
        downstream=mthl.DownstreamConfig(sources=[SourceConfig("down/cls_near_shapes", batch_size=4)], steps=2,
                                         router_steps=2, eval_samples=8))


@pytest.fixture(scope="module")
def setup():
    cfg = micro_cfg()
    data = mthl.Data(cfg)
    return cfg, data, mthl.build_model(cfg, data, data.pretraining)


def trainable(m):
    return {n for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("row", mthl.ADAPT_ROWS)
def test_adaptation_rows_train_what_the_paper_says(setup, row):
    cfg, data, base = setup
    m = __import__("copy").deepcopy(base)
    name = "down/cls_near_shapes"
    mthl.adaptation_prepare(row, cfg, data, name)(m)
    layers = m.backbone.moe_layers()
    tr = trainable(m)
    head = {n for n in tr if n.startswith(f"heads.{name}.")}
    assert head and m.task_ids[name] == 3  # a new router (task id 3) and a new head
    others = tr - head
    if row in ("router_only", "router_1ex", "router_2ex", "hybrid_a", "hybrid_b"):
        assert all(".moe." in n and n.endswith("_trainable") for n in others), sorted(others)[:5]
        rows = {n.rsplit(".", 1)[-1] for n in others}
        assert "router_weight_trainable" in rows
        n_ex = {"router_only": 0, "router_1ex": 1, "router_2ex": 2, "hybrid_a": 1, "hybrid_b": 2}[row]
        if n_ex:
            w1 = dict(m.named_parameters())[f"{[n for n, l in m.backbone.named_modules() if l is layers[0]][0]}"
                                            .join(["backbone.", ".w1_trainable"])]
            assert w1.shape[0] == n_ex
        else:
            assert rows == {"router_weight_trainable"}
    else:
        assert {n for n, _ in m.backbone.named_parameters(prefix="backbone")} <= tr  # the whole model
    if row.startswith("prune") or row.startswith("hybrid"):
        assert all(layer.num_experts < 12 for layer in layers)
        if row in ("prune_two_thirds", "hybrid_a", "hybrid_b"):
            assert all(layer.num_experts == 4 for layer in layers)
        if row == "prune_half":
            assert all(layer.num_experts == 6 for layer in layers)
    k = {"topk_3": 3, "topk_2": 2, "topk_1": 1, "hybrid_a": 2, "hybrid_b": 3}.get(row)
    if k is not None and not row.startswith("hybrid"):
        assert all(layer.k == k for layer in layers)
    # the copy is adapted, the base model is not
    assert all(layer.num_experts == 12 and layer.num_tasks == 3 for layer in base.backbone.moe_layers())


def test_continual_keeps_old_outputs_bit_identical(setup, tmp_path):
    cfg, data, base = setup
    res = mthl.run_continual(cfg, data, base, 1, str(tmp_path))
    assert res["old_outputs_bit_identical"] is True
    assert set(res["per_source"]) == {"down/cls_near_shapes"}
    assert all(layer.num_experts == 12 for layer in base.backbone.moe_layers())


def test_backbone_stats_count_the_pruned_model(setup):
    cfg, data, base = setup
    m = __import__("copy").deepcopy(base)
    before = mthl.backbone_stats(m, "cls/textures", 32)
    mk.adapt.prune_experts(m.backbone, num=6, usage={n: torch.arange(12.0) for n in mk.adapt.moe_layers(m.backbone)})
    after = mthl.backbone_stats(m, "cls/textures", 32)
    assert after["params_M"] < before["params_M"]
    assert after["GFLOPs"] == pytest.approx(before["GFLOPs"], rel=0.05)  # k experts per token either way
    mk.adapt.set_top_k(m.backbone, 1)
    assert mthl.backbone_stats(m, "cls/textures", 32)["GFLOPs"] < after["GFLOPs"]


@pytest.mark.slow
def test_recipe_end_to_end_from_the_command_line(tmp_path):
    """`moe-kernels pretrain mthl` writes config, metrics, checkpoints, every table row and report.md."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "moe_kernels", "pretrain", "mthl", "--preset", "cpu-tiny", "--out", str(out),
           "studies.adapt_rows=[\"ft_full\",\"router_only\",\"topk_1\"]", "studies.continual_experts=[1]"] + MICRO
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for f in ("config.json", "results.json", "report.md", "expert_usage.png", "loss_curves.png",
              "mthl/metrics.jsonl", "mthl_d/metrics.jsonl"):
        assert (out / f).exists(), f
    assert any((out / "mthl" / "checkpoints").iterdir())
    res = json.loads((out / "results.json").read_text())
    assert set(res["adapt"]) == {"ft_full", "router_only", "topk_1"}
    assert set(res["pretrain"]) == {"mthl", "mthl_d", "scratch", "pre_ft"}
    assert set(res["pretrain"]["pre_ft"]) == {"det/medium", "seg/street"}  # Pre.&FT.: det and seg from the cls model
    assert set(res["downstream"]) == {"mthl", "mthl_d", "cls_only"}
    assert res["continual"]["1"]["old_outputs_bit_identical"] is True
    report = (out / "report.md").read_text()
    for heading in ("Tab. 1", "Tab. 2", "Tab. 3", "Tab. 4", "Directional claims"):
        assert heading in report
    assert "| Ro. Only |" in report and "paper Mean" in report
    # a rerun resumes from what the folder holds: nothing is trained again
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    recs = [json.loads(x) for x in (out / "mthl" / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for r in recs if r["kind"] == "train" and r["step"] == 6) == 1


@pytest.mark.slow
@pytest.mark.peers
def test_paper_preset_one_step_under_deepspeed(tmp_path, deepspeed_ops):
    """The `paper` preset parses, builds and trains one step through a DeepSpeed engine (ZeRO stage 0 on
    CPU, gloo) at reduced width: the command of the preset's header, smoke-tested."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0}}))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "moe_kernels", "pretrain", "mthl", "--preset", "paper", "--out", str(out),
           "--stages", "pretrain", "model.embed_dim=24", "model.depths=[1,1,1,1]", "model.heads=[1,1,2,2]",
           "model.head_channels=16", "world.image_size=64", "world.size=60", "train.steps=1", "train.eval_samples=4",
           "train.eval_batch_size=4", "downstream.eval_samples=4", "sources.0.batch_size=4", f"deepspeed={ds}",
           "train.progress=false"]
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=deepspeed_ops)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    recs = [json.loads(x) for x in (out / "mthl" / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["kind"] == "train" and recs[0]["step"] == 1
    assert torch.isfinite(torch.tensor(recs[0]["loss"]))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["backbone"] == "swin-t" and cfg["train"]["steps"] == 1


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.peers
def test_pretraining_under_the_deepspeed_launcher_with_two_processes(tmp_path, deepspeed_ops):
    """`deepspeed --num_gpus 2 --module moe_recipes.cli pretrain mthl ...` (the paper preset's command
    shape) on 2 CPU processes: each rank joins the group, trains its own sources through the engine,
    rank 0 writes the logs and checkpoints."""
    import shutil

    from moe_kernels.distributed import free_port

    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable))
    if launcher is None:
        pytest.skip("the deepspeed launcher is not installed beside this python")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 0}}))
    out = tmp_path / "run"
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "moe_recipes.cli",
           "pretrain", "mthl", "--preset", "cpu-tiny", "--out", str(out), "--stages", "pretrain",
           "train.steps=4", "train.checkpoint_every=2", f"deepspeed={ds}"] + [m for m in MICRO if "steps" not in m]
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=deepspeed_ops,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, start_new_session=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    recs = [json.loads(x) for x in (out / "mthl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [4]  # one writer (rank 0)
    assert {r["source"] for r in recs if r["kind"] == "eval"} == {"cls/textures", "det/medium", "seg/street"}
    assert (out / "mthl" / "checkpoints" / "step_0000004" / "rng_rank1.pt").exists()
