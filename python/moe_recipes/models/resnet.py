"""A ResNet-style backbone whose stem and residual blocks can be GPPF lego layers.

The architecture is ResNet's (He et al., "Deep Residual Learning for Image Recognition",
arXiv:1512.03385): a 7x7 stride-2 stem with max pooling, then four stages of basic (two 3x3) or
bottleneck (1x1, 3x3 with the stride, 1x1 with 4x expansion) blocks, a 1x1 projection where the shape
changes. ``forward`` returns the four stages' feature maps (strides 4, 8, 16, 32).

With ``lego_units=N`` every block and the stem become an ``mk.nn.LegoLayer`` of N units of that
architecture, each task choosing one unit per layer with its Gumbel-softmax controller (GPPF: Sun et
al., "GPPF: A General Perception Pre-training Framework via Sparsely Activated Multi-Task Learning",
arXiv:2208.02148; RECIPES.md 3.2: L = 17 layers for ResNet-50, the stem included). ``forward(images, task_id)`` runs
one task for the whole batch (SIMT). ``extract_path``-style plain models come from the library
(``mk.nn.extract_path``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn

import moe_kernels as mk

from ._common import BackboneOutput, resolve_config


@dataclass(frozen=True)
class ResNetConfig:
    widths: Tuple[int, ...] = (16, 32, 64, 128)  # output channels per stage
    depths: Tuple[int, ...] = (1, 1, 1, 1)
    bottleneck: bool = False
    stem_width: int = 16
    in_channels: int = 3

    def __post_init__(self):
        if len(self.widths) != len(self.depths) or not self.depths or min(self.depths) < 1:
            raise ValueError(f"ResNetConfig: arguments 'widths' and 'depths' must have one length and depths "
                             f">= 1, got {self.widths!r} and {self.depths!r}")
        if self.bottleneck and any(w % 4 for w in self.widths):
            raise ValueError(f"ResNetConfig: bottleneck widths must be multiples of 4, got {self.widths!r}")


PRESETS = {
    "cpu-tiny": ResNetConfig(),
    "resnet18": ResNetConfig((64, 128, 256, 512), (2, 2, 2, 2), False, 64),
    "resnet50": ResNetConfig((256, 512, 1024, 2048), (3, 4, 6, 3), True, 64),
}


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


class Stem(nn.Sequential):
    def __init__(self, in_channels: int, width: int):
        super().__init__(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), _bn(width), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, 2, 1))


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, bottleneck: bool):
        super().__init__()
        if bottleneck:
            mid = cout // 4
            self.body = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), _bn(mid), nn.ReLU(inplace=True),
                                      nn.Conv2d(mid, mid, 3, stride, 1, bias=False), _bn(mid), nn.ReLU(inplace=True),
                                      nn.Conv2d(mid, cout, 1, bias=False), _bn(cout))
        else:
            self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _bn(cout), nn.ReLU(inplace=True),
                                      nn.Conv2d(cout, cout, 3, 1, 1, bias=False), _bn(cout))
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))
                         if stride != 1 or cin != cout else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """The backbone (see the module doc). ``config``: a :class:`ResNetConfig` or a name of ``PRESETS``.

    Args:
        lego_units: None (a plain ResNet) or N >= 2: every layer a lego layer of N units.
        num_tasks: the lego controllers' task count.
        lego_mode: ``"soft"`` or ``"hard"`` (see ``mk.nn.LegoLayer``).
        temperature: the Gumbel-softmax temperature to start from (GPPF anneals 5.0 -> 0.01).
    """

    def __init__(self, config: Union[str, ResNetConfig] = "cpu-tiny", *, lego_units: Optional[int] = None,
                 num_tasks: int = 1, lego_mode: str = "soft", temperature: float = 5.0, **overrides):
        super().__init__()
        cfg = self.config = resolve_config("ResNet", config, PRESETS, overrides)
        if lego_units is not None and lego_units < 2:
            raise ValueError(f"ResNet: argument 'lego_units' must be None or >= 2, got {lego_units!r}")
        self.lego = lego_units is not None

        def layer(factory):
            if not self.lego:
                return factory()
            return mk.nn.LegoLayer(factory, num_tasks, num_units=lego_units, mode=lego_mode,
                                   temperature=temperature)

        self.stem = layer(lambda: Stem(cfg.in_channels, cfg.stem_width))
        self.stages = nn.ModuleList()
        cin = cfg.stem_width
        for i, (width, depth) in enumerate(zip(cfg.widths, cfg.depths)):
            blocks = nn.ModuleList()
            for j in range(depth):
                stride = 2 if (j == 0 and i > 0) else 1
                blocks.append(layer(lambda cin=cin, stride=stride: ResidualBlock(cin, width, stride, cfg.bottleneck)))
                cin = width
            self.stages.append(blocks)

    @property
    def widths(self) -> Tuple[int, ...]:
        return self.config.widths

    def lego_layers(self):
        return [m for m in self.modules() if isinstance(m, mk.nn.LegoLayer)]

    def forward(self, images: torch.Tensor, task_id: Optional[int] = None) -> BackboneOutput:
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"ResNet: argument 'images' must be [B, {self.config.in_channels}, H, W], "
                             f"got {tuple(images.shape)}")
        # per module: after mk.nn.extract_path a lego layer is its chosen plain unit
        run = lambda m, x: m(x, task_id) if isinstance(m, mk.nn.LegoLayer) else m(x)  # noqa: E731
        x = run(self.stem, images)
        feats = []
        for blocks in self.stages:
            for b in blocks:
                x = run(b, x)
            feats.append(x)
        return BackboneOutput(feats, images.new_zeros((), dtype=torch.float32))
