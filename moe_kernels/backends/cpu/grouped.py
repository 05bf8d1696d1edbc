"""cpu grouped GEMM / MLP and the fused expert layer: ATen GEMMs on expert segment views, experts run
concurrently when there are enough of them (largest first), large buffers from a pool."""

from ..contract import checks_values
from ._op import call


@checks_values("offsets")
def grouped_gemm(x, offsets, w, *, check_values):
    return call("grouped_gemm", x, offsets, w)


def grouped_gemm_backward(grad_out, x, offsets, w, need_x, need_w):
    return call("grouped_gemm_backward", grad_out, x, offsets, w, need_x, need_w)


@checks_values("offsets")
def grouped_mlp(x, offsets, w1, w2, b1, b2, activation, *, check_values):
    return call("grouped_mlp", x, offsets, w1, w2, b1, b2, activation)


def grouped_mlp_backward(grad_out, x, z, offsets, w1, w2, b1, b2, activation):
    return call("grouped_mlp_backward", grad_out, x, z, offsets, w1, w2, b1, b2, activation)


@checks_values("offsets", "routing.slots", "routing.sources")
def moe_mlp(x, weights, slots, sources, offsets, w1, w2, b1, b2, activation, *, check_values):
    return call("moe_mlp", x, weights, slots, sources, offsets, w1, w2, b1, b2, activation)


def moe_mlp_backward(grad_out, x, z, weights, slots, sources, offsets, w1, w2, b1, b2, activation, need_x,
                     need_weights, need_params):
    return call("moe_mlp_backward", grad_out, x, z, weights, slots, sources, offsets, w1, w2, b1, b2, activation,
                need_x, need_weights, need_params)
