"""Optimisers and learning-rate schedules of the recipes, from maintained implementations.

* LAMB (MTHL): NVIDIA apex's ``FusedLAMB`` when apex is importable and the parameters are on a GPU,
  else DeepSpeed's ``FusedLamb`` on a GPU, else the ``pytorch-optimizer`` package's ``Lamb`` (CPU).
  Never a hand-written one. ``implementation=`` forces one; the choice is returned for the run log.
* SGD (GPPF) and AdamW: torch's.

Parameter groups: no weight decay on norms, biases (also the experts' ``b1``/``b2``), routers
(``router_weight``) and lego controllers (RECIPES.md 5.6 item 7, 3.6 item 3); ``lr_scales`` gives a
group of parameters (by name prefix) its own learning-rate multiplier and, with ``schedules``, its own
schedule (per-parameter-group schedules, RECIPES.md 6.3 item 5).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .config import OptimConfig, ScheduleConfig

NO_DECAY_LEAVES = ("b1", "b2", "router_weight", "router_weight_trainable")


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Norm weights, biases, routers and controllers get no weight decay."""
    leaf = name.rsplit(".", 1)[-1]
    return (p.ndim <= 1 or leaf in NO_DECAY_LEAVES or "bias" in leaf or ".controllers." in f".{name}"
            or "norm" in name.lower())


def param_groups(model: nn.Module, weight_decay: float, lr_scales: Optional[Mapping[str, float]] = None) -> List[dict]:
    """The trainable parameters of ``model`` in groups ``(prefix, decay)``; each group dict carries
    ``name`` (for logs), ``weight_decay`` and ``lr_scale`` (1 unless a prefix of ``lr_scales`` matches;
    the longest matching prefix wins)."""
    lr_scales = dict(lr_scales or {})
    groups: Dict[Tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        prefix = max((k for k in lr_scales if name.startswith(k)), key=len, default="")
        decay = not no_weight_decay(name, p)
        g = groups.setdefault((prefix, decay), {
            "params": [], "name": f"{prefix or 'all'}/{'decay' if decay else 'no_decay'}",
            "weight_decay": weight_decay if decay else 0.0, "lr_scale": lr_scales.get(prefix, 1.0)})
        g["params"].append(p)
    if not groups:
        raise ValueError("param_groups: the model has no trainable parameter")
    return list(groups.values())


def _lamb(groups, cfg: OptimConfig, on_gpu: bool):
    impl = cfg.implementation
    if impl not in ("auto", "apex", "deepspeed", "pytorch_optimizer"):
        raise ValueError(f"optim: argument 'implementation' must be auto, apex, deepspeed or pytorch_optimizer, "
                         f"got {impl!r}")
    betas = tuple(cfg.betas)
    if impl in ("auto", "apex") and (on_gpu or impl == "apex"):
        try:
            from apex.optimizers import FusedLAMB  # NVIDIA apex (never the unrelated PyPI 'apex')

            return FusedLAMB(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             max_grad_norm=0.0), "apex.optimizers.FusedLAMB"
        except ImportError:
            if impl == "apex":
                raise
    if impl in ("auto", "deepspeed") and (on_gpu or impl == "deepspeed"):
        try:
            from deepspeed.ops.lamb import FusedLamb

            return FusedLamb(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             max_grad_norm=0.0), "deepspeed.ops.lamb.FusedLamb"
        except ImportError:
            if impl == "deepspeed":
                raise
    try:
        from pytorch_optimizer import Lamb
    except ImportError as exc:  # pragma: no cover - declared dependency of the recipes
        raise ImportError("optim: LAMB on CPU needs the pytorch-optimizer package "
                          "(pip install pytorch-optimizer==4.1.0)") from exc
    # clipping is the trainer's (clip_grad), not the optimiser's: max_grad_norm only acts with pre_norm
    return Lamb(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                weight_decouple=True, pre_norm=False), "pytorch_optimizer.Lamb"


def build_optimizer(model: nn.Module, cfg: OptimConfig,
                    lr_scales: Optional[Mapping[str, float]] = None) -> Tuple[torch.optim.Optimizer, str]:
    """``(optimizer, implementation name)`` over ``model``'s trainable parameters (see the module doc).
    Every group's ``lr`` is ``cfg.lr * lr_scale``."""
    groups = param_groups(model, cfg.weight_decay, lr_scales)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    on_gpu = any(p.is_cuda for g in groups for p in g["params"])
    name = cfg.name.lower()
    if name == "lamb":
        return _lamb(groups, cfg, on_gpu)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay), "torch.optim.SGD"
    if name == "adamw":
        return (torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay), "torch.optim.AdamW")
    raise ValueError(f"optim: argument 'name' must be lamb, sgd or adamw, got {cfg.name!r}")


def lr_factor(cfg: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """The schedule's multiplier of the peak learning rate at step s (0-based, the step about to run)."""
    if cfg.kind not in ("triangular", "cosine", "constant"):
        raise ValueError(f"schedule: argument 'kind' must be triangular, cosine or constant, got {cfg.kind!r}")
    if not 0.0 <= cfg.warmup < 1.0:
        raise ValueError(f"schedule: argument 'warmup' must be a fraction in [0, 1), got {cfg.warmup!r}")
    warm = int(round(cfg.warmup * total_steps))
    lo = float(cfg.min_lr_ratio)

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        if cfg.kind == "constant":
            return 1.0
        t = (s - warm) / max(total_steps - warm, 1)
        if cfg.kind == "triangular":
            return max(1.0 - t, 0.0) * (1 - lo) + lo
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int,
                    schedules: Optional[Mapping[str, ScheduleConfig]] = None) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` with one multiplier per parameter group: the group's own schedule where
    ``schedules`` names its prefix group (``param_groups``' ``name`` before the slash), else ``cfg``'s."""
    schedules = dict(schedules or {})
    fns = []
    for g in optimizer.param_groups:
        prefix = g.get("name", "all/").split("/")[0]
        fns.append(lr_factor(schedules.get(prefix, cfg), total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fns)


__all__ = ["no_weight_decay", "param_groups", "build_optimizer", "lr_factor", "build_scheduler"]
