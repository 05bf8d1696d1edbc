"""Small models for the tests: a ResNet-style sub-backbone exposing its stage outputs.

(The recipes in python/ have their own backbones; this one is just big enough to wire
reconciliation links between stages.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from moe_kernels._validation import check, check_choice, check_int
from moe_kernels.nn.reconcile import LAYOUTS, _from_nchw, _to_nchw


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class _LayoutSeq(nn.Sequential):
    """A sequence of NCHW modules that takes and returns maps in ``layout``."""

    def __init__(self, layout: str, *mods: nn.Module) -> None:
        super().__init__(*mods)
        self.layout = layout

    def forward(self, x: Tensor) -> Tensor:
        return _from_nchw(super().forward(_to_nchw(x, self.layout)), self.layout)


class TinyResNet(nn.Module):
    """A small ResNet-style sub-backbone exposing D stage outputs (for tests and recipes).

    ``stem``: 3x3 conv + BN + ReLU (stride 1). ``stages[0]``: ``blocks`` basic residual blocks at
    ``channels[0]``; ``stages[i > 0]``: the first block has stride 2 (H, W halved, ceil) and a
    projection shortcut. ``forward`` returns the D stage outputs; with ``layout="nhwc"`` input and
    outputs are ``[B, H, W, C]`` (computed as channels_last NCHW views, no copies).

    Example::

        net = TinyResNet(channels=(16, 32, 64, 128))
        c1, c2, c3, c4 = net(torch.randn(2, 3, 32, 32))   # 32x32, 16x16, 8x8, 4x4
    """

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (16, 32, 64, 128), *,
                 blocks: int = 1, layout: str = "nchw") -> None:
        super().__init__()
        op = "TinyResNet"
        check_int(in_channels, op, "in_channels", lo=1)
        channels = list(channels)
        check(len(channels) >= 1, op, "channels", "must give at least one stage")
        for n, c in enumerate(channels):
            check_int(c, op, f"channels[{n}]", lo=1)
        check_int(blocks, op, "blocks", lo=1)
        check_choice(layout, op, "layout", LAYOUTS)
        self.layout = layout
        self.stage_channels = tuple(channels)
        self.stem = _LayoutSeq(layout, nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False),
                               nn.BatchNorm2d(channels[0]), nn.ReLU())
        stages, cin = [], channels[0]
        for i, c in enumerate(channels):
            blks = [_BasicBlock(cin if b == 0 else c, c, (2 if i > 0 and b == 0 else 1))
                    for b in range(blocks)]
            stages.append(_LayoutSeq(layout, *blks))
            cin = c
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.stem(x)
        outs = []
        for s in self.stages:
            h = s(h)
            outs.append(h)
        return outs
