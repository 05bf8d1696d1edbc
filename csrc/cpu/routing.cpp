// CPU launcher: fused top-k routing and dispatch-plan construction.
//
// One parallel pass over the tokens ranks each row of logits (the contract ranks by the upcast
// logit, so the choice never depends on how a backend rounds the softmax), computes the k scores
// and weights and detects non-finite rows; the plan (counting sort by expert, capacity, padding,
// slots, sources) is then built in two parallel passes over token blocks instead of the reference's
// sorts and scatters. The backward is one pass over the tokens as well.
//
// Non-finite logits: with check_values the op raises the op layer's error, naming the first bad
// element in row-major order (searched for only on that error path); without it (the sync-free
// policy) the token gets ids 0..k-1, NaN weights and, under drop_policy "score", priority -inf.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "../kernels/routing.h"
#include "checks.h"
#include "ops.h"

namespace moe_kernels {
namespace cpu {

namespace {

constexpr int64_t kBlocks = 128;  // fixed: results never depend on it, only speed does

// The plan. `local` (plan from given ids; nullptr for route, whose ids are all local) marks the
// assignments to experts of this rank: the others are never kept, count for no expert and are not
// dropped; *num_dropped counts the local assignments beyond capacity.
template <typename acc_t>
void plan_rows(const int32_t* ids, const uint8_t* local, int64_t num_local, const acc_t* top, int64_t T, int k,
               int64_t E, int64_t capacity, bool by_score, int64_t pad_to, int64_t num_rows, int32_t* counts,
               int32_t* offsets, int32_t* slots, int32_t* sources, int64_t* num_dropped) {
  using namespace kernels;
  const Blocks blocks(T, kBlocks);
  const int64_t nb = blocks.n;
  std::vector<uint8_t> keep_buf;
  const uint8_t* keep = local;
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
    histogram(local);
    keep_buf.assign(static_cast<size_t>(T) * k, 1);
    const std::vector<int64_t> zero(E, 0);
    if (!by_score) {
      const std::vector<int64_t> base = block_bases(zero);
      at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          std::vector<int64_t> next(base.begin() + b * E, base.begin() + (b + 1) * E);
          keep_by_position(ids, local, blocks.begin(b), blocks.end(b), k, capacity, next.data(), keep_buf.data());
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
            for (int j = 0; j < k; ++j)
              if (!local || local[t * k + j]) perm[next[ids[t * k + j]]++] = t * k + j;
        }
      });
      at::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e) {
          if (total[e] <= capacity) continue;
          std::vector<int64_t> members(perm.begin() + start[e], perm.begin() + start[e + 1]);
          keep_by_score(top, members, capacity, keep_buf.data());
        }
      });
      if (local)  // keep_buf starts all-ones: the assignments of no local expert are not kept
        for (int64_t a = 0; a < T * k; ++a) keep_buf[a] &= local[a];
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
  // before any row is written: sources has num_rows entries
  TORCH_CHECK(off <= num_rows, "moe_kernels cpu route: the plan needs ", off, " rows but num_rows is ", num_rows);
  const std::vector<int64_t> base = block_bases(seg_start);
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      std::vector<int64_t> next(base.begin() + b * E, base.begin() + (b + 1) * E);
      assign_slots(ids, keep, blocks.begin(b), blocks.end(b), k, next.data(), slots, sources);
    }
  });
  *num_dropped = num_local - kept;
}

using RouteOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// route's work for route and task_route. With stop_on_nonfinite, a row holding NaN or inf stops
// the work and sets *nonfinite (the caller raises the error naming its argument); otherwise such a
// token follows the sync-free semantics.
RouteOut route_impl(const at::Tensor& logits, int64_t k, std::string_view score, bool renormalize,
                    int64_t capacity, std::string_view drop_policy, int64_t pad_to, int64_t num_rows,
                    bool stop_on_nonfinite, bool* nonfinite) {
  check_logits(logits, "route");
  TORCH_CHECK(score == "softmax" || score == "sigmoid", "moe_kernels cpu route: bad score ", score);
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E && pad_to >= 1 && num_rows >= 0, "moe_kernels cpu route: bad k, pad_to or num_rows");
  const auto acc_type = acc_type_of(logits.scalar_type());
  const bool softmax = score == "softmax";
  const bool by_score = capacity >= 0 && drop_policy == "score";

  at::Tensor ids = new_empty_cpu({T, k}, at::kInt);
  at::Tensor weights = new_empty_cpu({T, k}, acc_type);
  at::Tensor counts = new_empty_cpu({E}, at::kInt), offsets = new_empty_cpu({E + 1}, at::kInt);
  at::Tensor slots = new_empty_cpu({T, k}, at::kInt), sources = new_empty_cpu({num_rows}, at::kInt);
  std::fill_n(sources.data_ptr<int32_t>(), num_rows, -1);
  int64_t dropped = 0;
  std::atomic<bool> any_bad{false};
  // the non-finite tokens, for the "score" policy's priorities (the only consumer)
  std::vector<uint8_t> bad(by_score ? static_cast<size_t>(T) : 0, 0);
  uint8_t* badp = by_score ? bad.data() : nullptr;

  // pass 1, per token: upcast, finiteness, top-k by logit, scores, weights
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "moe_kernels_route", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* lp = logits.const_data_ptr<scalar_t>();
    int32_t* idp = ids.data_ptr<int32_t>();
    acc_t* wp = weights.data_ptr<acc_t>();
    at::parallel_for(0, T, 256, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> row(static_cast<size_t>(E)), ex(static_cast<size_t>(E));
      for (int64_t t = t0; t < t1; ++t)
        if (!kernels::route_row(lp + t * E, E, static_cast<int>(k), softmax, renormalize, row.data(), ex.data(),
                                idp + t * k, wp + t * k)) {
          any_bad.store(true, std::memory_order_relaxed);
          if (stop_on_nonfinite) return;  // the caller raises
          if (badp) badp[t] = 1;
        }
    });
  });
  *nonfinite = any_bad.load();
  if (*nonfinite && stop_on_nonfinite) return {};

  // pass 2: the plan. The "score" drop policy ranks assignments of different tokens by their score,
  // so it takes the scores from ATen's softmax / sigmoid, exactly as the reference does: integer
  // outputs then agree bit for bit. A non-finite token's priority is -inf.
  AT_DISPATCH_FLOATING_TYPES(acc_type, "moe_kernels_route_plan", [&] {
    at::Tensor top;
    if (by_score) {
      const at::Tensor lf = logits.to(acc_type);
      top = (softmax ? at::softmax(lf, -1) : at::sigmoid(lf)).gather(1, ids.to(at::kLong)).contiguous();
      if (*nonfinite) {
        scalar_t* tp = top.data_ptr<scalar_t>();
        for (int64_t t = 0; t < T; ++t)
          if (badp[t])
            for (int64_t j = 0; j < k; ++j) tp[t * k + j] = -std::numeric_limits<scalar_t>::infinity();
      }
    }
    plan_rows<scalar_t>(ids.const_data_ptr<int32_t>(), nullptr, T * k,
                        by_score ? top.const_data_ptr<scalar_t>() : nullptr, T, static_cast<int>(k), E, capacity,
                        by_score, pad_to, num_rows, counts.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(),
                        slots.data_ptr<int32_t>(), sources.data_ptr<int32_t>(), &dropped);
  });
  at::Tensor num_dropped = new_empty_cpu({}, at::kLong);
  *num_dropped.data_ptr<int64_t>() = dropped;
  return {weights, ids, counts, offsets, slots, sources, num_dropped};
}

}  // namespace

