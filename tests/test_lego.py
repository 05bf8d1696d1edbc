"""mk.nn.LegoLayer (GPPF lego layers): Eq. 1 sampling, hard/soft, eval argmax, temperature, extraction."""

from __future__ import annotations

import copy
import itertools
import math
import re

import pytest
import torch
from torch import nn

import moe_kernels as mk
from moe_kernels.nn.lego import (
    GumbelTemperature,
    LegoLayer,
    LegoSequential,
    extract_path,
    lego_layers,
    selected_paths,
    selection_probs,
    set_task,
    set_temperature,
)

TINY = torch.finfo(torch.float32).tiny


def _gumbel(n: int, seed: int) -> torch.Tensor:
    """The documented draw, written independently: U = rand(N) (fp32, clamped to tiny), G = -log(-log U)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g, dtype=torch.float32).clamp_min(TINY)
    return -torch.log(-torch.log(u))


def _layer(n=3, tasks=2, dim=6, mode="soft", seed=0, **kw) -> LegoLayer:
    torch.manual_seed(seed)
    return LegoLayer(lambda: nn.Linear(dim, dim), num_tasks=tasks, num_units=n, mode=mode, **kw)


def _set_probs(layer: LegoLayer, task: int, p) -> None:
    with torch.no_grad():
        layer.controllers[task].copy_(torch.tensor(p, dtype=torch.float32).log())


class _Counter:
    """Counts forward calls per unit with forward hooks."""

    def __init__(self, layer: LegoLayer):
        self.calls = [0] * layer.num_units
        for k, u in enumerate(layer.units):
            u.register_forward_hook(lambda m, i, o, k=k: self.calls.__setitem__(k, self.calls[k] + 1))


# ---- Eq. 1: soft mode ----

def test_soft_output_is_explicit_sum_with_same_gumbel_noise():
    layer = _layer(n=4, tasks=3, mode="soft")
    p = [0.1, 0.2, 0.3, 0.4]
    _set_probs(layer, 2, p)
    layer.set_temperature(0.7)
    x = torch.randn(5, 6)
    out = layer(x, 2, generator=torch.Generator().manual_seed(11))

    z = torch.tensor(p).log() + _gumbel(4, 11)          # log p + G
    u = torch.exp(z / 0.7) / torch.exp(z / 0.7).sum()   # Eq. 1 written out
    want = sum(u[k] * layer.units[k](x) for k in range(4))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    w, idx = layer.sample(2, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(w, u, rtol=1e-5, atol=1e-7)
    assert int(idx) == int(z.argmax())
    assert math.isclose(float(w.detach().sum()), 1.0, rel_tol=1e-6)


def test_soft_mode_runs_every_unit_and_all_units_get_gradients():
    layer = _layer(n=3)
    c = _Counter(layer)
    layer(torch.randn(2, 6), 0).square().sum().backward()
    assert c.calls == [1, 1, 1]
    assert all(u.weight.grad is not None and u.weight.grad.abs().sum() > 0 for u in layer.units)
    assert layer.controllers[0].grad.abs().sum() > 0


def test_controller_shift_invariance_uses_log_softmax():
    """Logits and logits + c are the same distribution p, so the same sample (log p enters Eq. 1)."""
    a, b = _layer(n=3), _layer(n=3)
    with torch.no_grad():
        a.controllers[0].copy_(torch.tensor([0.3, -1.0, 2.0]))
        b.controllers[0].copy_(torch.tensor([0.3, -1.0, 2.0]) + 7.0)
    wa, _ = a.sample(0, generator=torch.Generator().manual_seed(3))
    wb, _ = b.sample(0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(wa, wb)
    torch.testing.assert_close(a.probs(0), torch.softmax(torch.tensor([0.3, -1.0, 2.0]), -1))


# ---- hard mode (straight-through) ----

def test_hard_mode_runs_only_the_sampled_unit_and_output_is_exact():
    layer = _layer(n=4, tasks=2, mode="hard")
    p = [0.25, 0.05, 0.3, 0.4]
    _set_probs(layer, 1, p)
    c = _Counter(layer)
    x = torch.randn(3, 6)
    for seed in range(6):
        before = list(c.calls)
        out = layer(x, 1, generator=torch.Generator().manual_seed(seed))
        k = int((torch.tensor(p).log() + _gumbel(4, seed)).argmax())
        assert [a - b for a, b in zip(c.calls, before)] == [int(j == k) for j in range(4)]
        with torch.no_grad():
            ref = layer.units[k](x)
        assert torch.equal(out, ref)  # the straight-through weight is exactly 1
    w, idx = layer.sample(1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(w.detach(), nn.functional.one_hot(idx, 4).float())


def test_hard_straight_through_gradient_matches_soft_sample_gradient():
    layer = _layer(n=3, tasks=2, mode="hard")
    logits = torch.tensor([0.5, -0.2, 0.1])
    with torch.no_grad():
        layer.controllers[0].copy_(logits)
    tau = 0.8
    layer.set_temperature(tau)
    x, r = torch.randn(4, 6), torch.randn(4, 6)
    out = layer(x, 0, generator=torch.Generator().manual_seed(5))
    (out * r).sum().backward()

    z = torch.log_softmax(logits, -1) + _gumbel(3, 5)
    s = int(z.argmax())
    u = torch.softmax(z / tau, -1)
    with torch.no_grad():
        c = (layer.units[s](x) * r).sum()
    # d u_s / d logits_j = u_s (delta_sj - u_j) / tau  (log_softmax drops out since sum u = 1)
    want = c * u[s] * (torch.eye(3)[s] - u) / tau
    torch.testing.assert_close(layer.controllers[0].grad, want, rtol=1e-5, atol=1e-7)
    # and against autograd on the soft sample itself
    lg = logits.clone().requires_grad_(True)
    us = torch.softmax((torch.log_softmax(lg, -1) + _gumbel(3, 5)) / tau, -1)[s]
    (c * us).backward()
    torch.testing.assert_close(layer.controllers[0].grad, lg.grad, rtol=1e-5, atol=1e-7)
    # only the sampled unit gets a gradient
    assert [u.weight.grad is not None for u in layer.units] == [j == s for j in range(3)]


# ---- eval ----

@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_eval_is_argmax_deterministic_and_runs_one_unit(mode):
    layer = _layer(n=4, tasks=2, mode=mode)
    _set_probs(layer, 0, [0.1, 0.2, 0.6, 0.1])
    _set_probs(layer, 1, [0.4, 0.3, 0.2, 0.1])
    layer.eval()
    c = _Counter(layer)
    x = torch.randn(3, 6)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    y1, y2 = layer(x, 0, generator=g), layer(x, 0)
    assert torch.equal(y1, y2) and torch.equal(y1, layer.units[2](x))
    assert torch.equal(g.get_state(), state)  # no noise drawn
    assert c.calls == [0, 0, 3, 0]
    assert layer.selected(0) == 2 and layer.selected(1) == 0
    assert torch.equal(layer(x, 1), layer.units[0](x))


def test_eval_ties_go_to_lower_index():
    layer = _layer(n=3).eval()
    assert layer.selected(0) == 0 and layer.selected(1) == 0


# ---- temperature ----

def test_temperature_schedule_values():
    s = GumbelTemperature(5.0, 0.01, decay_steps=450_000)
    assert s(0) == 5.0
    assert s(225_000) == pytest.approx(2.505, abs=1e-12)
    assert s(90_000) == pytest.approx(5.0 - 0.2 * 4.99, abs=1e-12)
    assert s(450_000) == 0.01 and s(499_999) == 0.01 and s(10**7) == 0.01
    vals = [s(i) for i in range(0, 450_001, 45_000)]
    assert all(a > b for a, b in itertools.pairwise(vals))                       # strictly decreasing
    assert max(abs((a - b) - 0.499) for a, b in itertools.pairwise(vals)) < 1e-9  # linear
    assert GumbelTemperature(2.0, 0.5, decay_steps=0)(0) == 0.5


def test_set_temperature_and_schedule_apply_set_every_layer():
    net = LegoSequential(_layer(n=2), nn.ReLU(), _layer(n=3))
    assert set_temperature(net, 0.25) == 2
    assert all(float(l.temperature) == 0.25 for _, l in lego_layers(net))
    tau = GumbelTemperature(5.0, 0.01, 100).apply(net, 50)
    assert tau == pytest.approx(2.505)
    assert all(float(l.temperature) == pytest.approx(2.505) for _, l in lego_layers(net))


def test_small_temperature_gives_one_hot_soft_samples():
    layer = _layer(n=4)
    _set_probs(layer, 0, [0.4, 0.3, 0.2, 0.1])
    g = torch.Generator().manual_seed(0)

    def mean_max(tau):
        layer.set_temperature(tau)
        return sum(float(layer.sample(0, generator=g)[0].detach().max()) for _ in range(300)) / 300

    hot, warm = mean_max(1e-3), mean_max(5.0)
    assert hot > 0.999 and warm < 0.5
    layer.set_temperature(1e-3)
    w, idx = layer.sample(0, generator=g)
    assert int(w.argmax()) == int(idx)


def test_argmax_sampling_frequency_matches_p():
    """argmax(log p + G) ~ Categorical(p) (the Gumbel-max trick behind Eq. 1), at any tau."""
    layer = _layer(n=4, mode="hard")
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    _set_probs(layer, 0, p.tolist())
    layer.set_temperature(3.0)
    g = torch.Generator().manual_seed(1234)
    n = 20_000
    counts = torch.zeros(4)
    for _ in range(n):
        counts[int(layer.sample(0, generator=g)[1])] += 1
    # binomial std <= sqrt(0.25 / n) = 0.0035: 0.015 is > 4 sigma; using p instead of log p would
    # give frequencies near (0.33, 0.27, 0.22, 0.18), far outside it
    assert (counts / n - p).abs().max() < 0.015


# ---- path extraction and reports ----

class _Net(nn.Module):
    """A custom model calling its lego layers as layer(x) (works with set_task)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.body = nn.Sequential(_layer(n=3, tasks=3, seed=1), nn.GELU(), _layer(n=2, tasks=3, seed=2))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def _randomise(model):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, l in lego_layers(model):
            for c in l.controllers:
                c.copy_(torch.randn(c.shape, generator=g))


