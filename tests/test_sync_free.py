"""The validation policy: sync-free steps (no host synchronisation in forward or backward) that still
never let a bad value pass, and the checking policy's clear errors.

Host synchronisations are counted with moe_kernels.testing.HostSyncCounter, which sees inside the
library's custom ops (see its docstring for what counts)."""

import pytest
import torch

import moe_kernels as mk
from moe_kernels.testing import HostSyncCounter

from .conftest import use_backend
from .helpers import assert_exact

LAYERS = {
    "dropless": dict(),
    "capacity_factor": dict(capacity_factor=1.0, drop_policy="score"),
    "capacity_pad": dict(capacity=3, pad_to=4),
    "tasks_ema": dict(num_tasks=3),
    "tasks_batch_mi": dict(num_tasks=3, mi_loss="batch"),
    "swiglu_sigmoid": dict(activation="swiglu", score="sigmoid", renormalize=False),
}


def _step(layer, x, tasks):
    out = layer(x, tasks)
    (out.output.square().mean() + out.aux_loss).backward()
    return out


def _layer(opts, backend):
    torch.manual_seed(0)
    return mk.nn.MoE(12, 16, 5, 2, backend=backend, **opts)


def _tasks(opts, how, T=10):
    if opts.get("num_tasks", 1) == 1:
        return None
    return 1 if how == "batch" else torch.arange(T) % 3


