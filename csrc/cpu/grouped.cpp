// CPU launchers: grouped GEMM and grouped expert MLP over row segments, forward and backward.
//
// Each expert's GEMMs run on views of its segment (no copies) with ATen's GEMM (oneDNN/MKL, which
// parallelises internally) writing in place through the out= variants; per-call scratch for the
// hidden activation is allocated once at the size of the largest segment and reused by every
// expert. Outputs, gradients and scratch of 1 MiB and more come from the buffer pool (workspace.h).
// The sequence of ATen calls per expert is the reference's, so results match it exactly.
// Offsets and the fused layer's plan indices are checked before anything is read (checks.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <optional>
#include <string_view>
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

struct Segment {
  int64_t e, lo, n;
};

// The non-empty segments of offsets (any integer dtype), read in place (no conversion copy).
std::vector<Segment> segments(const at::Tensor& offsets) {
  const at::Tensor o = offsets.contiguous();
  std::vector<Segment> segs;
  AT_DISPATCH_INTEGRAL_TYPES(o.scalar_type(), "moe_kernels_segments", [&] {
    const scalar_t* p = o.const_data_ptr<scalar_t>();
    for (int64_t e = 0; e + 1 < o.numel(); ++e)
      if (p[e + 1] > p[e]) segs.push_back({e, static_cast<int64_t>(p[e]), static_cast<int64_t>(p[e + 1] - p[e])});
  });
  return segs;
}

int64_t max_rows(const std::vector<Segment>& segs) {
  int64_t m = 0;
  for (const auto& s : segs) m = std::max(m, s.n);
  return m;
}

// offsets[-1], read in place (offsets was checked: non-empty)
int64_t used_rows(const at::Tensor& offsets) {
  int64_t last = 0;
  AT_DISPATCH_INTEGRAL_TYPES(offsets.scalar_type(), "moe_kernels_used_rows", [&] {
    last = static_cast<int64_t>(offsets.const_data_ptr<scalar_t>()[offsets.numel() - 1]);
  });
  return last;
}

// zero the rows [used, t.size(0)) that no segment writes (no call at all when there are none)
void zero_rows_from(at::Tensor& t, int64_t used) {
  if (used < t.size(0)) t.narrow(0, used, t.size(0) - used).zero_();
}

// A per-expert gradient [E, ...] whose experts with rows are all overwritten by out= GEMMs: only the
// experts without rows need zeros (zero-filling all of it cost 13% of a step at E=64). It comes from
// the workspace pool: at E=64 the expert gradients are 64 dense MLPs' worth of fresh pages per step.
// It has w's layout: a weight given as the transpose(1, 2) of a contiguous tensor (Hugging Face's
// [E, out, in] experts, used in place) gets its gradient in that layout, so nothing copies it.
at::Tensor expert_grad_like(const at::Tensor& w, const std::vector<Segment>& segs) {
  at::Tensor g = w.is_contiguous() ? workspace_empty_like(w)
                                   : workspace_empty({w.size(0), w.size(2), w.size(1)}, w.options()).transpose(1, 2);
  std::vector<bool> has_rows(w.size(0), false);
  for (const auto& s : segs) has_rows[s.e] = true;
  for (int64_t e = 0; e < w.size(0); ++e)
    if (!has_rows[e]) g[e].zero_();
  return g;
}