def test_extract_path_equals_eval_output_bit_exactly():
    net = LegoSequential(nn.Linear(4, 6), _layer(n=3, tasks=3, seed=1), nn.ReLU(),
                         _layer(n=2, tasks=3, seed=2), nn.Linear(6, 2))
    _randomise(net)
    net.eval()
    x = torch.randn(5, 4)
    before = copy.deepcopy(net.state_dict())
    paths = selected_paths(net)
    for t in range(3):
        static = extract_path(net, t)
        assert type(static) is nn.Sequential
        assert not any(isinstance(m, (LegoLayer, LegoSequential)) for m in static.modules())
        assert not any("controllers" in n for n, _ in static.named_parameters())
        assert not static.training
        assert torch.equal(static(x), net(x, t))
        assert torch.equal(static[1].weight, net[1].units[paths[t][0]].weight)
        assert static[1].weight.data_ptr() != net[1].units[paths[t][0]].weight.data_ptr()  # a copy
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    unit, h = extract_path(net[1], 0), torch.randn(5, 6)
    assert type(unit) is nn.Linear and torch.equal(unit(h), net[1](h, 0))


def test_extract_path_of_custom_model_with_set_task():
    net = _Net()
    _randomise(net)
    net.eval()
    x = torch.randn(2, 4)
    for t in range(3):
        set_task(net, t)
        y = net(x)
        static = extract_path(net, t)
        assert not any(isinstance(m, LegoLayer) for m in static.modules())
        assert isinstance(static, _Net) and torch.equal(static(x), y)
        n_static = sum(p.numel() for p in static.parameters())
        assert n_static == 4 * 6 + 6 + 2 * (6 * 6 + 6) + 6 * 2 + 2  # one unit per layer, no controllers


