// CPU launcher: fused top-k routing and dispatch-plan construction.
//
// Scores come from ATen's softmax / sigmoid on the upcast logits: the very kernels the reference
// uses, so the top-k choice (and with it every integer output) is bit-identical to the reference.
// Top-k and the plan (counting sort by expert, capacity, padding, slots, sources) are built here in
// two parallel passes over token blocks instead of the reference's sorts and scatters.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "../kernels/routing.h"
#include "ops.h"

namespace moe_kernels {
namespace cpu {

namespace {

constexpr int64_t kBlocks = 128;  // fixed: results never depend on it, only speed does

template <typename acc_t>
void plan(const int32_t* ids, const acc_t* top, int64_t T, int k, int64_t E, int64_t capacity, bool by_score,
          int64_t pad_to, int32_t* counts, int32_t* offsets, int32_t* slots, int32_t* sources,
          int64_t* num_dropped) {
  using namespace kernels;
  const Blocks blocks(T, kBlocks);
  const int64_t nb = blocks.n;
  std::vector<uint8_t> keep_buf;
  const uint8_t* keep = nullptr;
  std::vector<int64_t> hist(nb * E, 0);  // per-block histograms (chosen, then kept)
  auto histogram = [&](const uint8_t* kp) {
    std::fill(hist.begin(), hist.end(), 0);
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        block_histogram(ids, kp, blocks.begin(b), blocks.end(b), k, hist.data() + b * E);
    });
  };
  // exclusive prefix over blocks, per expert, starting at start[e]
  auto block_bases = [&](const std::vector<int64_t>& start) {
    std::vector<int64_t> base(nb * E);
    for (int64_t e = 0; e < E; ++e) {
      int64_t run = start[e];
      for (int64_t b = 0; b < nb; ++b) {
        base[b * E + e] = run;
        run += hist[b * E + e];
      }
    }
    return base;
  };

  if (capacity >= 0 && T > 0) {
    histogram(nullptr);
    keep_buf.assign(static_cast<size_t>(T) * k, 1);
    const std::vector<int64_t> zero(E, 0);
    if (!by_score) {
      const std::vector<int64_t> base = block_bases(zero);
      at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          std::vector<int64_t> next(base.begin() + b * E, base.begin() + (b + 1) * E);
          keep_by_position(ids, blocks.begin(b), blocks.end(b), k, capacity, next.data(), keep_buf.data());
        }
      });
    } else {
      // counting sort of the assignments by expert (token order inside), then per over-full expert
      // a selection of the best `capacity`
      std::vector<int64_t> total(E, 0), start(E + 1, 0);
      for (int64_t b = 0; b < nb; ++b)
        for (int64_t e = 0; e < E; ++e) total[e] += hist[b * E + e];
      for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + total[e];
      const std::vector<int64_t> base = block_bases(std::vector<int64_t>(start.begin(), start.end() - 1));
      std::vector<int64_t> perm(static_cast<size_t>(T) * k);
      at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          std::vector<int64_t> next(base.begin() + b * E, base.begin() + (b + 1) * E);
          for (int64_t t = blocks.begin(b); t < blocks.end(b); ++t)
            for (int j = 0; j < k; ++j) perm[next[ids[t * k + j]]++] = t * k + j;
        }
      });
      at::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e) {
          if (total[e] <= capacity) continue;
          std::vector<int64_t> members(perm.begin() + start[e], perm.begin() + start[e + 1]);
          keep_by_score(top, members, capacity, keep_buf.data());
        }
      });
    }
    keep = keep_buf.data();
  }

  histogram(keep);
  std::vector<int64_t> seg_start(E);
  int64_t off = 0, kept = 0;
  offsets[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    int64_t c = 0;
    for (int64_t b = 0; b < nb; ++b) c += hist[b * E + e];
    counts[e] = static_cast<int32_t>(c);
    kept += c;
    seg_start[e] = off;
    off += (c + pad_to - 1) / pad_to * pad_to;
    offsets[e + 1] = static_cast<int32_t>(off);
  }
  const std::vector<int64_t> base = block_bases(seg_start);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      std::vector<int64_t> next(base.begin() + b * E, base.begin() + (b + 1) * E);
      assign_slots(ids, keep, blocks.begin(b), blocks.end(b), k, next.data(), slots, sources);
    }
  });
  *num_dropped = T * k - kept;
}

}  // namespace

std::vector<at::Tensor> route_fwd(const at::Tensor& logits, int64_t k, const std::string& score,
                                  bool renormalize, int64_t capacity, const std::string& drop_policy,
                                  int64_t pad_to, int64_t num_rows) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.device().is_cpu(),
              "moe_kernels cpu route: logits must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(score == "softmax" || score == "sigmoid", "moe_kernels cpu route: bad score ", score);
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E && pad_to >= 1, "moe_kernels cpu route: bad k or pad_to");
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor lf = logits.to(acc_type);
  const at::Tensor scores = score == "softmax" ? at::softmax(lf, -1) : at::sigmoid(lf);

  const auto i32 = logits.options().dtype(at::kInt);
  at::Tensor ids = at::empty({T, k}, i32);
  at::Tensor top = at::empty({T, k}, scores.options());
  at::Tensor weights = renormalize ? at::empty({T, k}, scores.options()) : top;
  at::Tensor counts = at::empty({E}, i32), offsets = at::empty({E + 1}, i32);
  at::Tensor slots = at::empty({T, k}, i32), sources = at::full({num_rows}, -1, i32);
  int64_t dropped = 0;

  AT_DISPATCH_FLOATING_TYPES(acc_type, "moe_kernels_route", [&] {
    const scalar_t* s = scores.data_ptr<scalar_t>();
    int32_t* idp = ids.data_ptr<int32_t>();
    scalar_t* tp = top.data_ptr<scalar_t>();
    scalar_t* wp = weights.data_ptr<scalar_t>();
    const scalar_t tiny = static_cast<scalar_t>(std::numeric_limits<float>::min());
    at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        kernels::topk_row(s + t * E, E, static_cast<int>(k), idp + t * k, tp + t * k);
        if (renormalize) {
          scalar_t sum = 0;
          for (int64_t j = 0; j < k; ++j) sum += tp[t * k + j];
          const scalar_t denom = sum > tiny ? sum : tiny;
          for (int64_t j = 0; j < k; ++j) wp[t * k + j] = tp[t * k + j] / denom;
        }
      }
    });
    plan<scalar_t>(idp, tp, T, static_cast<int>(k), E, capacity, drop_policy == "score", pad_to,
                   counts.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(), slots.data_ptr<int32_t>(),
                   sources.data_ptr<int32_t>(), &dropped);
  });
  TORCH_CHECK(offsets[E].item<int64_t>() <= num_rows, "moe_kernels cpu route: plan exceeds num_rows");
  return {weights, ids, counts, offsets, slots, sources, at::scalar_tensor(dropped, at::kLong)};
}

}  // namespace cpu
}  // namespace moe_kernels
