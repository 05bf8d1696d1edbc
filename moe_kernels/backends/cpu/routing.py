"""cpu routing kernels: one pass per token (top-k by logit, scores, weights, finiteness), then the plan."""

from ..contract import checks_values
from ._op import call

ROUTER_LOGITS = "router_weight (the router logits x @ router_weight)"


@checks_values("logits")
def route(logits, k, score, renormalize, capacity, drop_policy, pad_to, num_rows, *, check_values):
    return call("route", logits, k, score, renormalize, capacity, drop_policy, pad_to, num_rows, check_values)


def plan(topk_ids, priority, num_experts, capacity, drop_policy, pad_to, num_rows):
    return call("plan", topk_ids, priority, num_experts, capacity, drop_policy, pad_to, num_rows)


def route_backward(grad_weights, logits, topk_ids, score, renormalize):
    return call("route_backward", grad_weights, logits, topk_ids, score, renormalize)


@checks_values("task_ids", "x", ROUTER_LOGITS)
def task_route(x, router_weight, task_ids, batch_task, k, score, renormalize, capacity, drop_policy, pad_to,
               num_rows, *, check_values):
    return call("task_route", x, router_weight, task_ids, batch_task, k, score, renormalize, capacity, drop_policy,
                pad_to, num_rows, check_values)


def task_route_backward(grad_logits, grad_weights, x, router_weight, task_ids, batch_task, logits, topk_ids, score,
                        renormalize):
    return call("task_route_backward", grad_logits, grad_weights, x, router_weight, task_ids, batch_task, logits,
                topk_ids, score, renormalize)
