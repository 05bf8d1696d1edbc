"""Loss modules."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from .._validation import check, check_int
from ..ops.losses import mutual_information_ema_update, mutual_information_loss_ema


class MutualInformationLoss(nn.Module):
    """MTHL's mutual-information loss with an EMA buffer of the dataset-expert joint (Eq. 5 of MTHL,
    "An Efficient General-Purpose Modular Vision Model via Multi-Task Heterogeneous Training",
    Chen et al., arXiv:2306.17165).

    The buffer ``joint`` (``[M, E]``, a registered buffer, so it is saved and restored with the
    module's state dict) estimates P(D, E) across steps: in training, each forward first updates
    the rows of the datasets present in the batch, ``B(D_i,:) <- m B(D_i,:) + (1-m) P(D_i,:)``,
    then evaluates Eq. 5 with the updated buffer (``P(D_i, E) = 0`` for datasets absent from the
    batch; the constant ``sum P(D) log P(D)`` is dropped). In eval mode the buffer is not updated.

    Args:
        num_tasks: M, the number of datasets (or tasks).
        num_experts: E.
        momentum: EMA momentum (0.98 in the paper).

    Example:
        >>> mi = MutualInformationLoss(num_tasks=3, num_experts=12)
        >>> loss = mi(routing.dense_weights(), task_ids=1)   # the whole batch from dataset 1
    """

    def __init__(self, num_tasks: int, num_experts: int, momentum: float = 0.98,
                 device=None, dtype=torch.float32):
        super().__init__()
        check_int(num_tasks, "MutualInformationLoss", "num_tasks", lo=1)
        check_int(num_experts, "MutualInformationLoss", "num_experts", lo=1)
        check(isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0, "MutualInformationLoss",
              "momentum", f"must be in [0, 1), got {momentum!r}")
        self.num_tasks, self.num_experts, self.momentum = num_tasks, num_experts, float(momentum)
        # start from the uniform joint: every log is finite and no dataset is favoured
        self.register_buffer("joint", torch.full((num_tasks, num_experts), 1.0 / (num_tasks * num_experts),
                                                 device=device, dtype=dtype))

    def forward(self, probs: Tensor, task_ids: Union[int, Tensor], *,
                backend: Optional[str] = None) -> Tensor:
        check(isinstance(probs, Tensor) and probs.dim() == 2 and probs.shape[1] == self.num_experts,
              "MutualInformationLoss", "probs",
              f"must have shape [T, E={self.num_experts}], got {tuple(getattr(probs, 'shape', ()))}")
        probs = probs.contiguous()  # a module takes any strides (the functional ops want them contiguous)
        if isinstance(task_ids, Tensor):
            task_ids = task_ids.contiguous()
        if self.training:
            mutual_information_ema_update(self.joint, probs, task_ids, self.num_tasks, self.momentum,
                                          backend=backend)
        return mutual_information_loss_ema(probs, task_ids, self.joint, self.num_tasks, backend=backend)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, num_experts={self.num_experts}, momentum={self.momentum}"
