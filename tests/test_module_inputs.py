"""Modules accept what a torch module accepts: any strides (transposed, sliced, channels-last
views) give the result of the contiguous input, while the functional ops keep their explicit errors."""

import pytest
import torch

import moe_kernels as mk
import moe_kernels.nn as mnn


def _views(t):
    """Non-contiguous views holding the values of ``t``: transposed storage, a strided slice."""
    tr = t.transpose(0, -1).contiguous().transpose(0, -1)
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    out = ([tr] if t.dim() > 1 else []) + [wide[..., ::2]]
    assert all(not v.is_contiguous() and torch.equal(v, t) for v in out)
    return out


def _check(fn, t, *rest):
    want = fn(t.contiguous(), *rest)
    for v in _views(t):
        got = fn(v, *rest)
        for a, b in zip(want if isinstance(want, (list, tuple)) else [want],
                        got if isinstance(got, (list, tuple)) else [got]):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # GEMMs may take another path


def test_moe_takes_any_view():
    torch.manual_seed(0)
    layer = mnn.MoE(8, 16, 4, 2, num_tasks=2)
    layer.eval()  # the MI buffer is not updated, so calls are repeatable
    _check(lambda x: layer(x, 1).output, torch.randn(3, 5, 8))
    tasks = torch.tensor([0, 1, 1, 0, 1, 0])
    _check(lambda x: layer(x, tasks).output, torch.randn(6, 8))
    _check(lambda t: layer(torch.ones(6, 8), t).output, tasks)  # strided task ids


def test_moe_error_names_the_layer_input():
    layer = mnn.MoE(8, 16, 4, 2)
    with pytest.raises(mk.MoEKernelsError, match="nn.MoE: argument 'x' must be a tensor ending in dim=8"):
        layer(torch.randn(4, 7))


def test_mutual_information_loss_takes_any_view():
    mi = mnn.MutualInformationLoss(2, 4)
    mi.eval()
    _check(lambda p: mi(p, torch.tensor([0, 1, 0, 1, 0, 1])), torch.softmax(torch.randn(6, 4), -1))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_reconciliation_layer_takes_any_view(layout):
    torch.manual_seed(1)
    layer = mnn.ReconciliationLayer(8, [4, 6], layout=layout)
    shape = (lambda c: (2, c, 5, 5)) if layout == "nchw" else (lambda c: (2, 5, 5, c))
    aux = [torch.randn(*shape(4)), torch.randn(*shape(6))]
    _check(lambda m: layer(m, aux), torch.randn(*shape(8)))
    _check(lambda a: layer(torch.randn(*shape(8), generator=torch.Generator().manual_seed(2)), [a, aux[1]]),
           aux[0])


def test_lego_layer_takes_any_view():
    torch.manual_seed(2)
    layer = mnn.LegoLayer(lambda: torch.nn.Linear(6, 6), num_tasks=2, num_units=3)
    layer.eval()  # test time: the argmax unit
    _check(lambda x: layer(x, 1), torch.randn(4, 6))


def test_functional_ops_keep_their_explicit_errors():
    x = torch.randn(6, 4).t()
    with pytest.raises(mk.MoEKernelsError, match="argument 'logits' must be contiguous .* call .contiguous"):
        mk.route(x, 2)
