"""What the backbones share: their output, the config-or-preset-name argument, a parameter count."""

from __future__ import annotations

from dataclasses import replace
from typing import List, Mapping, NamedTuple, TypeVar, Union

import torch
import torch.nn as nn

C = TypeVar("C")


class BackboneOutput(NamedTuple):
    features: List[torch.Tensor]  # per stage [B, C, H, W]
    aux_loss: torch.Tensor  # the MoE layers' auxiliary losses, summed (0 without MoE)


def resolve_config(owner: str, config: Union[str, C], presets: Mapping[str, C], overrides: dict) -> C:
    """``config`` as given or the preset of that name, with ``overrides`` replacing its fields."""
    if isinstance(config, str):
        if config not in presets:
            kind = type(next(iter(presets.values()))).__name__
            raise ValueError(f"{owner}: argument 'config' must be one of {list(presets)} or a {kind}, "
                             f"got {config!r}")
        config = presets[config]
    return replace(config, **overrides) if overrides else config


def parameter_count(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
