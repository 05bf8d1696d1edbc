"""The recipes' trainer, optimiser groups, schedules and sampler (moe_recipes.trainer / optim)."""

import json
import math
import os

import pytest
import torch

from moe_recipes.config import OptimConfig, ScheduleConfig, SourceConfig, TrainConfig, WorldConfig
from moe_recipes.optim import build_optimizer, lr_factor, no_weight_decay, param_groups
from moe_recipes.recipes import mthl
from moe_recipes.trainer import Trainer


def tiny_cfg(**train):
    cfg = mthl.MTHLConfig(
        world=WorldConfig(seed=0, image_size=32, size=200),
        model=mthl.MTHLModelConfig(embed_dim=16, depths=[1, 1, 1, 1], heads=[1, 1, 2, 2], num_experts=5, k=2,
                                   head_channels=8),
        sources=[SourceConfig("cls/textures", 3.0, 1.0, 4), SourceConfig("det/medium", 2.0, 0.6, 1),
                 SourceConfig("seg/street", 1.0, 0.2, 1)],
        optim=OptimConfig(name="lamb", lr=4e-3, weight_decay=0.05, clip_grad=0.1),
        schedule=ScheduleConfig(kind="triangular", warmup=0.1),
        train=TrainConfig(**{**dict(steps=8, log_every=1, checkpoint_every=4, eval_samples=8, eval_batch_size=8,
                                    progress=False, virtual_devices=2), **train}))
    return cfg


def make_trainer(cfg, out):
    data = mthl.Data(cfg)
    model = mthl.build_model(cfg, data, data.pretraining)
    return Trainer(model, mthl.train_sources(data, model, data.pretraining), cfg.train, cfg.optim, cfg.schedule,
                   str(out), seed=cfg.seed)


def train_losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r["losses"], r["loss"]) for r in map(json.loads, f) if r["kind"] == "train"]


def test_exact_resume(tmp_path):
    """Interrupted at step 4 and resumed: the losses from step 5 on and the final weights, optimiser
    state and MI buffers are the uninterrupted run's, bit for bit (RNG, sampler cursors, LAMB state,
    schedule and the MI loss's EMA buffer are all restored)."""
    cfg = tiny_cfg()
    a = make_trainer(cfg, tmp_path / "a")
    a.fit()
    b = make_trainer(cfg, tmp_path / "b")
    b.fit(stop_at=4)
    assert b.step == 4 and b.latest_checkpoint().endswith("step_0000004")
    del b
    c = make_trainer(cfg, tmp_path / "b")  # a new process would build everything afresh, as here
    c.fit(resume=True)
    la, lb = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert [s for s, *_ in lb] == list(range(1, 9))
    assert la == lb  # floats compared exactly
    sa, sc = a.model.state_dict(), c.model.state_dict()
    assert sa.keys() == sc.keys()
    for k in sa:
        assert torch.equal(sa[k], sc[k]), k
    assert any("mutual_information.joint" in k for k in sa)
    assert a.cursors == c.cursors


def test_resume_refuses_other_layout(tmp_path):
    cfg = tiny_cfg()
    t = make_trainer(cfg, tmp_path)
    t.fit(stop_at=4)
    other = make_trainer(tiny_cfg(virtual_devices=1), tmp_path)
    with pytest.raises(ValueError, match="virtual devices"):
        other.fit(resume=True)


def test_sampler_frequencies_and_streams(tmp_path):
    """Slots draw sources in proportion to the sampling weights {3, 2, 1}; each source's stream is a
    permutation of its training indices per epoch (no index repeats before all were seen)."""
    cfg = tiny_cfg(virtual_devices=4)
    t = make_trainer(cfg, tmp_path)
    n = 600
    counts = {s: 0 for s in t.sources}
    for step in range(n):
        for s in t.assignment(step):
            counts[s] += 1
    total = 4 * n
    for s, w in zip(("cls/textures", "det/medium", "seg/street"), (3, 2, 1)):
        p = w / 6
        sd = math.sqrt(p * (1 - p) / total)
        assert abs(counts[s] / total - p) < 4 * sd, (s, counts[s] / total, p)
    src = t.sources["seg/street"]
    L = len(src.train_indices)
    seen = t._take("seg/street", L)
    assert sorted(seen) == list(src.train_indices)
    again = t._take("seg/street", L)
    assert sorted(again) == sorted(seen) and again != seen  # a new epoch, a new order
    # global sampling: one source per step for every slot
    g = make_trainer(tiny_cfg(virtual_devices=4, sampling="global"), tmp_path / "g")
    assert all(len(set(g.assignment(s))) == 1 for s in range(50))
    assert len({g.assignment(s)[0] for s in range(50)}) == 3


