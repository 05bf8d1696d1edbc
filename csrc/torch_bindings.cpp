// The one file that exposes the compiled kernels to Python (moe_kernels/cpu_backend.py maps them to
// op names; the ops' schemas, autograd and fake implementations live in moe_kernels/ops/).
#include <torch/extension.h>

#include "cpu/ops.h"
#include "cpu/workspace.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moe_kernels compiled CPU kernels";
  m.def("route_fwd", &moe_kernels::cpu::route_fwd, "top-k routing + dispatch plan");
  m.def("route_bwd", &moe_kernels::cpu::route_bwd, "routing backward: d loss / d logits");
  m.def("task_route_fwd", &moe_kernels::cpu::task_route_fwd, "per-task router product + routing");
  m.def("task_route_bwd", &moe_kernels::cpu::task_route_bwd, "task routing backward");
  m.def("load_balancing_fwd", &moe_kernels::cpu::load_balancing_fwd, "load-balancing loss");
  m.def("load_balancing_bwd", &moe_kernels::cpu::load_balancing_bwd, "load-balancing loss backward");
  m.def("z_loss_fwd", &moe_kernels::cpu::z_loss_fwd, "router z-loss");
  m.def("z_loss_bwd", &moe_kernels::cpu::z_loss_bwd, "router z-loss backward");
  m.def("dispatch_fwd", &moe_kernels::cpu::dispatch_fwd, "gather tokens into expert-grouped rows");
  m.def("dispatch_bwd", &moe_kernels::cpu::dispatch_bwd, "sum the k copies of each token's gradient");
  m.def("combine_fwd", &moe_kernels::cpu::combine_fwd, "weighted gather-sum of expert rows");
  m.def("combine_bwd", &moe_kernels::cpu::combine_bwd, "gradients of combine w.r.t. rows and weights");
  m.def("grouped_gemm_fwd", &moe_kernels::cpu::grouped_gemm_fwd, "per-expert GEMM over row segments");
  m.def("grouped_gemm_bwd", &moe_kernels::cpu::grouped_gemm_bwd, "grouped GEMM backward");
  m.def("grouped_mlp_fwd", &moe_kernels::cpu::grouped_mlp_fwd, "per-expert MLP over row segments");
  m.def("grouped_mlp_bwd", &moe_kernels::cpu::grouped_mlp_bwd, "grouped MLP backward");
  m.def("moe_mlp_fwd", &moe_kernels::cpu::moe_mlp_fwd, "fused dispatch -> grouped MLP -> combine");
  m.def("moe_mlp_bwd", &moe_kernels::cpu::moe_mlp_bwd, "fused expert layer backward (keeps only z)");
  m.def("workspace_bytes", &moe_kernels::cpu::workspace_bytes, "bytes held by the kernels' buffer pool");
  m.def("workspace_release", &moe_kernels::cpu::workspace_release, "free the pool's idle buffers");
  m.def("reconcile_fwd", &moe_kernels::cpu::reconcile_fwd, "fused detached reconciliation (+ batch norm)");
  m.def("reconcile_bwd", &moe_kernels::cpu::reconcile_bwd, "reconciliation backward: weight/bias/BN grads");
}