// Run body(segment, scratch) for every segment. With at least two segments per thread, experts run
// concurrently, each GEMM on one thread, handed out dynamically (segments differ in size);
// otherwise one after another with ATen's multithreaded GEMM. at::parallel_for (not a raw OpenMP
// region) rethrows the workers' exceptions instead of terminating the process.
// `make_scratch` builds one worker's scratch.
template <typename MakeScratch, typename Body>
void for_each_segment(const std::vector<Segment>& segs, MakeScratch make_scratch, Body body) {
  const int64_t nt = at::get_num_threads(), ns = static_cast<int64_t>(segs.size());
  if (nt > 1 && ns >= 2 * nt) {
    // largest segments first: the last ones handed out are the smallest, so the workers finish
    // close together (each segment's results do not depend on which worker runs it or when)
    std::vector<int64_t> order(static_cast<size_t>(ns));
    for (int64_t i = 0; i < ns; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return segs[a].n > segs[b].n; });
    std::atomic<int64_t> next{0};
    at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
      c10::NoGradGuard no_grad;  // grad mode is thread-local: the workers start with it on
      auto scratch = make_scratch();
      for (int64_t i = next++; i < ns; i = next++) body(segs[order[i]], scratch);
    });
  } else {
    auto scratch = make_scratch();
    for (const auto& s : segs) body(s, scratch);
  }
}

int no_scratch() { return 0; }

// h = act(z), into `h` (same shape as act's output)
void act_fwd(const at::Tensor& z, std::string_view act, at::Tensor& h) {
  if (act == "gelu") {
    at::gelu_out(h, z);
  } else if (act == "relu") {
    at::clamp_min_out(h, z, 0);
  } else if (act == "silu") {
    at::silu_out(h, z);
  } else if (act == "swiglu") {
    const int64_t half = z.size(1) / 2;
    at::silu_out(h, z.narrow(1, 0, half));
    h.mul_(z.narrow(1, half, half));
  } else {
    TORCH_CHECK(false, "moe_kernels cpu: unknown activation ", act);
  }
}

// d loss / d z from d loss / d act(z) = gh, into `gz` (z's shape)
void act_bwd(const at::Tensor& z, const at::Tensor& gh, std::string_view act, at::Tensor& gz) {
  if (act == "gelu") {
    at::gelu_backward_out(gz, gh, z);
  } else if (act == "relu") {
    at::threshold_backward_out(gz, gh, z, 0);
  } else if (act == "silu") {
    at::silu_backward_out(gz, gh, z);
  } else {  // swiglu: h = silu(a) * b
    const int64_t half = z.size(1) / 2;
    const at::Tensor a = z.narrow(1, 0, half), b = z.narrow(1, half, half);
    at::Tensor ga = gz.narrow(1, 0, half), gb = gz.narrow(1, half, half);
    at::silu_backward_out(ga, gh * b, a);
    at::mul_out(gb, gh, at::silu(a));
  }
}

}  // namespace

