"""GPPF lego layers: N same-architecture units per layer, one Gumbel-softmax controller per task.

GPPF ("GPPF: A General Perception Pre-training Framework via Sparsely Activated Multi-Task
Learning", Sun et al., arXiv:2208.02148; Sec. 3.2 "Task-Specific Dynamic Network") builds its backbone from a
stack of L *lego layers*. Layer l holds N units ``M_{l,1..N}`` with one architecture (e.g. a residual
bottleneck block) and different weights. For every task t the layer's controller records the
selection probabilities ``p_l^t[k]``; during training a sample of Eq. 1 weights the units,

    u_l^t[k] = exp((log p_l^t[k] + G_k) / tau) / sum_i exp((log p_l^t[i] + G_i) / tau),
    G_k = -log(-log U_k),  U_k ~ Unif(0, 1) i.i.d.,

with a temperature ``tau`` that decays linearly during training (Appendix D.1: 5.0 -> 0.01 at 450k of
500k iterations, then constant). At test time only the unit with the largest probability runs. After
dynamic finetuning (Sec. 3.3) the argmax units are extracted into a plain static network, which is
also what fixed-path finetuning starts from.

Public names: :class:`LegoLayer`, :class:`LegoSequential`, :class:`GumbelTemperature`,
:func:`set_temperature`, :func:`set_task`, :func:`extract_path`, :func:`selected_paths`,
:func:`selection_probs`, :func:`lego_layers`.

Example (a 3-layer lego backbone of residual MLP blocks, 2 units per layer, 4 tasks)::

    import moe_kernels as mk
    from torch import nn

    def block():
        return nn.Sequential(nn.Linear(32, 32), nn.ReLU())

    net = mk.nn.LegoSequential(*[mk.nn.LegoLayer(block, num_tasks=4, num_units=2) for _ in range(3)])
    sched = mk.nn.GumbelTemperature(start=5.0, end=0.01, decay_steps=450_000)
    for step in range(500_000):
        sched.apply(net, step)                 # tau of every LegoLayer for this step
        y = net(x, task_id=t)                  # one task per batch (SIMT: one task per rank)
        ...
    static = mk.nn.extract_path(net.eval(), task_id=t)   # nn.Sequential of the 3 argmax units
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check, check_choice, check_int, fail

__all__ = [
    "GumbelTemperature", "LegoLayer", "LegoSequential", "extract_path", "lego_layers",
    "selected_paths", "selection_probs", "set_task", "set_temperature",
]

MODES = ("soft", "hard")


def _check_tau(tau, op: str, arg: str) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        fail(op, arg, f"must be a float, got {type(tau).__name__}")
    if not (math.isfinite(tau) and tau > 0):
        fail(op, arg, f"must be a finite number > 0, got {tau}")
    return float(tau)


def _init_logits(init, num_units: int, num_tasks: int, op: str) -> Tensor:
    """Controller logits ``[num_tasks, N]`` (fp32) from ``"uniform"`` or a probability tensor."""
    if isinstance(init, str):
        check_choice(init, op, "init", ("uniform",))
        return torch.zeros(num_tasks, num_units)
    if not isinstance(init, Tensor):
        fail(op, "init", f"must be 'uniform' or a tensor of probabilities, got {type(init).__name__}")
    p = init.detach().to("cpu", torch.float64)
    if p.dim() == 1:
        p = p.expand(num_tasks, -1)
    if tuple(p.shape) != (num_tasks, num_units):
        fail(op, "init", f"must have shape ({num_units},) or ({num_tasks}, {num_units}), "
                         f"got {tuple(init.shape)}")
    if not bool(torch.isfinite(p).all()) or bool((p <= 0).any()):
        fail(op, "init", "must hold finite probabilities > 0 (log p enters Eq. 1)")
    if not torch.allclose(p.sum(-1), torch.ones(num_tasks, dtype=torch.float64), atol=1e-4):
        fail(op, "init", f"rows must sum to 1, got sums {p.sum(-1).tolist()}")
    return p.log().float()


def _signature(m: nn.Module) -> tuple:
    return (type(m),
            tuple((n, tuple(t.shape), t.dtype) for n, t in m.named_parameters()),
            tuple((n, tuple(t.shape), t.dtype) for n, t in m.named_buffers()))


def _check_same_architecture(units: Sequence[nn.Module], op: str) -> None:
    ref = _signature(units[0])
    seen = {id(units[0]): 0}
    for k, u in enumerate(units[1:], start=1):
        if id(u) in seen:
            fail(op, f"units[{k}]", f"is the same module object as units[{seen[id(u)]}]; the units "
                                    "need separate weights (pass a factory or N distinct modules)")
        seen[id(u)] = k
        sig = _signature(u)
        if sig == ref:
            continue
        if sig[0] is not ref[0]:
            fail(op, f"units[{k}]", f"is a {sig[0].__name__} but units[0] is a {ref[0].__name__}; "
                                    "all units of a lego layer need the same architecture")
        for kind, a, b in (("parameters", sig[1], ref[1]), ("buffers", sig[2], ref[2])):
            if a != b:
                da, db = {n: (s, d) for n, s, d in a}, {n: (s, d) for n, s, d in b}
                diff = next((n for n in list(da) + list(db) if da.get(n) != db.get(n)), "?")
                fail(op, f"units[{k}]", f"has {kind} that differ from units[0] at '{diff}': "
                                        f"{da.get(diff)} vs {db.get(diff)} (shape, dtype); all units "
                                        "of a lego layer need the same architecture")


class LegoLayer(nn.Module):
    """One GPPF lego layer: N units of one architecture and a Gumbel-softmax controller per task.

    **Controller.** ``controllers[t]`` is a parameter of shape ``[N]`` holding *logits* of task t's
    selection distribution: ``p^t = softmax(controllers[t])``, so ``log p^t = log_softmax(...)``
    enters Eq. 1 of GPPF exactly (a constant shift of the logits changes nothing). Each task has its own
    parameter, so a step that runs only task t leaves the other tasks' ``.grad`` at ``None`` and an
    optimizer does not touch them (keep the controllers out of weight decay).

    **Forward** ``forward(x, task_id)`` runs one task for the whole batch (SIMT: each rank runs one
    task per step):

    * training, ``mode="soft"``: draw ``U = torch.rand(N, generator=generator)`` (fp32, on the
      controller's device, clamped to ``>= tiny``), ``G = -log(-log U)``, ``u = softmax((log p + G) /
      tau)`` (Eq. 1) and return ``sum_k u[k] * unit_k(x)`` (every unit runs: N times the memory).
    * training, ``mode="hard"``: the same sample; ``k* = argmax(log p + G)`` (distributed as
      ``Categorical(p)`` for every tau); only unit ``k*`` runs and the output is
      ``w * unit_k*(x)`` with the straight-through weight ``w = 1 + (u[k*] - stopgrad(u[k*]))``,
      i.e. ``onehot(k*) - stopgrad(u) + u`` evaluated at ``k*``: its value is exactly 1 (the output
      equals the unit's bit for bit) and its gradient is that of the soft ``u[k*]``, so the controller
      learns. (GPPF's text writes ``stop_gradient(u) + u``; the one-hot term is the standard trick.)
    * eval (``self.training`` False): unit ``argmax_k p^t[k]`` (ties to the lower index) runs alone,
      no noise, output ``unit(x)`` unchanged: the same value :func:`extract_path` gives.

    Hard mode and eval read the chosen index on the host (a device sync, a graph break under
    ``torch.compile``); soft mode does not. Units not run in a step get no gradient (DDP then needs
    ``find_unused_parameters=True``).

    Args:
        units: a sequence of N distinct modules with identical parameter/buffer names, shapes and
            dtypes (checked), or a zero-argument factory called ``num_units`` times.
        num_tasks: number of task controllers (>= 1); more can be added with :meth:`add_task`.
        num_units: N when ``units`` is a factory (must match ``len(units)`` if given with a sequence).
        mode: ``"soft"`` or ``"hard"`` (settable later: ``layer.mode = "hard"``).
        init: ``"uniform"`` (all logits 0, p = 1/N) or a tensor of probabilities, shape ``[N]`` (every
            task) or ``[num_tasks, N]``, all > 0, rows summing to 1.
        temperature: initial tau (> 0); GPPF starts at 5.0. Stored in the fp32 buffer
            ``temperature`` (it is in the state dict; changing it does not recompile).

    Example:
        >>> layer = LegoLayer(lambda: nn.Linear(8, 8), num_tasks=3, num_units=2, mode="hard")
        >>> y = layer(torch.randn(4, 8), task_id=1)      # training: sampled unit, ST gradient
        >>> _ = layer.eval()                              # test time: the argmax unit, no noise
        >>> layer.selected(1)                             # p = 1/N for every unit: ties to unit 0
        0
    """

    def __init__(self, units: Sequence[nn.Module] | Callable[[], nn.Module], num_tasks: int, *,
                 num_units: int | None = None, mode: str = "soft", init: str | Tensor = "uniform",
                 temperature: float = 5.0):
        super().__init__()
        op = "nn.LegoLayer"
        check_int(num_tasks, op, "num_tasks", lo=1)
        check_choice(mode, op, "mode", MODES)
        tau = _check_tau(temperature, op, "temperature")
        if num_units is not None:
            check_int(num_units, op, "num_units", lo=1)
        if isinstance(units, (list, tuple, nn.ModuleList)):
            units = list(units)
            check(len(units) >= 1, op, "units", "must hold at least one module (num_units >= 1)")
            if num_units is not None and num_units != len(units):
                fail(op, "num_units", f"is {num_units} but {len(units)} units were given")
            for k, u in enumerate(units):
                if not isinstance(u, nn.Module):
                    fail(op, f"units[{k}]", f"must be an nn.Module, got {type(u).__name__}")
        elif callable(units) and not isinstance(units, nn.Module):
            if num_units is None:
                fail(op, "num_units", "is required when units is a factory")
            factory = units
            units = []
            for k in range(num_units):
                u = factory()
                if not isinstance(u, nn.Module):
                    fail(op, "units", f"factory must return an nn.Module, got {type(u).__name__}")
                units.append(u)
        else:
            fail(op, "units", "must be a sequence of nn.Modules or a zero-argument factory, got "
                              f"{type(units).__name__}")
        _check_same_architecture(units, op)
        logits = _init_logits(init, len(units), num_tasks, op)

        first = next(iter(units[0].parameters()), None)
        device = first.device if first is not None else None
        self.units = nn.ModuleList(units)
        self.controllers = nn.ParameterList([nn.Parameter(row.clone().to(device)) for row in logits])
        self.register_buffer("temperature", torch.tensor(tau, dtype=torch.float32, device=device))
        self._mode = mode
        self.active_task: int | None = None  # used when forward gets no task_id (see set_task)

    # ---- configuration ----

    @property
    def num_units(self) -> int:
        return len(self.units)

    @property
    def num_tasks(self) -> int:
        return len(self.controllers)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = check_choice(value, "nn.LegoLayer", "mode", MODES)

    def set_temperature(self, tau: float) -> None:
        """Set the Gumbel-softmax temperature tau (> 0) of this layer."""
        self.temperature.fill_(_check_tau(tau, "nn.LegoLayer.set_temperature", "tau"))

    def add_task(self, init: str | Tensor = "uniform") -> int:
        """Add a controller for a new task (GPPF dynamic finetuning, Sec. 3.3); returns its task id.

        Create the optimizer after adding tasks: the new controller is a new parameter.
        """
        logits = _init_logits(init, self.num_units, 1, "nn.LegoLayer.add_task")[0]
        ref = self.controllers[0]
        self.controllers.append(nn.Parameter(logits.to(ref.device, ref.dtype)))
        return self.num_tasks - 1

    # ---- controller ----

    def _task(self, task_id: int | None, op: str) -> int:
        if task_id is None:
            task_id = self.active_task
            if task_id is None:
                fail(op, "task_id", "is required: pass task_id or call moe_kernels.nn.set_task(model, t)")
        return check_int(task_id, op, "task_id", lo=0, hi=self.num_tasks - 1)

    def probs(self, task_id: int | None = None) -> Tensor:
        """Selection probabilities p (differentiable): ``[N]`` for one task, ``[num_tasks, N]`` for None."""
        if task_id is None:
            return torch.softmax(torch.stack(list(self.controllers)).float(), dim=-1)
        t = check_int(task_id, "nn.LegoLayer.probs", "task_id", lo=0, hi=self.num_tasks - 1)
        return torch.softmax(self.controllers[t].float(), dim=-1)

    def selected(self, task_id: int) -> int:
        """The test-time unit of ``task_id``: argmax of its probabilities (ties to the lower index)."""
        t = check_int(task_id, "nn.LegoLayer.selected", "task_id", lo=0, hi=self.num_tasks - 1)
        return int(self.controllers[t].detach().argmax())

    def sample(self, task_id: int | None = None, *,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """One Gumbel-softmax draw (Eq. 1) for ``task_id``: ``(weights [N] fp32, index 0-d int64)``.

        ``index = argmax(log p + G)``. ``weights`` is the soft sample ``u`` in soft mode and the
        straight-through one-hot ``onehot(index) + (u - stopgrad(u))`` (exact 0/1 values) in hard
        mode. Consumes N uniforms from ``generator`` (or the global RNG of the controller's device).
        """
        t = self._task(task_id, "nn.LegoLayer.sample")
        logits = self.controllers[t].float()
        u01 = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
        gumbel = -torch.log(-torch.log(u01.clamp_min(torch.finfo(torch.float32).tiny)))
        z = F.log_softmax(logits, dim=-1) + gumbel
        u = torch.softmax(z / self.temperature.float(), dim=-1)
        index = z.detach().argmax()
        if self._mode == "hard":
            onehot = F.one_hot(index, self.num_units).to(u.dtype)
            return onehot + (u - u.detach()), index
        return u, index

    # ---- forward ----

    def forward(self, x, task_id: int | None = None, *, generator: torch.Generator | None = None):
        """Run the batch ``x`` for one task (``task_id``, or the one set by :func:`set_task`)."""
        t = self._task(task_id, "nn.LegoLayer")
        if not self.training:
            return self.units[self.selected(t)](x)
        weights, index = self.sample(t, generator=generator)
        if self._mode == "hard":
            k = int(index)
            y = self.units[k](x)
            return weights[k].to(y.dtype) * y
        out = None
        for k, unit in enumerate(self.units):
            y = unit(x)
            term = weights[k].to(y.dtype) * y
            out = term if out is None else out + term
        return out

    def extra_repr(self) -> str:
        return (f"num_units={self.num_units}, num_tasks={self.num_tasks}, mode={self._mode!r}, "
                f"temperature={float(self.temperature):.4g}")


class LegoSequential(nn.Sequential):
    """``nn.Sequential`` that threads ``task_id`` (and ``generator``) to its lego layers.

    Children that are :class:`LegoLayer` or ``LegoSequential`` get ``(x, task_id, generator=...)``;
    any other child gets ``x`` alone. :func:`extract_path` turns it into a plain ``nn.Sequential``.
    (A plain ``nn.Sequential`` of lego layers also works after :func:`set_task`.)

    Example:
        >>> net = LegoSequential(nn.Linear(4, 8),
        ...                      LegoLayer(lambda: nn.Linear(8, 8), num_tasks=2, num_units=3))
        >>> y = net(torch.randn(5, 4), task_id=1)
    """

    def forward(self, x, task_id: int | None = None, *, generator: torch.Generator | None = None):
        for m in self:
            x = m(x, task_id, generator=generator) if isinstance(m, (LegoLayer, LegoSequential)) else m(x)
        return x


# ---- temperature ----

class GumbelTemperature:
    """Linear temperature decay of GPPF: ``start -> end`` over ``decay_steps`` steps, then ``end``.

    ``tau(step) = start * (1 - f) + end * f`` with ``f = min(step, decay_steps) / decay_steps``
    (``tau = end`` for every step when ``decay_steps == 0``). Stateless: ``tau`` is a function of the
    step, so resuming from a checkpoint needs only the step. GPPF pre-training: ``start=5.0, end=0.01,
    decay_steps=450_000`` of 500k iterations; dynamic finetuning decays over half the steps.

    Example:
        >>> sched = GumbelTemperature(5.0, 0.01, decay_steps=450_000)
        >>> sched(0), sched(225_000), sched(450_000), sched(499_999)
        (5.0, 2.505, 0.01, 0.01)
        >>> layer = LegoLayer(lambda: nn.Linear(4, 4), num_tasks=1, num_units=2)
        >>> sched.apply(layer, 225_000)      # sets every LegoLayer of the model, returns tau
        2.505
    """

    def __init__(self, start: float = 5.0, end: float = 0.01, decay_steps: int = 450_000):
        op = "nn.GumbelTemperature"
        self.start = _check_tau(start, op, "start")
        self.end = _check_tau(end, op, "end")
        self.decay_steps = check_int(decay_steps, op, "decay_steps", lo=0)

    def __call__(self, step: int) -> float:
        check_int(step, "nn.GumbelTemperature", "step", lo=0)
        if step >= self.decay_steps:
            return self.end
        f = step / self.decay_steps
        return self.start * (1.0 - f) + self.end * f

    def apply(self, model: nn.Module, step: int) -> float:
        """Set the temperature of every :class:`LegoLayer` in ``model`` for ``step``; returns it."""
        tau = self(step)
        set_temperature(model, tau)
        return tau

    def __repr__(self) -> str:
        return f"GumbelTemperature(start={self.start}, end={self.end}, decay_steps={self.decay_steps})"


# ---- model-level helpers ----

def lego_layers(model: nn.Module) -> list[tuple[str, LegoLayer]]:
    """``(name, layer)`` for every :class:`LegoLayer` in ``model`` (``named_modules`` order).

    This order is the layer order of :func:`selected_paths` and :func:`selection_probs`.
    """
    if not isinstance(model, nn.Module):
        fail("nn.lego_layers", "model", f"must be an nn.Module, got {type(model).__name__}")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LegoLayer)]


def _layers_or_fail(model: nn.Module, op: str) -> list[tuple[str, LegoLayer]]:
    if not isinstance(model, nn.Module):
        fail(op, "model", f"must be an nn.Module, got {type(model).__name__}")
    layers = lego_layers(model)
    check(len(layers) > 0, op, "model", "contains no LegoLayer")
    return layers


def set_temperature(model: nn.Module, tau: float) -> int:
    """Set the Gumbel-softmax temperature of every :class:`LegoLayer` in ``model``.

    Validates ``tau`` (finite, > 0) before changing anything; returns the number of layers set.
    """
    op = "nn.set_temperature"
    tau = _check_tau(tau, op, "tau")
    layers = _layers_or_fail(model, op)
    for _, layer in layers:
        layer.temperature.fill_(tau)
    return len(layers)


def set_task(model: nn.Module, task_id: int | None) -> None:
    """Make ``task_id`` the default task of every :class:`LegoLayer` in ``model`` (None clears it).

    Lets models that call their lego layers as ``layer(x)`` (e.g. a plain ``nn.Sequential``) run one
    task per step; an explicit ``task_id`` in ``forward`` takes precedence.
    """
    op = "nn.set_task"
    layers = _layers_or_fail(model, op)
    if task_id is not None:
        for _, layer in layers:
            check_int(task_id, op, "task_id", lo=0, hi=layer.num_tasks - 1)
    for _, layer in layers:
        layer.active_task = task_id


def _num_tasks(layers: list[tuple[str, LegoLayer]], op: str) -> int:
    counts = {layer.num_tasks for _, layer in layers}
    if len(counts) != 1:
        fail(op, "model", "has lego layers with different numbers of tasks: "
                          + ", ".join(f"{n or '<root>'}={l.num_tasks}" for n, l in layers))
    return counts.pop()


def selected_paths(model: nn.Module) -> list[list[int]]:
    """The test-time path of every task: ``paths[t][l]`` is the unit task t uses in lego layer l.

    Layers in :func:`lego_layers` order; every layer must have the same number of tasks.
    """
    op = "nn.selected_paths"
    layers = _layers_or_fail(model, op)
    num_tasks = _num_tasks(layers, op)
    return [[layer.selected(t) for _, layer in layers] for t in range(num_tasks)]


def selection_probs(model: nn.Module) -> list[Tensor]:
    """Detached selection probabilities, one ``[num_tasks, N]`` fp32 tensor per lego layer.

    Layers in :func:`lego_layers` order.
    """
    layers = _layers_or_fail(model, "nn.selection_probs")
    with torch.no_grad():
        return [layer.probs().detach().clone() for _, layer in layers]


def extract_path(model: nn.Module, task_id: int) -> nn.Module:
    """A plain static copy of ``model`` on task ``task_id``'s test-time path (GPPF Sec. 3.3).

    Every :class:`LegoLayer` is replaced by a deep copy of its argmax unit for ``task_id`` (nested
    lego layers inside units too), every :class:`LegoSequential` by an ``nn.Sequential``; other
    modules are deep-copied, unselected units are not copied. The result has no controller and no
    lego layer, keeps the training flags, and in eval mode gives bit for bit the output of ``model`` in
    eval mode for ``task_id``. Models whose own ``forward`` passes ``task_id`` to a lego layer need
    the lego layers called as ``layer(x)`` (via :func:`set_task`) or a :class:`LegoSequential` to be
    extractable. ``model`` is not modified.

    Example:
        >>> net = LegoSequential(*[LegoLayer(lambda: nn.Linear(4, 4), num_tasks=3, num_units=2)
        ...                        for _ in range(2)])
        >>> static = extract_path(net, task_id=2)    # nn.Sequential of 2 Linear: fine-tune it as usual
    """
    op = "nn.extract_path"
    layers = _layers_or_fail(model, op)
    for _, layer in layers:
        check_int(task_id, op, "task_id", lo=0, hi=layer.num_tasks - 1)
    return _static_copy(model, task_id, {})


def _contains_lego(m: nn.Module) -> bool:
    return any(isinstance(s, (LegoLayer, LegoSequential)) for s in m.modules())


def _static_copy(m: nn.Module, task_id: int, memo: dict[int, object]) -> nn.Module:
    if id(m) in memo:
        return memo[id(m)]  # a module shared at several places stays shared
    if isinstance(m, LegoLayer):
        out = _static_copy(m.units[m.selected(task_id)], task_id, memo)
    elif isinstance(m, LegoSequential):
        out = nn.Sequential()
        for name, child in m.named_children():
            out.add_module(name, _static_copy(child, task_id, memo))
        out.train(m.training)
    else:
        # replace the lego descendants first; deepcopy then picks the replacements up from memo
        for child in m.children():
            if _contains_lego(child):
                _static_copy(child, task_id, memo)
        out = copy.deepcopy(m, memo)
    memo[id(m)] = out
    return out