def test_selected_paths_and_selection_probs():
    net = LegoSequential(_layer(n=3, tasks=2), _layer(n=2, tasks=2))
    _set_probs(net[0], 0, [0.2, 0.5, 0.3])
    _set_probs(net[0], 1, [0.1, 0.1, 0.8])
    _set_probs(net[1], 0, [0.9, 0.1])
    _set_probs(net[1], 1, [0.3, 0.7])
    assert selected_paths(net) == [[1, 0], [2, 1]]
    probs = selection_probs(net)
    assert [tuple(p.shape) for p in probs] == [(2, 3), (2, 2)]
    torch.testing.assert_close(probs[0], torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]]))
    assert not probs[0].requires_grad
    assert [n for n, _ in lego_layers(net)] == ["0", "1"]


# ---- tasks ----

@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_per_task_controllers_are_independent(mode):
    layer = _layer(n=3, tasks=3, mode=mode)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    other = [c.detach().clone() for c in layer.controllers]
    for step in range(2):
        opt.zero_grad()
        layer(torch.randn(4, 6), 0).square().sum().backward()
        assert layer.controllers[1].grad is None and layer.controllers[2].grad is None
        assert layer.controllers[0].grad.abs().sum() > 0
        opt.step()
    assert torch.equal(layer.controllers[1], other[1]) and torch.equal(layer.controllers[2], other[2])
    assert not torch.equal(layer.controllers[0], other[0])