at::Tensor grouped_gemm(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& w) {
  check_offsets(offsets, x.size(0), "grouped_gemm");
  at::Tensor out = workspace_empty({x.size(0), w.size(2)}, x.options());
  zero_rows_from(out, used_rows(offsets));
  for_each_segment(segments(offsets), no_scratch, [&](const Segment& s, int) {
    at::Tensor o = out.narrow(0, s.lo, s.n);
    at::mm_out(o, x.narrow(0, s.lo, s.n), w[s.e]);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> grouped_gemm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                         const at::Tensor& offsets, const at::Tensor& w,
                                                         bool need_x, bool need_w) {
  check_offsets(offsets, x.size(0), "grouped_gemm_backward");  // a guard
  at::Tensor gx, gw;
  const auto segs = segments(offsets);
  if (need_x) {
    gx = workspace_empty_like(x);
    zero_rows_from(gx, used_rows(offsets));
  }
  if (need_w) gw = expert_grad_like(w, segs);  // experts without rows get zero gradient
  for_each_segment(segs, no_scratch, [&](const Segment& s, int) {
    const at::Tensor g = grad_out.narrow(0, s.lo, s.n);
    if (need_x) {
      at::Tensor o = gx.narrow(0, s.lo, s.n);
      at::mm_out(o, g, w[s.e].t());
    }
    if (need_w) {
      at::Tensor o = gw[s.e];
      at::mm_out(o, x.narrow(0, s.lo, s.n).t(), g);
    }
  });
  return {gx, gw};
}

std::tuple<at::Tensor, at::Tensor> grouped_mlp(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& w1,
                                               const at::Tensor& w2, const std::optional<at::Tensor>& b1,
                                               const std::optional<at::Tensor>& b2, std::string_view act) {
  check_offsets(offsets, x.size(0), "grouped_mlp");
  const int64_t N = x.size(0), h1 = w1.size(2), h = w2.size(1);
  at::Tensor out = workspace_empty({N, w2.size(2)}, x.options());
  at::Tensor z = workspace_empty({N, h1}, x.options());
  const int64_t used = used_rows(offsets);
  zero_rows_from(out, used);
  zero_rows_from(z, used);
  const auto segs = segments(offsets);
  const int64_t m = max_rows(segs);
  // scratch for the hidden activation: one per thread, reused by each expert it runs
  auto scratch = [&] { return workspace_empty({m, h}, x.options()); };
  for_each_segment(segs, scratch, [&](const Segment& s, at::Tensor& hbuf) {
    at::Tensor z_e = z.narrow(0, s.lo, s.n), h_e = hbuf.narrow(0, 0, s.n), y_e = out.narrow(0, s.lo, s.n);
    at::mm_out(z_e, x.narrow(0, s.lo, s.n), w1[s.e]);
    if (b1) z_e.add_((*b1)[s.e]);
    act_fwd(z_e, act, h_e);
    at::mm_out(y_e, h_e, w2[s.e]);
    if (b2) y_e.add_((*b2)[s.e]);
  });
  return {out, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_mlp_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& z, const at::Tensor& offsets,
    const at::Tensor& w1, const at::Tensor& w2, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& b2, std::string_view act) {
  check_offsets(offsets, x.size(0), "grouped_mlp_backward");  // a guard
  const int64_t N = x.size(0), h1 = w1.size(2), h = w2.size(1);
  at::Tensor gx = workspace_empty_like(x);
  zero_rows_from(gx, used_rows(offsets));
  const auto segs = segments(offsets);
  at::Tensor gw1 = expert_grad_like(w1, segs), gw2 = expert_grad_like(w2, segs);
  at::Tensor gb1 = b1 ? expert_grad_like(*b1, segs) : at::Tensor();
  at::Tensor gb2 = b2 ? expert_grad_like(*b2, segs) : at::Tensor();
  const int64_t m = max_rows(segs);
  const auto acc = acc_type_of(x.scalar_type());
  auto scratch = [&] {
    return std::array<at::Tensor, 3>{workspace_empty({m, h}, x.options()), workspace_empty({m, h}, x.options()),
                                     workspace_empty({m, h1}, x.options())};
  };
  for_each_segment(segs, scratch, [&](const Segment& s, std::array<at::Tensor, 3>& buf) {
    const at::Tensor x_e = x.narrow(0, s.lo, s.n), g = grad_out.narrow(0, s.lo, s.n), z_e = z.narrow(0, s.lo, s.n);
    at::Tensor h_e = buf[0].narrow(0, 0, s.n), gh = buf[1].narrow(0, 0, s.n), gz = buf[2].narrow(0, 0, s.n);
    act_fwd(z_e, act, h_e);  // elementwise recompute from the saved pre-activation
    at::Tensor gw2_e = gw2[s.e];
    at::mm_out(gw2_e, h_e.t(), g);
    if (b2) gb2[s.e].copy_(g.to(acc).sum(0));
    at::mm_out(gh, g, w2[s.e].t());
    act_bwd(z_e, gh, act, gz);
    at::Tensor gw1_e = gw1[s.e];
    at::mm_out(gw1_e, x_e.t(), gz);
    if (b1) gb1[s.e].copy_(gz.to(acc).sum(0));
    at::Tensor gx_e = gx.narrow(0, s.lo, s.n);
    at::mm_out(gx_e, gz, w1[s.e].t());
  });
  return {gx, gw1, gw2, gb1, gb2};
}

// ---- the fused expert layer: gather -> grouped MLP -> combine, keeping only z ----

namespace {

// rows [lo, lo + n) of the dispatched buffer, gathered from x into `out` ([>= n, d])
void gather_segment(const at::Tensor& x, const at::Tensor& sources, int64_t lo, int64_t n, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_kernels_moe_mlp_gather", [&] {
    kernels::dispatch_rows(x.const_data_ptr<scalar_t>(), sources.const_data_ptr<int32_t>() + lo, 0, n, x.size(1),
                           out.data_ptr<scalar_t>());
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> moe_mlp(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& slots,
                                           const at::Tensor& sources, const at::Tensor& offsets,
                                           const at::Tensor& w1, const at::Tensor& w2,
                                           const std::optional<at::Tensor>& b1,
                                           const std::optional<at::Tensor>& b2, std::string_view act) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(),
              "moe_kernels cpu moe_mlp: x must be a contiguous 2-D CPU tensor");
  check_offsets(offsets, sources.size(0), "moe_mlp");
  check_index_range(slots, sources.size(0), "moe_mlp", "routing.slots", true);
  check_index_range(sources, x.size(0), "moe_mlp", "routing.sources", true);
  const int64_t N = sources.size(0), d = x.size(1), h1 = w1.size(2), h = w2.size(1), dout = w2.size(2);
  // z is saved for backward and y is a temporary: both pooled, so steps reuse their pages
  at::Tensor z = workspace_empty({N, h1}, x.options());
  at::Tensor y = workspace_empty({N, dout}, x.options());
  zero_rows_from(z, used_rows(offsets));
  const auto segs = segments(offsets);
  const int64_t m = max_rows(segs);
  auto scratch = [&] {
    return std::array<at::Tensor, 2>{workspace_empty({m, d}, x.options()), workspace_empty({m, h}, x.options())};
  };
  for_each_segment(segs, scratch, [&](const Segment& s, std::array<at::Tensor, 2>& buf) {
    at::Tensor x_e = buf[0].narrow(0, 0, s.n), h_e = buf[1].narrow(0, 0, s.n);
    at::Tensor z_e = z.narrow(0, s.lo, s.n), y_e = y.narrow(0, s.lo, s.n);
    gather_segment(x, sources, s.lo, s.n, x_e);
    at::mm_out(z_e, x_e, w1[s.e]);
    if (b1) z_e.add_((*b1)[s.e]);
    act_fwd(z_e, act, h_e);
    at::mm_out(y_e, h_e, w2[s.e]);
    if (b2) y_e.add_((*b2)[s.e]);
  });
  return {combine_rows(y, weights, slots), z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_mlp_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& z, const at::Tensor& weights,
    const at::Tensor& slots, const at::Tensor& sources, const at::Tensor& offsets, const at::Tensor& w1,
    const at::Tensor& w2, const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& b2,
    std::string_view act, bool need_x, bool need_weights, bool need_params) {
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.is_contiguous() && grad_out.device().is_cpu(),
              "moe_kernels cpu moe_mlp backward: grad_out must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(grad_out.size(0) == slots.size(0) && weights.numel() == slots.numel() && z.size(0) == sources.size(0),
              "moe_kernels cpu moe_mlp backward: grad_out, weights and z do not match the plan");
  // guards: the plan's indices are read below (row_assignments writes through the slots)
  check_offsets(offsets, sources.size(0), "moe_mlp_backward");
  check_index_range(slots, sources.size(0), "moe_mlp_backward", "slots", true);
  check_index_range(sources, x.size(0), "moe_mlp_backward", "sources", true);
  const int64_t N = sources.size(0), d = x.size(1), h1 = w1.size(2), h = w2.size(1), dout = w2.size(2);
  const int k = static_cast<int>(slots.size(1));
  const auto acc = acc_type_of(x.scalar_type());
  const at::Tensor w = as_dtype(weights, acc).contiguous();
  const auto segs = segments(offsets);
  const std::vector<int64_t> inv = row_assignments(slots, N);
  at::Tensor gw1, gw2, gb1, gb2;
  if (need_params) {
    gw1 = expert_grad_like(w1, segs);
    gw2 = expert_grad_like(w2, segs);
    if (b1) gb1 = expert_grad_like(*b1, segs);
    if (b2) gb2 = expert_grad_like(*b2, segs);
  }
  // the gradient of the dispatched rows; rows past offsets[E] are never read (no slot points there)
  at::Tensor gxe = need_x ? workspace_empty({N, d}, x.options()) : at::Tensor();
  at::Tensor gate = need_weights ? at::zeros(w.sizes(), w.options()) : at::Tensor();
  const int64_t m = max_rows(segs);
  auto scratch = [&] {
    const auto o = x.options();
    return std::array<at::Tensor, 5>{workspace_empty({m, d}, o), workspace_empty({m, dout}, o),
                                     workspace_empty({m, h}, o), workspace_empty({m, h}, o),
                                     workspace_empty({m, h1}, o)};
  };
  for_each_segment(segs, scratch, [&](const Segment& s, std::array<at::Tensor, 5>& buf) {
    at::Tensor x_e = buf[0].narrow(0, 0, s.n), g_e = buf[1].narrow(0, 0, s.n), h_e = buf[2].narrow(0, 0, s.n);
    at::Tensor u_e = buf[3].narrow(0, 0, s.n), gz = buf[4].narrow(0, 0, s.n);
    const at::Tensor z_e = z.narrow(0, s.lo, s.n);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_kernels_moe_mlp_bwd", [&] {
      kernels::assigned_rows(grad_out.const_data_ptr<scalar_t>(), inv.data(), s.lo, s.n, k, dout,
                             g_e.data_ptr<scalar_t>());
    });
    act_fwd(z_e, act, h_e);         // elementwise recompute from the saved pre-activation
    at::mm_out(u_e, g_e, w2[s.e].t());  // u = g W2^T, unweighted
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_kernels_moe_mlp_weigh", [&] {
      auto run = [&](auto acc_tag) {
        using acc_t = decltype(acc_tag);
        const acc_t* wp = w.const_data_ptr<acc_t>();
        const scalar_t* hp = h_e.const_data_ptr<scalar_t>();
        scalar_t* up = u_e.data_ptr<scalar_t>();
        scalar_t* gp = g_e.data_ptr<scalar_t>();
        const scalar_t* bp = b2 ? (*b2)[s.e].const_data_ptr<scalar_t>() : nullptr;
        acc_t* gate_p = need_weights ? gate.data_ptr<acc_t>() : nullptr;
        run_isa([&] { kernels::weigh_rows<scalar_t, acc_t, acc_t>(inv.data(), wp, s.lo, s.n, hp, h, up, gp, dout, bp, gate_p); });
      };
      if (acc == at::kDouble)
        run(double{});
      else
        run(float{});
    });
    // now g_e = w * g (the combine's row gradient) and u_e = w * g W2^T = d loss / d act(z)
    if (need_params) {
      at::Tensor gw2_e = gw2[s.e];
      at::mm_out(gw2_e, h_e.t(), g_e);
      if (b2) gb2[s.e].copy_(g_e.to(acc).sum(0));
    }
    act_bwd(z_e, u_e, act, gz);
    if (need_params) {
      gather_segment(x, sources, s.lo, s.n, x_e);  // the dispatched rows, recomputed
      at::Tensor gw1_e = gw1[s.e];
      at::mm_out(gw1_e, x_e.t(), gz);
      if (b1) gb1[s.e].copy_(gz.to(acc).sum(0));
    }
    if (need_x) {
      at::Tensor gx_e = gxe.narrow(0, s.lo, s.n);
      at::mm_out(gx_e, gz, w1[s.e].t());
    }
  });
  at::Tensor gx = need_x ? gather_rows_sum(gxe, slots) : at::Tensor();
  at::Tensor gweights = need_weights ? as_dtype(gate, weights.scalar_type()) : at::Tensor();
  return {gx, gweights, gw1, gw2, gb1, gb2};
}

}  // namespace cpu
}  // namespace moe_kernels
