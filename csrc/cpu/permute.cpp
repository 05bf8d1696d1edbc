// CPU launchers: dispatch / combine forward and backward (row copies and weighted gather-sums,
// parallel over rows or tokens, no atomics: each output row is written by exactly one thread).
// Outputs of 1 MiB and more come from the buffer pool (workspace.h): a fresh output pays a page
// fault per 4 KiB, which made dispatch run at a fifth of the copy bandwidth. Every launcher checks
// the plan's indices before it reads through them (checks.h); the forward ops with the op layer's
// messages. combine adds 0 * w for a dropped assignment: nothing for a finite weight, NaN for a
// non-finite one (kernels/permute.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <tuple>
#include <vector>

#include "../kernels/permute.h"
#include "checks.h"
#include "isa.h"
#include "ops.h"
#include "workspace.h"

namespace moe_kernels {
namespace cpu {

namespace {

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.device().is_cpu(), "moe_kernels cpu: ", name,
              " must be a contiguous 2-D CPU tensor");
}

// rows per parallel task: about 64 KiB of row data
int64_t grain(int64_t d, int64_t elem) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, d * elem)); }

template <typename scalar_t, typename acc_t>
void gather_sum(const at::Tensor& y, const at::Tensor* w, const at::Tensor& slots, at::Tensor& out) {
  const int64_t T = slots.size(0), d = y.size(1);
  const int k = static_cast<int>(slots.size(1));
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  const acc_t* wp = w ? w->const_data_ptr<acc_t>() : nullptr;
  const int32_t* sp = slots.const_data_ptr<int32_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, T, grain(d, sizeof(scalar_t)), [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> acc(static_cast<size_t>(d));
    run_isa([&] { kernels::gather_sum_rows<scalar_t, acc_t, acc_t>(yp, wp, sp, t0, t1, k, d, acc.data(), op); });
  });
}

}  // namespace

std::vector<int64_t> row_assignments(const at::Tensor& slots, int64_t N) {
  const int32_t* sp = slots.const_data_ptr<int32_t>();
  std::vector<int64_t> inv(static_cast<size_t>(N), -1);
  at::parallel_for(0, slots.numel(), 4096, [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a)
      if (sp[a] >= 0) inv[sp[a]] = a;  // written once per kept assignment
  });
  return inv;
}

at::Tensor dispatch(const at::Tensor& x, const at::Tensor& slots, const at::Tensor& sources) {
  check_rows(x, "x");
  const int64_t N = sources.size(0), d = x.size(1);
  check_index_range(slots, N, "dispatch", "routing.slots", true);
  check_index_range(sources, x.size(0), "dispatch", "routing.sources", true);
  at::Tensor out = workspace_empty({N, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_kernels_dispatch", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int32_t* src = sources.const_data_ptr<int32_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain(d, sizeof(scalar_t)), [&](int64_t r0, int64_t r1) {
      kernels::dispatch_rows(xp, src, r0, r1, d, op);
    });
  });
  return out;
}

at::Tensor gather_rows_sum(const at::Tensor& grad_out, const at::Tensor& slots) {
  check_rows(grad_out, "grad_out");
  at::Tensor gx = workspace_empty({slots.size(0), grad_out.size(1)}, grad_out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "moe_kernels_dispatch_bwd", [&] {
    if (grad_out.scalar_type() == at::kDouble)
      gather_sum<scalar_t, double>(grad_out, nullptr, slots, gx);
    else
      gather_sum<scalar_t, float>(grad_out, nullptr, slots, gx);
  });
  return gx;
}

at::Tensor dispatch_backward(const at::Tensor& grad_out, const at::Tensor& slots) {
  check_rows(grad_out, "grad_out");
  check_index_range(slots, grad_out.size(0), "dispatch_backward", "slots", true);  // a guard
  return gather_rows_sum(grad_out, slots);
}

at::Tensor combine_rows(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& slots) {
  check_rows(y, "y");
  TORCH_CHECK(weights.numel() == slots.numel(), "moe_kernels cpu combine: weights must have the shape of slots");
  const at::Tensor w = as_dtype(weights, acc_type_of(y.scalar_type())).contiguous();
  at::Tensor out = workspace_empty({slots.size(0), y.size(1)}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "moe_kernels_combine", [&] {
    if (y.scalar_type() == at::kDouble)
      gather_sum<scalar_t, double>(y, &w, slots, out);
    else
      gather_sum<scalar_t, float>(y, &w, slots, out);
  });
  return out;
}

at::Tensor combine(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& slots) {
  check_rows(y, "y");
  check_index_range(slots, y.size(0), "combine", "routing.slots", true);
  return combine_rows(y, weights, slots);
}

std::tuple<at::Tensor, at::Tensor> combine_backward(const at::Tensor& grad_out, const at::Tensor& y,
                                                    const at::Tensor& weights, const at::Tensor& slots,
                                                    bool need_y, bool need_w) {
  check_rows(grad_out, "grad_out");
  check_rows(y, "y");
  const int64_t T = slots.size(0), N = y.size(0), d = y.size(1);
  TORCH_CHECK(grad_out.size(0) == T && grad_out.size(1) == d && weights.numel() == slots.numel(),
              "moe_kernels cpu combine_backward: grad_out must be [T, d] and weights [T, k]");
  check_index_range(slots, N, "combine_backward", "slots", true);  // a guard
  const int k = static_cast<int>(slots.size(1));
  const auto acc = acc_type_of(y.scalar_type());
  const at::Tensor w = as_dtype(weights, acc).contiguous();
  at::Tensor gy, gw;
  const int32_t* sp = slots.const_data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "moe_kernels_combine_bwd", [&] {
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    auto run = [&](auto acc_tag) {
      using acc_t = decltype(acc_tag);
      const acc_t* wp = w.const_data_ptr<acc_t>();
      if (need_y) {
        const std::vector<int64_t> inv = row_assignments(slots, N);
        gy = workspace_empty({N, d}, y.options());
        scalar_t* gyp = gy.data_ptr<scalar_t>();
        at::parallel_for(0, N, grain(d, sizeof(scalar_t)), [&](int64_t r0, int64_t r1) {
          run_isa([&] { kernels::scatter_rows<scalar_t, acc_t, acc_t>(gp, wp, inv.data(), r0, r1, k, d, gyp); });
        });
      }
      if (need_w) {
        at::Tensor gacc = new_empty_cpu({T, k}, w.scalar_type());
        acc_t* gwp = gacc.data_ptr<acc_t>();
        const scalar_t* yp = y.const_data_ptr<scalar_t>();
        at::parallel_for(0, T, grain(d * k, sizeof(scalar_t)), [&](int64_t t0, int64_t t1) {
          run_isa([&] { kernels::weight_grad_rows<scalar_t, acc_t, acc_t>(gp, yp, sp, t0, t1, k, d, gwp); });
        });
        gw = as_dtype(gacc, weights.scalar_type());
      }
    };
    if (acc == at::kDouble)
      run(double{});
    else
      run(float{});
  });
  return {gy, gw};
}

}  // namespace cpu
}  // namespace moe_kernels
