"""Custom ops (``torch.ops.moe_kernels.*``) with autograd and fake implementations, and the public
functionals that validate their inputs and choose the backend."""

from .grouped import grouped_gemm, grouped_mlp, moe_mlp
from .losses import (load_balancing_loss, mutual_information_ema_update, mutual_information_loss,
                     mutual_information_loss_ema, z_loss)
from .permute import combine, dispatch
from .reconcile import reconcile
from .routing import plan, route, task_route

__all__ = ["combine", "dispatch", "grouped_gemm", "grouped_mlp", "load_balancing_loss", "moe_mlp",
           "mutual_information_ema_update", "mutual_information_loss", "mutual_information_loss_ema",
           "plan", "reconcile", "route", "task_route", "z_loss"]