def test_lego_sequential_threads_task_and_generator():
    net = LegoSequential(_layer(n=2, tasks=2, seed=1), nn.Tanh(), _layer(n=3, tasks=2, seed=2))
    _randomise(net)
    x = torch.randn(3, 6)
    out = net(x, 1, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    want = net[2](net[1](net[0](x, 1, generator=g)), 1, generator=g)
    assert torch.equal(out, want)
    set_task(net, 1)
    plain = nn.Sequential(*net)  # plain nn.Sequential works through set_task
    assert torch.equal(plain.eval()(x), net.eval()(x, 1))


def test_add_task_for_dynamic_finetuning():
    layer = _layer(n=2, tasks=2)
    t = layer.add_task(torch.tensor([0.25, 0.75]))
    assert t == 2 and layer.num_tasks == 3
    torch.testing.assert_close(layer.probs(2), torch.tensor([0.25, 0.75]))
    assert layer.eval().selected(2) == 1


# ---- validation (raises MoEKernelsError naming the argument, changes nothing) ----

def _raises(arg, fn, *a, **kw):
    with pytest.raises(mk.MoEKernelsError, match=re.escape(f"'{arg}'")):
        fn(*a, **kw)


def test_validation_errors():
    lin = lambda: nn.Linear(3, 3)
    _raises("num_units", LegoLayer, lin, 2, num_units=0)
    _raises("num_units", LegoLayer, lin, 2)
    _raises("num_units", LegoLayer, [lin(), lin()], 2, num_units=3)
    _raises("units", LegoLayer, [], 2)
    _raises("units", LegoLayer, nn.Linear(3, 3), 2)
    _raises("units[1]", LegoLayer, [lin(), nn.Linear(3, 4)], 2)
    _raises("units[1]", LegoLayer, [lin(), nn.Conv1d(3, 3, 1)], 2)
    _raises("units[1]", LegoLayer, [lin(), nn.Linear(3, 3, bias=False)], 2)
    _raises("units[1]", LegoLayer, [lin(), lin().double()], 2)
    u = lin()
    _raises("units[1]", LegoLayer, [u, u], 2)
    _raises("units[0]", LegoLayer, ["linear"], 2)
    _raises("num_tasks", LegoLayer, lin, 0, num_units=2)
    _raises("mode", LegoLayer, lin, 2, num_units=2, mode="sparse")
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        _raises("temperature", LegoLayer, lin, 2, num_units=2, temperature=bad)
    _raises("init", LegoLayer, lin, 2, num_units=2, init="random")
    _raises("init", LegoLayer, lin, 2, num_units=2, init=torch.tensor([0.5, 0.6]))
    _raises("init", LegoLayer, lin, 2, num_units=2, init=torch.tensor([1.0, 0.0]))
    _raises("init", LegoLayer, lin, 2, num_units=2, init=torch.tensor([0.2, 0.3, 0.5]))

    layer = LegoLayer(lin, 2, num_units=2)
    x = torch.randn(1, 3)
    _raises("task_id", layer, x, 2)
    _raises("task_id", layer, x, -1)
    _raises("task_id", layer, x, True)
    _raises("task_id", layer, x)              # no task given, none set
    _raises("task_id", layer.eval(), x, 5)
    _raises("task_id", layer.sample, 3)
    _raises("task_id", layer.selected, 2)
    with pytest.raises(mk.MoEKernelsError, match="'mode'"):
        layer.mode = "gumbel"
    assert layer.mode == "soft"

    layer.set_temperature(0.5)
    _raises("tau", layer.set_temperature, 0.0)
    _raises("tau", set_temperature, layer, -2.0)
    assert float(layer.temperature) == 0.5    # unchanged
    _raises("model", set_temperature, nn.Linear(2, 2), 1.0)
    set_task(layer, 1)
    net = LegoSequential(layer, LegoLayer(lin, 3, num_units=2))
    _raises("task_id", set_task, net, 2)      # valid for the second layer, not the first
    assert layer.active_task == 1             # unchanged
    _raises("task_id", extract_path, net, 2)
    _raises("model", extract_path, nn.Linear(2, 2), 0)
    _raises("model", selected_paths, net)     # 2 vs 3 tasks
    for bad in {"start": 0.0}, {"end": -1.0}, {"decay_steps": -1}, {"decay_steps": 1.5}:
        _raises(next(iter(bad)), GumbelTemperature, **bad)
    _raises("step", GumbelTemperature(), -1)
    assert issubclass(mk.MoEKernelsError, ValueError)


# ---- state, shapes, dtypes ----

def test_state_dict_round_trip():
    a = _layer(n=3, tasks=2, mode="hard")
    _randomise(a)
    a.set_temperature(0.3)
    b = _layer(n=3, tasks=2, mode="hard", seed=99)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"temperature", "controllers.0", "controllers.1",
                                   *(f"units.{k}.{w}" for k in range(3) for w in ("weight", "bias"))}
    assert float(b.temperature) == pytest.approx(0.3)
    x = torch.randn(2, 6)
    assert torch.equal(a(x, 1, generator=torch.Generator().manual_seed(4)),
                       b(x, 1, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(a.eval()(x, 0), b.eval()(x, 0))
    assert selected_paths(a) == selected_paths(b)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_single_unit_and_single_row_batch(mode):
    layer = _layer(n=1, tasks=1, mode=mode)
    x = torch.randn(1, 6)
    out = layer(x, 0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, layer.units[0](x))  # u = softmax of one entry = 1 exactly
    out.sum().backward()
    assert torch.equal(layer.controllers[0].grad, torch.zeros(1))
    assert selected_paths(layer) == [[0]]
    assert torch.equal(extract_path(layer.eval(), 0)(x), layer(x, 0))


def test_bf16_units_keep_their_dtype():
    torch.manual_seed(0)
    layer = LegoLayer(lambda: nn.Linear(4, 4).to(torch.bfloat16), num_tasks=1, num_units=2)
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    assert layer(x, 0).dtype == torch.bfloat16
    assert layer.controllers[0].dtype == torch.float32
    layer.mode = "hard"
    assert layer(x, 0).dtype == torch.bfloat16
