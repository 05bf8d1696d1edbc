"""Scale-out on ``torch.distributed`` (gloo on CPU, NCCL on CUDA): expert parallelism with dropless
(variable-split) and capacity (fixed-split) all-to-all, and the multi-task SIMT pieces of GPPF/INTERN
(per-rank task sampling, task-averaged gradients, cross-task synchronised BatchNorm).

    import moe_kernels.distributed as mkd
    layer = mkd.ExpertParallelMoE(dim, hidden, num_experts=8, k=2)   # this rank holds 8 / world experts
    out = layer(x)                                                    # x: this rank's tokens (any count)

The DeepSpeed integration (a drop-in ``deepspeed.moe.layer.MoE``) is :mod:`moe_kernels.deepspeed`.
"""

from .comm import all_reduce_max_int, all_to_all, exchange_counts, group_rank, group_size
from .expert_parallel import (
                              ExpertParallelMoE,
                              allreduce_gradients,
                              expert_parallel_mlp,
                              fixed_capacity_routing,
                              is_expert_parameter,
                              local_expert_range,
                              mark_expert_parameter,
                              new_expert_parallel_groups,
                              run_experts,
)
from .launch import ChildProcessFailed, free_port, run_processes
from .simt import (
                              GPPF_TASKS,
                              SyncBatchNorm,
                              TaskSampler,
                              broadcast_parameters,
                              convert_sync_batchnorm,
                              task_average_gradients,
)

__all__ = [
                              "GPPF_TASKS",
                              "ChildProcessFailed",
                              "ExpertParallelMoE",
                              "SyncBatchNorm",
                              "TaskSampler",
                              "all_reduce_max_int",
                              "all_to_all",
                              "allreduce_gradients",
                              "broadcast_parameters",
                              "convert_sync_batchnorm",
                              "exchange_counts",
                              "expert_parallel_mlp",
                              "fixed_capacity_routing",
                              "free_port",
                              "group_rank",
                              "group_size",
                              "is_expert_parameter",
                              "local_expert_range",
                              "mark_expert_parameter",
                              "new_expert_parallel_groups",
                              "run_experts",
                              "run_processes",
                              "task_average_gradients",
]
