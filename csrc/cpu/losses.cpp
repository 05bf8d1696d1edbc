// CPU launchers: load-balancing loss and router z-loss, forward and backward, each one parallel
// pass over the tokens' rows of logits (the reference needs a softmax, a mean and their backward as
// separate ATen passes). Token sums use a fixed block partition: thread-count invariant.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <string_view>
#include <vector>

#include "../kernels/losses.h"
#include "../kernels/routing.h"
#include "checks.h"
#include "ops.h"

namespace moe_kernels {
namespace cpu {

namespace {

constexpr int64_t kLossBlocks = 64;  // fixed: results never depend on it, only speed does

// f_e = (assignments chosen for e) / (T * k), from the [T, k] top-k ids
template <typename acc_t>
std::vector<acc_t> chosen_share(const at::Tensor& topk_ids, int64_t E) {
  const at::Tensor ids = as_dtype(topk_ids, at::kLong).contiguous();
  const int64_t n = ids.numel();
  std::vector<int64_t> count(E, 0);
  const int64_t* ip = ids.const_data_ptr<int64_t>();
  for (int64_t a = 0; a < n; ++a) ++count[ip[a]];
  std::vector<acc_t> f(E);
  for (int64_t e = 0; e < E; ++e) f[e] = static_cast<acc_t>(count[e]) / static_cast<acc_t>(n);
  return f;
}

}  // namespace

at::Tensor load_balancing_loss(const at::Tensor& logits, const at::Tensor& topk_ids, std::string_view score) {
  check_logits(logits, "load_balancing_loss");
  const int64_t T = logits.size(0), E = logits.size(1);
  check_index_range(topk_ids, E, "load_balancing_loss", "routing.topk_ids");
  const bool softmax = score == "softmax";
  const auto acc = acc_type_of(logits.scalar_type());
  if (T == 0) return at::zeros({}, logits.options().dtype(acc));
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "moe_kernels_lb_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* lp = logits.const_data_ptr<scalar_t>();
    const kernels::Blocks blocks(T, kLossBlocks);
    std::vector<acc_t> part(static_cast<size_t>(blocks.n * E), acc_t(0));  // per-block sums of q
    at::parallel_for(0, blocks.n, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> row(E), q(E);
      for (int64_t b = b0; b < b1; ++b) {
        acc_t* s = part.data() + b * E;
        for (int64_t t = blocks.begin(b); t < blocks.end(b); ++t) {
          kernels::score_row(lp + t * E, E, softmax, row.data(), q.data());
          for (int64_t e = 0; e < E; ++e) s[e] += q[e];
        }
      }
    });
    const std::vector<acc_t> f = chosen_share<acc_t>(topk_ids, E);
    acc_t loss = 0;
    for (int64_t e = 0; e < E; ++e) {
      acc_t p = 0;
      for (int64_t b = 0; b < blocks.n; ++b) p += part[b * E + e];
      loss += f[e] * (p / static_cast<acc_t>(T));
    }
    out = new_empty_cpu({}, acc);
    *out.data_ptr<acc_t>() = loss * static_cast<acc_t>(E);
  });
  return out;
}

at::Tensor load_balancing_loss_backward(const at::Tensor& grad, const at::Tensor& logits,
                                        const at::Tensor& topk_ids, std::string_view score) {
  check_logits(logits, "load_balancing_loss_backward");
  const int64_t T = logits.size(0), E = logits.size(1);
  check_index_range(topk_ids, E, "load_balancing_loss_backward", "topk_ids");  // a guard: the ids index counts
  const bool softmax = score == "softmax";
  at::Tensor out = at::empty_like(logits);
  if (T == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "moe_kernels_lb_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* lp = logits.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const std::vector<acc_t> f = chosen_share<acc_t>(topk_ids, E);
    const acc_t c = static_cast<acc_t>(grad.item<double>()) * static_cast<acc_t>(E) / static_cast<acc_t>(T);
    at::parallel_for(0, T, 256, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> row(E), q(E);
      for (int64_t t = t0; t < t1; ++t)
        kernels::load_balancing_grad_row(lp + t * E, f.data(), c, E, softmax, row.data(), q.data(),
                                         op + t * E);
    });
  });
  return out;
}

at::Tensor z_loss(const at::Tensor& logits) {
  check_logits(logits, "z_loss");
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto acc = acc_type_of(logits.scalar_type());
  if (T == 0) return at::zeros({}, logits.options().dtype(acc));
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "moe_kernels_z_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* lp = logits.const_data_ptr<scalar_t>();
    const kernels::Blocks blocks(T, kLossBlocks);
    std::vector<acc_t> part(static_cast<size_t>(blocks.n), acc_t(0));
    at::parallel_for(0, blocks.n, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> row(E), ex(E);
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t t = blocks.begin(b); t < blocks.end(b); ++t) {
          acc_t sum;
          const acc_t lse = kernels::logsumexp_row(lp + t * E, E, row.data(), ex.data(), &sum);
          part[b] += lse * lse;
        }
    });
    acc_t sum = 0;
    for (int64_t b = 0; b < blocks.n; ++b) sum += part[b];
    out = new_empty_cpu({}, acc);
    *out.data_ptr<acc_t>() = sum / static_cast<acc_t>(T);
  });
  return out;
}

at::Tensor z_loss_backward(const at::Tensor& grad, const at::Tensor& logits) {
  check_logits(logits, "z_loss_backward");
  const int64_t T = logits.size(0), E = logits.size(1);
  at::Tensor out = at::empty_like(logits);
  if (T == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "moe_kernels_z_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* lp = logits.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t c = static_cast<acc_t>(grad.item<double>()) * acc_t(2) / static_cast<acc_t>(T);
    at::parallel_for(0, T, 256, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> row(E), ex(E);
      for (int64_t t = t0; t < t1; ++t) {
        acc_t sum;
        const acc_t lse = kernels::logsumexp_row(lp + t * E, E, row.data(), ex.data(), &sum);
        const acc_t scale = c * lse / sum;  // dL/dl_e = c * lse * softmax_e
        for (int64_t e = 0; e < E; ++e) op[t * E + e] = static_cast<scalar_t>(scale * ex[e]);
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace moe_kernels
