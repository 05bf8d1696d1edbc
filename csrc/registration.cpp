// The one file with every schema of the compiled operators: the namespace moe_kernels_C, i.e.
// torch.ops.moe_kernels_C.<op> in Python. Each schema is written here once and only here; the
// implementations are registered per dispatch key by the source sets (csrc/cpu/register_cpu.cpp
// under CPU, a CUDA source set under CUDA), and the fake (meta) implementations that let the ops
// trace under torch.compile / torch.export are registered in Python by the module named below,
// right after the library is loaded.
//
// The names and argument orders are the kernel contract of the Python side. Conventions:
// an output that is not needed (need_* false) or has nothing to belong to (an absent bias or BN
// affine) is an undefined tensor, which Python receives as None; `check_values` (route,
// task_route) turns the finiteness checks on; ids and offsets are always checked (on the CPU an
// index out of range raises, it is never read out of bounds).
#include <torch/library.h>

TORCH_LIBRARY(moe_kernels_C, m) {
  m.set_python_module("moe_kernels.backends.compiled");  // where the fakes live

  // ---- routing: (topk_weights, topk_ids, counts, offsets, slots, sources, num_dropped)
  m.def("route(Tensor logits, int k, str score, bool renormalize, int capacity, str drop_policy, int pad_to, "
        "int num_rows, bool check_values) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // the plan of given ids: (counts, offsets, slots, sources, num_dropped, num_nonlocal)
  m.def("plan(Tensor topk_ids, Tensor priority, int num_experts, int capacity, str drop_policy, int pad_to, "
        "int num_rows) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("route_backward(Tensor grad_weights, Tensor logits, Tensor topk_ids, str score, bool renormalize) -> Tensor");
  // (logits, then route's 7 outputs)
  m.def("task_route(Tensor x, Tensor router_weight, Tensor? task_ids, int batch_task, int k, str score, "
        "bool renormalize, int capacity, str drop_policy, int pad_to, int num_rows, bool check_values) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("task_route_backward(Tensor? grad_logits, Tensor? grad_weights, Tensor x, Tensor router_weight, "
        "Tensor? task_ids, int batch_task, Tensor logits, Tensor topk_ids, str score, bool renormalize) -> "
        "(Tensor, Tensor)");

  // ---- data movement
  m.def("dispatch(Tensor x, Tensor slots, Tensor sources) -> Tensor");
  m.def("dispatch_backward(Tensor grad_out, Tensor slots) -> Tensor");
  m.def("combine(Tensor y, Tensor weights, Tensor slots) -> Tensor");
  m.def("combine_backward(Tensor grad_out, Tensor y, Tensor weights, Tensor slots, bool need_y, "
        "bool need_weights) -> (Tensor, Tensor)");

  // ---- expert compute
  m.def("grouped_gemm(Tensor x, Tensor offsets, Tensor w) -> Tensor");
  m.def("grouped_gemm_backward(Tensor grad_out, Tensor x, Tensor offsets, Tensor w, bool need_x, bool need_w) -> "
        "(Tensor, Tensor)");
  m.def("grouped_mlp(Tensor x, Tensor offsets, Tensor w1, Tensor w2, Tensor? b1, Tensor? b2, str activation) -> "
        "(Tensor, Tensor)");
  m.def("grouped_mlp_backward(Tensor grad_out, Tensor x, Tensor z, Tensor offsets, Tensor w1, Tensor w2, "
        "Tensor? b1, Tensor? b2, str activation) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("moe_mlp(Tensor x, Tensor weights, Tensor slots, Tensor sources, Tensor offsets, Tensor w1, Tensor w2, "
        "Tensor? b1, Tensor? b2, str activation) -> (Tensor, Tensor)");
  m.def("moe_mlp_backward(Tensor grad_out, Tensor x, Tensor z, Tensor weights, Tensor slots, Tensor sources, "
        "Tensor offsets, Tensor w1, Tensor w2, Tensor? b1, Tensor? b2, str activation, bool need_x, "
        "bool need_weights, bool need_params) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- router losses
  m.def("load_balancing_loss(Tensor logits, Tensor topk_ids, str score) -> Tensor");
  m.def("load_balancing_loss_backward(Tensor grad, Tensor logits, Tensor topk_ids, str score) -> Tensor");
  m.def("z_loss(Tensor logits) -> Tensor");
  m.def("z_loss_backward(Tensor grad, Tensor logits) -> Tensor");

  // ---- detached reconciliation
  m.def("reconcile(Tensor? main, Tensor[] aux, Tensor[] weights, Tensor[] bias, str activation, bool batch_norm, "
        "Tensor? bn_weight, Tensor? bn_bias, float eps) -> (Tensor, Tensor)");
  m.def("reconcile_backward(Tensor grad_out, Tensor[] aux, Tensor[] weights, Tensor[] bias, str activation, "
        "bool batch_norm, Tensor? bn_weight, Tensor? bn_bias, Tensor? stats) -> (Tensor[], Tensor[], Tensor, Tensor)");

  // ---- the CPU kernels' buffer pool (no tensor arguments: registered catch-all)
  m.def("workspace_bytes() -> int");
  m.def("workspace_release() -> int");
}
