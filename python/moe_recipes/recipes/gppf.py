"""GPPF (Sun et al., "GPPF: A General Perception Pre-training Framework via Sparsely Activated Multi-Task
Learning", arXiv:2208.02148; RECIPES.md section 3): SIMT pre-training of a lego (task-level dynamic)
ResNet, then path extraction and sparse fine-tuning, in miniature on the built-in world (or real data
by path).

Stages (each writes into the run folder and is skipped when its result is already there):

* ``pretrain``: "DyNet N=2" of Tab. 1: a ResNet whose stem and every residual block is a
  ``mk.nn.LegoLayer`` of N units, one Gumbel-softmax controller per task (temperature 5.0 -> 0.01
  linearly over ``gumbel.decay_fraction`` of the steps, then fixed; ``mk.nn.GumbelTemperature``), a
  head per task, w_t = 1, SGD (momentum 0.9, weight decay on weights only) with cosine decay and
  warm-up. SIMT: every device slot (``world size x train.virtual_devices``) samples its own task with
  the Tab. D.1-like weights at that task's batch size and input size; cross-task SyncBN
  (``mk.distributed.convert_sync_batchnorm``) over the ranks when there are >= 2; task-averaged
  gradients (``Trainer(reduction="task_average")``: each parameter averaged over the device slots
  that used it, virtual devices included).
* ``baselines``: the other rows of Tab. 1 with the same code: ``single`` (each task alone on a plain
  ResNet, budget matched so that the single budgets sum to the joint one), ``static`` (N = 1: a
  plain shared ResNet, SIMT + SyncBN) and the divergence checks ``global`` (per-batch task sampling:
  one task for every slot of a step) and ``no_syncbn`` (SIMT with per-rank BN; needs >= 2 ranks).
* ``extract``: per pre-training task the argmax unit per lego layer (``mk.nn.selected_paths``) and
  the plain ResNet of that path (``mk.nn.extract_path``), checked to give the lego model's eval output.
* ``finetune``: on the held-out ``down/*`` sources, through the fine-tuning harness of
  ``recipes/common.py``: the static backbone, fixed paths of pre-training tasks (the downstream
  source's "near" task and the classification task's, Tab. 4's "path IN21K" / "path COCO" rows) and
  dynamic fine-tuning (a new controller per lego layer, re-learned with the temperature decaying
  5.0 -> 0.01 over the first half of the steps, then the argmax path; Sec. 3.3, App. D.2).
* ``report``: ``report.md`` (see :mod:`moe_recipes.recipes.gppf_report`).

Processes (RECIPES.md 3.6 item 5): under a launcher (``torchrun --nproc_per_node 2 -m moe_recipes.cli
pretrain gppf ...``, ``deepspeed -m moe_recipes.cli ...``) each rank runs :func:`run` and joins the
process group the launcher describes. Without one, ``procs = P > 1`` in the preset (cpu-tiny and
cpu-small: 2) makes :func:`run` start P local gloo workers itself (``mk.distributed.run_processes``)
and return rank 0's results, so ``moe-kernels pretrain gppf --preset cpu-tiny`` is one command that
runs SIMT over 2 processes; ``procs=1`` runs everything in the calling process (virtual devices only).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

import moe_kernels as mk

from ..config import OptimConfig, ScheduleConfig, SourceConfig, TrainConfig, WorldConfig
from ..metrics import plain_mean
from ..models.multisource import MultiSourceModel
from ..models.resnet import PRESETS, ResNet
from ..trainer import Trainer, init_distributed
from .common import SourceData, final_state, finetune, run_folder, train_sources, write_config, write_json

STAGES = ("pretrain", "baselines", "extract", "finetune", "report")
BASELINES = ("single", "static", "global", "no_syncbn")


@dataclass
class GPPFModelConfig:
    backbone: str = "cpu-tiny"  # a preset of moe_recipes.models.resnet.PRESETS
    widths: List[int] = field(default_factory=list)  # []: the preset's
    depths: List[int] = field(default_factory=list)
    stem_width: int = 0  # 0: the preset's
    lego_units: int = 2  # N (GPPF default 2; 3 ablated)
    lego_mode: str = "soft"  # soft (default, every unit runs) or hard (straight-through, 1 unit)
    head_channels: int = 16


@dataclass
class GumbelConfig:
    start: float = 5.0
    end: float = 0.01
    decay_fraction: float = 0.9  # 450k of 500k iterations (App. D.1)


@dataclass
class SIMTConfig:
    sync_bn: bool = True  # cross-task SyncBN over the ranks (with >= 2 ranks)
    reduction: str = "task_average"  # task_average (GPPF) or mean
    probs_every: int = 5  # record the selection probabilities every n steps (Fig. 11)


@dataclass
class DownstreamConfig:
    sources: List[SourceConfig] = field(default_factory=list)
    steps: int = 60
    lr_cls: List[float] = field(default_factory=lambda: [0.02])
    lr_det: List[float] = field(default_factory=lambda: [0.02])
    lr_seg: List[float] = field(default_factory=lambda: [0.02])
    lr_depth: List[float] = field(default_factory=lambda: [0.02])
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="sgd", lr=0.02, weight_decay=1e-4,
                                                                   momentum=0.9))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(kind="cosine", warmup=0.1))
    eval_samples: int = 48
    rows: List[str] = field(default_factory=lambda: ["static", "path_near", "path_cls", "dyfinetune"])
    # downstream source -> the pre-training source whose path "path_near" reuses (default: the first
    # pre-training source of the same task type whose name the downstream name contains, else the first of its type)
    near: Dict[str, str] = field(default_factory=dict)


@dataclass
class StudiesConfig:
    baselines: List[str] = field(default_factory=lambda: ["single", "static", "global", "no_syncbn"])
    # pre-training source -> the paper's task it stands in for (Tab. 1 column beside it)
    paper_analogues: Dict[str, str] = field(default_factory=dict)


@dataclass
class GPPFConfig:
    recipe: str = "gppf"
    preset: str = ""
    seed: int = 0
    procs: int = 1  # without a launcher: local gloo processes the recipe starts (RECIPES.md 3.6 item 5)
    launch_timeout: float = 6 * 3600.0  # seconds for the whole job of those processes
    world: WorldConfig = field(default_factory=WorldConfig)
    model: GPPFModelConfig = field(default_factory=GPPFModelConfig)
    gumbel: GumbelConfig = field(default_factory=GumbelConfig)
    simt: SIMTConfig = field(default_factory=SIMTConfig)
    sources: List[SourceConfig] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="sgd", lr=0.16, weight_decay=5e-4))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(kind="cosine", warmup=0.1))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(virtual_devices=4))
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    studies: StudiesConfig = field(default_factory=StudiesConfig)


# ----------------------------------------------------------------------------- distributed helpers

def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier():
    if _rank_world()[1] > 1:
        dist.barrier()


def _is_main() -> bool:
    return _rank_world()[0] == 0


def _write_json(path, obj):
    if _is_main():
        write_json(path, obj)


# ----------------------------------------------------------------------------- model and data

def build_backbone(cfg: GPPFModelConfig, num_tasks: int, lego: bool = True, temperature: float = 5.0) -> ResNet:
    """The lego ResNet (``lego``: every layer, the stem included, N units) or the plain one."""
    if cfg.backbone not in PRESETS:
        raise ValueError(f"gppf: 'model.backbone' must be one of {sorted(PRESETS)}, got {cfg.backbone!r}")
    if cfg.lego_mode not in ("soft", "hard"):
        raise ValueError(f"gppf: 'model.lego_mode' must be soft or hard, got {cfg.lego_mode!r}")
    over = {}
    if cfg.widths:
        over["widths"] = tuple(cfg.widths)
    if cfg.depths:
        over["depths"] = tuple(cfg.depths)
    if cfg.stem_width:
        over["stem_width"] = cfg.stem_width
    if lego and cfg.lego_units < 2:
        raise ValueError(f"gppf: 'model.lego_units' must be >= 2 (N = 1 is the static baseline), got {cfg.lego_units}")
    return ResNet(cfg.backbone, lego_units=cfg.lego_units if lego else None, num_tasks=max(num_tasks, 1),
                  lego_mode=cfg.lego_mode, temperature=temperature, **over)


class Data(SourceData):
    """The run's sources (:class:`~moe_recipes.recipes.common.SourceData`), with GPPF's task pairings."""

    def near(self, cfg: GPPFConfig, name: str) -> str:
        """The pre-training source whose path ``path_near`` reuses for downstream ``name``."""
        if name in cfg.downstream.near:
            return cfg.downstream.near[name]
        same = [p for p in self.pretraining if self.task(p) == self.task(name)]
        if not same:
            return self.pretraining[0]
        for p in same:
            if p.split("/")[-1] in name:
                return p
        return same[0]

    def cls_source(self) -> Optional[str]:
        c = [p for p in self.pretraining if self.task(p) == "cls"]
        return c[0] if c else None


def build_model(cfg: GPPFConfig, data: Data, sources: List[str], lego: bool = True,
                sync_bn: Optional[bool] = None) -> MultiSourceModel:
    torch.manual_seed(cfg.seed)  # one initialisation on every rank (no broadcast needed)
    bb = build_backbone(cfg.model, len(sources), lego, cfg.gumbel.start)
    heads = {n: (data.task(n), data.num_classes(n)) for n in sources}
    opts = {t: {"channels": cfg.model.head_channels} for t in ("det", "seg", "depth")}
    size = max([cfg.world.image_size] + [data.specs[n].image_size for n in sources])
    m = MultiSourceModel(bb, heads, {n: i for i, n in enumerate(sources)} if lego else None, image_size=size,
                         head_options=opts)
    if (cfg.simt.sync_bn if sync_bn is None else sync_bn) and _rank_world()[1] > 1:
        if lego and cfg.model.lego_mode == "hard":
            raise ValueError("gppf: hard lego mode runs a different unit on each rank, so cross-rank SyncBN "
                             "cannot pair its collectives; use model.lego_mode=soft or simt.sync_bn=false")
        m.backbone = mk.distributed.convert_sync_batchnorm(m.backbone)
    return m


class SelectionRecorder:
    """Writes the selection probabilities of every task and lego layer to ``selection.jsonl`` every
    ``every`` steps (Fig. 11), with the temperature; rank 0 only."""

    def __init__(self, model: MultiSourceModel, names: List[str], folder: str, every: int):
        self.model, self.names, self.every = model, names, max(int(every), 1)
        self.path = os.path.join(folder, "selection.jsonl")

    def record(self, step: int, tau: float) -> None:
        if not _is_main():
            return
        probs = mk.nn.selection_probs(self.model.backbone)  # [layer] -> [tasks, N]
        rec = {"step": step, "tau": tau,
               "probs": {n: [p[self.model.task_ids[n]].tolist() for p in probs] for n in self.names}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _losses_finite(folder: str) -> dict:
    from ..report import read_jsonl

    recs = [r for r in read_jsonl(os.path.join(folder, "metrics.jsonl")) if r.get("kind") == "train"]
    if not recs:
        return {"finite": True, "first_loss": None, "last_loss": None}
    k = max(len(recs) // 5, 1)
    first = sum(r["loss"] for r in recs[:k]) / k
    last = sum(r["loss"] for r in recs[-k:]) / k
    return {"finite": all(math.isfinite(r["loss"]) for r in recs), "first_loss": first, "last_loss": last}


def pretrain_variant(cfg: GPPFConfig, data: Data, out: str, variant: str, resume: bool = True):
    """Train one row of Tab. 1: ``dynet`` (lego N, SIMT, SyncBN), ``static`` (plain shared ResNet),
    ``global`` (lego, per-batch task sampling), ``no_syncbn`` (lego, per-rank BN) or
    ``single:<source>`` (plain ResNet on that source alone, as many slot-steps as its share of the
    joint run). Returns ``(model, eval metrics, info)``."""
    folder = run_folder(os.path.join(out, variant.replace(":", "_").replace("/", "_")))
    single = variant.startswith("single:")
    names = [variant.split(":", 1)[1]] if single else list(data.pretraining)
    lego = variant in ("dynet", "global", "no_syncbn")
    rank, world = _rank_world()
    train = cfg.train
    if single:
        share = data.specs[names[0]].weight / sum(data.specs[n].weight for n in data.pretraining)
        train = dataclasses.replace(train, steps=max(int(round(train.steps * share * train.virtual_devices)), 1),
                                    virtual_devices=1)
    if variant == "global":
        train = dataclasses.replace(train, sampling="global")
    model = build_model(cfg, data, names, lego=lego, sync_bn=False if variant == "no_syncbn" else None)
    done = os.path.join(folder, "eval.json")
    _barrier()
    final = final_state(folder)
    if resume and os.path.exists(done) and final is not None and final["step"] == train.steps:
        model.load_state_dict(final["model"])
        with open(done) as f:
            res = json.load(f)
        info = {}
        if os.path.exists(os.path.join(folder, "run.json")):
            with open(os.path.join(folder, "run.json")) as f:
                info = json.load(f)
        return model, res, info
    if variant == "no_syncbn" and world < 2:
        info = {"variant": variant, "skipped": "one process: BN statistics are already per slot (per task), so this "
                                              "row is the DyNet run itself (RECIPES.md 3.6 item 5)"}
        _write_json(os.path.join(folder, "run.json"), info)
        return model, None, info
    if train.backend:
        os.environ["MOE_KERNELS_BACKEND"] = train.backend
    sched = mk.nn.GumbelTemperature(cfg.gumbel.start, cfg.gumbel.end,
                                    int(round(cfg.gumbel.decay_fraction * train.steps)))
    recorder = SelectionRecorder(model, names, folder, cfg.simt.probs_every) if lego else None
    state = {"tau": cfg.gumbel.start}

    def before_step(tr, step):
        if lego:
            state["tau"] = sched.apply(model.backbone, step)
            if step == 0 and recorder is not None:
                recorder.record(0, state["tau"])

    def after_step(tr, step, rec):
        rec["slots"] = tr.assignment(step)
        if lego:
            rec["tau"] = state["tau"]
            if recorder is not None and ((step + 1) % recorder.every == 0 or step + 1 == train.steps):
                recorder.record(step + 1, state["tau"])

    tr = Trainer(model, train_sources(data, model, names), train, cfg.optim, cfg.schedule, folder, seed=cfg.seed,
                 reduction=cfg.simt.reduction, hooks={"before_step": before_step, "after_step": after_step})
    t0 = time.time()
    error = None
    try:
        tr.fit(resume=resume)
        res = tr.last_eval
    except Exception as exc:  # a divergence check may blow up (NaN boxes in NMS, ...): that is its result
        if variant not in ("global", "no_syncbn"):
            raise
        error, res = f"{type(exc).__name__}: {exc}", None
    info = {"variant": variant, "steps": train.steps, "virtual_devices": train.virtual_devices, "world_size": world,
            "sampling": train.sampling, "sync_bn": any(isinstance(m, mk.distributed.SyncBatchNorm)
                                                       for m in model.modules()),
            "seconds": time.time() - t0, "optimizer": tr.optimizer_impl,
            "params": sum(p.numel() for p in model.backbone.parameters()), "error": error,
            **_losses_finite(folder)}
    if res is not None:
        _write_json(done, res)
    _write_json(os.path.join(folder, "run.json"), info)
    _barrier()
    return model, res, info


# ----------------------------------------------------------------------------- extraction

@torch.no_grad()
def extract_paths(cfg: GPPFConfig, data: Data, model: MultiSourceModel, out: str) -> dict:
    """Per pre-training task: its path (argmax unit per lego layer), its selection probabilities, the
    parameter count of the extracted plain ResNet and the largest difference between the lego
    model's eval features and the extracted model's on a batch of the task's held-out images."""
    path = os.path.join(out, "paths.json")
    bb = model.backbone
    names = [n for n, _ in mk.nn.lego_layers(bb)]
    paths = mk.nn.selected_paths(bb)
    probs = mk.nn.selection_probs(bb)
    was = bb.training
    bb.eval()
    per = {}
    for n in data.pretraining:
        t = model.task_ids[n]
        plain = mk.nn.extract_path(bb, t).eval()
        ds, _, _, _, te = data.items[n]
        x = model.heads[n].collate([ds[i] for i in list(te)[:4]])["images"]
        a, b = bb(x, t).features, plain(x).features
        diff = max(float((u - v).abs().max()) for u, v in zip(a, b))
        per[n] = {"task_id": t, "path": paths[t], "probs": [p[t].tolist() for p in probs],
                  "params": sum(p.numel() for p in plain.parameters()), "max_abs_diff": diff,
                  "plain": not any(isinstance(m, mk.nn.LegoLayer) for m in plain.modules())}
    bb.train(was)
    res = {"layers": names, "units": cfg.model.lego_units, "per_task": per,
           "lego_params": sum(p.numel() for p in bb.parameters())}
    _write_json(path, res)
    return res


