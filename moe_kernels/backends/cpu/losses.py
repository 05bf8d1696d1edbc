"""cpu router losses: the load-balancing loss and the z-loss in one pass over the logits.

The mutual-information losses are delegated to the reference: their work is a scatter-add of the
[T, E] gates into [M, E] per-task sums and a few [M, E] elementwise steps, which ATen already does
at memory speed; a native kernel would gain nothing.
"""

from ..contract import checks_values, delegated
from ._op import call

_WHY = "a scatter-add into [M, E] sums and [M, E] elementwise math: ATen is at memory speed already"


@checks_values("routing.topk_ids")
def load_balancing_loss(logits, topk_ids, score, *, check_values):
    return call("load_balancing_loss", logits, topk_ids, score)


def load_balancing_loss_backward(grad, logits, topk_ids, score):
    return call("load_balancing_loss_backward", grad, logits, topk_ids, score)


def z_loss(logits):
    return call("z_loss", logits)


def z_loss_backward(grad, logits):
    return call("z_loss_backward", grad, logits)


mutual_information_loss = delegated("reference", _WHY)
mutual_information_loss_backward = delegated("reference", _WHY)
mutual_information_loss_ema = delegated("reference", _WHY)
mutual_information_loss_ema_backward = delegated("reference", _WHY)
mutual_information_ema_update = delegated("reference", _WHY)
