"""cpu dispatch / combine: row copies and weighted gather-sums, parallel over rows or tokens, no atomics."""

from ..contract import checks_values
from ._op import call


@checks_values("routing.slots", "routing.sources")
def dispatch(x, slots, sources, *, check_values):
    return call("dispatch", x, slots, sources)


def dispatch_backward(grad_out, slots):
    return call("dispatch_backward", grad_out, slots)


@checks_values("routing.slots")
def combine(y, weights, slots, *, check_values):
    return call("combine", y, weights, slots)


def combine_backward(grad_out, y, weights, slots, need_y, need_weights):
    return call("combine_backward", grad_out, y, weights, slots, need_y, need_weights)
