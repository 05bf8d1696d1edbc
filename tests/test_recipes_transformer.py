"""The recipes' Swin-style backbone with MoE MLPs (moe_recipes.models.transformer)."""

import pytest
import torch

from moe_recipes.models import HierarchicalTransformer, TransformerConfig, parameter_count
from moe_recipes.models.transformer import Block


@pytest.mark.parametrize("size", [(64, 64), (52, 60)])
def test_feature_pyramid_shapes_and_a_training_step(size):
    torch.manual_seed(0)
    m = HierarchicalTransformer("cpu-tiny", num_tasks=3)
    x = torch.randn(2, 3, *size)
    out = m(x, torch.tensor([0, 2]))
    h, w = -(-size[0] // 4), -(-size[1] // 4)
    shapes = []
    for c in m.widths:
        shapes.append((2, c, h, w))
        h, w = -(-h // 2), -(-w // 2)
    assert [tuple(f.shape) for f in out.features] == shapes
    assert out.aux_loss.dim() == 0 and float(out.aux_loss.detach()) > 0
    (sum(f.square().mean() for f in out.features) + out.aux_loss).backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


def _influence(block: Block, H: int, W: int, C: int = 8) -> torch.Tensor:
    """[H*W, H*W]: whether output token i depends on input token j (through the gradient)."""
    x = torch.randn(1, H, W, C, requires_grad=True)
    out = torch.zeros(H * W, H * W, dtype=torch.bool)
    y, _ = block(x, None)
    for i in range(H * W):
        (g,) = torch.autograd.grad(y.view(H * W, C)[i].sum(), x, retain_graph=True)
        out[i] = g.view(H * W, C).abs().sum(1) > 0
    return out


@pytest.mark.parametrize("shift", [False, True])
def test_attention_sees_exactly_its_window(shift):
    """A token attends to the tokens of its window: the w x w tiles of the grid, or (shifted) the tiles
    offset by w/2, cut at the border without wrapping around (what the roll + mask must amount to)."""
    torch.manual_seed(0)
    H = W = 8
    w = 4
    block = Block(8, 2, w, shift, 2.0, None)
    got = _influence(block, H, W)
    r = torch.arange(H).repeat_interleave(W)
    c = torch.arange(W).repeat(H)
    off = w // 2 if shift else 0
    tile_r, tile_c = torch.div(r + off, w, rounding_mode="floor"), torch.div(c + off, w, rounding_mode="floor")
    expect = (tile_r[:, None] == tile_r[None, :]) & (tile_c[:, None] == tile_c[None, :])
    assert torch.equal(got, expect)


def test_moe_placement_and_per_dataset_routers():
    every = HierarchicalTransformer("cpu-tiny", num_tasks=4)
    second = HierarchicalTransformer("cpu-tiny", moe="every_second")
    dense = HierarchicalTransformer("cpu-tiny", moe="none")
    blocks = sum(every.config.depths)
    assert len(every.moe_layers()) == blocks and len(second.moe_layers()) == blocks // 2
    assert dense.moe_layers() == []
    layer = every.moe_layers()[0]
    assert layer.num_tasks == 4 and layer.num_experts == 12 and layer.k == 4
    assert layer.hidden == int(every.config.mlp_ratio * every.config.embed_dim) // 4  # dense hidden / k
    out = dense(torch.randn(1, 3, 32, 32))
    assert float(out.aux_loss) == 0.0


def test_dense_preset_sizes_match_the_swin_backbones():
    """The dense backbones' parameter counts: Swin-T/S/B 27.5M / 48.9M / 86.7M (MTHL Tab. 1, RECIPES.md 5.2)."""
    for name, millions in (("swin-t", 27.5), ("swin-s", 48.9), ("swin-b", 86.7)):
        m = HierarchicalTransformer(name, moe="none")
        assert abs(parameter_count(m) / 1e6 - millions) < 0.1, (name, parameter_count(m))


def test_dense_preset_sizes_match_the_davit_backbones():
    """DaViT-T/S/B dense: 27.6M / 49.0M / 86.9M (MTHL Tab. 1): a depth is a (spatial, channel) pair."""
    for name, millions in (("davit-t", 27.6), ("davit-s", 49.0), ("davit-b", 86.9)):
        m = HierarchicalTransformer(name, moe="none")
        assert abs(parameter_count(m) / 1e6 - millions) < 0.1, (name, parameter_count(m))
        assert sum(len(s) for s in m.stages) == 2 * sum(m.config.depths)


@pytest.mark.parametrize("size", [32, 40, 57])
def test_davit_style_forward_backward_on_odd_grids(size):
    torch.manual_seed(0)
    m = HierarchicalTransformer("cpu-tiny-davit", num_tasks=2)
    assert len(m.moe_layers()) == 2 * sum(m.config.depths)  # both blocks of every pair (RECIPES.md 5.6 item 8)
    out = m(torch.randn(2, 3, size, size), 1)
    grid = -(-size // 4)
    assert out.features[0].shape == (2, 32, grid, grid)
    assert [f.shape[1] for f in out.features] == [32, 64, 128, 256]
    (sum(f.mean() for f in out.features) + out.aux_loss).backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if "router" not in n or "stages" in n)
    # channel attention mixes every token: one changed pixel moves every position of the first-stage
    # map (a window-attention-only stage would leave the far windows unchanged)
    x = torch.randn(1, 3, 32, 32)
    m.eval()
    a = m(x, 0).features[0]
    x2 = x.clone()
    x2[..., 0, 0] += 1.0
    b = m(x2, 0).features[0]
    assert bool(((a - b).abs().amax(1) > 0).all())


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="argument 'config'"):
        HierarchicalTransformer("swin-xl")
    with pytest.raises(ValueError, match="argument 'moe'"):
        TransformerConfig(moe="sometimes")
    with pytest.raises(ValueError, match="argument 'style'"):
        TransformerConfig(style="vit")
    with pytest.raises(ValueError, match="not a multiple of its heads"):
        TransformerConfig(embed_dim=30, heads=(4, 4, 4, 4))
    with pytest.raises(ValueError, match="argument 'images'"):
        HierarchicalTransformer("cpu-tiny")(torch.randn(3, 64, 64))