# ----------------------------------------------------------------------------- fine-tuning

def _lrs(cfg: GPPFConfig, task: str) -> List[float]:
    return list(getattr(cfg.downstream, f"lr_{task}"))


def _plain_base(backbone) -> MultiSourceModel:
    return MultiSourceModel(copy.deepcopy(backbone), {}, None)


def finetune_row(cfg: GPPFConfig, data: Data, models: dict, paths: dict, row: str, out: str) -> dict:
    """One fine-tuning row over every downstream source: ``static`` (the N = 1 backbone), ``path_near``
    / ``path_cls`` (the extracted path of the near / the classification pre-training task) or
    ``dyfinetune``. Per source: the best primary metric over the LR grid, the path used."""
    cache = os.path.join(out, "finetune", f"{row}.json")
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    dyn = models["dynet"]
    per = {}
    for name in data.downstream:
        ds, task, n, tr, te = data.items[name]
        spec = data.specs[name]
        src, used_path = None, None
        if row == "static":
            if "static" not in models:
                continue
            base = _plain_base(models["static"].backbone)
        elif row in ("path_near", "path_cls"):
            src = data.near(cfg, name) if row == "path_near" else data.cls_source()
            if src is None:
                continue
            t = dyn.task_ids[src]
            base = MultiSourceModel(mk.nn.extract_path(dyn.backbone, t), {}, None)
            used_path = paths["per_task"][src]["path"]
        elif row == "dyfinetune":
            bb = copy.deepcopy(dyn.backbone)
            mk.nn.set_task(bb, 0)  # MultiSourceModel's dry forward (feature strides) needs a task
            base = MultiSourceModel(bb, {}, {})
            mk.nn.set_task(bb, None)
        else:
            raise ValueError(f"gppf: unknown fine-tuning row {row!r} (static, path_near, path_cls, dyfinetune)")

        def prepare(m, name=name, task=task, n=n):
            if row == "dyfinetune":
                tid = None
                for layer in m.backbone.lego_layers():
                    tid = layer.add_task()
                m.add_source(name, task, n, tid)
            else:
                m.add_source(name, task, n, None)

        hooks = None
        if row == "dyfinetune":  # the temperature decays 5.0 -> 0.01 over the first half (App. D.2)
            tau = mk.nn.GumbelTemperature(cfg.gumbel.start, cfg.gumbel.end, max(cfg.downstream.steps // 2, 1))
            hooks = {"before_step": lambda trainer, step: tau.apply(trainer.model.backbone, step)}

        best = finetune(base, name, ds, tr, te, None, steps=cfg.downstream.steps, batch_size=spec.batch_size,
                        lrs=_lrs(cfg, task), optim=cfg.downstream.optim, schedule=cfg.downstream.schedule,
                        out_dir=os.path.join(out, "finetune", row, name.replace("/", "_")), seed=cfg.seed,
                        eval_batch_size=cfg.train.eval_batch_size, prepare=prepare, task=task, hooks=hooks)
        if row == "dyfinetune":
            m = best["model"]
            tid = m.task_ids[name]
            used_path = [layer.selected(tid) for layer in m.backbone.lego_layers()]
            src = "new controller"
        per[name] = {"task": task, "metric": best["primary"], "lr": best["lr"],
                     "grid": {f"{k:g}": v for k, v in best["grid"].items()},
                     "metrics": best["metrics"], "path_of": src, "path": used_path,
                     "trainable": best["trainable"]}
    res = {"row": row, "per_source": per,
           "mean": plain_mean(v["metric"] for v in per.values() if v["task"] != "depth") if per else None}
    if _is_main():
        os.makedirs(os.path.dirname(cache), exist_ok=True)
    _write_json(cache, res)
    if _is_main() and per:
        print(f"[gppf] finetune {row:<11} " + "  ".join(f"{k}={v['metric']:.2f}" for k, v in per.items()), flush=True)
    return res


# ----------------------------------------------------------------------------- the recipe

def _spawned(rank: int, world_size: int, cfg: GPPFConfig, out: str, resume: bool, stages: tuple):
    return run(cfg, out, resume=resume, stages=stages)


def _launcher_present() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or (dist.is_available() and dist.is_initialized())


def run(cfg: GPPFConfig, out: str, *, resume: bool = True, stages=STAGES) -> dict:
    """Run the recipe's ``stages`` into ``out`` (see the module doc); returns the results dict."""
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"gppf: unknown stage(s) {bad}; the stages are {list(STAGES)}")
    unknown = [b for b in cfg.studies.baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"gppf: unknown baseline(s) {unknown}; the baselines are {list(BASELINES)}")
    if cfg.procs > 1 and not _launcher_present():
        run_folder(out)
        threads = cfg.train.threads or max((os.cpu_count() or 1) // cfg.procs, 1)
        print(f"[gppf] starting {cfg.procs} gloo processes x {cfg.train.virtual_devices} virtual devices "
              f"({threads} thread(s) each)", flush=True)
        results = mk.distributed.run_processes(_spawned, cfg.procs, args=(cfg, out, resume, tuple(stages)),
                                               backend=None, timeout=cfg.launch_timeout, threads=threads)
        return results[0]
    init_distributed()
    rank, world = _rank_world()
    run_folder(out)
    if rank == 0:
        write_config(out, cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data = Data(cfg)
    results: dict = {"world_size": world, "pretrain": {}, "runs": {}, "finetune": {}}
    models = {}
    models["dynet"], results["pretrain"]["dynet"], results["runs"]["dynet"] = pretrain_variant(
        cfg, data, out, "dynet", resume)
    want_base = any(s in stages for s in ("baselines", "finetune", "report"))
    if want_base:
        for b in cfg.studies.baselines:
            if b == "single":
                for n in data.pretraining:
                    _, r, info = pretrain_variant(cfg, data, out, f"single:{n}", resume)
                    results["pretrain"].setdefault("single", {}).update(r or {})
                    results["runs"][f"single:{n}"] = info
            elif b == "static" or ("baselines" in stages or "report" in stages):
                m, r, info = pretrain_variant(cfg, data, out, b, resume)
                results["pretrain"][b], results["runs"][b] = r, info
                if b == "static":
                    models["static"] = m
    paths = None
    if any(s in stages for s in ("extract", "finetune", "report")):
        paths = extract_paths(cfg, data, models["dynet"], out)
        results["paths"] = paths
    if "finetune" in stages and data.downstream:
        for row in cfg.downstream.rows:
            results["finetune"][row] = finetune_row(cfg, data, models, paths, row, out)
    elif os.path.isdir(os.path.join(out, "finetune")):
        for row in cfg.downstream.rows:
            p = os.path.join(out, "finetune", f"{row}.json")
            if os.path.exists(p):
                with open(p) as f:
                    results["finetune"][row] = json.load(f)
    _write_json(os.path.join(out, "results.json"), results)
    if "report" in stages and rank == 0:
        from .gppf_report import write_report

        write_report(cfg, data, out)
    _barrier()
    return results


__all__ = ["GPPFConfig", "GPPFModelConfig", "GumbelConfig", "SIMTConfig", "DownstreamConfig", "StudiesConfig",
           "STAGES", "BASELINES", "run", "build_backbone", "build_model", "pretrain_variant", "extract_paths",
           "finetune_row", "Data"]
