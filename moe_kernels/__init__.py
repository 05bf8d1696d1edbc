"""moe_kernels: fused kernels for sparse mixture-of-experts and multi-task routing.

    import moe_kernels as mk
    r = mk.route(logits, k=2)                 # top-k + dispatch plan in one op
    r = mk.plan(ids, weights, num_experts=8)  # the plan of a router outside the library
    y = mk.moe_mlp(x, r, w1, w2, "gelu")      # dispatch -> grouped expert MLP -> combine
    layer = mk.nn.MoE(dim, hidden, num_experts=8, k=2)

Every op is a ``torch.ops.moe_kernels.*`` custom op with autograd and a fake implementation
(``torch.compile(fullgraph=True)`` works) and runs on a chosen backend (see ``mk.backends``).
Value checks follow a validation policy (:func:`value_checks`): synchronous with clear errors on
CPU tensors, sync-free on GPU tensors.
"""

import importlib as _importlib
import sys as _sys

from . import backends
from ._validation import MoEKernelsError, checking_values, set_value_checks, value_checks
from ._version import __version__
from .backends import BackendUnavailableError
from .backends import cpu as cpu_backend  # the 0.1 name of the cpu backend's module
from .backends import reference
from .ops import (combine, dispatch, grouped_gemm, grouped_mlp, load_balancing_loss, moe_mlp,
                  mutual_information_ema_update, mutual_information_loss, mutual_information_loss_ema,
                  plan, reconcile, route, task_route, z_loss)
from .types import Routing

# Import paths of 0.1 keep working: moe_kernels.reference(.routing, ...) and moe_kernels.cpu_backend.
_sys.modules[__name__ + ".reference"] = reference
_sys.modules[__name__ + ".cpu_backend"] = cpu_backend
for _stem in backends.contract.MODULES:
    _sys.modules[f"{__name__}.reference.{_stem}"] = _importlib.import_module(f"{reference.__name__}.{_stem}")

from . import adapt, distributed, nn, ops  # noqa: E402  (modules built on the ops)

__all__ = [
    "BackendUnavailableError", "MoEKernelsError", "Routing", "__version__", "adapt", "backends", "checking_values",
    "combine", "dispatch", "distributed", "grouped_gemm", "grouped_mlp", "load_balancing_loss", "moe_mlp",
    "mutual_information_ema_update", "mutual_information_loss", "mutual_information_loss_ema", "nn", "ops", "plan",
    "reconcile", "reference", "route", "set_value_checks", "task_route", "value_checks", "z_loss",
]
