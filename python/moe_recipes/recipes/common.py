"""What every recipe does the same way: open the data, split it, set up the run folder, fine-tune.

* :func:`open_source`: a pre-training or downstream source, from the built-in world (by name) or a
  real dataset by path (ImageFolder / COCO JSON / PNG masks / depth PNGs), resized to one square
  size so it batches: ``(dataset, task, num_classes)``.
* :func:`split`: the held-out evaluation indices are the last ``eval_samples`` of a source, the
  training indices the rest (the world's samples are independent draws, so any split is a random one).
* :func:`run_folder` / :func:`write_json`: the run's folder and its resolved ``config.json``.
* :func:`finetune`: the one fine-tuning harness (end-to-end or any trainable subset, a step budget
  and an LR grid per source): trains a copy of a model on a downstream source and returns its metric.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..config import OptimConfig, ScheduleConfig, SourceConfig, TrainConfig, WorldConfig, to_dict
from ..data import World
from ..tasks import HIGHER_IS_BETTER, PRIMARY


def open_world(cfg: WorldConfig) -> World:
    return World.default(seed=cfg.seed, image_size=cfg.image_size, size=cfg.size)


class Resized(torch.utils.data.Dataset):
    """A real dataset's samples resized to ``size`` x ``size`` (labels alike: masks and depth nearest,
    boxes scaled) so that a batch stacks."""

    def __init__(self, dataset, size: int):
        self.dataset, self.size = dataset, int(size)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        s = dict(self.dataset[i])
        img = s["image"]
        h, w = img.shape[-2:]
        S = self.size
        if (h, w) == (S, S):
            return s
        s["image"] = F.interpolate(img[None], size=(S, S), mode="bilinear", align_corners=False)[0]
        if "mask" in s:
            s["mask"] = F.interpolate(s["mask"][None, None].float(), size=(S, S), mode="nearest")[0, 0].long()
        if "depth" in s:
            s["depth"] = F.interpolate(s["depth"][None, None], size=(S, S), mode="nearest")[0, 0]
        if "boxes" in s:
            scale = torch.tensor([S / w, S / h, S / w, S / h], dtype=s["boxes"].dtype)
            s["boxes"] = s["boxes"] * scale
        if "masks" in s:
            s["masks"] = F.interpolate(s["masks"][None].float(), size=(S, S), mode="nearest")[0].bool()
        return s


def open_source(world: World, spec: SourceConfig) -> Tuple[object, str, int]:
    """``(dataset, task, num_classes)`` of a source (see the module doc)."""
    if not spec.path:
        src = world.source(spec.name)
        from ..data import SourceDataset

        return SourceDataset(world, spec.name), src.task, src.num_classes
    from ..data import CocoDetection, DepthFolder, ImageFolder, MaskFolder

    size = spec.image_size or world_image_size(world)
    if spec.task == "cls":
        ds = ImageFolder(spec.path, source=spec.name)
        n = ds.num_classes
    elif spec.task == "det":
        ds = CocoDetection(spec.path, spec.labels, source=spec.name)
        n = ds.num_classes
    elif spec.task == "seg":
        # mask values 0 .. K-1 are the classes; the head predicts K maps, the world's layout of
        # "0 = background + num_classes objects", so the source reports K - 1
        ds = MaskFolder(spec.path, spec.labels, ignore_index=spec.ignore_index, source=spec.name,
                        num_classes=spec.num_classes or None)
        K = spec.num_classes or 1 + max(int(ds[i]["mask"].max()) for i in range(len(ds)))
        if K < 2:
            raise ValueError(f"source {spec.name!r}: a segmentation dataset needs at least 2 classes, found {K}")
        n = K - 1
    elif spec.task == "depth":
        ds, n = DepthFolder(spec.path, spec.labels, source=spec.name), 1
    else:
        raise ValueError(f"source {spec.name!r}: a dataset by path needs 'task' = cls, det, seg or depth, "
                         f"got {spec.task!r}")
    return Resized(ds, size), spec.task, n


def world_image_size(world: World) -> int:
    return max(s.domain.image_size for s in world.sources.values())


def split(n: int, eval_samples: int, name: str = "") -> Tuple[range, range]:
    """``(train indices, eval indices)``: the last ``eval_samples`` of ``n`` are held out."""
    if not 0 < eval_samples < n:
        raise ValueError(f"source {name!r}: 'eval_samples' must be in (0, {n}), got {eval_samples}")
    return range(0, n - eval_samples), range(n - eval_samples, n)


def run_folder(out: str) -> str:
    os.makedirs(out, exist_ok=True)
    return out


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


def write_config(out: str, config) -> None:
    write_json(os.path.join(out, "config.json"), to_dict(config))


def read_jsonl(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def primary_metric(task: str, metrics: Dict[str, float]) -> float:
    return float(metrics[PRIMARY[task]])


# ----------------------------------------------------------------------------- fine-tuning harness

def finetune(model, source: str, dataset, train_indices: Sequence[int], eval_indices: Sequence[int],
             collate: Callable, *, steps: int, batch_size: int, lrs: Sequence[float], optim: OptimConfig,
             schedule: ScheduleConfig, out_dir: str, seed: int = 0, eval_batch_size: int = 16,
             prepare: Optional[Callable] = None, task: str = "cls", threads: int = 0,
             hooks: Optional[dict] = None) -> dict:
    """Fine-tune a copy of ``model`` (a :class:`MultiSourceModel` with a head for ``source``) for
    ``steps`` on ``train_indices`` at each learning rate of ``lrs``, evaluate on ``eval_indices``, and
    return the best: ``{"lr", "metrics", "primary", "grid": {lr: primary}, "trainable", "model"}``.

    ``prepare(model_copy)`` runs on each copy before its optimiser is built (e.g. freeze, add a
    router, prune): whatever is trainable afterwards is fine-tuned. ``hooks`` go to the
    :class:`~moe_recipes.trainer.Trainer` (e.g. ``{"before_step": fn(trainer, step)}`` to anneal a
    Gumbel temperature). One step budget for every method,
    as RECIPES.md 5.6 item 9 decides; the grid is the per-source LR search (GPPF App. D.2 style).
    """
    from ..trainer import Trainer, TrainSource

    best = None
    grid = {}
    for lr in lrs:
        m = copy.deepcopy(model)
        if prepare is not None:
            prepare(m)
        o = dataclasses.replace(optim, lr=float(lr))
        tcfg = TrainConfig(steps=steps, log_every=max(steps // 5, 1), eval_every=0, checkpoint_every=0,
                           eval_batch_size=eval_batch_size, progress=False, threads=threads)
        sub = os.path.join(out_dir, f"lr{lr:g}")
        os.makedirs(sub, exist_ok=True)
        col = collate if collate is not None else m.heads[source].collate
        tr = Trainer(m, [TrainSource(source, dataset, train_indices, eval_indices, col, 1.0, 1.0, batch_size)],
                     tcfg, o, schedule, sub, seed=seed, hooks=hooks)
        tr.fit()
        metrics = tr.last_eval[source]
        value = primary_metric(task, metrics)
        grid[float(lr)] = value
        better = best is None or (value > best["primary"] if HIGHER_IS_BETTER[task] else value < best["primary"])
        if better:
            best = {"lr": float(lr), "metrics": metrics, "primary": value, "model": m,
                    "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad)}
    best["grid"] = grid
    return best


class SourceData:
    """A run's sources: per name ``items[name] = (dataset, task, num_classes, train indices, eval
    indices)`` and its ``specs[name]``, pre-training first; ``pretraining`` / ``downstream`` name them.
    A world source given an ``image_size`` is resized to it (a task's own input size, as SIMT has)."""

    def __init__(self, cfg):
        self.world = open_world(cfg.world)
        self.specs: Dict[str, SourceConfig] = {}
        self.items: Dict[str, tuple] = {}
        for spec in list(cfg.sources) + list(cfg.downstream.sources):
            ds, task, n = open_source(self.world, spec)
            if spec.image_size and not spec.path:
                ds = Resized(ds, spec.image_size)
            ev = cfg.train.eval_samples if spec in cfg.sources else cfg.downstream.eval_samples
            tr, te = split(len(ds), ev, spec.name)
            self.specs[spec.name] = spec
            self.items[spec.name] = (ds, task, n, tr, te)
        self.pretraining = [s.name for s in cfg.sources]
        self.downstream = [s.name for s in cfg.downstream.sources]

    def task(self, name):
        return self.items[name][1]

    def num_classes(self, name):
        return self.items[name][2]


def train_sources(data: SourceData, model, names: Sequence[str]):
    """The trainer's view of the named sources, batched by ``model``'s heads."""
    from ..trainer import TrainSource

    out = []
    for n in names:
        ds, task, _, tr, te = data.items[n]
        spec = data.specs[n]
        out.append(TrainSource(n, ds, tr, te, model.heads[n].collate, spec.weight, spec.loss_weight, spec.batch_size))
    return out


def final_state(folder: str):
    """The newest complete checkpoint's state under ``folder/checkpoints`` (None without one)."""
    ck = os.path.join(folder, "checkpoints")
    if not os.path.isdir(ck):
        return None
    done = sorted(d for d in os.listdir(ck) if os.path.exists(os.path.join(ck, d, "COMPLETE")))
    if not done:
        return None
    return torch.load(os.path.join(ck, done[-1], "state.pt"), map_location="cpu", weights_only=False)


__all__ = ["SourceData", "train_sources", "final_state", "open_world", "open_source", "Resized", "split", "run_folder", "write_json", "write_config",
           "read_jsonl", "primary_metric", "finetune", "world_image_size"]