def test_param_groups_no_decay():
    cfg = tiny_cfg()
    data = mthl.Data(cfg)
    model = mthl.build_model(cfg, data, data.pretraining)
    decayed = {n for n, p in model.named_parameters() if not no_weight_decay(n, p)}
    assert decayed and all(n.endswith(("weight", "w1", "w2")) for n in decayed)
    assert not any("router" in n or "norm" in n or n.endswith((".b1", ".b2", "bias")) for n in decayed)
    groups = param_groups(model, 0.05, {"heads.": 10.0})
    by = {g["name"]: g for g in groups}
    assert by["heads./decay"]["lr_scale"] == 10.0 and by["all/no_decay"]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    opt, impl = build_optimizer(model, cfg.optim)
    assert impl == "pytorch_optimizer.Lamb"  # CPU: no fused LAMB
    with pytest.raises(ValueError, match="'name'"):
        build_optimizer(model, OptimConfig(name="adam"))


def test_schedules():
    tri = lr_factor(ScheduleConfig("triangular", 0.1), 100)
    assert tri(0) == pytest.approx(0.1) and tri(9) == pytest.approx(1.0) and tri(10) == pytest.approx(1.0)
    assert tri(55) == pytest.approx(0.5) and tri(99) == pytest.approx(1 / 90)
    cos = lr_factor(ScheduleConfig("cosine", 0.0, 0.1), 100)
    assert cos(0) == pytest.approx(1.0) and cos(50) == pytest.approx(0.55) and cos(100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="'kind'"):
        lr_factor(ScheduleConfig("step"), 10)


def test_trainer_rejects_bad_sources(tmp_path):
    cfg = tiny_cfg()
    t = make_trainer(cfg, tmp_path)
    srcs = list(t.sources.values())
    with pytest.raises(ValueError, match="distinct"):
        Trainer(t.model, [srcs[0], srcs[0]], cfg.train, cfg.optim, cfg.schedule, str(tmp_path))
    with pytest.raises(ValueError, match="sampling"):
        Trainer(t.model, srcs, TrainConfig(sampling="random"), cfg.optim, cfg.schedule, str(tmp_path))


def test_backends_give_the_same_loss_curve(tmp_path, monkeypatch):
    """Convergence: the `cpu` (C++) and `reference` backends train the same model to the same loss
    curve. Tolerance: the backends agree per op to fp32 rounding (~1e-6 relative); over 8 LAMB steps
    the difference grows but stays far below the loss changes (> 1e-2): rel 1e-3."""
    curves = {}
    for backend in ("reference", "cpu"):
        monkeypatch.setenv("MOE_KERNELS_BACKEND", backend)
        make_trainer(tiny_cfg(), tmp_path / backend).fit()
        curves[backend] = train_losses(tmp_path / backend)
    ref, cpu = curves["reference"], curves["cpu"]
    assert [s for s, *_ in ref] == [s for s, *_ in cpu]
    for (_, _, a), (_, _, b) in zip(ref, cpu):
        assert b == pytest.approx(a, rel=1e-3)
    assert max(a for *_, a in ref) - min(a for *_, a in ref) > 1e-2  # the curve moves: the check means something


def _two_rank_child(rank, world, out):
    cfg = tiny_cfg(virtual_devices=1, steps=4, checkpoint_every=2)
    t = make_trainer(cfg, out)
    t.fit()
    params = torch.cat([p.detach().reshape(-1) for p in t.model.parameters()])
    joint = torch.cat([b.reshape(-1) for n, b in t.model.named_buffers() if n.endswith("mutual_information.joint")])
    # a fresh trainer of this rank resumes from the checkpoint rank 0 wrote (and its own RNG file)
    again = make_trainer(cfg, out)
    again.load_checkpoint(again.latest_checkpoint())
    resumed = torch.cat([p.detach().reshape(-1) for p in again.model.parameters()])
    return params, joint, [t.assignment(s) for s in range(4)], dict(t.cursors), torch.equal(resumed, params)


@pytest.mark.distributed
def test_two_ranks_stay_identical(tmp_path):
    """Per-rank sampling over 2 gloo processes: each rank trains its own source per step, gradients
    are averaged (parameters no rank used keep no gradient), the MI buffer is averaged: after 4 steps
    both ranks hold the same weights and buffers, and both know every slot's source."""
    from moe_kernels.distributed import run_processes

    (p0, j0, a0, c0, r0), (p1, j1, a1, c1, r1) = run_processes(_two_rank_child, 2, args=(str(tmp_path),),
                                                                timeout=300)
    assert torch.equal(p0, p1) and torch.equal(j0, j1)
    assert r0 and r1
    assert a0 == a1 and c0 == c1
    assert any(len(set(a)) > 1 for a in a0)  # ranks trained different sources in some step
    assert (tmp_path / "checkpoints" / "step_0000004" / "rng_rank1.pt").exists()
