"""One trainer for every recipe: multi-source sampling, weighted losses, logs, checkpoints, exact resume.

A step (RECIPES.md 5.1 two-step sampling, 3.1 SIMT, 3.6 item 5 virtual devices):

1. every device slot -- ``world_size x virtual_devices`` of them, slot ``rank * V + v`` -- draws a
   source with probability proportional to its sampling weight (``sampling="per_device"``;
   ``"global"``: one draw per step for every slot), with :class:`moe_kernels.distributed.TaskSampler`,
   a pure function of (seed, step, slot), so every rank knows every slot's source;
2. each source's batches are the next ``batch_size`` indices of that source's stream (a fresh
   permutation of its training indices per epoch, seeded by (seed, source, epoch)); slots that drew
   the same source take consecutive chunks in slot order, so the streams advance identically on
   every rank and a per-source cursor is the sampler's whole state;
3. each slot's loss, times its source's loss weight, is back-propagated (V micro-steps accumulate);
4. gradients are reduced -- ``"mean"`` (data parallel: the sum over all slots / (V x world size)) or
   ``"task_average"`` (GPPF: each parameter's sum over the slots that used it / their number, with
   :func:`moe_kernels.distributed.task_average_gradients` and per-parameter use counts) -- clipped to
   ``clip_grad``, and the optimiser and the schedule step; buffers named in ``sync_buffers`` (the MI
   loss's EMA joint, RECIPES.md 5.6 item 6) are averaged over the ranks.

Under DeepSpeed (``deepspeed_config``) the engine owns steps 3-4 (``gradient_accumulation_steps`` = V,
its clipping and all-reduce), with the optimiser and schedule built here.

Every run writes into ``out_dir``: ``metrics.jsonl`` (one JSON line per logged step and per
evaluation), ``checkpoints/step_NNNNNNN/`` (model, optimiser, schedule, sampler cursors and every
rank's RNG states), and TensorBoard events when ``tensorboard`` is installed. ``resume=True`` continues
from the newest checkpoint, and the losses from there on are the uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import moe_kernels as mk

from .config import OptimConfig, ScheduleConfig, TrainConfig
from .optim import build_optimizer, build_scheduler


@dataclass
class TrainSource:
    """A source as the trainer sees it: ``dataset[i]`` -> sample dict, the indices to train on and to
    evaluate on, a ``collate`` (list of samples -> batch), and its weights and batch size."""

    name: str
    dataset: object
    train_indices: Sequence[int]
    eval_indices: Sequence[int]
    collate: Callable[[List[dict]], dict]
    weight: float = 1.0
    loss_weight: float = 1.0
    batch_size: int = 8


def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple:
    """Join the process group a launcher (torchrun, ``deepspeed``) describes in the environment:
    gloo on CPU, NCCL on GPUs. Returns ``(rank, world_size)``; (0, 1) without a launcher."""
    if dist.is_available() and dist.is_initialized():
        return _dist_info()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return _dist_info()


def _stream_seed(seed: int, source: str, epoch: int) -> int:
    h = 1469598103934665603
    for ch in f"{seed}|{source}|{epoch}".encode():
        h = ((h ^ ch) * 1099511628211) % (1 << 61)
    return h


class Trainer:
    """Train ``model`` on ``sources`` (see the module doc).

    ``model`` must have ``step_loss(source_name, batch) -> {"loss": scalar, <parts>: scalars}`` and
    ``evaluate(source_name, batches) -> {metric: float}``; a batch is what the source's ``collate``
    returns (a dict of tensors or lists of dicts of tensors).

    Args:
        model, sources: as above (every rank the same).
        train: steps, logging, checkpoint and evaluation intervals, virtual devices, sampling mode.
        optim, schedule: the optimiser (parameter groups without weight decay on norms, biases,
            routers, controllers) and its schedule, built over the parameters trainable at construction.
        out_dir: the run's folder (created).
        seed: sampling and stream seed (the model's initialisation is the caller's).
        reduction: ``"mean"`` or ``"task_average"`` (see the module doc).
        sync_buffers: suffixes of buffer names averaged over the ranks after each step.
        lr_scales / schedules: per-parameter-group learning-rate multipliers and schedules by name prefix.
        deepspeed_config: a DeepSpeed config dict or JSON path: train through a DeepSpeed engine.
        hooks: ``{"before_step": fn(trainer, step)}`` (e.g. an annealed temperature) and
            ``{"after_step": fn(trainer, step, record)}``.
    """

    def __init__(self, model: nn.Module, sources: Sequence[TrainSource], train: TrainConfig, optim: OptimConfig,
                 schedule: ScheduleConfig, out_dir: str, *, seed: int = 0, reduction: str = "mean",
                 sync_buffers: Sequence[str] = ("mutual_information.joint",),
                 lr_scales: Optional[Mapping[str, float]] = None,
                 schedules: Optional[Mapping[str, ScheduleConfig]] = None,
                 deepspeed_config=None, hooks: Optional[Mapping[str, Callable]] = None):
        if reduction not in ("mean", "task_average"):
            raise ValueError(f"Trainer: argument 'reduction' must be 'mean' or 'task_average', got {reduction!r}")
        if train.sampling not in ("per_device", "global"):
            raise ValueError(f"Trainer: argument 'train.sampling' must be 'per_device' or 'global', got {train.sampling!r}")
        if train.virtual_devices < 1 or train.steps < 1:
            raise ValueError("Trainer: 'train.virtual_devices' and 'train.steps' must be >= 1")
        names = [s.name for s in sources]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"Trainer: argument 'sources' must name distinct sources, got {names}")
        for s in sources:
            if len(s.train_indices) < s.batch_size:
                raise ValueError(f"Trainer: source {s.name!r} has {len(s.train_indices)} training samples, fewer "
                                 f"than its batch size {s.batch_size}")
        self.model, self.sources = model, {s.name: s for s in sources}
        self.train_cfg, self.seed, self.reduction = train, int(seed), reduction
        self.sync_buffers = tuple(sync_buffers)
        self.hooks = dict(hooks or {})
        self.rank, self.world_size = _dist_info()
        self.out_dir = out_dir
        self.ckpt_dir = os.path.join(out_dir, "checkpoints")
        if self.rank == 0:
            os.makedirs(self.ckpt_dir, exist_ok=True)
        V = train.virtual_devices
        weights = {s.name: s.weight for s in sources}
        # every slot's draw, known on every rank (rank=0 of a world of all slots: assignment() is local)
        self.sampler = mk.distributed.TaskSampler(weights, seed=self.seed, rank=0, world_size=self.world_size * V)
        self._global_sampler = mk.distributed.TaskSampler(weights, seed=self.seed, rank=0, world_size=1)
        self.optimizer, self.optimizer_impl = build_optimizer(model, optim, lr_scales)
        self.scheduler = build_scheduler(self.optimizer, schedule, train.steps, schedules)
        self.clip_grad = float(optim.clip_grad)
        self.engine = None
        if self.world_size > 1 and deepspeed_config is None:
            mk.distributed.broadcast_parameters(model)  # every rank starts from rank 0's weights, as DDP does
        if deepspeed_config is not None:
            self._init_deepspeed(deepspeed_config)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # task average over device *slots*: count, per parameter, the micro-steps whose backward reached it
        # (the hooks that count live for one train_step: a model trained here and then copied or trained
        # elsewhere carries none of them)
        self._uses = [0] * len(self.params)
        self.cursors: Dict[str, int] = {n: 0 for n in self.sources}
        self.step = 0
        self._writer = None
        self._perm_cache: Dict[tuple, List[int]] = {}

    # ------------------------------------------------------------------ pieces

    def _init_deepspeed(self, cfg):
        import deepspeed

        if not (dist.is_available() and dist.is_initialized()):
            # one process without a launcher: a world of one (a launcher sets these itself)
            for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
                os.environ.setdefault(k, v)
            if "MASTER_PORT" not in os.environ:
                from moe_kernels.distributed import free_port

                os.environ["MASTER_PORT"] = str(free_port())
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
            self.rank, self.world_size = _dist_info()
        if isinstance(cfg, str):
            with open(cfg) as f:
                cfg = json.load(f)
        cfg = dict(cfg)
        V = self.train_cfg.virtual_devices
        mb = max(s.batch_size for s in self.sources.values())
        # nominal: every slot's batch has its own source's size; DeepSpeed only checks the product
        cfg.setdefault("train_micro_batch_size_per_gpu", mb)
        cfg["gradient_accumulation_steps"] = V
        cfg["train_batch_size"] = cfg["train_micro_batch_size_per_gpu"] * V * self.world_size
        if self.clip_grad > 0:
            cfg.setdefault("gradient_clipping", self.clip_grad)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=cfg)

    def _count_use(self, i: int):
        def hook(grad):
            self._uses[i] += 1
            return grad

        return hook

    def _permutation(self, source: str, epoch: int) -> List[int]:
        key = (source, epoch)
        if key not in self._perm_cache:
            idx = self.sources[source].train_indices
            g = torch.Generator().manual_seed(_stream_seed(self.seed, source, epoch))
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if k[0] != source}
            self._perm_cache[key] = [int(idx[i]) for i in torch.randperm(len(idx), generator=g).tolist()]
        return self._perm_cache[key]

    def _take(self, source: str, n: int) -> List[int]:
        """The next ``n`` indices of the source's stream (advances its cursor)."""
        out = []
        L = len(self.sources[source].train_indices)
        while len(out) < n:
            c = self.cursors[source]
            epoch, pos = divmod(c, L)
            chunk = self._permutation(source, epoch)[pos:pos + n - len(out)]
            out += chunk
            self.cursors[source] = c + len(chunk)
        return out

    def assignment(self, step: int) -> List[str]:
        """The source of every slot (rank * V + v) at ``step``."""
        if self.train_cfg.sampling == "global":
            return self._global_sampler.assignment(step) * (self.world_size * self.train_cfg.virtual_devices)
        return self.sampler.assignment(step)

    def batches_for(self, step: int) -> List[tuple]:
        """``[(source, indices)]`` of this rank's V slots at ``step``; advances every source's cursor by
        what all slots of all ranks take, in slot order."""
        V = self.train_cfg.virtual_devices
        mine = []
        for slot, src in enumerate(self.assignment(step)):
            idx = self._take(src, self.sources[src].batch_size)
            if slot // V == self.rank:
                mine.append((src, idx))
        return mine

    def _reduce_gradients(self):
        if self.reduction == "task_average":
            # each parameter: the sum over every slot that used it / the number of such slots (GPPF's
            # task average, over virtual devices as well as ranks)
            uses, self._uses = self._uses, [0] * len(self.params)
            mk.distributed.task_average_gradients(self.params, counts=uses)
            return
        if self.world_size == 1:
            return
        # data parallel: the sum over ranks / world size; a parameter no rank used keeps grad None (so
        # the optimiser skips it, as it does in one process), one all-reduce of the use flags
        used = torch.tensor([p.grad is not None for p in self.params], dtype=torch.float64, device=self.params[0].device)
        dist.all_reduce(used)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        o = 0
        for p, u in zip(self.params, used.tolist()):
            g = flat[o:o + p.numel()].view_as(p)
            o += p.numel()
            if u == 0:
                p.grad = None
            elif p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)

    def _sync_buffers(self):
        if self.world_size == 1 or not self.sync_buffers:
            return
        with torch.no_grad():
            for name, b in self.model.named_buffers():
                if name.endswith(self.sync_buffers) and b.is_floating_point():
                    dist.all_reduce(b)
                    b.div_(self.world_size)

    # ------------------------------------------------------------------ a step

    def _micro_steps(self, step: int):
        """Forward and backward of this rank's V slots at ``step``: ``(losses per source, loss parts, images)``."""
        V = self.train_cfg.virtual_devices
        losses: Dict[str, List[float]] = {}
        parts_log: Dict[str, float] = {}
        images = 0
        for src, idx in self.batches_for(step):
            s = self.sources[src]
            batch = s.collate([s.dataset[i] for i in idx])
            images += len(idx)
            out = self.model.step_loss(src, batch)
            loss = out["loss"] * s.loss_weight
            if self.engine is not None:
                self.engine.backward(loss)
            elif self.reduction == "task_average":
                loss.backward()  # summed over the slots here, divided by each parameter's use count later
            else:
                (loss / V).backward()
            losses.setdefault(src, []).append(float(out["loss"].detach()))
            for k, v in out.items():
                if k != "loss":
                    parts_log[f"{src}/{k}"] = float(v.detach())
        return losses, parts_log, images

    def train_step(self) -> dict:
        step = self.step
        if "before_step" in self.hooks:
            self.hooks["before_step"](self, step)
        self.model.train()
        V = self.train_cfg.virtual_devices
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        t0 = time.perf_counter()
        # task average: count, per parameter, the slots whose backward reached it (hooks for this step only)
        hooks = ([p.register_hook(self._count_use(i)) for i, p in enumerate(self.params)]
                 if self.reduction == "task_average" and self.engine is None else [])
        try:
            losses, parts_log, images = self._micro_steps(step)
        finally:
            for h in hooks:
                h.remove()
        if self.engine is not None:
            self.engine.step()
            grad_norm = None
        else:
            self._reduce_gradients()
            grad_norm = None
            if self.clip_grad > 0:
                present = [p for p in self.params if p.grad is not None]
                grad_norm = float(torch.nn.utils.clip_grad_norm_(present, self.clip_grad))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._sync_buffers()
        dt = time.perf_counter() - t0
        self.step = step + 1
        weighted = sum(self.sources[s].loss_weight * sum(v) for s, v in losses.items()) / V
        rec = {"kind": "train", "step": self.step, "loss": weighted,
               "losses": {s: sum(v) / len(v) for s, v in losses.items()},
               "lr": lr, "images_per_s": images * self.world_size / dt,
               "seconds": dt, "parts": parts_log}
        if grad_norm is not None:
            rec["grad_norm"] = grad_norm
        if "after_step" in self.hooks:
            self.hooks["after_step"](self, step, rec)
        return rec

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, sources: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
        """Metrics of every (or the named) source on its evaluation indices, on every rank alike."""
        self.model.eval()
        res = {}
        bs = self.train_cfg.eval_batch_size
        for name in (sources or list(self.sources)):
            s = self.sources[name]
            idx = list(s.eval_indices)
            batches = (s.collate([s.dataset[i] for i in idx[j:j + bs]]) for j in range(0, len(idx), bs))
            res[name] = self.model.evaluate(name, batches)
        self.model.train()
        return res

    # ------------------------------------------------------------------ logging

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(os.path.join(self.out_dir, "tensorboard"))
            except ImportError:
                self._writer = False
        if self._writer:
            step = record.get("step", 0)
            if record["kind"] == "train":
                self._writer.add_scalar("train/loss", record["loss"], step)
                for s, v in record["losses"].items():
                    self._writer.add_scalar(f"train/loss/{s}", v, step)
            elif record["kind"] == "eval":
                for k, v in record["metrics"].items():
                    self._writer.add_scalar(f"eval/{record['source']}/{k}", v, step)

    # ------------------------------------------------------------------ checkpoints

    def _model_state(self):
        return self.model.state_dict()

    def save_checkpoint(self) -> str:
        path = os.path.join(self.ckpt_dir, f"step_{self.step:07d}")
        if self.rank == 0:
            os.makedirs(path, exist_ok=True)
        if self.world_size > 1:
            dist.barrier()
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        torch.save(rng, os.path.join(path, f"rng_rank{self.rank}.pt"))
        if self.rank == 0:
            torch.save({"step": self.step, "model": self._model_state(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "cursors": dict(self.cursors),
                        "world_size": self.world_size, "virtual_devices": self.train_cfg.virtual_devices,
                        "optimizer_impl": self.optimizer_impl}, os.path.join(path, "state.pt"))
            with open(os.path.join(path, "COMPLETE"), "w") as f:
                f.write(str(self.step))
            done = sorted(d for d in os.listdir(self.ckpt_dir)
                          if os.path.exists(os.path.join(self.ckpt_dir, d, "COMPLETE")))
            for d in done[:-max(self.train_cfg.keep_checkpoints, 1)]:
                shutil.rmtree(os.path.join(self.ckpt_dir, d), ignore_errors=True)
        if self.world_size > 1:
            dist.barrier()
        return path

    def latest_checkpoint(self) -> Optional[str]:
        if not os.path.isdir(self.ckpt_dir):
            return None
        done = sorted(d for d in os.listdir(self.ckpt_dir) if os.path.exists(os.path.join(self.ckpt_dir, d, "COMPLETE")))
        return os.path.join(self.ckpt_dir, done[-1]) if done else None

    def load_checkpoint(self, path: str) -> None:
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
        if state["world_size"] != self.world_size or state["virtual_devices"] != self.train_cfg.virtual_devices:
            raise ValueError(f"Trainer.load_checkpoint: {path} was written by {state['world_size']} rank(s) x "
                             f"{state['virtual_devices']} virtual devices; this run has {self.world_size} x "
                             f"{self.train_cfg.virtual_devices}, so its sampling would differ")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.cursors = dict(state["cursors"])
        self.step = int(state["step"])
        rng = torch.load(os.path.join(path, f"rng_rank{self.rank}.pt"), map_location="cpu", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: bool = False, stop_at: Optional[int] = None) -> List[dict]:
        """Train to ``train.steps`` (or stop early at ``stop_at``, as an interruption would); returns the
        train records of this call. Evaluates every ``eval_every`` steps and at the end."""
        cfg = self.train_cfg
        if resume:
            latest = self.latest_checkpoint()
            if latest is not None:
                self.load_checkpoint(latest)
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        bar = None
        if cfg.progress and self.rank == 0 and self.step < end:
            from tqdm import tqdm

            bar = tqdm(total=end, initial=self.step, desc=os.path.basename(os.path.abspath(self.out_dir)),
                       unit="step", dynamic_ncols=True)
        records = []
        self._loop(end, bar, records)
        if bar is not None:
            bar.close()
        if self.step == cfg.steps and stop_at is None:
            self._log_eval()
        return records

    def _loop(self, end: int, bar, records: list) -> None:
        cfg = self.train_cfg
        while self.step < end:
            rec = self.train_step()
            records.append(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", img_s=f"{rec['images_per_s']:.0f}")
            if self.step % max(cfg.log_every, 1) == 0 or self.step == end:
                self.log(rec)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self._log_eval()
            if cfg.checkpoint_every and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                self.save_checkpoint()

    def _log_eval(self):
        res = self.evaluate()
        for name, metrics in res.items():
            self.log({"kind": "eval", "step": self.step, "source": name, "metrics": metrics})
        self.last_eval = res
        return res


__all__ = ["TrainSource", "Trainer", "init_distributed"]
