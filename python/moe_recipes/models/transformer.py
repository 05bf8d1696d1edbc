"""A Swin-style hierarchical vision transformer whose MLPs can be ``mk.nn.MoE`` layers (MTHL's backbone).

Four stages of transformer blocks over a patch grid: window self-attention with a relative position
bias, shifted by half a window in every second block (with the attention mask that keeps shifted
windows from mixing pixels that are not neighbours), and patch merging (2x2 -> one token, twice the
width) between stages, as in Swin (Liu et al., "Swin Transformer: Hierarchical Vision Transformer
using Shifted Windows", arXiv:2103.14030). Grids that are not multiples of the window are padded.

The MLP of a block is dense or a mixture of experts (MTHL: Chen et al., "An Efficient General-Purpose
Modular Vision Model via Multi-Task Heterogeneous Training", arXiv:2306.17165; RECIPES.md 5.2): ``moe="every"`` (tiny/small)
or ``"every_second"`` (base), ``num_experts`` experts of hidden size ``mlp_ratio * dim / k`` each
(the dense MLP's hidden size divided by k, MTHL App. A2), one router per dataset
(``num_tasks``) and the EMA mutual-information loss.

``style="davit"`` builds the DaViT shape instead (Ding et al., "DaViT: Dual Attention Vision
Transformers", arXiv:2204.03645): an overlapping 7x7 stride-4 stem, stages of (spatial-window,
channel-group) attention block pairs with convolutional position encodings (no shift, no relative
bias), and LayerNorm + 2x2 stride-2 convolutions between stages; presets ``davit-t/s/b`` have MTHL
Tab. 1's dense 27.6M / 49.0M / 86.9M parameters.

``forward(images, task_ids)`` returns :class:`BackboneOutput`: the four stages' feature maps
(``[B, C_i, H/4/2^i, W/4/2^i]``) and the sum of the MoE layers' auxiliary losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import moe_kernels as mk

from ._common import BackboneOutput, parameter_count, resolve_config


@dataclass(frozen=True)
class TransformerConfig:
    """The backbone's shape. ``PRESETS`` has the papers' sizes and a CPU-tiny one."""

    embed_dim: int = 32
    depths: Tuple[int, ...] = (1, 1, 2, 1)
    heads: Tuple[int, ...] = (1, 2, 4, 8)
    window: int = 4
    patch: int = 4
    mlp_ratio: float = 4.0
    in_channels: int = 3
    moe: str = "every"  # "every", "every_second" or "none" (the dense baseline, MTHL.D)
    num_experts: int = 12
    k: int = 4
    num_tasks: int = 1
    moe_options: dict = field(default_factory=dict)  # more mk.nn.MoE arguments (capacity, mi_loss, ...)
    style: str = "swin"  # "swin" (shifted windows) or "davit" (spatial-window + channel-group attention pairs)

    def __post_init__(self):
        if self.style not in ("swin", "davit"):
            raise ValueError(f"TransformerConfig: argument 'style' must be 'swin' or 'davit', got {self.style!r}")
        if len(self.depths) != len(self.heads) or not self.depths:
            raise ValueError(f"TransformerConfig: arguments 'depths' and 'heads' must have one length, got "
                             f"{self.depths!r} and {self.heads!r}")
        for i, h in enumerate(self.heads):
            if (self.embed_dim * 2 ** i) % h:
                raise ValueError(f"TransformerConfig: stage {i} width {self.embed_dim * 2 ** i} is not a "
                                 f"multiple of its heads {h}")
        if self.moe not in ("every", "every_second", "none"):
            raise ValueError(f"TransformerConfig: argument 'moe' must be 'every', 'every_second' or 'none', "
                             f"got {self.moe!r}")
        if self.moe != "none" and not (1 <= self.k <= self.num_experts):
            raise ValueError(f"TransformerConfig: argument 'k' must be in [1, num_experts={self.num_experts}], "
                             f"got {self.k!r}")

    def widths(self) -> Tuple[int, ...]:
        return tuple(self.embed_dim * 2 ** i for i in range(len(self.depths)))


PRESETS = {
    "cpu-tiny": TransformerConfig(),
    # the papers' Swin shapes (Swin paper Tab. 1); MTHL puts MoE in every block for T/S, every second for B
    "swin-t": TransformerConfig(96, (2, 2, 6, 2), (3, 6, 12, 24), window=7),
    "swin-s": TransformerConfig(96, (2, 2, 18, 2), (3, 6, 12, 24), window=7),
    "swin-b": TransformerConfig(128, (2, 2, 18, 2), (4, 8, 16, 32), window=7, moe="every_second"),
    # DaViT (Ding et al., arXiv:2204.03645): a depth counts (spatial, channel) block pairs; MTHL puts MoE
    # in both blocks of every pair for T/S, every second block for B (RECIPES.md 5.6 item 8)
    "davit-t": TransformerConfig(96, (1, 1, 3, 1), (3, 6, 12, 24), window=7, style="davit"),
    "davit-s": TransformerConfig(96, (1, 1, 9, 1), (3, 6, 12, 24), window=7, style="davit"),
    "davit-b": TransformerConfig(128, (1, 1, 9, 1), (4, 8, 16, 32), window=7, style="davit", moe="every_second"),
    "cpu-tiny-davit": TransformerConfig(style="davit", depths=(1, 1, 1, 1)),
}


def _windows(x: torch.Tensor, w: int) -> torch.Tensor:
    """[B, H, W, C] (H, W multiples of w) -> [B * nW, w*w, C]."""
    B, H, W, C = x.shape
    return x.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)


def _unwindows(x: torch.Tensor, w: int, B: int, H: int, W: int) -> torch.Tensor:
    C = x.shape[-1]
    return x.view(B, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside w x w windows, with a learned relative position bias.

    The bias table covers the configured window; a smaller effective window (a grid smaller than
    the window, as in the last stage of small images) uses the table's central part."""

    def __init__(self, dim: int, heads: int, window: int, relative_bias: bool = True):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if relative_bias:
            self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
            nn.init.trunc_normal_(self.bias_table, std=0.02)
        else:  # DaViT: positions come from the convolutional position encoding instead
            self.bias_table = None
        self._index_cache: Dict[tuple, torch.Tensor] = {}  # per (w, device): made once, not every step

    def _bias_index(self, w: int, device) -> torch.Tensor:
        key = (w, str(device))
        if key not in self._index_cache:
            self._index_cache[key] = self._make_bias_index(w, device)
        return self._index_cache[key]

    def _make_bias_index(self, w: int, device) -> torch.Tensor:
        coords = torch.stack(torch.meshgrid(torch.arange(w, device=device), torch.arange(w, device=device),
                                            indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (self.window - 1)
        return rel[..., 0] * (2 * self.window - 1) + rel[..., 1]  # [w*w, w*w]

    def forward(self, x: torch.Tensor, w: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
        n, t, c = x.shape  # windows, tokens per window (w*w), channels
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.bias_table is None:
            bias = x.new_zeros(1, self.heads, t, t)
        else:
            bias = self.bias_table[self._bias_index(w, x.device).reshape(-1)].view(t, t, -1).permute(2, 0, 1)
            bias = bias.unsqueeze(0)  # [1, heads, t, t]
        if mask is None and self.bias_table is None:
            out = F.scaled_dot_product_attention(q, k, v)
            return self.proj(out.transpose(1, 2).reshape(n, t, c))
        if mask is not None:  # [nW, t, t] for the windows of one image, the same for every image
            bias = (bias.view(1, 1, self.heads, t, t) + mask.view(1, -1, 1, t, t)).reshape(-1, self.heads, t, t)
            bias = bias.repeat(n // mask.shape[0], 1, 1, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class Block(nn.Module):
    """LayerNorm -> (shifted) window attention -> residual; LayerNorm -> MLP or MoE -> residual."""

    def __init__(self, dim: int, heads: int, window: int, shift: bool, mlp_ratio: float,
                 moe: Optional[dict]):
        super().__init__()
        self.window, self.shift = window, shift
        self._mask_cache: Dict[tuple, torch.Tensor] = {}
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        hidden = int(dim * mlp_ratio)
        if moe is None:
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            self.moe = None
        else:
            self.mlp = None
            opts = dict(moe)
            E, k = opts.pop("num_experts"), opts.pop("k")
            self.moe = mk.nn.MoE(dim, max(1, hidden // k), E, k, **opts)

    def _mask(self, H: int, W: int, w: int, device) -> torch.Tensor:
        """Shifted windows: tokens that come from different regions of the rolled grid must not attend.
        One per grid shape, kept (each block sees the same few shapes every step)."""
        key = (H, W, w, str(device))
        if key not in self._mask_cache:
            self._mask_cache[key] = self._make_mask(H, W, w, device)
        return self._mask_cache[key]

    @staticmethod
    def _make_mask(H: int, W: int, w: int, device) -> torch.Tensor:
        s = w // 2
        region = torch.zeros(H, W, dtype=torch.int64, device=device)
        cuts = (slice(0, -w), slice(-w, -s), slice(-s, None))
        r = 0
        for hs in cuts:
            for ws in cuts:
                region[hs, ws] = r
                r += 1
        ids = _windows(region.view(1, H, W, 1), w).squeeze(-1)  # [nW, w*w]
        same = ids[:, :, None] == ids[:, None, :]
        return torch.zeros(same.shape, device=device).masked_fill(~same, float("-inf"))

    def forward(self, x: torch.Tensor, task_ids) -> Tuple[torch.Tensor, torch.Tensor]:
        B, H, W, C = x.shape
        # as in Swin: a grid no larger than the window is one window, and is not shifted
        w = min(self.window, H, W)
        shift = self.shift and min(H, W) > self.window
        y = self.norm1(x)
        ph, pw = (-H) % w, (-W) % w
        if ph or pw:
            y = F.pad(y, (0, 0, 0, pw, 0, ph))
        Hp, Wp = H + ph, W + pw
        if shift:
            y = torch.roll(y, (-(w // 2), -(w // 2)), dims=(1, 2))
        mask = self._mask(Hp, Wp, w, x.device) if shift else None
        y = _unwindows(self.attn(_windows(y, w), w, mask), w, B, Hp, Wp)
        if shift:
            y = torch.roll(y, (w // 2, w // 2), dims=(1, 2))
        x = x + y[:, :H, :W]
        z = self.norm2(x)
        if self.moe is None:
            return x + self.mlp(z), x.new_zeros(())
        out = self.moe(z.reshape(B, H * W, C), task_ids)
        return x + out.output.view(B, H, W, C), out.aux_loss


def _mlp_or_moe(dim: int, mlp_ratio: float, moe: Optional[dict]):
    hidden = int(dim * mlp_ratio)
    if moe is None:
        return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)), None
    opts = dict(moe)
    E, k = opts.pop("num_experts"), opts.pop("k")
    return None, mk.nn.MoE(dim, max(1, hidden // k), E, k, **opts)


class ConvPosEnc(nn.Module):
    """DaViT's convolutional position encoding: x + depthwise 3x3 conv(x), on [B, H, W, C]."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ChannelAttention(nn.Module):
    """DaViT's channel group attention: per group of C/g channels, a (C/g) x (C/g) attention whose
    scores sum over all N tokens (scaled by N^-0.5), so every channel sees the whole image."""

    def __init__(self, dim: int, groups: int):
        super().__init__()
        self.groups = groups
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.groups, C // self.groups).permute(2, 0, 3, 1, 4)  # [B, g, N, c]
        attn = (q.transpose(-1, -2) * N ** -0.5) @ k  # [B, g, c, c]
        out = (attn.softmax(-1) @ v.transpose(-1, -2)).transpose(-1, -2)  # [B, g, N, c]
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class DualBlock(nn.Module):
    """One DaViT block: ``kind="spatial"`` (window attention, no shift) or ``"channel"`` (channel group
    attention), each CPE -> LayerNorm -> attention -> residual, CPE -> LayerNorm -> MLP or MoE -> residual."""

    def __init__(self, dim: int, heads: int, window: int, kind: str, mlp_ratio: float, moe: Optional[dict]):
        super().__init__()
        self.kind, self.window = kind, window
        self.cpe1, self.cpe2 = ConvPosEnc(dim), ConvPosEnc(dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = (WindowAttention(dim, heads, window, relative_bias=False) if kind == "spatial"
                     else ChannelAttention(dim, heads))
        self.mlp, self.moe = _mlp_or_moe(dim, mlp_ratio, moe)

    def forward(self, x: torch.Tensor, task_ids) -> Tuple[torch.Tensor, torch.Tensor]:
        B, H, W, C = x.shape
        x = self.cpe1(x)
        y = self.norm1(x)
        if self.kind == "spatial":
            w = min(self.window, H, W)
            ph, pw = (-H) % w, (-W) % w
            if ph or pw:
                y = F.pad(y, (0, 0, 0, pw, 0, ph))
            y = _unwindows(self.attn(_windows(y, w), w, None), w, B, H + ph, W + pw)[:, :H, :W]
        else:
            y = self.attn(y.reshape(B, H * W, C)).view(B, H, W, C)
        x = self.cpe2(x + y)
        z = self.norm2(x)
        if self.moe is None:
            return x + self.mlp(z), x.new_zeros(())
        out = self.moe(z.reshape(B, H * W, C), task_ids)
        return x + out.output.view(B, H, W, C), out.aux_loss


class ConvDown(nn.Module):
    """DaViT's downsampling between stages: LayerNorm, then a 2x2 stride-2 convolution to twice the width."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv2d(dim, 2 * dim, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        y = self.norm(x)
        if H % 2 or W % 2:
            y = F.pad(y, (0, 0, 0, W % 2, 0, H % 2))
        return self.conv(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PatchMerging(nn.Module):
    """2 x 2 neighbouring tokens -> one token of twice the width (odd grids padded)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduce = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduce(self.norm(x))


class HierarchicalTransformer(nn.Module):
    """The backbone (see the module doc). ``config``: a :class:`TransformerConfig` or a name of ``PRESETS``;
    keyword overrides replace its fields (e.g. ``num_tasks=3``, ``moe="none"``)."""

    def __init__(self, config: Union[str, TransformerConfig] = "cpu-tiny", **overrides):
        super().__init__()
        cfg = self.config = resolve_config("HierarchicalTransformer", config, PRESETS, overrides)
        davit = cfg.style == "davit"
        if davit:  # DaViT's overlapping 7x7 stride-4 stem
            self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.embed_dim, 7, stride=cfg.patch, padding=3)
        else:
            self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.embed_dim, cfg.patch, stride=cfg.patch)
        self.embed_norm = nn.LayerNorm(cfg.embed_dim)
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        self.out_norms = nn.ModuleList()
        n_block = 0
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.heads)):
            dim = cfg.widths()[i]
            blocks = nn.ModuleList()
            kinds = [k for _ in range(depth) for k in ("spatial", "channel")] if davit else [None] * depth
            for j, kind in enumerate(kinds):
                use_moe = cfg.moe == "every" or (cfg.moe == "every_second" and n_block % 2 == 1)
                moe = (dict(cfg.moe_options, num_experts=cfg.num_experts, k=cfg.k, num_tasks=cfg.num_tasks)
                       if use_moe else None)
                if davit:
                    blocks.append(DualBlock(dim, heads, cfg.window, kind, cfg.mlp_ratio, moe))
                else:
                    blocks.append(Block(dim, heads, cfg.window, j % 2 == 1, cfg.mlp_ratio, moe))
                n_block += 1
            self.stages.append(blocks)
            self.out_norms.append(nn.LayerNorm(dim))
            if i + 1 < len(cfg.depths):
                self.merges.append(ConvDown(dim) if davit else PatchMerging(dim))

    @property
    def widths(self) -> Tuple[int, ...]:
        return self.config.widths()

    def moe_layers(self) -> List[mk.nn.MoE]:
        return [b.moe for blocks in self.stages for b in blocks if b.moe is not None]

    def forward(self, images: torch.Tensor, task_ids: Union[None, int, torch.Tensor] = None) -> BackboneOutput:
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"HierarchicalTransformer: argument 'images' must be [B, {self.config.in_channels}, "
                             f"H, W], got {tuple(images.shape)}")
        x = self.embed_norm(self.patch_embed(images).permute(0, 2, 3, 1))
        aux = images.new_zeros((), dtype=torch.float32)
        feats = []
        for i, blocks in enumerate(self.stages):
            for b in blocks:
                x, a = b(x, task_ids)
                aux = aux + a
            feats.append(self.out_norms[i](x).permute(0, 3, 1, 2).contiguous())
            if i < len(self.merges):
                x = self.merges[i](x)
        return BackboneOutput(feats, aux)


__all__: Sequence[str] = ("TransformerConfig", "PRESETS", "BackboneOutput", "HierarchicalTransformer",
                          "WindowAttention", "Block", "PatchMerging", "ChannelAttention", "DualBlock", "ConvPosEnc",
                          "ConvDown", "parameter_count")
