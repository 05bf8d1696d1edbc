"""MTHL (Chen et al., "An Efficient General-Purpose Modular Vision Model via Multi-Task Heterogeneous
Training", arXiv:2306.17165; RECIPES.md section 5): heterogeneous MoE pre-training, then modular
adaptation, in miniature on the built-in world (or real data by path).

Stages (each writes into the run folder and is skipped when its result is already there):

* ``pretrain``: the MoE backbone (12 experts, top-4, the expert hidden size divided by K, one router
  per dataset, the EMA MI loss with momentum 0.98) with a head per source, two-step sampling
  {3, 2, 1}, loss weights {1.0, 0.6, 0.2}, LAMB with the triangular schedule, clip 0.1.
* ``baselines``: the same code with a dense backbone (MTHL.D), each source alone ("Scratch",
  trained on as many of its samples as the joint run saw), and the classification source alone
  (the "IN-1K Pre." initialisation of Tab. 2).
* ``downstream`` (Tab. 2): FT-Full of each pre-trained backbone on every downstream source.
* ``adapt`` (Tab. 3): router only, router + 1/2 random experts, prune 1/2, 2/3, theta 1%/5%,
  top-K 3/2/1, Hybrid-A, Hybrid-B; each row with trainable parameters, model parameters, FLOPs.
* ``continual`` (Tab. 4): the downstream sources one after another, each with 1 (or 2) new experts
  per MoE layer and a new router, everything old frozen; the old datasets' outputs are checked
  bit-identical after every addition.
* ``report``: ``report.md`` with the tables beside the paper's numbers, the directional claims of
  RECIPES.md 6.4, the expert-usage heatmap and the loss curves.

Decisions where the paper is silent are RECIPES.md 5.6's and are listed in the report.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

import moe_kernels as mk

from ..config import OptimConfig, ScheduleConfig, SourceConfig, TrainConfig, WorldConfig
from ..metrics import plain_mean, task_type_mean
from ..models.multisource import MultiSourceModel
from ..models.transformer import PRESETS, HierarchicalTransformer
from ..tasks import PRIMARY
from ..trainer import Trainer, TrainSource
from .common import SourceData, final_state, finetune, run_folder, train_sources, write_config, write_json

Data = SourceData  # MTHL needs nothing more of its sources

STAGES = ("pretrain", "baselines", "downstream", "adapt", "continual", "report")
ADAPT_ROWS = ("ft_full", "router_only", "router_1ex", "router_2ex", "prune_half", "prune_two_thirds",
              "prune_theta_1", "prune_theta_5", "topk_3", "topk_2", "topk_1", "hybrid_a", "hybrid_b")


@dataclass
class MTHLModelConfig:
    backbone: str = "cpu-tiny"  # a preset of moe_recipes.models.transformer.PRESETS
    embed_dim: int = 0  # 0: the preset's
    depths: List[int] = field(default_factory=list)  # []: the preset's
    heads: List[int] = field(default_factory=list)
    window: int = 0
    moe: str = "every"  # every (tiny/small), every_second (base), none (MTHL.D)
    num_experts: int = 12
    k: int = 4
    mi_coef: float = 0.005  # per MoE layer, summed over layers (RECIPES.md 5.6 item 1)
    mi_loss: str = "ema"
    mi_momentum: float = 0.98
    renormalize: bool = False  # Eq. 2: no renormalisation of the top-K gates (5.6 item 4)
    load_balancing_coef: float = 0.0  # MTHL's only auxiliary loss is the MI loss
    z_loss_coef: float = 0.0
    head_channels: int = 32


@dataclass
class DownstreamConfig:
    sources: List[SourceConfig] = field(default_factory=list)
    steps: int = 100
    lr_cls: List[float] = field(default_factory=lambda: [1e-3])
    lr_det: List[float] = field(default_factory=lambda: [1e-3])
    lr_seg: List[float] = field(default_factory=lambda: [1e-3])
    lr_depth: List[float] = field(default_factory=lambda: [1e-3])
    router_steps: int = 30  # the new router's own training before pruning (Tab. 3 prune / hybrid rows),
    # taken out of their `steps`: every row has the same total budget
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(kind="cosine", warmup=0.1))
    eval_samples: int = 64


@dataclass
class StudiesConfig:
    baselines: List[str] = field(default_factory=lambda: ["mthl_d", "scratch", "cls_only", "pre_ft"])
    adapt_rows: List[str] = field(default_factory=lambda: list(ADAPT_ROWS))
    continual_experts: List[int] = field(default_factory=lambda: [1, 2])
    seed: int = 0  # random expert choice of the router + n experts rows


@dataclass
class MTHLConfig:
    recipe: str = "mthl"
    preset: str = ""
    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    model: MTHLModelConfig = field(default_factory=MTHLModelConfig)
    sources: List[SourceConfig] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    studies: StudiesConfig = field(default_factory=StudiesConfig)
    deepspeed: str = ""  # a DeepSpeed config JSON path: train the MTHL pre-training through its engine


# ----------------------------------------------------------------------------- model and data

def build_backbone(cfg: MTHLModelConfig, num_tasks: int, dense: bool = False) -> HierarchicalTransformer:
    over = {}
    if cfg.embed_dim:
        over["embed_dim"] = cfg.embed_dim
    if cfg.depths:
        over["depths"] = tuple(cfg.depths)
    if cfg.heads:
        over["heads"] = tuple(cfg.heads)
    if cfg.window:
        over["window"] = cfg.window
    if cfg.backbone not in PRESETS:
        raise ValueError(f"mthl: 'model.backbone' must be one of {sorted(PRESETS)}, got {cfg.backbone!r}")
    opts = dict(mi_coef=cfg.mi_coef, mi_loss=cfg.mi_loss, mi_momentum=cfg.mi_momentum, renormalize=cfg.renormalize,
                load_balancing_coef=cfg.load_balancing_coef, z_loss_coef=cfg.z_loss_coef)
    return HierarchicalTransformer(cfg.backbone, moe="none" if dense else cfg.moe, num_experts=cfg.num_experts,
                                   k=cfg.k, num_tasks=num_tasks, moe_options=opts, **over)


def build_model(cfg: MTHLConfig, data: Data, sources: List[str], dense: bool = False) -> MultiSourceModel:
    torch.manual_seed(cfg.seed)
    bb = build_backbone(cfg.model, len(sources), dense)
    heads = {n: (data.task(n), data.num_classes(n)) for n in sources}
    opts = {t: {"channels": cfg.model.head_channels} for t in ("det", "seg", "depth")}
    return MultiSourceModel(bb, heads, None if dense else {n: i for i, n in enumerate(sources)},
                            image_size=cfg.world.image_size, head_options=opts)


def pretrain_variant(cfg: MTHLConfig, data: Data, out: str, variant: str, resume: bool = True,
                     init_from: Optional[MultiSourceModel] = None):
    """Train one pre-training variant: ``mthl`` (MoE, all sources), ``mthl_d`` (dense, all sources),
    ``single:<source>`` (that source alone with the dense backbone, as a standard single-task model,
    trained on as many samples of the source as the joint run saw) or ``preft:<source>`` (the same,
    starting from ``init_from``'s backbone: Tab. 1's "Pre.&FT." row). Returns ``(model, eval metrics)``."""
    folder = run_folder(os.path.join(out, variant.replace(":", "_").replace("/", "_")))
    dense = variant != "mthl"
    single = variant.startswith(("single:", "preft:"))
    names = data.pretraining if not single else [variant.split(":", 1)[1]]
    model = build_model(cfg, data, names, dense=dense)
    if variant.startswith("preft:"):
        if init_from is None:
            raise ValueError("mthl: the preft variant needs 'init_from' (the classification-only model)")
        model.backbone.load_state_dict(init_from.backbone.state_dict())
    train = cfg.train
    if single:
        share = data.specs[names[0]].weight / sum(data.specs[n].weight for n in data.pretraining)
        train = dataclasses.replace(train, steps=max(int(round(train.steps * share * train.virtual_devices)), 1),
                                    virtual_devices=1)
    done = os.path.join(folder, "eval.json")
    final = final_state(folder)
    if resume and os.path.exists(done) and final is not None and final["step"] == train.steps:
        model.load_state_dict(final["model"])
        with open(done) as f:
            return model, json.load(f)
    if train.backend:
        os.environ["MOE_KERNELS_BACKEND"] = train.backend  # the library's backend choice for every op
    ds_cfg = cfg.deepspeed or None
    tr = Trainer(model, train_sources(data, model, names), train, cfg.optim, cfg.schedule, folder, seed=cfg.seed,
                 deepspeed_config=ds_cfg if variant == "mthl" else None)
    t0 = time.time()
    tr.fit(resume=resume)
    res = tr.last_eval
    write_json(done, res)
    write_json(os.path.join(folder, "run.json"), {"variant": variant, "steps": train.steps, "seconds": time.time() - t0,
                                                 "optimizer": tr.optimizer_impl,
                                                 "params": sum(p.numel() for p in model.backbone.parameters())})
    return model, res


# ----------------------------------------------------------------------------- downstream and adaptation

def _lrs(cfg: MTHLConfig, task: str) -> List[float]:
    return list(getattr(cfg.downstream, f"lr_{task}"))


ROUTER_PHASE_ROWS = ("prune_half", "prune_two_thirds", "prune_theta_1", "prune_theta_5", "hybrid_a", "hybrid_b")


def _finetune(cfg, data, model, name, out, prepare, tag, steps=None):
    ds, task, n, tr, te = data.items[name]
    spec = data.specs[name]
    return finetune(model, name, ds, tr, te, None, steps=steps or cfg.downstream.steps, batch_size=spec.batch_size,
                    lrs=_lrs(cfg, task), optim=cfg.downstream.optim, schedule=cfg.downstream.schedule,
                    out_dir=os.path.join(out, tag, name.replace("/", "_")), seed=cfg.seed,
                    eval_batch_size=cfg.train.eval_batch_size, prepare=prepare, task=task)


def backbone_stats(model: MultiSourceModel, name: str, image_size: int) -> dict:
    """Trainable parameters (backbone + the source's head), backbone parameters and backbone GFLOPs at
    one image of ``image_size`` for source ``name`` (dense parts by torch's FLOP counter, MoE layers
    by ``mk.adapt.flops_per_token`` times their tokens: routing, k experts per token)."""
    from torch.utils.flop_counter import FlopCounterMode

    bb = model.backbone
    trainable = sum(p.numel() for p in bb.parameters() if p.requires_grad)
    trainable += sum(p.numel() for p in model.heads[name].parameters() if p.requires_grad)
    params = mk.adapt.stats(bb).params if bb.moe_layers() else sum(p.numel() for p in bb.parameters())
    x = torch.zeros(1, 3, image_size, image_size)
    tokens: Dict[int, int] = {}
    hooks = []
    for layer in bb.moe_layers():
        hooks.append(layer.register_forward_pre_hook(
            lambda m, args: tokens.__setitem__(id(m), args[0].shape[0] * args[0].shape[1] if args[0].dim() == 3
                                               else args[0].shape[0])))
    was = bb.training
    bb.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model.features(name, x)
    finally:
        bb.train(was)
        for h in hooks:
            h.remove()
    tid = model.task_ids[name]
    moe = sum(mk.adapt.flops_per_token(layer, -1 if tid is None else tid) * tokens.get(id(layer), 0)
              for layer in bb.moe_layers())
    return {"trainable_M": trainable / 1e6, "params_M": params / 1e6, "GFLOPs": (fc.get_total_flops() + moe) / 1e9}


def _train_router_phase(cfg, data, m, name):
    """Train the new router (and the new head) alone for ``router_steps`` (the first phase of the
    prune and hybrid rows), in place."""
    ds, task, n, tr, te = data.items[name]
    spec = data.specs[name]
    tcfg = TrainConfig(steps=cfg.downstream.router_steps, log_every=10 ** 9, eval_every=0, checkpoint_every=0,
                       progress=False)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        Trainer(m, [TrainSource(name, ds, tr, te, m.heads[name].collate, 1.0, 1.0, spec.batch_size)], tcfg,
                dataclasses.replace(cfg.downstream.optim, lr=_lrs(cfg, task)[0]), cfg.downstream.schedule, d,
                seed=cfg.seed).fit()


def _usage(cfg, data, m, name):
    ds, task, n, tr, te = data.items[name]
    head = m.heads[name]
    bs = cfg.train.eval_batch_size
    idx = list(tr)[:max(bs * 4, 64)]
    m.eval()
    with torch.no_grad(), mk.nn.ExpertUsage(m.backbone) as usage:
        for j in range(0, len(idx), bs):
            m.features(name, head.collate([ds[i] for i in idx[j:j + bs]])["images"])
    m.train()
    return usage


def _unfreeze_all(m):
    mk.adapt.merge(m.backbone, trainable=True)
    for p in m.parameters():
        p.requires_grad_(True)


def adaptation_prepare(row: str, cfg: MTHLConfig, data: Data, name: str):
    """The ``prepare`` of one Tab. 3 row for downstream source ``name`` (RECIPES.md 5.5)."""
    task, n = data.task(name), data.num_classes(name)
    gen = torch.Generator().manual_seed(cfg.studies.seed)

    def add(m, **kw):
        rep = mk.adapt.add_router(m.backbone, generator=gen, **kw)
        m.add_source(name, task, n, rep.new_task)
        return rep

    def prune(m, **kw):
        rep = add(m)
        _train_router_phase(cfg, data, m, name)
        mk.adapt.prune_experts(m.backbone, usage=_usage(cfg, data, m, name), tasks=rep.new_task, **kw)
        return rep

    def hybrid(m, experts, k):
        rep = prune(m, fraction=2 / 3)
        mk.adapt.set_top_k(m.backbone, k)
        for layer in m.backbone.moe_layers():
            E = layer.num_experts
            ids = torch.randperm(E, generator=gen)[:experts].tolist()
            for p in ("w1", "w2", "b1", "b2"):
                if getattr(layer, p, None) is not None:
                    layer.set_trainable_rows(p, ids)
            layer.set_trainable_rows("router_weight", [rep.new_task])

    def prepare(m):
        m.heads.requires_grad_(False)  # the old datasets' heads take no part in a new dataset
        if row == "ft_full":
            add(m, freeze=False)
        elif row == "router_only":
            add(m)
        elif row in ("router_1ex", "router_2ex"):
            add(m, unfreeze_experts=int(row[7]))
        elif row in ("prune_half", "prune_two_thirds"):
            prune(m, fraction=0.5 if row == "prune_half" else 2 / 3)
            _unfreeze_all(m)
        elif row in ("prune_theta_1", "prune_theta_5"):
            prune(m, threshold=0.01 if row.endswith("1") else 0.05)
            _unfreeze_all(m)
        elif row.startswith("topk_"):
            add(m, freeze=False)
            mk.adapt.set_top_k(m.backbone, int(row[-1]))
        elif row == "hybrid_a":
            hybrid(m, 1, 2)
        elif row == "hybrid_b":
            hybrid(m, 2, 3)
        else:
            raise ValueError(f"mthl: unknown adaptation row {row!r}; the rows are {list(ADAPT_ROWS)}")

    return prepare


def run_row(cfg: MTHLConfig, data: Data, base: MultiSourceModel, row: str, out: str, base_tag: str = "mthl") -> dict:
    """One row of Tab. 3 (or FT-Full of Tab. 2 for ``base_tag`` != mthl): per downstream source the
    best metric over the LR grid and the cost columns; the row's Mean as Tab. 2 defines it."""
    path = os.path.join(out, "rows", f"{base_tag}__{row}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    per = {}
    for name in data.downstream:
        if base_tag in ("mthl_d", "cls_only") or not base.backbone.moe_layers():
            def prep(m, name=name):
                m.add_source(name, data.task(name), data.num_classes(name), None if not m.backbone.moe_layers()
                             else mk.adapt.add_router(m.backbone, freeze=False).new_task)
        else:
            prep = adaptation_prepare(row, cfg, data, name)
        # one budget for every row: the rows that first train the new router alone get that many fewer
        # fine-tuning steps (RECIPES.md 5.6 item 9)
        steps = cfg.downstream.steps - (cfg.downstream.router_steps if row in ROUTER_PHASE_ROWS else 0)
        best = _finetune(cfg, data, base, name, out, prep, f"{base_tag}__{row}", steps=max(steps, 1))
        cost = backbone_stats(best["model"], name, data.items[name][0][0]["image"].shape[-1])
        per[name] = {"task": data.task(name), "metric": best["primary"], "lr": best["lr"], "grid": best["grid"],
                     "metrics": best["metrics"], **cost}
    res = {"row": row, "base": base_tag, "per_source": per,
           "mean": task_type_mean({n: (v["task"], v["metric"]) for n, v in per.items()
                                   if v["task"] != "depth"}) if any(v["task"] != "depth" for v in per.values()) else None}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, res)
    print(f"[mthl] {base_tag:>8} {row:<18} mean {res['mean']:.2f}  " +
          "  ".join(f"{n}={v['metric']:.2f}" for n, v in per.items()), flush=True)
    return res


@torch.no_grad()
def _outputs(m: MultiSourceModel, data: Data, name: str, n: int = 4) -> torch.Tensor:
    ds = data.items[name][0]
    te = data.items[name][4]
    batch = m.heads[name].collate([ds[i] for i in list(te)[:n]])
    m.eval()
    feats = m.features(name, batch["images"]).features
    m.train()
    return torch.cat([f.flatten() for f in feats])


def run_continual(cfg: MTHLConfig, data: Data, base: MultiSourceModel, C: int, out: str) -> dict:
    """Tab. 4: the downstream sources in order, each with ``C`` new experts per layer and a new router;
    only the new experts, router and head train. After each addition every earlier dataset's
    backbone features (pre-training sources included) must be bit-identical to what they were."""
    path = os.path.join(out, "rows", f"continual_{C}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    m = copy.deepcopy(base)
    reference = {n: _outputs(m, data, n) for n in data.pretraining}
    per, identical = {}, True
    for name in data.downstream:
        ds, task, nc, tr, te = data.items[name]
        spec = data.specs[name]
        rep = mk.adapt.add_experts(m.backbone, C, generator=torch.Generator().manual_seed(cfg.studies.seed))
        m.add_source(name, task, nc, rep.new_task)
        tcfg = TrainConfig(steps=cfg.downstream.steps, log_every=max(cfg.downstream.steps // 5, 1), eval_every=0,
                           checkpoint_every=0, progress=False, eval_batch_size=cfg.train.eval_batch_size)
        folder = run_folder(os.path.join(out, f"continual_{C}", name.replace("/", "_")))
        tr_ = Trainer(m, [TrainSource(name, ds, tr, te, m.heads[name].collate, 1.0, 1.0, spec.batch_size)], tcfg,
                      dataclasses.replace(cfg.downstream.optim, lr=_lrs(cfg, task)[0]), cfg.downstream.schedule,
                      folder, seed=cfg.seed)
        tr_.fit()
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        per[name] = {"task": task, "metric": float(tr_.last_eval[name][PRIMARY[task]]),
                     "new_params_M": trainable / 1e6}
        for old, ref in reference.items():
            same = torch.equal(_outputs(m, data, old), ref)
            identical &= same
            if not same:
                print(f"[mthl] continual C={C}: outputs of {old} changed after adding {name}", flush=True)
        reference[name] = _outputs(m, data, name)
        mk.adapt.merge(m.backbone)  # fold the new rows back (frozen) before the next dataset
        for p in m.parameters():
            p.requires_grad_(False)
    res = {"C": C, "per_source": per, "average": plain_mean(v["metric"] for v in per.values()
                                                              if v["task"] != "depth"),
           "old_outputs_bit_identical": identical}
    write_json(path, res)
    print(f"[mthl] continual C={C}: average {res['average']:.2f}, old outputs bit-identical: {identical}", flush=True)
    return res


# ----------------------------------------------------------------------------- the recipe

def _collect(cfg: MTHLConfig, data: Data, out: str, results: dict) -> dict:
    """``results`` completed with everything earlier calls left in the run folder (a stage run alone,
    e.g. ``--stages report`` or one ``--rows``, reports every finished stage and row)."""
    def load(path):
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        return None

    def folder(variant):
        return os.path.join(out, variant.replace(":", "_").replace("/", "_"), "eval.json")

    pre = results["pretrain"]
    for key, variant in (("mthl", "mthl"), ("mthl_d", "mthl_d")):
        if key not in pre and load(folder(variant)) is not None:
            pre[key] = load(folder(variant))
    cls = [n for n in data.pretraining if data.task(n) == "cls"]
    for key, prefix, names in (("scratch", "single", data.pretraining),
                               ("pre_ft", "preft", [n for n in data.pretraining if n not in cls])):
        for n in names:
            r = load(folder(f"{prefix}:{n}"))
            if r is not None:
                pre.setdefault(key, {}).update({k: v for k, v in r.items() if k not in pre.get(key, {})})
    for tag in ("mthl", "mthl_d", "cls_only"):
        r = load(os.path.join(out, "rows", f"{tag}__ft_full.json"))
        if r is not None:
            results["downstream"].setdefault(tag, r)
    for row in ADAPT_ROWS:
        r = load(os.path.join(out, "rows", f"mthl__{row}.json"))
        if r is not None:
            results["adapt"].setdefault(row, r)
    for C in cfg.studies.continual_experts:
        r = load(os.path.join(out, "rows", f"continual_{C}.json"))
        if r is not None and C not in results["continual"]:
            results["continual"][C] = r
    return results


def run(cfg: MTHLConfig, out: str, *, resume: bool = True, stages=STAGES, rows: Optional[List[str]] = None) -> dict:
    """Run the recipe's ``stages`` into ``out`` (see the module doc); returns the results dict."""
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"mthl: unknown stage(s) {bad}; the stages are {list(STAGES)}")
    run_folder(out)
    write_config(out, cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data = Data(cfg)
    from ..trainer import init_distributed

    rank, world = init_distributed()
    if world > 1:  # under a launcher: the pre-training only; the studies run in one process afterwards
        stages = tuple(s for s in stages if s == "pretrain")
        if rank == 0:
            print(f"[mthl] {world} ranks: running the pre-training only; run the other stages in one process "
                  f"afterwards (moe-kernels pretrain mthl ... --stages baselines,downstream,adapt,continual,report)")
    results: dict = {"pretrain": {}, "downstream": {}, "adapt": {}, "continual": {}}
    need_base = any(s in stages for s in ("pretrain", "downstream", "adapt", "continual", "report"))
    models = {}
    if need_base:
        models["mthl"], results["pretrain"]["mthl"] = pretrain_variant(cfg, data, out, "mthl", resume)
    if "baselines" in stages or "downstream" in stages:
        for b in cfg.studies.baselines:
            if b == "mthl_d":
                models["mthl_d"], results["pretrain"]["mthl_d"] = pretrain_variant(cfg, data, out, "mthl_d", resume)
            elif b == "scratch":
                for n in data.pretraining:
                    _, r = pretrain_variant(cfg, data, out, f"single:{n}", resume)
                    results["pretrain"].setdefault("scratch", {}).update(r)
            elif b in ("cls_only", "pre_ft"):
                cls = [n for n in data.pretraining if data.task(n) == "cls"][0]
                if "cls_only" not in models:
                    models["cls_only"], _ = pretrain_variant(cfg, data, out, f"single:{cls}", resume)
                if b == "pre_ft":
                    for n in data.pretraining:
                        if n != cls:
                            _, r = pretrain_variant(cfg, data, out, f"preft:{n}", resume, models["cls_only"])
                            results["pretrain"].setdefault("pre_ft", {}).update(r)
            else:
                raise ValueError(f"mthl: unknown baseline {b!r} (mthl_d, scratch, cls_only, pre_ft)")
    if "downstream" in stages:
        for tag, m in models.items():
            results["downstream"][tag] = run_row(cfg, data, m, "ft_full", out, base_tag=tag)
    if "adapt" in stages:
        for row in (rows or cfg.studies.adapt_rows):
            results["adapt"][row] = run_row(cfg, data, models["mthl"], row, out)
    if "continual" in stages:
        for C in cfg.studies.continual_experts:
            results["continual"][C] = run_continual(cfg, data, models["mthl"], C, out)
    results = _collect(cfg, data, out, results)
    write_json(os.path.join(out, "results.json"), results)
    if "report" in stages:
        from .mthl_report import write_report

        write_report(cfg, data, models["mthl"], out)
    return results


__all__ = ["MTHLConfig", "MTHLModelConfig", "DownstreamConfig", "StudiesConfig", "STAGES", "ADAPT_ROWS", "run",
           "build_backbone", "build_model", "pretrain_variant", "run_row", "run_continual", "backbone_stats",
           "adaptation_prepare"]
