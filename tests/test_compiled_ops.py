"""The compiled operators ``torch.ops.moe_kernels_C`` called directly (no op layer in between).

* every schema (csrc/registration.cpp) is registered, exactly as the kernel contract spells it, with
  a CPU kernel and a fake implementation (catch-all for the two without tensors), and
  ``torch.library.opcheck`` passes its schema and fake-tensor tests on every operator;
* outputs that are not needed or have nothing to belong to come back as ``None``;
* every value check made inside a kernel raises a ``ValueError`` whose text is exactly what the
  Python validator (``moe_kernels._validation``) says for the same tensors, in the op layer's order;
* without ``check_values`` a token whose logits are not all finite follows the reference's
  sync-free semantics (ids 0..k-1, NaN weights, drop priority -inf; integer outputs bit-exact) and
  ``combine`` / ``moe_mlp`` give it a NaN output row even when its assignments are dropped;
* T = 0 works for every operator.

Where ``MOE_KERNELS_TEST_BACKENDS`` lists ``cpu`` (CI), a missing build fails instead of skipping.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_kernels import _validation as V
from moe_kernels.backends import compiled
from moe_kernels.reference import permute as ref_permute
from moe_kernels.reference import routing as ref_routing

from .conftest import REQUIRED

OK, REASON = compiled.load()
if "cpu" in REQUIRED:
    assert OK, f"the compiled operators must build here: {REASON}"
pytestmark = pytest.mark.skipif(not OK, reason=f"compiled operators unavailable: {REASON}")

NS = "moe_kernels_C"
SCHEMAS = {
    "route": "route(Tensor logits, int k, str score, bool renormalize, int capacity, str drop_policy, int pad_to, "
             "int num_rows, bool check_values) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "route_backward": "route_backward(Tensor grad_weights, Tensor logits, Tensor topk_ids, str score, "
                      "bool renormalize) -> Tensor",
    "plan": "plan(Tensor topk_ids, Tensor priority, int num_experts, int capacity, str drop_policy, int pad_to, "
            "int num_rows) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "task_route": "task_route(Tensor x, Tensor router_weight, Tensor? task_ids, int batch_task, int k, str score, "
                  "bool renormalize, int capacity, str drop_policy, int pad_to, int num_rows, bool check_values) -> "
                  "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "task_route_backward": "task_route_backward(Tensor? grad_logits, Tensor? grad_weights, Tensor x, "
                           "Tensor router_weight, Tensor? task_ids, int batch_task, Tensor logits, Tensor topk_ids, "
                           "str score, bool renormalize) -> (Tensor, Tensor)",
    "dispatch": "dispatch(Tensor x, Tensor slots, Tensor sources) -> Tensor",
    "dispatch_backward": "dispatch_backward(Tensor grad_out, Tensor slots) -> Tensor",
    "combine": "combine(Tensor y, Tensor weights, Tensor slots) -> Tensor",
    "combine_backward": "combine_backward(Tensor grad_out, Tensor y, Tensor weights, Tensor slots, bool need_y, "
                        "bool need_weights) -> (Tensor, Tensor)",
    "grouped_gemm": "grouped_gemm(Tensor x, Tensor offsets, Tensor w) -> Tensor",
    "grouped_gemm_backward": "grouped_gemm_backward(Tensor grad_out, Tensor x, Tensor offsets, Tensor w, "
                             "bool need_x, bool need_w) -> (Tensor, Tensor)",
    "grouped_mlp": "grouped_mlp(Tensor x, Tensor offsets, Tensor w1, Tensor w2, Tensor? b1, Tensor? b2, "
                   "str activation) -> (Tensor, Tensor)",
    "grouped_mlp_backward": "grouped_mlp_backward(Tensor grad_out, Tensor x, Tensor z, Tensor offsets, Tensor w1, "
                            "Tensor w2, Tensor? b1, Tensor? b2, str activation) -> "
                            "(Tensor, Tensor, Tensor, Tensor, Tensor)",
    "moe_mlp": "moe_mlp(Tensor x, Tensor weights, Tensor slots, Tensor sources, Tensor offsets, Tensor w1, "
               "Tensor w2, Tensor? b1, Tensor? b2, str activation) -> (Tensor, Tensor)",
    "moe_mlp_backward": "moe_mlp_backward(Tensor grad_out, Tensor x, Tensor z, Tensor weights, Tensor slots, "
                        "Tensor sources, Tensor offsets, Tensor w1, Tensor w2, Tensor? b1, Tensor? b2, "
                        "str activation, bool need_x, bool need_weights, bool need_params) -> "
                        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "load_balancing_loss": "load_balancing_loss(Tensor logits, Tensor topk_ids, str score) -> Tensor",
    "load_balancing_loss_backward": "load_balancing_loss_backward(Tensor grad, Tensor logits, Tensor topk_ids, "
                                    "str score) -> Tensor",
    "z_loss": "z_loss(Tensor logits) -> Tensor",
    "z_loss_backward": "z_loss_backward(Tensor grad, Tensor logits) -> Tensor",
    "reconcile": "reconcile(Tensor? main, Tensor[] aux, Tensor[] weights, Tensor[] bias, str activation, "
                 "bool batch_norm, Tensor? bn_weight, Tensor? bn_bias, float eps) -> (Tensor, Tensor)",
    "reconcile_backward": "reconcile_backward(Tensor grad_out, Tensor[] aux, Tensor[] weights, Tensor[] bias, "
                          "str activation, bool batch_norm, Tensor? bn_weight, Tensor? bn_bias, Tensor? stats) -> "
                          "(Tensor[], Tensor[], Tensor, Tensor)",
    "workspace_bytes": "workspace_bytes() -> int",
    "workspace_release": "workspace_release() -> int",
}
NO_TENSORS = ("workspace_bytes", "workspace_release")


def op(name):
    return getattr(getattr(torch.ops, NS), name).default


# ---------------------------------------------------------------- registration

def test_every_schema_is_registered_once_with_a_cpu_kernel_and_a_fake():
    from torch._library.simple_registry import singleton

    prefix = f"{NS}::"
    registered = {n[len(prefix):] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix)}
    assert registered == set(SCHEMAS)
    for name, schema in SCHEMAS.items():
        assert op(name)._schema == torch._C.parse_schema(prefix + schema), name
        q = prefix + name
        if name in NO_TENSORS:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(q, "CompositeImplicitAutograd"), name
            assert isinstance(op(name)(), int)
        else:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(q, "CPU"), name
            assert singleton.find(q).fake_impl.kernel is not None, f"{name} has no fake implementation"


def test_workspace_helpers():
    assert compiled.workspace_bytes() >= 0 and compiled.empty_cache() >= 0
    assert op("workspace_release")() >= 0


# ---------------------------------------------------------------- inputs

def _plan(T=9, E=5, k=2, capacity=3, policy="position", pad_to=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g).to(dtype)
    N = ref_routing.plan_num_rows(T, k, E, capacity, pad_to)
    outs = op("route")(logits, k, "softmax", True, capacity, policy, pad_to, N, True)
    return logits, outs  # (weights, ids, counts, offsets, slots, sources, num_dropped)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _cases():
    logits, (w, ids, counts, offsets, slots, sources, nd) = _plan()
    T, E, k, N, d, h = 9, 5, 2, sources.shape[0], 6, 8
    x = _randn(T, d, seed=1)
    W = _randn(3, d, E, seed=2)
    tids = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1])
    xe, y = _randn(N, d, seed=3), _randn(N, d, seed=4)
    w1, w2, w1s = _randn(E, d, h, seed=5), _randn(E, h, d, seed=6), _randn(E, d, 2 * h, seed=7)
    b1, b2 = _randn(E, h, seed=8), _randn(E, d, seed=9)
    z = _randn(N, h, seed=10)
    lg0, g0 = torch.randn(0, E), torch.randn(0, k)
    aux = [_randn(2, 4, 4, 3, seed=11), _randn(2, 4, 4, 5, seed=12)]
    rw = [_randn(3, 7, seed=13), _randn(7, 5, seed=14).t()]  # the second: a 1x1 conv weight's transpose
    rb = [_randn(7, seed=15), _randn(7, seed=16)]
    main = _randn(2, 4, 4, 7, seed=17)
    bnw, bnb = _randn(2, 7, seed=18), _randn(2, 7, seed=19)
    _, stats = op("reconcile")(main, aux, rw, rb, "relu", True, bnw, bnb, 1e-5)
    gmain = _randn(2, 4, 4, 7, seed=20)
    gy = _randn(T, d, seed=21)
    _, zf = op("moe_mlp")(x, w, slots, sources, offsets, w1, w2, b1, b2, "gelu")
    return {
        "route": ("route", (logits, k, "softmax", True, 3, "score", 2, N, True)),
        "route_dropless_sigmoid": ("route", (logits.bfloat16(), 3, "sigmoid", False, -1, "position", 1, 27, False)),
        "route_T0": ("route", (lg0, k, "softmax", True, -1, "position", 1, 0, True)),
        "plan": ("plan", (torch.tensor([[0, 4], [4, 2], [-1, 1], [7, 3]], dtype=torch.int32),
                          torch.tensor([[0.5, 0.2], [0.9, 0.1], [0.3, 0.3], [0.6, 0.4]]), 5, 1, "score", 2, 10)),
        "plan_dropless": ("plan", (torch.tensor([[0, 1], [1, 5]], dtype=torch.int32), torch.rand(2, 2), 2, -1,
                                   "position", 1, 4)),
        "route_backward": ("route_backward", (_randn(T, k, seed=22), logits, ids, "softmax", True)),
        "task_route": ("task_route", (x, W, tids, -1, k, "softmax", True, -1, "position", 1, T * k, True)),
        "task_route_batch": ("task_route", (x, W, None, 1, k, "sigmoid", False, 3, "score", 1, 15, True)),
        "task_route_backward": ("task_route_backward",
                                (_randn(T, E, seed=23), _randn(T, k, seed=24), x, W, tids, -1, x @ W[0], ids,
                                 "softmax", True)),
        "task_route_backward_no_grad_logits": ("task_route_backward",
                                               (None, _randn(T, k, seed=24), x, W, None, 2, x @ W[2], ids,
                                                "sigmoid", False)),
        "dispatch": ("dispatch", (x, slots, sources)),
        "dispatch_backward": ("dispatch_backward", (xe, slots)),
        "combine": ("combine", (y, w, slots)),
        "combine_backward": ("combine_backward", (gy, y, w, slots, True, True)),
        "combine_backward_y_only": ("combine_backward", (gy, y, w, slots, True, False)),
        "combine_backward_w_only": ("combine_backward", (gy, y, w, slots, False, True)),
        "grouped_gemm": ("grouped_gemm", (xe, offsets, w1)),
        "grouped_gemm_backward": ("grouped_gemm_backward", (_randn(N, h, seed=25), xe, offsets, w1, True, True)),
        "grouped_gemm_backward_w_only": ("grouped_gemm_backward",
                                         (_randn(N, h, seed=25), xe, offsets, w1, False, True)),
        "grouped_mlp": ("grouped_mlp", (xe, offsets, w1, w2, b1, b2, "gelu")),
        "grouped_mlp_swiglu_nobias": ("grouped_mlp", (xe, offsets, w1s, w2, None, None, "swiglu")),
        "grouped_mlp_backward": ("grouped_mlp_backward", (y, xe, z, offsets, w1, w2, b1, b2, "relu")),
        "grouped_mlp_backward_nobias": ("grouped_mlp_backward", (y, xe, z, offsets, w1, w2, None, None, "silu")),
        "moe_mlp": ("moe_mlp", (x, w, slots, sources, offsets, w1, w2, b1, b2, "gelu")),
        "moe_mlp_nobias": ("moe_mlp", (x, w, slots, sources, offsets, w1, w2, None, None, "relu")),
        "moe_mlp_backward": ("moe_mlp_backward",
                             (gy, x, zf, w, slots, sources, offsets, w1, w2, b1, b2, "gelu", True, True, True)),
        "moe_mlp_backward_x_only": ("moe_mlp_backward", (gy, x, zf, w, slots, sources, offsets, w1, w2, b1, b2,
                                                         "gelu", True, False, False)),
        "load_balancing_loss": ("load_balancing_loss", (logits, ids, "softmax")),
        "load_balancing_loss_backward": ("load_balancing_loss_backward",
                                         (torch.tensor(0.7), logits, ids, "sigmoid")),
        "z_loss": ("z_loss", (logits,)),
        "z_loss_backward": ("z_loss_backward", (torch.tensor(1.3), logits)),
        "z_loss_T0": ("z_loss", (lg0,)),
        "load_balancing_loss_T0": ("load_balancing_loss", (lg0, g0.int(), "softmax")),
        "reconcile": ("reconcile", (main, aux, rw, rb, "gelu", False, None, None, 1e-5)),
        "reconcile_bn": ("reconcile", (main, aux, rw, rb, "relu", True, bnw, bnb, 1e-5)),
        "reconcile_no_main": ("reconcile", (None, aux, rw, [], "none", False, None, None, 1e-5)),
        "reconcile_backward": ("reconcile_backward", (gmain, aux, rw, rb, "gelu", False, None, None, None)),
        "reconcile_backward_bn": ("reconcile_backward", (gmain, aux, rw, rb, "relu", True, bnw, bnb, stats)),
        "reconcile_backward_bn_gamma_only": ("reconcile_backward",
                                             (gmain, aux, rw, [], "silu", True, bnw, None, stats)),
        "workspace_bytes": ("workspace_bytes", ()),
        "workspace_release": ("workspace_release", ()),
    }


CASES = _cases() if OK else {}


@pytest.mark.parametrize("case", sorted(CASES))
def test_opcheck(case):
    name, args = CASES[case]
    torch.library.opcheck(op(name), args, test_utils=("test_schema", "test_faketensor"))


def test_every_operator_has_an_opcheck_case():
    assert {name for name, _ in CASES.values()} == set(SCHEMAS)


# ---------------------------------------------------------------- None for undefined outputs

def test_unneeded_and_absent_outputs_are_none():
    c = CASES
    gy, gw = op("combine_backward")(*c["combine_backward_y_only"][1])
    assert gy is not None and gw is None
    gy, gw = op("combine_backward")(*c["combine_backward_w_only"][1])
    assert gy is None and gw is not None
    args = list(c["combine_backward"][1])
    args[-2:] = [False, False]
    assert op("combine_backward")(*args) == (None, None)
    gx, gw = op("grouped_gemm_backward")(*c["grouped_gemm_backward_w_only"][1])
    assert gx is None and gw is not None
    outs = op("grouped_mlp_backward")(*c["grouped_mlp_backward_nobias"][1])
    assert all(t is not None for t in outs[:3]) and outs[3:] == (None, None)
    outs = op("moe_mlp_backward")(*c["moe_mlp_backward_x_only"][1])
    assert outs[0] is not None and outs[1:] == (None,) * 5
    args = list(c["moe_mlp_backward"][1])
    args[9:11] = [None, None]
    outs = op("moe_mlp_backward")(*args)
    assert all(t is not None for t in outs[:4]) and outs[4:] == (None, None)
    gws, gbs, gg, gb = op("reconcile_backward")(*c["reconcile_backward"][1])
    assert len(gws) == 2 and len(gbs) == 2 and gg is None and gb is None
    gws, gbs, gg, gb = op("reconcile_backward")(*c["reconcile_backward_bn_gamma_only"][1])
    assert gbs == [] and gg is not None and gb is None
    # present outputs are real tensors of the documented shapes, empty lists stay lists
    gws, gbs, gg, gb = op("reconcile_backward")(*c["reconcile_backward_bn"][1])
    assert gg.shape == gb.shape == (2, 7)


# ---------------------------------------------------------------- value checks: the exact messages

def _python_message(fn, *args, **kwargs) -> str:
    with pytest.raises(V.MoEKernelsError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def _kernel_message(name, *args) -> str:
    with pytest.raises(ValueError) as info:
        op(name)(*args)
    assert type(info.value) is ValueError  # c10::ValueError; the op layer re-raises it as MoEKernelsError
    return str(info.value)


def _bad(t, index, value):
    t = t.clone()
    t.view(-1)[index] = value
    return t


def _index_cases():
    logits, (w, ids, counts, offsets, slots, sources, nd) = _plan()
    T, E, N, d = 9, 5, sources.shape[0], 6
    x, y = _randn(T, d), _randn(N, d)
    w1, w2 = _randn(E, d, 8), _randn(E, 8, d)
    W = _randn(3, d, E)
    tids = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1])
    chk, offs = V.check_index_range, V.check_offsets
    mm = lambda sl, so, of: ("moe_mlp", (x, w, sl, so, of, w1, w2, None, None, "gelu"))  # noqa: E731
    cases = {
        # dispatch: slots in [-1, N), then sources in [-1, T)
        "dispatch_slot_high": (("dispatch", (x, _bad(slots, 3, N), sources)),
                               lambda: chk(_bad(slots, 3, N), N, "dispatch", "routing.slots", allow_minus_one=True)),
        "dispatch_slot_low": (("dispatch", (x, _bad(slots, 5, -2), sources)),
                              lambda: chk(_bad(slots, 5, -2), N, "dispatch", "routing.slots", allow_minus_one=True)),
        "dispatch_source_high": (("dispatch", (x, slots, _bad(sources, 0, T))),
                                 lambda: chk(_bad(sources, 0, T), T, "dispatch", "routing.sources",
                                             allow_minus_one=True)),
        "dispatch_both_bad_slots_first": (("dispatch", (x, _bad(slots, 0, -5), _bad(sources, 0, 99))),
                                          lambda: chk(_bad(slots, 0, -5), N, "dispatch", "routing.slots",
                                                      allow_minus_one=True)),
        # combine: slots in [-1, y rows)
        "combine_slot_high": (("combine", (y, w, _bad(slots, 7, N + 3))),
                              lambda: chk(_bad(slots, 7, N + 3), N, "combine", "routing.slots", allow_minus_one=True)),
        "combine_slot_low_and_high": (("combine", (y, w, _bad(_bad(slots, 7, N + 3), 1, -9))),
                                      lambda: chk(_bad(_bad(slots, 7, N + 3), 1, -9), N, "combine", "routing.slots",
                                                  allow_minus_one=True)),
        # moe_mlp: offsets vs N, then slots, then sources
        "moe_mlp_offsets_start": (mm(slots, sources, _bad(offsets, 0, 1)),
                                  lambda: offs(_bad(offsets, 0, 1), N, "moe_mlp")),
        "moe_mlp_offsets_before_slots": (mm(_bad(slots, 2, N), sources, _bad(offsets, E, N + 1)),
                                         lambda: offs(_bad(offsets, E, N + 1), N, "moe_mlp")),
        "moe_mlp_slots": (mm(_bad(slots, 2, N), _bad(sources, 1, T), offsets),
                          lambda: chk(_bad(slots, 2, N), N, "moe_mlp", "routing.slots", allow_minus_one=True)),
        "moe_mlp_sources": (mm(slots, _bad(sources, 1, -3), offsets),
                            lambda: chk(_bad(sources, 1, -3), T, "moe_mlp", "routing.sources", allow_minus_one=True)),
        # grouped ops: offsets vs x rows
        "grouped_gemm_offsets_decreasing": (("grouped_gemm", (y, _bad(offsets, 2, 100), w1)),
                                            lambda: offs(_bad(offsets, 2, 100), N, "grouped_gemm")),
        "grouped_gemm_offsets_end": (("grouped_gemm", (y[:3], offsets, w1)),
                                     lambda: offs(offsets, 3, "grouped_gemm")),
        "grouped_gemm_offsets_int64": (("grouped_gemm", (y, _bad(offsets, 0, -1).long(), w1)),
                                       lambda: offs(_bad(offsets, 0, -1).long(), N, "grouped_gemm")),
        "grouped_mlp_offsets": (("grouped_mlp", (y, _bad(offsets, 3, 0), w1, w2, None, None, "gelu")),
                                lambda: offs(_bad(offsets, 3, 0), N, "grouped_mlp")),
        # losses: topk_ids in [0, E)
        "lb_topk_ids_high": (("load_balancing_loss", (logits, _bad(ids, 4, E), "softmax")),
                             lambda: chk(_bad(ids, 4, E), E, "load_balancing_loss", "routing.topk_ids")),
        "lb_topk_ids_minus_one": (("load_balancing_loss", (logits, _bad(ids, 4, -1), "softmax")),
                                  lambda: chk(_bad(ids, 4, -1), E, "load_balancing_loss", "routing.topk_ids")),
        # task_route: task_ids in [0, M), any integer dtype
        "task_ids_high": (("task_route", (x, W, _bad(tids, 2, 3), -1, 2, "softmax", True, -1, "position", 1, 18,
                                          True)),
                          lambda: chk(_bad(tids, 2, 3), 3, "task_route", "task_ids")),
        "task_ids_negative_int16": (("task_route", (x, W, _bad(tids, 8, -4).short(), -1, 2, "softmax", True, -1,
                                                    "position", 1, 18, False)),
                                    lambda: chk(_bad(tids, 8, -4).short(), 3, "task_route", "task_ids")),
        "task_ids_uint8": (("task_route", (x, W, _bad(tids, 0, 200).to(torch.uint8), -1, 2, "softmax", True, -1,
                                           "position", 1, 18, True)),
                           lambda: chk(_bad(tids, 0, 200).to(torch.uint8), 3, "task_route", "task_ids")),
    }
    return cases


INDEX_CASES = _index_cases() if OK else {}


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_index_and_offsets_checks_raise_the_validators_message(case):
    (name, args), python = INDEX_CASES[case]
    expected = _python_message(python)
    assert _kernel_message(name, *args) == expected


@pytest.mark.parametrize("check_values", [True, False])
def test_index_checks_do_not_depend_on_check_values(check_values):
    x, W = _randn(9, 6), _randn(3, 6, 5)
    tids = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 7])
    msg = _kernel_message("task_route", x, W, tids, -1, 2, "softmax", True, -1, "position", 1, 18, check_values)
    assert msg == _python_message(V.check_index_range, tids, 3, "task_route", "task_ids")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_route_nonfinite_logits_message(dtype):
    logits = torch.randn(7, 5).to(dtype)
    logits[4, 1] = float("inf")
    logits[2, 3] = float("nan")  # the first in row-major order
    logits[6, 0] = float("-inf")
    expected = _python_message(V.check_finite, logits, "route", "logits")
    assert "(2, 3)" in expected
    for policy, cap in (("position", -1), ("score", 2)):
        N = ref_routing.plan_num_rows(7, 2, 5, cap, 1)
        assert _kernel_message("route", logits, 2, "softmax", True, cap, policy, 1, N, True) == expected


def test_task_route_nonfinite_messages():
    x, W = torch.randn(6, 8), torch.randn(3, 8, 4)
    args = (None, 1, 2, "softmax", True, -1, "position", 1, 12, True)
    # x holds a non-finite value: the message names x, at x's first bad element
    xb = _bad(_bad(x, 8 * 4 + 5, float("nan")), 8 * 5 + 1, float("inf"))
    expected = _python_message(V.check_finite, xb, "task_route", "x")
    assert "(4, 5)" in expected
    assert _kernel_message("task_route", xb, W, *args) == expected
    # x finite, the router product overflows: named after router_weight, at the logits' first bad (t, e)
    Wb = W.clone()
    Wb[1, :, 2] = 3e38
    logits = x @ Wb[1]
    assert not torch.isfinite(logits).all()
    expected = _python_message(V.check_finite, logits, "task_route",
                               "router_weight (the router logits x @ router_weight)")
    assert _kernel_message("task_route", x, Wb, *args) == expected
    # per-token tasks
    tids = torch.tensor([0, 1, 2, 1, 0, 2])
    logits = torch.stack([x[t] @ Wb[tids[t]] for t in range(6)])
    expected = _python_message(V.check_finite, logits, "task_route",
                               "router_weight (the router logits x @ router_weight)")
    assert _kernel_message("task_route", x, Wb, tids, -1, *args[2:]) == expected


# ---------------------------------------------------------------- non-finite tokens without checks

MODES = [(-1, "position", 1), (2, "position", 1), (2, "score", 1), (3, "score", 2), (1, "score", 4),
         (4, "position", 3)]


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nonfinite_tokens_follow_the_reference(mode, score, dtype):
    capacity, policy, pad_to = mode
    T, E, k = 23, 6, 3
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(5)).to(dtype)
    bad = [0, 4, 5, 11, 22]
    logits[0, 3] = float("nan")
    logits[4, :] = float("inf")
    logits[5, 0] = float("-inf")
    logits[11, 5] = float("nan")
    logits[11, 1] = float("inf")
    logits[22, 2] = float("-inf")
    N = ref_routing.plan_num_rows(T, k, E, capacity, pad_to)
    ref = ref_routing.route(logits, k, score, True, capacity, policy, pad_to, N)
    got = op("route")(logits, k, score, True, capacity, policy, pad_to, N, False)
    for name, a, b in zip(("topk_ids", "counts", "offsets", "slots", "sources", "num_dropped"), got[1:], ref[1:]):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(got[1][bad], torch.arange(k, dtype=torch.int32).expand(len(bad), k))
    assert torch.isnan(got[0][bad]).all() and torch.isnan(ref[0][bad]).all()
    good = [t for t in range(T) if t not in bad]
    torch.testing.assert_close(got[0][good], ref[0][good], rtol=(E + k + 4) * torch.finfo(got[0].dtype).eps, atol=0)


def test_nonfinite_token_is_dropped_before_any_finite_one():
    # every token wants experts 0 and 1; capacity 3: with "score" the NaN tokens (first in token
    # order) yield their places to finite ones
    logits = torch.zeros(6, 4)
    logits[:, :2] = 5.0
    logits[0, 2] = float("nan")
    logits[1, 3] = float("inf")
    N = ref_routing.plan_num_rows(6, 2, 4, 3, 1)
    w, ids, counts, offsets, slots, sources, nd = op("route")(logits, 2, "softmax", True, 3, "score", 1, N, False)
    assert (slots[:2] == -1).all() and (slots[2:5] >= 0).all() and (slots[5] == -1).all()
    assert int(nd) == 6 and counts.tolist() == [3, 3, 0, 0]
    # with "position" the first tokens keep their rows, NaN weights and all
    w, ids, counts, offsets, slots, sources, nd = op("route")(logits, 2, "softmax", True, 3, "position", 1, N,
                                                              False)
    assert (slots[:3] >= 0).all() and (slots[3:] == -1).all() and torch.isnan(w[:2]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_combine_output_is_nan_for_a_nonfinite_token_even_when_dropped(dtype):
    T, E, k, d = 8, 4, 2, 5
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(2))
    logits[:, :2] += 5.0  # experts 0 and 1 are over capacity, the non-finite tokens' ids too
    logits[3, 1] = float("nan")  # dropped: priority -inf under "score"
    logits[6, 0] = float("inf")
    N = ref_routing.plan_num_rows(T, k, E, 2, 1)
    w, ids, counts, offsets, slots, sources, nd = op("route")(logits, k, "softmax", True, 2, "score", 1, N, False)
    assert (slots[3] == -1).all() and (slots[6] == -1).all()
    y = torch.randn(N, d).to(dtype)
    out = op("combine")(y, w, slots)
    ref = ref_permute.combine(y, w, slots)
    assert torch.isnan(out[[3, 6]]).all() and torch.isnan(ref[[3, 6]]).all()
    finite = [t for t in range(T) if t not in (3, 6)]
    assert torch.isfinite(out[finite]).all()
    torch.testing.assert_close(out[finite], ref[finite], rtol=0, atol=0)
    # a finite weight on a dropped assignment adds nothing, even next to an inf stand-in row
    w2 = torch.where(torch.isnan(w), 0.5, w)
    y_inf = torch.full((N, d), float("inf")).to(dtype)
    out = op("combine")(y_inf, w2, slots)
    assert (out[[3, 6]] == 0).all()
    # backward unchanged: a dropped assignment's weight gets zero gradient
    g = torch.randn(T, d).to(dtype)
    gy, gw = op("combine_backward")(g, y, w, slots, True, True)
    assert (gw[slots < 0] == 0).all()
    ref_gy, ref_gw = ref_permute.combine_backward(g, y, w, slots, True, True)
    assert torch.equal(gw[slots < 0], ref_gw[slots < 0])
    # the fused layer combines the same way
    w1, w2m = torch.randn(E, d, 7).to(dtype), torch.randn(E, 7, d).to(dtype)
    x = torch.randn(T, d).to(dtype)
    out, _ = op("moe_mlp")(x, w, slots, sources, offsets, w1, w2m, None, None, "gelu")
    assert torch.isnan(out[[3, 6]]).all() and torch.isfinite(out[finite]).all()


def test_nonfinite_token_in_task_route_without_checks():
    x, W = torch.randn(6, 8), torch.randn(2, 8, 4)
    x[2, 3] = float("nan")
    tids = torch.tensor([0, 1, 1, 0, 1, 0])
    N = ref_routing.plan_num_rows(6, 2, 4, 2, 1)
    got = op("task_route")(x, W, tids, -1, 2, "softmax", True, 2, "score", 1, N, False)
    ref = ref_routing.task_route(x, W, tids, -1, 2, "softmax", True, 2, "score", 1, N)
    torch.testing.assert_close(got[0], ref[0], equal_nan=True)
    for a, b in zip(got[2:], ref[2:]):
        assert torch.equal(a, b)
    assert torch.isnan(got[1][2]).all() and got[2][2].tolist() == [0, 1]


# ---------------------------------------------------------------- T = 0

def test_every_operator_works_with_no_tokens():
    E, k, d, h = 4, 2, 6, 8
    lg = torch.randn(0, E)
    w, ids, counts, offsets, slots, sources, nd = op("route")(lg, k, "softmax", True, -1, "position", 1, 0, True)
    assert w.shape == ids.shape == slots.shape == (0, k) and sources.shape == (0,)
    assert counts.tolist() == [0] * E and offsets.tolist() == [0] * (E + 1) and int(nd) == 0
    out = op("route")(lg, k, "softmax", True, 2, "score", 4, 0, False)
    assert out[1].shape == (0, k)
    x, W = torch.randn(0, d), torch.randn(2, d, E)
    tr = op("task_route")(x, W, torch.zeros(0, dtype=torch.long), -1, k, "softmax", True, -1, "position", 1, 0, True)
    assert tr[0].shape == (0, E) and tr[2].shape == (0, k)
    gx, gW = op("task_route_backward")(torch.zeros(0, E), torch.zeros(0, k), x, W, None, 0, tr[0], tr[2],
                                        "softmax", True)
    assert gx.shape == (0, d) and torch.equal(gW, torch.zeros_like(W))
    assert op("route_backward")(torch.zeros(0, k), lg, ids, "softmax", True).shape == (0, E)
    assert op("dispatch")(x, slots, sources).shape == (0, d)
    assert op("dispatch_backward")(torch.zeros(0, d), slots).shape == (0, d)
    y = torch.zeros(0, d)
    assert op("combine")(y, w, slots).shape == (0, d)
    gy, gw = op("combine_backward")(torch.zeros(0, d), y, w, slots, True, True)
    assert gy.shape == (0, d) and gw.shape == (0, k)
    w1, w2 = torch.randn(E, d, h), torch.randn(E, h, d)
    assert op("grouped_gemm")(y, offsets, w1).shape == (0, h)
    gx, gw1 = op("grouped_gemm_backward")(torch.zeros(0, h), y, offsets, w1, True, True)
    assert gx.shape == (0, d) and torch.equal(gw1, torch.zeros_like(w1))
    o, z = op("grouped_mlp")(y, offsets, w1, w2, None, None, "gelu")
    assert o.shape == (0, d) and z.shape == (0, h)
    outs = op("grouped_mlp_backward")(torch.zeros(0, d), y, z, offsets, w1, w2, None, None, "gelu")
    assert outs[0].shape == (0, d) and outs[3] is None
    o, z = op("moe_mlp")(x, w, slots, sources, offsets, w1, w2, None, None, "gelu")
    assert o.shape == (0, d) and z.shape == (0, h)
    outs = op("moe_mlp_backward")(torch.zeros(0, d), x, z, w, slots, sources, offsets, w1, w2, None, None, "gelu",
                                  True, True, True)
    assert outs[0].shape == (0, d) and outs[1].shape == (0, k) and torch.equal(outs[2], torch.zeros_like(w1))
    assert float(op("load_balancing_loss")(lg, ids, "softmax")) == 0.0
    assert op("load_balancing_loss_backward")(torch.tensor(1.0), lg, ids, "softmax").shape == (0, E)
    assert float(op("z_loss")(lg)) == 0.0
    assert op("z_loss_backward")(torch.tensor(1.0), lg).shape == (0, E)
    main, aux, ws = torch.randn(0, 5), [torch.randn(0, 3)], [torch.randn(3, 5)]
    out, stats = op("reconcile")(main, aux, ws, [], "gelu", False, None, None, 1e-5)
    assert out.shape == (0, 5) and stats.shape == (0, 3, 5)
    gws, gbs, gg, gb = op("reconcile_backward")(torch.zeros(0, 5), aux, ws, [], "gelu", False, None, None, None)
    assert torch.equal(gws[0], torch.zeros(3, 5)) and gbs == [] and gg is None and gb is None


def test_ops_trace_under_torch_compile():
    """The fakes alone make the operators traceable (no op layer): fullgraph, dynamic shapes."""
    logits, (w, ids, counts, offsets, slots, sources, nd) = _plan()
    x = torch.randn(9, 6)
    w1, w2 = torch.randn(5, 6, 8), torch.randn(5, 8, 6)

    def layer(logits, x):
        r = op("route")(logits, 2, "softmax", True, 3, "position", 2, sources.shape[0], False)
        out, z = op("moe_mlp")(x, r[0], r[4], r[5], r[3], w1, w2, None, None, "gelu")
        return out + op("z_loss")(logits)

    torch._dynamo.reset()
    compiled_layer = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    torch.testing.assert_close(compiled_layer(logits, x), layer(logits, x), rtol=0, atol=0)


def test_a_complete_cache_entry_loads_past_a_leftover_build_lock():
    """A build killed midway leaves torch's lock file in its cache entry, and torch's loader waits on
    that file forever; an entry stamped complete is loaded without it (in a fresh process)."""
    if not REASON.startswith("JIT"):
        pytest.skip(f"not a JIT build here: {REASON}")
    build = Path(REASON.rsplit(" ", 1)[-1])
    assert (build / compiled.BUILT_STAMP).is_file(), sorted(p.name for p in build.iterdir())
    lock = build / "lock"
    assert not lock.exists(), f"a build is running in {build}"
    lock.touch()
    try:
        proc = subprocess.run([sys.executable, "-c", "from moe_kernels.backends import compiled\n"
                               "ok, how = compiled.load()\nprint(ok, how)"],
                              capture_output=True, text=True, timeout=120)
    finally:
        lock.unlink(missing_ok=True)
    assert proc.returncode == 0 and proc.stdout.startswith("True JIT"), proc.stdout + proc.stderr
