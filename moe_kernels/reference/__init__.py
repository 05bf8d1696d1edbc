"""The pure-PyTorch reference backend: the executable specification of every op.

It is the test oracle, the benchmark baseline and the fallback for devices without a faster
backend. Kernels are plain functions; :mod:`moe_kernels.ops` wraps them in custom ops.
"""

from . import grouped, losses, permute, reconcile, routing

KERNELS = {
    "route": routing.route_fwd,
    "route_backward": routing.route_bwd,
    "task_route": routing.task_route_fwd,
    "task_route_backward": routing.task_route_bwd,
    "dispatch": permute.dispatch_fwd,
    "dispatch_backward": permute.dispatch_bwd,
    "combine": permute.combine_fwd,
    "combine_backward": permute.combine_bwd,
    "grouped_gemm": grouped.grouped_gemm_fwd,
    "grouped_gemm_backward": grouped.grouped_gemm_bwd,
    "grouped_mlp": grouped.grouped_mlp_fwd,
    "grouped_mlp_backward": grouped.grouped_mlp_bwd,
    "moe_mlp": grouped.moe_mlp_fwd,
    "moe_mlp_backward": grouped.moe_mlp_bwd,
    "reconcile": reconcile.reconcile_fwd,
    "reconcile_backward": reconcile.reconcile_bwd,
    "load_balancing_loss": losses.load_balancing_fwd,
    "load_balancing_loss_backward": losses.load_balancing_bwd,
    "z_loss": losses.z_loss_fwd,
    "z_loss_backward": losses.z_loss_bwd,
    "mutual_information_loss": losses.mi_batch_fwd,
    "mutual_information_loss_backward": losses.mi_batch_bwd,
    "mutual_information_loss_ema": losses.mi_ema_fwd,
    "mutual_information_loss_ema_backward": losses.mi_ema_bwd,
    "mutual_information_ema_update": losses.mi_ema_update,
}
