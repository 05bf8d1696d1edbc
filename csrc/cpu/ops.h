// Declarations of every CPU launcher (the binding file registers each one).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace moe_kernels {
namespace cpu {

// Shared by the launchers: the accumulation dtype (fp64 for fp64 input, fp32 otherwise) and the
// shape check on a [T, E] logits tensor.
inline at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.device().is_cpu(), "moe_kernels cpu ",
              op, ": logits must be a contiguous 2-D CPU tensor");
}

// -> {topk_weights, topk_ids, counts, offsets, slots, sources, num_dropped, all_finite}; when
// all_finite is false the logits hold NaN/inf and nothing else is meaningful
std::vector<at::Tensor> route_fwd(const at::Tensor& logits, int64_t k, const std::string& score,
                                  bool renormalize, int64_t capacity, const std::string& drop_policy,
                                  int64_t pad_to, int64_t num_rows);
// d loss / d logits (in the logits' dtype) from d loss / d topk_weights
at::Tensor route_bwd(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& topk_ids,
                     const std::string& score, bool renormalize);
// Task-conditioned routing: logits[t] = x[t] @ router_weight[task(t)] (one task for the batch when
// batch_task >= 0), then route_fwd. -> {logits, then route_fwd's outputs}
std::vector<at::Tensor> task_route_fwd(const at::Tensor& x, const at::Tensor& router_weight,
                                       const std::optional<at::Tensor>& task_ids, int64_t batch_task, int64_t k,
                                       const std::string& score, bool renormalize, int64_t capacity,
                                       const std::string& drop_policy, int64_t pad_to, int64_t num_rows);
// -> {grad_x, grad_router_weight}
std::tuple<at::Tensor, at::Tensor> task_route_bwd(const std::optional<at::Tensor>& grad_logits,
                                                  const std::optional<at::Tensor>& grad_weights, const at::Tensor& x,
                                                  const at::Tensor& router_weight,
                                                  const std::optional<at::Tensor>& task_ids, int64_t batch_task,
                                                  const at::Tensor& logits, const at::Tensor& topk_ids,
                                                  const std::string& score, bool renormalize);

// The inverse of slots [T, k] over N rows: the flat assignment t*k + j that each row holds, or -1
// (padding, or no assignment). Used by combine's and the fused layer's backward.
std::vector<int64_t> row_assignments(const at::Tensor& slots, int64_t N);
at::Tensor dispatch_fwd(const at::Tensor& x, const at::Tensor& slots, const at::Tensor& sources);
at::Tensor dispatch_bwd(const at::Tensor& grad_out, const at::Tensor& slots);
at::Tensor combine_fwd(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& slots);
// undefined tensors where not needed
std::tuple<at::Tensor, at::Tensor> combine_bwd(const at::Tensor& grad_out, const at::Tensor& y,
                                               const at::Tensor& weights, const at::Tensor& slots,
                                               bool need_y, bool need_w);

at::Tensor grouped_gemm_fwd(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& w);
std::tuple<at::Tensor, at::Tensor> grouped_gemm_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                                    const at::Tensor& offsets, const at::Tensor& w,
                                                    bool need_x, bool need_w);
// -> {out, z}: z = x @ w1 + b1, the pre-activation kept for backward
std::tuple<at::Tensor, at::Tensor> grouped_mlp_fwd(const at::Tensor& x, const at::Tensor& offsets,
                                                   const at::Tensor& w1, const at::Tensor& w2,
                                                   const std::optional<at::Tensor>& b1,
                                                   const std::optional<at::Tensor>& b2,
                                                   const std::string& act);
// -> {gx, gw1, gw2, gb1, gb2} (bias gradients undefined without biases)
std::vector<at::Tensor> grouped_mlp_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& z,
                                        const at::Tensor& offsets, const at::Tensor& w1, const at::Tensor& w2,
                                        const std::optional<at::Tensor>& b1,
                                        const std::optional<at::Tensor>& b2, const std::string& act);

// The whole expert layer in one op: out = combine(grouped_mlp(dispatch(x))) -> {out [T, d_out], z [N, h1]}.
// The dispatched rows and the expert outputs are per-expert scratch, not kept: backward gathers x
// again and takes the gate-weight gradient as <g W2^T, act(z)>, so only z is saved.
std::tuple<at::Tensor, at::Tensor> moe_mlp_fwd(const at::Tensor& x, const at::Tensor& weights,
                                               const at::Tensor& slots, const at::Tensor& sources,
                                               const at::Tensor& offsets, const at::Tensor& w1,
                                               const at::Tensor& w2, const std::optional<at::Tensor>& b1,
                                               const std::optional<at::Tensor>& b2, const std::string& act);
// -> {gx, g_weights, gw1, gw2, gb1, gb2} (undefined where not needed or absent)
std::vector<at::Tensor> moe_mlp_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& z,
                                    const at::Tensor& weights, const at::Tensor& slots, const at::Tensor& sources,
                                    const at::Tensor& offsets, const at::Tensor& w1, const at::Tensor& w2,
                                    const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& b2,
                                    const std::string& act, bool need_x, bool need_weights, bool need_params);

// Detached reconciliation (csrc/cpu/reconcile.cpp): out = main + sum_i act(norm_i(aux_i @ W_i + b_i)) over
// [N, C] rows (main may be absent: the links alone); norm_i is a training-mode BatchNorm with
// batch_norm (bn_weight / bn_bias: [L, C] or absent). -> {out, stats [L, 3, C] fp32: batch mean of
// z + b, inv-std, biased variance; empty without batch_norm}
std::tuple<at::Tensor, at::Tensor> reconcile_fwd(const std::optional<at::Tensor>& main,
                                                 const std::vector<at::Tensor>& aux,
                                                 const std::vector<at::Tensor>& weights,
                                                 const std::vector<at::Tensor>& bias, const std::string& act,
                                                 bool batch_norm, const std::optional<at::Tensor>& bn_weight,
                                                 const std::optional<at::Tensor>& bn_bias, double eps);
// -> {grad weights, grad biases (empty list without biases), grad bn_weight [L, C], grad bn_bias [L, C]
// (empty tensors where absent)}; recomputes aux_i @ W_i, keeps nothing
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor> reconcile_bwd(
    const at::Tensor& grad_out, const std::vector<at::Tensor>& aux, const std::vector<at::Tensor>& weights,
    const std::vector<at::Tensor>& bias, const std::string& act, bool batch_norm,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const std::optional<at::Tensor>& stats);

// Router auxiliary losses (csrc/cpu/losses.cpp): fp32 (fp64) scalars; backward in the logits' dtype.
at::Tensor load_balancing_fwd(const at::Tensor& logits, const at::Tensor& topk_ids, const std::string& score);
at::Tensor load_balancing_bwd(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& topk_ids,
                              const std::string& score);
at::Tensor z_loss_fwd(const at::Tensor& logits);
at::Tensor z_loss_bwd(const at::Tensor& grad, const at::Tensor& logits);

}  // namespace cpu
}  // namespace moe_kernels
