// The CPU implementations of the moe_kernels_C operators (schemas: csrc/registration.cpp), registered
// under the CPU dispatch key; the buffer pool's two ops take no tensors, so they are registered
// catch-all (they serve any device key, and no fake is needed or possible for them).
#include <torch/library.h>

#include "ops.h"
#include "workspace.h"

namespace mkc = moe_kernels::cpu;

TORCH_LIBRARY_IMPL(moe_kernels_C, CPU, m) {
  m.impl("route", &mkc::route);
  m.impl("route_backward", &mkc::route_backward);
  m.impl("plan", &mkc::plan);
  m.impl("task_route", &mkc::task_route);
  m.impl("task_route_backward", &mkc::task_route_backward);
  m.impl("dispatch", &mkc::dispatch);
  m.impl("dispatch_backward", &mkc::dispatch_backward);
  m.impl("combine", &mkc::combine);
  m.impl("combine_backward", &mkc::combine_backward);
  m.impl("grouped_gemm", &mkc::grouped_gemm);
  m.impl("grouped_gemm_backward", &mkc::grouped_gemm_backward);
  m.impl("grouped_mlp", &mkc::grouped_mlp);
  m.impl("grouped_mlp_backward", &mkc::grouped_mlp_backward);
  m.impl("moe_mlp", &mkc::moe_mlp);
  m.impl("moe_mlp_backward", &mkc::moe_mlp_backward);
  m.impl("load_balancing_loss", &mkc::load_balancing_loss);
  m.impl("load_balancing_loss_backward", &mkc::load_balancing_loss_backward);
  m.impl("z_loss", &mkc::z_loss);
  m.impl("z_loss_backward", &mkc::z_loss_backward);
  m.impl("reconcile", &mkc::reconcile);
  m.impl("reconcile_backward", &mkc::reconcile_backward);
}

TORCH_LIBRARY_IMPL(moe_kernels_C, CatchAll, m) {
  m.impl("workspace_bytes", &mkc::workspace_bytes);
  m.impl("workspace_release", &mkc::workspace_release);
}
