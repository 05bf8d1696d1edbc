"""The kernel contract: every kernel a backend may provide, its signature, and the rules it follows.

A backend is a package ``moe_kernels/backends/<name>/`` whose modules have the stems ``routing``,
``permute``, ``grouped``, ``losses`` and ``reconcile``. A kernel is a module-level function named as
in :data:`KERNELS` in the module :attr:`KernelSpec.module` names; the backend's kernel table is built
by looking those names up (:func:`kernel_table`), so no backend keeps a list of its ops. A
backend may leave a kernel out (the op then resolves to another backend for that device, with a
one-time warning when that is the reference) or delegate it on purpose with :func:`delegated`
(no warning; ``moe-kernels info`` lists it).

Rules every kernel follows (``tests/test_contract.py`` holds every registered backend to them):

1. **Signature.** Positional parameters with exactly the names and order of :attr:`KernelSpec.params`;
   a kernel that makes some of its value checks itself (rule 4) takes one more, keyword
   ``check_values``.
2. **Inputs.** The public ops (:mod:`moe_kernels.ops`) have checked every input's metadata before a
   kernel runs: shapes, dtypes, devices, contiguity, option values. Kernels do not check them again
   (a compiled kernel may assert them, as a guard against misuse from outside the ops).
3. **Outputs.** New tensors, never views of the inputs, in the order of :attr:`KernelSpec.returns`.
   An output listed in :attr:`KernelSpec.optional` is ``None`` exactly when the parameter it names
   is ``False`` (a ``need_*`` flag: the gradient is not needed) or ``None`` (an absent bias): never
   computed and never an empty placeholder. Kernels listed in :attr:`KernelSpec.mutates` update
   that argument in place and return ``None``.
4. **Values.** :attr:`KernelSpec.checks` lists the checks of input *values* an op needs (finite
   logits, ids in range, consistent offsets). Who runs them depends on the validation policy
   (:func:`moe_kernels.value_checks`):

   * *checking* (the default for CPU tensors): each check runs before the kernel, with a
     synchronous, clear error naming the op and the argument, and nothing changes. A kernel that
     checks some of them itself, while it reads the data anyway, declares which with
     :func:`checks_values`; it is called with ``check_values=True`` and must raise exactly the
     error the op layer would (:mod:`moe_kernels._validation`'s messages); the op layer then skips
     those checks.
   * *sync-free* (the default for GPU tensors): no check runs on the host and nothing synchronises.
     A kernel never lets a bad value pass silently: a token whose logits are not all finite gets
     NaN gate weights (:data:`NONFINITE_TOKEN`), so its output is NaN; an id or offset out of range
     stops the program (a device-side assertion; on the CPU an exception).

5. **Determinism.** Identical inputs give bitwise identical outputs, independent of thread count or
   launch configuration: no floating-point atomics in reductions, a fixed summation order.
6. **Exactness.** Integer outputs and data movement equal the reference's bit for bit; floating
   outputs agree within the dtype tolerances the tests state.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

#: The semantics of a token whose router logits are not all finite, under the sync-free policy:
#: its ids are the experts 0, 1, ..., k-1 in that order, its k gate weights are NaN, and under the
#: ``"score"`` drop policy its priority is -inf (it yields its capacity to every finite token; ties
#: by token order). ``combine`` adds ``0 * w`` for a dropped assignment, which is NaN for a NaN weight,
#: so the token's output is NaN whether its assignments are kept or dropped, and the NaN reaches the
#: loss: it is never routed silently.
NONFINITE_TOKEN = "ids 0..k-1, NaN weights, score priority -inf"


@dataclass(frozen=True)
class ValueCheck:
    """One check of input values.

    Attributes:
        kind: ``"finite"`` (no NaN or inf), ``"index"`` (every value in ``[lo, bound)``, ``lo`` = -1
            when ``minus_one`` else 0), ``"offsets"`` (starts at 0, non-decreasing, ends at most
            at ``bound``), ``"ids"`` (given expert ids of :func:`moe_kernels.plan`: every value >= -1,
            the ids in ``[0, bound)`` of a row distinct) or ``"priority"`` (finite, and >= 0 under
            the ``"score"`` drop policy with a capacity).
        arg: the kernel parameter it reads; with ``output``, the index of the output instead.
        name: how the error names it (the user's word for it: ``"routing.slots"``).
        bound: ``index``/``offsets``: the exclusive upper bound, from the kernel's arguments by name.
        minus_one: ``index``: -1 is allowed (a dropped assignment, a padding row).
        output: ``finite`` on an output the kernel computes from finite inputs (router logits that
            overflow); checked after the kernel.
    """

    kind: str
    arg: Any
    name: str
    bound: Optional[Callable[[dict], int]] = None
    minus_one: bool = False
    output: bool = False


@dataclass(frozen=True)
class KernelSpec:
    """One kernel: where it lives, what it takes and returns, what it mutates and which values it needs checked."""

    name: str
    module: str
    params: tuple
    returns: tuple
    optional: dict = field(default_factory=dict)  # output -> parameter that makes it None
    checks: tuple = ()
    mutates: tuple = ()
    doc: str = ""

    @property
    def is_backward(self) -> bool:
        return self.name.endswith("_backward")


def _finite(arg, name=None, *, output=False):
    return ValueCheck("finite", arg, name or arg, output=output)


def _index(arg, name, bound, *, minus_one=False):
    return ValueCheck("index", arg, name, bound=bound, minus_one=minus_one)


def _offsets(bound):
    return ValueCheck("offsets", "offsets", "offsets", bound=bound)


def _experts(a):
    return a["num_experts"]


def _rows(arg):
    return lambda a: a[arg].shape[0]


_PLAN = ("topk_weights", "topk_ids", "counts", "offsets", "slots", "sources", "num_dropped")
_ROUTE = ("k", "score", "renormalize", "capacity", "drop_policy", "pad_to", "num_rows")
_SLOTS = _index("slots", "routing.slots", lambda a: a["num_rows"] if "num_rows" in a else a["sources"].shape[0],
                minus_one=True)
_MLP = ("w1", "w2", "b1", "b2", "activation")

_SPECS = (
    # ---- routing
    KernelSpec("route", "routing", ("logits",) + _ROUTE, _PLAN, checks=(_finite("logits"),),
               doc="scores, top-k by the upcast logit (ties: lower id) and the dispatch plan"),
    KernelSpec("route_backward", "routing", ("grad_weights", "logits", "topk_ids", "score", "renormalize"),
               ("grad_logits",), doc="d loss / d logits from d loss / d topk_weights"),
    KernelSpec("plan", "routing",
               ("topk_ids", "priority", "num_experts", "capacity", "drop_policy", "pad_to", "num_rows"),
               ("counts", "offsets", "slots", "sources", "num_dropped", "num_nonlocal"),
               checks=(ValueCheck("ids", "topk_ids", "topk_ids", bound=_experts),
                       ValueCheck("priority", "priority", "topk_weights")),
               doc="route's plan from given ids: ids of -1 or >= num_experts are not local (slot -1, "
                   "counted in num_nonlocal); score priority: NaN and negative values rank as -inf"),
    KernelSpec("task_route", "routing", ("x", "router_weight", "task_ids", "batch_task") + _ROUTE,
               ("logits",) + _PLAN,
               checks=(_index("task_ids", "task_ids", lambda a: a["router_weight"].shape[0]), _finite("x"),
                       _finite(0, "router_weight (the router logits x @ router_weight)", output=True)),
               doc="logits[t] = x[t] @ router_weight[task(t)], then route"),
    KernelSpec("task_route_backward", "routing",
               ("grad_logits", "grad_weights", "x", "router_weight", "task_ids", "batch_task", "logits",
                "topk_ids", "score", "renormalize"), ("grad_x", "grad_router_weight")),
    # ---- permute
    KernelSpec("dispatch", "permute", ("x", "slots", "sources"), ("out",),
               checks=(_index("slots", "routing.slots", _rows("sources"), minus_one=True),
                       _index("sources", "routing.sources", _rows("x"), minus_one=True)),
               doc="out[r] = x[sources[r]], zero rows for padding"),
    KernelSpec("dispatch_backward", "permute", ("grad_out", "slots"), ("grad_x",),
               doc="grad_x[t] = sum_j grad_out[slots[t, j]] (a gather-sum, no atomics)"),
    KernelSpec("combine", "permute", ("y", "weights", "slots"), ("out",),
               checks=(_index("slots", "routing.slots", _rows("y"), minus_one=True),),
               doc="out[t] = sum_j w[t, j] * y[slots[t, j]] in the accumulation dtype, j in order"),
    KernelSpec("combine_backward", "permute", ("grad_out", "y", "weights", "slots", "need_y", "need_weights"),
               ("grad_y", "grad_weights"), optional={"grad_y": "need_y", "grad_weights": "need_weights"}),
    # ---- grouped expert compute
    KernelSpec("grouped_gemm", "grouped", ("x", "offsets", "w"), ("out",), checks=(_offsets(_rows("x")),),
               doc="out[offsets[e]:offsets[e+1]] = x[...] @ w[e]; rows past offsets[E] are zero"),
    KernelSpec("grouped_gemm_backward", "grouped", ("grad_out", "x", "offsets", "w", "need_x", "need_w"),
               ("grad_x", "grad_w"), optional={"grad_x": "need_x", "grad_w": "need_w"}),
    KernelSpec("grouped_mlp", "grouped", ("x", "offsets") + _MLP, ("out", "z"), checks=(_offsets(_rows("x")),),
               doc="per-expert act(x w1 + b1) w2 + b2; z = x w1 + b1 is kept for backward"),
    KernelSpec("grouped_mlp_backward", "grouped", ("grad_out", "x", "z", "offsets") + _MLP,
               ("grad_x", "grad_w1", "grad_w2", "grad_b1", "grad_b2"), optional={"grad_b1": "b1", "grad_b2": "b2"}),
    KernelSpec("moe_mlp", "grouped", ("x", "weights", "slots", "sources", "offsets") + _MLP, ("out", "z"),
               checks=(_offsets(_rows("sources")),
                       _index("slots", "routing.slots", _rows("sources"), minus_one=True),
                       _index("sources", "routing.sources", _rows("x"), minus_one=True)),
               doc="combine(grouped_mlp(dispatch(x))) keeping only z"),
    KernelSpec("moe_mlp_backward", "grouped",
               ("grad_out", "x", "z", "weights", "slots", "sources", "offsets") + _MLP
               + ("need_x", "need_weights", "need_params"),
               ("grad_x", "grad_weights", "grad_w1", "grad_w2", "grad_b1", "grad_b2"),
               optional={"grad_x": "need_x", "grad_weights": "need_weights", "grad_w1": "need_params",
                         "grad_w2": "need_params", "grad_b1": ("need_params", "b1"),
                         "grad_b2": ("need_params", "b2")}),
    # ---- losses
    KernelSpec("load_balancing_loss", "losses", ("logits", "topk_ids", "score"), ("loss",),
               checks=(_index("topk_ids", "routing.topk_ids", lambda a: a["logits"].shape[1]),)),
    KernelSpec("load_balancing_loss_backward", "losses", ("grad", "logits", "topk_ids", "score"), ("grad_logits",)),
    KernelSpec("z_loss", "losses", ("logits",), ("loss",)),
    KernelSpec("z_loss_backward", "losses", ("grad", "logits"), ("grad_logits",)),
    KernelSpec("mutual_information_loss", "losses", ("probs", "task_ids", "num_tasks"), ("loss",),
               checks=(_index("task_ids", "task_ids", lambda a: a["num_tasks"]), _finite("probs"))),
    KernelSpec("mutual_information_loss_backward", "losses", ("grad", "probs", "task_ids", "num_tasks"),
               ("grad_probs",)),
    KernelSpec("mutual_information_loss_ema", "losses", ("probs", "task_ids", "buffer", "num_tasks"), ("loss",),
               checks=(_index("task_ids", "task_ids", lambda a: a["num_tasks"]), _finite("probs"))),
    KernelSpec("mutual_information_loss_ema_backward", "losses",
               ("grad", "probs", "task_ids", "buffer", "num_tasks"), ("grad_probs",)),
    KernelSpec("mutual_information_ema_update", "losses", ("buffer", "probs", "task_ids", "num_tasks", "momentum"),
               (), mutates=("buffer",),
               checks=(_index("task_ids", "task_ids", lambda a: a["num_tasks"]), _finite("probs"))),
    # ---- reconcile
    KernelSpec("reconcile", "reconcile",
               ("main", "aux", "weights", "bias", "activation", "batch_norm", "bn_weight", "bn_bias", "eps"),
               ("out", "stats"), doc="main + sum_i act(norm_i(aux_i @ W_i + b_i)); stats [L, 3, C] with batch_norm"),
    KernelSpec("reconcile_backward", "reconcile",
               ("grad_out", "aux", "weights", "bias", "activation", "batch_norm", "bn_weight", "bn_bias", "stats"),
               ("grad_weights", "grad_bias", "grad_bn_weight", "grad_bn_bias"),
               optional={"grad_bn_weight": "bn_weight", "grad_bn_bias": "bn_bias"}),
)

#: Every kernel of the contract, by name (forward kernels carry the public op's name).
KERNELS: dict = {s.name: s for s in _SPECS}

#: The module stems every backend package has.
MODULES: tuple = ("routing", "permute", "grouped", "losses", "reconcile")


# ---------------------------------------------------------------- declarations in backend modules

def checks_values(*names: str):
    """Mark a kernel that makes the named value checks itself (names as in :attr:`ValueCheck.name`).

    The kernel takes a keyword ``check_values``; with ``True`` it raises the op layer's error for a
    bad value, with ``False`` it follows the sync-free semantics (rule 4 of the module docstring).
    """
    def mark(fn):
        fn.__moe_kernels_checks__ = frozenset(names)
        return fn
    return mark


@dataclass(frozen=True)
class Delegated:
    """A kernel a backend leaves to another backend on purpose (see :func:`delegated`)."""

    to: str
    why: str


def delegated(to: str = "reference", why: str = "") -> Delegated:
    """Declare, in a backend module, that a kernel runs on backend ``to`` by design::

        mutual_information_loss = delegated("reference", "[M, E] statistics: nothing to gain")

    Automatic backend choice then uses this backend for the op without a fallback warning, and
    ``moe-kernels info`` lists the op as delegated.
    """
    return Delegated(to, why)


@dataclass(frozen=True)
class Kernel:
    """One entry of a backend's kernel table."""

    spec: KernelSpec
    fn: Callable
    backend: str
    self_checks: frozenset = frozenset()
    delegated_to: Optional[str] = None
    # the spec's checks the op layer runs under the checking policy: those the kernel does not make
    pre_checks: tuple = ()
    post_checks: tuple = ()


def signature_problems(spec: KernelSpec, fn: Callable) -> list:
    """Ways in which ``fn``'s signature breaks rule 1 (empty when it conforms)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return [f"{spec.name}: signature cannot be inspected"]
    ps = list(sig.parameters.values())
    pos = [p.name for p in ps if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    problems = []
    if tuple(pos) != spec.params:
        problems.append(f"{spec.name}: parameters {tuple(pos)}, the contract has {spec.params}")
    kw = [p.name for p in ps if p.kind == p.KEYWORD_ONLY]
    self_checks = getattr(fn, "__moe_kernels_checks__", None)
    if self_checks is not None and kw != ["check_values"]:
        problems.append(f"{spec.name}: declares checks_values{tuple(sorted(self_checks))} but its keyword "
                        f"parameters are {kw}, not ['check_values']")
    if self_checks is None and kw:
        problems.append(f"{spec.name}: keyword parameters {kw} without a checks_values declaration")
    if self_checks:
        unknown = set(self_checks) - {c.name for c in spec.checks}
        if unknown:
            problems.append(f"{spec.name}: declares checks {sorted(unknown)} that the contract does not list "
                            f"({sorted(c.name for c in spec.checks)})")
    return problems


def kernel_table(backend: str, package: str, resolve_delegate: Callable[[str, str], Optional[Kernel]]) -> dict:
    """The kernel table of the backend package ``package``: every contract kernel its modules define.

    ``resolve_delegate(to, name)`` returns the other backend's kernel for a :func:`delegated` entry.
    Raises ``TypeError`` for a kernel whose signature breaks the contract.
    """
    import importlib

    table = {}
    for stem in MODULES:
        mod = importlib.import_module(f"{package}.{stem}")
        for spec in KERNELS.values():
            if spec.module != stem or not hasattr(mod, spec.name):
                continue
            fn = getattr(mod, spec.name)
            if isinstance(fn, Delegated):
                other = resolve_delegate(fn.to, spec.name)
                if other is not None:
                    table[spec.name] = Kernel(spec, other.fn, backend, other.self_checks, fn.to,
                                              other.pre_checks, other.post_checks)
                continue
            problems = signature_problems(spec, fn)
            if problems:
                raise TypeError(f"backend '{backend}' ({mod.__name__}): " + "; ".join(problems))
            own = getattr(fn, "__moe_kernels_checks__", frozenset())
            todo = tuple(c for c in spec.checks if c.name not in own)
            table[spec.name] = Kernel(spec, fn, backend, own, None,
                                      tuple(c for c in todo if not c.output),
                                      tuple(c for c in todo if c.output))
    return table


def device_of(args) -> Optional[torch.device]:
    """The device of the first tensor among a kernel's arguments (lists of tensors included)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0].device
    return None
