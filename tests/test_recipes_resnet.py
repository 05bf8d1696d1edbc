"""The recipes' ResNet-style backbone, plain and as GPPF lego layers (moe_recipes.models.resnet)."""

import pytest
import torch

import moe_kernels as mk
from moe_recipes.models import parameter_count
from moe_recipes.models.resnet import ResNet, ResNetConfig


def test_plain_presets_have_resnets_parameter_counts():
    """Without the classifier: ResNet-18 11,176,512 and ResNet-50 23,508,032 parameters (torchvision's
    resnet18 / resnet50 less their fc layers)."""
    assert parameter_count(ResNet("resnet18")) == 11_176_512
    assert parameter_count(ResNet("resnet50")) == 23_508_032


@pytest.mark.parametrize("size", [(64, 64), (45, 70)])
def test_feature_pyramid(size):
    m = ResNet("cpu-tiny")
    out = m(torch.randn(2, 3, *size))
    h, w = size
    h, w = -(-h // 4), -(-w // 4)  # stem: stride 2 conv, stride 2 pool
    for f, c in zip(out.features, m.widths):
        assert tuple(f.shape) == (2, c, h, w)
        h, w = -(-h // 2), -(-w // 2)
    assert float(out.aux_loss) == 0.0


def test_lego_backbone_has_a_lego_layer_per_block_and_stem_and_trains_per_task():
    torch.manual_seed(0)
    m = ResNet("resnet50", lego_units=2, num_tasks=3, widths=(16, 32, 64, 128), stem_width=8)
    legos = m.lego_layers()
    assert len(legos) == 17  # GPPF's L for ResNet-50: the stem and 3 + 4 + 6 + 3 blocks
    x = torch.randn(2, 3, 32, 32)
    out = m(x, task_id=1)
    sum(f.mean() for f in out.features).backward()
    assert all(layer.controllers[1].grad is not None for layer in legos)
    assert all(layer.controllers[0].grad is None for layer in legos)  # other tasks untouched
    m.eval()
    plain = mk.nn.extract_path(m, 1)
    assert not plain.lego_layers()
    torch.testing.assert_close(plain(x).features[-1], m(x, task_id=1).features[-1], rtol=0, atol=0)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="argument 'config'"):
        ResNet("resnet1000")
    with pytest.raises(ValueError, match="argument 'lego_units'"):
        ResNet("cpu-tiny", lego_units=1)
    with pytest.raises(ValueError, match="multiples of 4"):
        ResNetConfig(widths=(6, 8, 12, 16), bottleneck=True)
    with pytest.raises(ValueError, match="argument 'images'"):
        ResNet("cpu-tiny")(torch.randn(1, 1, 8, 8))