@pytest.mark.parametrize("how", ["batch", "tokens"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_moe_layer_step_makes_no_host_sync(name, how, fast_backend):
    """Under the sync-free policy, a forward + backward of the layer on a compiled backend makes
    zero host synchronisations: nothing in the op layer, the module or the losses reads a value."""
    opts = LAYERS[name]
    layer = _layer(opts, fast_backend)
    x = torch.randn(2, 5, 12, requires_grad=True)
    tasks = _tasks(opts, how)
    _step(layer, x, tasks)  # warm-up: builds and loads outside the count
    with mk.value_checks(False), HostSyncCounter() as syncs:
        _step(layer, x, tasks)
    assert syncs.count == 0, syncs.report()


@pytest.mark.parametrize("name", ["capacity_pad", "tasks_ema"])
def test_sync_free_step_compiles_to_one_graph(name, fast_backend):
    """What sync-free is for: under that policy the layer's step traces with fullgraph=True (a value
    read would be a graph break) and gives the eager step's outputs and gradients."""
    import copy

    opts = LAYERS[name]
    layer = _layer(opts, fast_backend)
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 5, 12)
    tasks = _tasks(opts, "tokens")
    with mk.value_checks(False):
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        o1 = _step(layer, x1, tasks)
        torch._dynamo.reset()
        o2 = _step(torch.compile(twin, fullgraph=True), x2, tasks)
    torch.testing.assert_close(o2.output, o1.output, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    for (n, p1), p2 in zip(layer.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_tasks_seeing_different_experts_make_no_host_sync(fast_backend):
    layer = _layer(dict(num_tasks=2), fast_backend)
    mk.adapt.add_experts(layer, 2)  # the new task sees 7 experts, the old ones 5
    x = torch.randn(9, 12)
    tasks = torch.tensor([0, 1, 2, 2, 1, 0, 2, 2, 1])
    _step(layer, x, tasks)
    with mk.value_checks(False), HostSyncCounter() as syncs:
        _step(layer, x, tasks)
    assert syncs.count == 0, syncs.report()


def test_reference_syncs_only_where_it_says():
    """The reference kernels are the oracle, not the GPU path: their one host read is the expert
    segment offsets of the grouped GEMMs (and task_route's grouping of tokens by task)."""
    layer = _layer(dict(num_tasks=3), "reference")
    x = torch.randn(10, 12, requires_grad=True)
    with mk.value_checks(False), HostSyncCounter() as syncs:
        _step(layer, x, 1)
    places = {e.where.rsplit("(", 1)[-1].rstrip(")") for e in syncs.events}
    assert places == {"segments"}, syncs.report()
    with mk.value_checks(False), HostSyncCounter() as syncs:
        _step(layer, x, torch.arange(10) % 3)
    places = {e.where.rsplit("(", 1)[-1].rstrip(")") for e in syncs.events}
    assert places == {"segments", "task_logits", "task_logits_bwd"}, syncs.report()


def test_the_counter_sees_syncs_inside_ops():
    """The counter can fail: the checking policy's value checks are host syncs, and it finds them
    inside the custom ops' bodies."""
    logits = torch.randn(10, 5)
    with mk.value_checks(True), HostSyncCounter() as syncs:
        mk.route(logits, 2, backend="reference")
    assert syncs.count >= 1 and any("check_finite" in e.where for e in syncs.events), syncs.report()
    with HostSyncCounter() as syncs:
        torch.tensor([1, 2]).tolist()
        int(torch.tensor(3))
        torch.nonzero(torch.tensor([0, 1]))
    assert syncs.count == 3, syncs.report()
    assert torch.Tensor.tolist is torch._C.TensorBase.tolist  # restored


def test_policy_defaults_and_switches(monkeypatch):
    monkeypatch.delenv("MOE_KERNELS_CHECK_VALUES", raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert mk.checking_values(cpu) and not mk.checking_values(cuda)
    monkeypatch.setenv("MOE_KERNELS_CHECK_VALUES", "1")
    assert mk.checking_values(cuda)
    monkeypatch.setenv("MOE_KERNELS_CHECK_VALUES", "0")
    assert not mk.checking_values(cpu)
    with mk.value_checks(True):  # code wins over the environment, and the block restores it
        assert mk.checking_values(cpu) and mk.checking_values(cuda)
    assert not mk.checking_values(cpu)
    monkeypatch.setenv("MOE_KERNELS_CHECK_VALUES", "yes")
    with pytest.raises(mk.MoEKernelsError, match="MOE_KERNELS_CHECK_VALUES must be 0, 1 or auto"):
        mk.checking_values(cpu)
    with pytest.raises(mk.MoEKernelsError, match="argument 'enabled'"):
        mk.set_value_checks("off")


@pytest.mark.parametrize("mode", [dict(), dict(capacity=2), dict(capacity=2, drop_policy="score")], ids=str)
def test_nonfinite_logits_give_nan_outputs_never_a_silent_route(mode, backend):
    """Sync-free: a token with a non-finite logit gets experts 0..k-1 and NaN weights, the lowest
    priority under the score policy; its output is NaN even when its assignments are dropped, and
    every other token is routed exactly as without it."""
    torch.manual_seed(1)
    T, E, k, d = 12, 4, 2, 6
    logits = torch.randn(T, E)
    logits[3, 1] = float("nan")
    logits[7, 2] = float("inf")
    logits[9] = -float("inf")
    with mk.value_checks(False):
        r = mk.route(logits, k, backend=backend, **mode)
        want = mk.route(logits, k, backend="reference", **mode)
        x, w1, w2 = torch.randn(T, d), torch.randn(E, d, 8), torch.randn(E, 8, d)
        y = mk.moe_mlp(x, r, w1, w2, backend=backend)
        yc = mk.combine(mk.grouped_mlp(mk.dispatch(x, r, backend=backend), r.offsets, w1, w2, backend=backend), r,
                        backend=backend)
    bad = torch.tensor([3, 7, 9])
    for name in ("topk_ids", "counts", "offsets", "slots", "sources", "num_dropped"):
        assert_exact(getattr(r, name), getattr(want, name), name)
    assert (r.topk_ids[bad] == torch.arange(k, dtype=torch.int32)).all()
    assert torch.isnan(r.topk_weights[bad]).all()
    good = torch.ones(T, dtype=torch.bool)
    good[bad] = False
    assert torch.isfinite(r.topk_weights[good]).all()
    for out in (y, yc):
        assert torch.isnan(out[bad]).all(dim=1).all()
        assert torch.isfinite(out[good]).all()
    if mode.get("drop_policy") == "score":  # the bad tokens yield their capacity first
        fine = mk.route(logits[good], k, backend="reference", capacity=mode["capacity"])
        assert int(r.num_dropped) - len(bad) * k <= int(fine.num_dropped)


def test_checking_policy_rejects_nonfinite_logits(backend):
    logits = torch.randn(6, 4)
    logits[2, 3] = float("nan")
    with mk.value_checks(True), pytest.raises(mk.MoEKernelsError, match=r"argument 'logits' contains NaN or inf "
                                                                        r"\(first at index \(2, 3\)\)"):
        mk.route(logits, 2, backend=backend)


def test_ids_out_of_range_stop_the_call_under_either_policy(backend):
    r = mk.route(torch.randn(6, 4), 2, backend="reference")
    bad = r._replace(sources=r.sources.clone().fill_(9))
    x = torch.randn(6, 3)
    for check in (True, False):
        with mk.value_checks(check), pytest.raises((RuntimeError, ValueError)):
            mk.dispatch(x, bad, backend=backend)


def test_nan_input_is_reported_as_the_layers_input(backend):
    layer = _layer(dict(), backend)
    x = torch.randn(2, 5, 12)
    x[1, 3, 7] = float("nan")
    with pytest.raises(mk.MoEKernelsError, match=r"nn.MoE: argument 'x' contains NaN or inf \(first at index "
                                                 r"\(1, 3, 7\)\)"):
        layer(x)
    with torch.no_grad():
        layer.router_weight[0, 0, 0] = float("inf")
    with pytest.raises(mk.MoEKernelsError, match="router logits x @ router_weight are not finite although x is"):
        layer(torch.randn(4, 12))
    tasks_layer = _layer(dict(num_tasks=2), backend)
    with pytest.raises(mk.MoEKernelsError, match=r"argument 'x' contains NaN or inf \(first at index \(1, 3, 7\)\)"):
        tasks_layer(x, torch.zeros(2, dtype=torch.long))


def test_compiled_backend_required_here():
    """The cpu backend builds on this machine (CI lists it in MOE_KERNELS_TEST_BACKENDS)."""
    use_backend("cpu")
