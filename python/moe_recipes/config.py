"""Typed run configurations, loaded from preset files (data) with ``key=value`` overrides.

A preset is one small TOML file, ``moe_recipes/presets/<recipe>/<preset>.toml``; it is read into the
recipe's config dataclass (e.g. :class:`moe_recipes.recipes.mthl.MTHLConfig`) whose fields are typed:
an unknown key, a value of the wrong type or a missing section is one clear error naming the key.
Overrides use dotted keys and are parsed as TOML values (``train.steps=20``, ``optim.lr=1e-3``,
``model.depths=[1,1,1,1]``, ``optim.name=sgd``: a bare word that is not a TOML value stays a string).
A list of tables (``[[sources]]``) is overridden by index: ``sources.1.batch_size=4``.

The resolved configuration is written as ``config.json`` into the run's folder; :func:`load` reads
that back as well (``--preset path/to/config.json``), so a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Dict, List, Sequence, Type, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A preset or an override that does not fit the recipe's config (the message names the key)."""


# ----------------------------------------------------------------------------- shared sections

@dataclass
class WorldConfig:
    """The built-in world (:meth:`moe_recipes.data.World.default`)."""

    seed: int = 0
    image_size: int = 64
    size: int = 10_000


@dataclass
class SourceConfig:
    """One pre-training source: a world source name (or a label for a real dataset given by ``path``),
    its sampling weight (two-step sampling, MTHL Sec. 3.2; SIMT task weight, GPPF Tab. D.1), its loss
    weight and per-step batch size, and optionally a real dataset."""

    name: str
    weight: float = 1.0
    loss_weight: float = 1.0
    batch_size: int = 8
    path: str = ""  # a real dataset: its images ("" = the built-in world's source of this name)
    labels: str = ""  # with a path: COCO JSON (det), mask folder (seg) or depth folder (depth); cls: none
    task: str = ""  # with a path: cls, det, seg or depth
    image_size: int = 0  # with a path: resize to this (0: the world's image size)
    num_classes: int = 0  # seg by path: mask values 0 .. num_classes-1 (0: the largest value found + 1)
    ignore_index: int = 255  # seg by path: the mask value of unlabelled pixels


@dataclass
class OptimConfig:
    """``name``: ``lamb`` (DeepSpeed's or apex's fused LAMB on GPU, else pytorch-optimizer's),
    ``sgd`` or ``adamw`` (torch). Norms, biases, routers and controllers get no weight decay."""

    name: str = "lamb"
    lr: float = 4e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    clip_grad: float = 0.0  # max global gradient norm (0: no clipping)
    implementation: str = "auto"  # lamb only: auto, apex, deepspeed or pytorch_optimizer


@dataclass
class ScheduleConfig:
    """``triangular`` (linear warm-up to the peak, linear decay to 0: MTHL/DaViT), ``cosine`` (linear
    warm-up, cosine to ``min_lr_ratio``: GPPF) or ``constant``; ``warmup`` is a fraction of the steps."""

    kind: str = "triangular"
    warmup: float = 0.05
    min_lr_ratio: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 100
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    virtual_devices: int = 1  # micro-steps per step, each with its own sampled source (RECIPES.md 3.6.5)
    sampling: str = "per_device"  # per_device: each (rank, virtual device) draws a source; global: one per step
    eval_samples: int = 64  # per source
    eval_batch_size: int = 16
    backend: str = ""  # moe_kernels backend for the whole run ("" = automatic)
    threads: int = 0  # torch intra-op threads (0: leave as is)
    progress: bool = True  # tqdm bar


# ----------------------------------------------------------------------------- loading

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config: key '{key}' must be a table, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (list, List, Sequence):
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config: key '{key}' must be a list, got {value!r}")
        return [_convert(v, item, f"{key}.{i}") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"config: key '{key}' must be a table, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"config: key '{key}' must be {_type_name(tp)}, got {value!r}")
        return value
    raise ConfigError(f"config: key '{key}' has an unsupported type {tp!r}")  # pragma: no cover


def from_dict(cls: Type[T], data: dict, prefix: str = "") -> T:
    """``cls`` (a dataclass) from a nested dict, every value checked against the field's type."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"section '{prefix}'" if prefix else cls.__name__
        raise ConfigError(f"config: unknown key(s) {unknown} in {where}; the keys are {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config: key '{key}' is required")
    return cls(**kwargs)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """``data`` (nested dicts/lists) with each ``a.b.c=value`` applied (a new dict; ``data`` unchanged)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config: override {item!r} must be key=value (e.g. train.steps=20)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for i, p in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"config: override {item!r}: '{'.'.join(parts[:i + 1])}' is not an index "
                                      f"of a list of {len(node)}")
                node = node[int(p)]
            else:
                if p not in node:
                    node[p] = {}
                elif not isinstance(node[p], (dict, list)):
                    raise ConfigError(f"config: override {item!r}: '{'.'.join(parts[:i + 1])}' is a value, "
                                      f"not a section")
                node = node[p]
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"config: override {item!r}: '{last}' is not an index of a list of {len(node)}")
            node[int(last)] = _parse_value(text.strip())
        else:
            node[last] = _parse_value(text.strip())
    return data


def preset_names(recipe: str) -> List[str]:
    root = resources.files("moe_recipes") / "presets" / recipe
    if not root.is_dir():
        return []
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def read_preset(recipe: str, preset: str) -> dict:
    """The preset's data: a name of ``presets/<recipe>/`` or a path to a ``.toml``/``.json`` file."""
    if os.path.sep in preset or preset.endswith((".toml", ".json")):
        if not os.path.isfile(preset):
            raise ConfigError(f"config: preset file {preset!r} does not exist")
        with open(preset, "rb") as f:
            return json.load(f) if preset.endswith(".json") else tomllib.load(f)
    path = resources.files("moe_recipes") / "presets" / recipe / f"{preset}.toml"
    if not path.is_file():
        raise ConfigError(f"config: recipe {recipe!r} has no preset {preset!r}; the presets are "
                          f"{preset_names(recipe)}")
    return tomllib.loads(path.read_text())


def load(cls: Type[T], recipe: str, preset: str, overrides: Sequence[str] = ()) -> T:
    """The typed config of ``recipe`` from ``preset`` with ``overrides`` applied."""
    data = apply_overrides(read_preset(recipe, preset), overrides)
    data.setdefault("preset", os.path.basename(preset).rsplit(".", 1)[0] if os.path.sep in preset else preset)
    return from_dict(cls, data)


__all__ = ["ConfigError", "WorldConfig", "SourceConfig", "OptimConfig", "ScheduleConfig", "TrainConfig",
           "from_dict", "to_dict", "apply_overrides", "read_preset", "preset_names", "load"]