RouteOut route(const at::Tensor& logits, int64_t k, std::string_view score, bool renormalize, int64_t capacity,
               std::string_view drop_policy, int64_t pad_to, int64_t num_rows, bool check_values) {
  bool nonfinite = false;
  RouteOut out = route_impl(logits, k, score, renormalize, capacity, drop_policy, pad_to, num_rows, check_values,
                            &nonfinite);
  if (nonfinite && check_values) {
    int64_t i = 0, j = 0;
    first_nonfinite(logits, &i, &j);
    fail_nonfinite("route", "logits", i, j);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan(
    const at::Tensor& topk_ids, const at::Tensor& priority, int64_t num_experts, int64_t capacity,
    std::string_view drop_policy, int64_t pad_to, int64_t num_rows) {
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.is_contiguous() && topk_ids.scalar_type() == at::kInt &&
                  topk_ids.device().is_cpu(),
              "moe_kernels cpu plan: topk_ids must be a contiguous int32 [T, k] CPU tensor");
  TORCH_CHECK(priority.sizes() == topk_ids.sizes() && priority.is_contiguous() &&
                  (priority.scalar_type() == at::kFloat || priority.scalar_type() == at::kDouble),
              "moe_kernels cpu plan: priority must be a contiguous fp32 or fp64 tensor shaped like topk_ids");
  const int64_t T = topk_ids.size(0), k = topk_ids.size(1), E = num_experts;
  TORCH_CHECK(k >= 1 && E >= 1 && pad_to >= 1 && num_rows >= 0, "moe_kernels cpu plan: bad k, num_experts, "
              "pad_to or num_rows");
  const bool by_score = capacity >= 0 && drop_policy == "score";
  const int32_t* ids = topk_ids.const_data_ptr<int32_t>();
  // which assignments are local; ids of other ranks (-1, >= E) never index an expert's counters
  std::vector<uint8_t> local(static_cast<size_t>(T * k));
  int64_t num_local = 0;
  for (int64_t a = 0; a < T * k; ++a) {
    local[a] = ids[a] >= 0 && ids[a] < E ? 1 : 0;
    num_local += local[a];
  }
  at::Tensor counts = new_empty_cpu({E}, at::kInt), offsets = new_empty_cpu({E + 1}, at::kInt);
  at::Tensor slots = new_empty_cpu({T, k}, at::kInt), sources = new_empty_cpu({num_rows}, at::kInt);
  std::fill_n(sources.data_ptr<int32_t>(), num_rows, -1);
  int64_t dropped = 0;
  AT_DISPATCH_FLOATING_TYPES(priority.scalar_type(), "moe_kernels_plan", [&] {
    std::vector<scalar_t> prio;
    if (by_score) {  // NaN and negative priorities rank as -inf (the contract's plan semantics)
      const scalar_t* p = priority.const_data_ptr<scalar_t>();
      prio.resize(static_cast<size_t>(T * k));
      for (int64_t a = 0; a < T * k; ++a)
        prio[a] = p[a] >= scalar_t(0) ? p[a] : -std::numeric_limits<scalar_t>::infinity();
    }
    plan_rows<scalar_t>(ids, local.data(), num_local, by_score ? prio.data() : nullptr, T, static_cast<int>(k), E,
                        capacity, by_score, pad_to, num_rows, counts.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(),
                        slots.data_ptr<int32_t>(), sources.data_ptr<int32_t>(), &dropped);
  });
  at::Tensor num_dropped = new_empty_cpu({}, at::kLong), num_nonlocal = new_empty_cpu({}, at::kLong);
  *num_dropped.data_ptr<int64_t>() = dropped;
  *num_nonlocal.data_ptr<int64_t>() = T * k - num_local;
  return {counts, offsets, slots, sources, num_dropped, num_nonlocal};
}

at::Tensor route_backward(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& topk_ids,
                          std::string_view score, bool renormalize) {
  check_logits(logits, "route_backward");
  TORCH_CHECK(grad_weights.dim() == 2 && topk_ids.dim() == 2, "moe_kernels cpu route_backward: grad_weights and "
              "topk_ids must be [T, k]");
  const int64_t T = logits.size(0), E = logits.size(1), k = topk_ids.size(1);
  const auto acc_type = acc_type_of(logits.scalar_type());
  TORCH_CHECK(grad_weights.is_contiguous() && topk_ids.is_contiguous() && grad_weights.size(0) == T &&
                  grad_weights.size(1) == k && topk_ids.size(0) == T && topk_ids.scalar_type() == at::kInt,
              "moe_kernels cpu route_backward: bad grad_weights or topk_ids");
  check_index_range(topk_ids, E, "route_backward", "topk_ids");  // a guard: the ids index the logits' rows
  const at::Tensor g = as_dtype(grad_weights, acc_type);
  at::Tensor out = new_empty_cpu({T, E}, logits.scalar_type());
  const bool softmax = score == "softmax";
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "moe_kernels_route_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* lp = logits.const_data_ptr<scalar_t>();
    const int32_t* idp = topk_ids.const_data_ptr<int32_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 256, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> row(static_cast<size_t>(E)), p(static_cast<size_t>(E)), top(static_cast<size_t>(k)),
          gk(static_cast<size_t>(k));
      for (int64_t t = t0; t < t1; ++t) {
        std::copy(gp + t * k, gp + (t + 1) * k, gk.begin());
        kernels::route_grad_row(lp + t * E, idp + t * k, gk.data(), E, static_cast<int>(k), softmax, renormalize,
                                row.data(), p.data(), top.data(), op + t * E);
      }
    });
  });
  return out;
}

