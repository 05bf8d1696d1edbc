"""moe_kernels: fused kernels for sparse mixture-of-experts and multi-task routing.

    import moe_kernels as mk
    r = mk.route(logits, k=2)                 # top-k + dispatch plan in one op
    y = mk.moe_mlp(x, r, w1, w2, "gelu")      # dispatch -> grouped expert MLP -> combine
    layer = mk.nn.MoE(dim, hidden, num_experts=8, k=2)

Every op is a ``torch.ops.moe_kernels.*`` custom op with autograd and a fake implementation
(``torch.compile(fullgraph=True)`` works) and runs on a chosen backend (see ``mk.backends``).
"""

from . import adapt, backends, distributed, nn, ops, reference
from ._validation import MoEKernelsError
from ._version import __version__
from .backends import BackendUnavailableError
from .ops import (combine, dispatch, grouped_gemm, grouped_mlp, load_balancing_loss, moe_mlp,
                  mutual_information_ema_update, mutual_information_loss, mutual_information_loss_ema,
                  reconcile, route, task_route, z_loss)
from .types import Routing

__all__ = [
    "BackendUnavailableError", "MoEKernelsError", "Routing", "__version__", "adapt", "backends", "distributed", "combine",
    "dispatch", "grouped_gemm", "grouped_mlp", "load_balancing_loss", "moe_mlp",
    "mutual_information_ema_update", "mutual_information_loss", "mutual_information_loss_ema", "nn",
    "ops", "reconcile", "reference", "route", "task_route", "z_loss",
]