namespace {

// The tokens of each task, in token order (a counting sort); undefined for a task without tokens.
std::vector<at::Tensor> rows_by_task(const at::Tensor& task_ids, int64_t M) {
  const int64_t T = task_ids.size(0);
  const at::Tensor tids = task_ids.to(at::kLong).contiguous();
  const int64_t* tp = tids.const_data_ptr<int64_t>();
  std::vector<int64_t> start(M + 1, 0);
  for (int64_t t = 0; t < T; ++t) ++start[tp[t] + 1];
  for (int64_t m = 0; m < M; ++m) start[m + 1] += start[m];
  at::Tensor order = at::empty({T}, tids.options());
  int64_t* op = order.data_ptr<int64_t>();
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  for (int64_t t = 0; t < T; ++t) op[next[tp[t]]++] = t;
  std::vector<at::Tensor> rows(M);
  for (int64_t m = 0; m < M; ++m)
    if (start[m + 1] > start[m]) rows[m] = order.slice(0, start[m], start[m + 1]);
  return rows;
}

// logits[t] = x[t] @ router_weight[task(t)], in x's dtype, with the same ATen GEMM per task as the
// reference (so the logits, and the plan built from them, agree bit for bit)
at::Tensor task_logits(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& task_ids,
                       int64_t batch_task) {
  if (batch_task >= 0) return at::mm(x, w[batch_task]);
  at::Tensor logits = at::empty({x.size(0), w.size(2)}, x.options());
  const std::vector<at::Tensor> rows = rows_by_task(*task_ids, w.size(0));
  for (size_t m = 0; m < rows.size(); ++m)
    if (rows[m].defined()) logits.index_copy_(0, rows[m], at::mm(x.index_select(0, rows[m]), w[m]));
  return logits;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
task_route(const at::Tensor& x, const at::Tensor& router_weight, const std::optional<at::Tensor>& task_ids,
           int64_t batch_task, int64_t k, std::string_view score, bool renormalize, int64_t capacity,
           std::string_view drop_policy, int64_t pad_to, int64_t num_rows, bool check_values) {
  TORCH_CHECK(x.dim() == 2 && router_weight.dim() == 3 && x.is_contiguous() && router_weight.is_contiguous(),
              "moe_kernels cpu task_route: x must be [T, d] and router_weight [M, d, E], contiguous");
  TORCH_CHECK(batch_task >= 0 || task_ids.has_value(), "moe_kernels cpu task_route: no task ids");
  TORCH_CHECK(batch_task < router_weight.size(0), "moe_kernels cpu task_route: batch_task out of range");
  if (task_ids.has_value()) check_index_range(*task_ids, router_weight.size(0), "task_route", "task_ids");
  const at::Tensor logits = task_logits(x, router_weight, task_ids, batch_task);
  bool nonfinite = false;
  auto [w, ids, counts, offsets, slots, sources, dropped] = route_impl(
      logits, k, score, renormalize, capacity, drop_policy, pad_to, num_rows, check_values, &nonfinite);
  if (nonfinite && check_values) {  // name the input that made them: x, else the router product
    int64_t i = 0, j = 0;
    if (first_nonfinite(x, &i, &j)) fail_nonfinite("task_route", "x", i, j);
    first_nonfinite(logits, &i, &j);
    fail_nonfinite("task_route", "router_weight (the router logits x @ router_weight)", i, j);
  }
  return {logits, w, ids, counts, offsets, slots, sources, dropped};
}

std::tuple<at::Tensor, at::Tensor> task_route_backward(const std::optional<at::Tensor>& grad_logits,
                                                       const std::optional<at::Tensor>& grad_weights,
                                                       const at::Tensor& x, const at::Tensor& router_weight,
                                                       const std::optional<at::Tensor>& task_ids,
                                                       int64_t batch_task, const at::Tensor& logits,
                                                       const at::Tensor& topk_ids, std::string_view score,
                                                       bool renormalize) {
  TORCH_CHECK(batch_task >= 0 || task_ids.has_value(), "moe_kernels cpu task_route_backward: no task ids");
  TORCH_CHECK(batch_task < router_weight.size(0), "moe_kernels cpu task_route_backward: batch_task out of range");
  if (batch_task < 0) check_index_range(*task_ids, router_weight.size(0), "task_route_backward", "task_ids");
  const auto acc_type = acc_type_of(logits.scalar_type());
  at::Tensor g = at::zeros(logits.sizes(), logits.options().dtype(acc_type));
  if (grad_logits.has_value()) g.add_(grad_logits->to(acc_type));
  if (grad_weights.has_value()) g.add_(route_backward(*grad_weights, logits, topk_ids, score, renormalize).to(acc_type));
  g = g.to(x.scalar_type());
  at::Tensor gw = at::zeros_like(router_weight);
  if (batch_task >= 0) {
    at::Tensor gw_task = gw[batch_task];
    at::mm_out(gw_task, x.t(), g);
    return {at::mm(g, router_weight[batch_task].t()), gw};
  }
  at::Tensor gx = at::empty_like(x);
  const std::vector<at::Tensor> rows = rows_by_task(*task_ids, router_weight.size(0));
  for (size_t m = 0; m < rows.size(); ++m) {
    if (!rows[m].defined()) continue;
    const at::Tensor gm = g.index_select(0, rows[m]);
    gx.index_copy_(0, rows[m], at::mm(gm, router_weight[m].t()));
    at::Tensor gw_task = gw[m];
    at::mm_out(gw_task, x.index_select(0, rows[m]).t(), gm);
  }
  return {gx, gw};
}

}  // namespace cpu
}  // namespace moe_kernels
