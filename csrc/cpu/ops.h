// Declarations of every CPU launcher: the CPU implementations of the moe_kernels_C operators, one
// function per schema of csrc/registration.cpp (same name, same argument order; register_cpu.cpp
// registers them under the CPU dispatch key), plus the few helpers launchers share.
//
// Types follow the schemas: Tensor -> const at::Tensor&, Tensor? -> const std::optional<at::Tensor>&,
// Tensor[] in -> at::TensorList, Tensor[] out -> std::vector<at::Tensor>, str -> std::string_view,
// float -> double, int -> int64_t. An output that is not needed (a need_* flag is false) or has no
// input to belong to (an absent bias or BN affine) is an undefined tensor: Python receives None.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

namespace moe_kernels {
namespace cpu {

// Shared by the launchers: the accumulation dtype (fp64 for fp64 input, fp32 otherwise) and the
// shape check on a [T, E] logits tensor.
inline at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A new uninitialised CPU tensor straight from the CPU allocator: at::empty's CPU kernel without
// the trip through the dispatcher (a few hundred ns per output, much of a small call's cost).
inline at::Tensor new_empty_cpu(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_cpu(sizes, dtype);
}

// t in dtype: t itself when it already is (no dispatcher call), else a converted copy
inline at::Tensor as_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

inline void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.device().is_cpu(), "moe_kernels cpu ",
              op, ": logits must be a contiguous 2-D CPU tensor");
}

// ---- routing (routing.cpp)

// -> (topk_weights, topk_ids, counts, offsets, slots, sources, num_dropped). check_values: a
// non-finite logit raises (the op layer's message, naming 'logits'); without it such a token gets
// ids 0..k-1, NaN weights and, under drop_policy "score", priority -inf.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route(
    const at::Tensor& logits, int64_t k, std::string_view score, bool renormalize, int64_t capacity,
    std::string_view drop_policy, int64_t pad_to, int64_t num_rows, bool check_values);
// The plan of given ids (route's plan; ids -1 and >= num_experts are not local: slot -1, counted in
// num_nonlocal). priority ranks under drop_policy "score" (NaN and negative rank as -inf).
// -> (counts, offsets, slots, sources, num_dropped, num_nonlocal)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan(
    const at::Tensor& topk_ids, const at::Tensor& priority, int64_t num_experts, int64_t capacity,
    std::string_view drop_policy, int64_t pad_to, int64_t num_rows);
// d loss / d logits (in the logits' dtype) from d loss / d topk_weights
at::Tensor route_backward(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& topk_ids,
                          std::string_view score, bool renormalize);
// Task-conditioned routing: logits[t] = x[t] @ router_weight[task(t)] (one task for the batch when
// batch_task >= 0), then route. -> (logits, then route's outputs)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
task_route(const at::Tensor& x, const at::Tensor& router_weight, const std::optional<at::Tensor>& task_ids,
           int64_t batch_task, int64_t k, std::string_view score, bool renormalize, int64_t capacity,
           std::string_view drop_policy, int64_t pad_to, int64_t num_rows, bool check_values);
// -> (grad_x, grad_router_weight)
std::tuple<at::Tensor, at::Tensor> task_route_backward(const std::optional<at::Tensor>& grad_logits,
                                                       const std::optional<at::Tensor>& grad_weights,
                                                       const at::Tensor& x, const at::Tensor& router_weight,
                                                       const std::optional<at::Tensor>& task_ids,
                                                       int64_t batch_task, const at::Tensor& logits,
                                                       const at::Tensor& topk_ids, std::string_view score,
                                                       bool renormalize);

// ---- dispatch / combine (permute.cpp)

// The inverse of slots [T, k] over N rows: the flat assignment t*k + j that each row holds, or -1
// (padding, or no assignment). Used by combine's and the fused layer's backward; slots must be
// in [-1, N).
std::vector<int64_t> row_assignments(const at::Tensor& slots, int64_t N);
at::Tensor dispatch(const at::Tensor& x, const at::Tensor& slots, const at::Tensor& sources);
at::Tensor dispatch_backward(const at::Tensor& grad_out, const at::Tensor& slots);
at::Tensor combine(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& slots);
// combine without its value checks, for callers that made them (the fused moe_mlp)
at::Tensor combine_rows(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& slots);
// dispatch_backward without its value checks (the fused moe_mlp backward)
at::Tensor gather_rows_sum(const at::Tensor& grad_out, const at::Tensor& slots);
// -> (grad_y, grad_weights), undefined where not needed
std::tuple<at::Tensor, at::Tensor> combine_backward(const at::Tensor& grad_out, const at::Tensor& y,
                                                    const at::Tensor& weights, const at::Tensor& slots,
                                                    bool need_y, bool need_weights);

// ---- expert compute (grouped.cpp)

at::Tensor grouped_gemm(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& w);
// -> (grad_x, grad_w), undefined where not needed
std::tuple<at::Tensor, at::Tensor> grouped_gemm_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                         const at::Tensor& offsets, const at::Tensor& w,
                                                         bool need_x, bool need_w);
// -> (out, z): z = x @ w1 + b1, the pre-activation kept for backward
std::tuple<at::Tensor, at::Tensor> grouped_mlp(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& w1,
                                               const at::Tensor& w2, const std::optional<at::Tensor>& b1,
                                               const std::optional<at::Tensor>& b2, std::string_view activation);
// -> (gx, gw1, gw2, gb1, gb2) (bias gradients undefined without biases)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grouped_mlp_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& z, const at::Tensor& offsets,
    const at::Tensor& w1, const at::Tensor& w2, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& b2, std::string_view activation);

// The whole expert layer in one op: out = combine(grouped_mlp(dispatch(x))) -> (out [T, d_out], z [N, h1]).
// The dispatched rows and the expert outputs are per-expert scratch, not kept: backward gathers x
// again and takes the gate-weight gradient as <g W2^T, act(z)>, so only z is saved.
std::tuple<at::Tensor, at::Tensor> moe_mlp(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& slots,
                                           const at::Tensor& sources, const at::Tensor& offsets,
                                           const at::Tensor& w1, const at::Tensor& w2,
                                           const std::optional<at::Tensor>& b1,
                                           const std::optional<at::Tensor>& b2, std::string_view activation);
// -> (gx, g_weights, gw1, gw2, gb1, gb2) (undefined where not needed or absent)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_mlp_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& z, const at::Tensor& weights,
    const at::Tensor& slots, const at::Tensor& sources, const at::Tensor& offsets, const at::Tensor& w1,
    const at::Tensor& w2, const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& b2,
    std::string_view activation, bool need_x, bool need_weights, bool need_params);

// ---- router losses (losses.cpp): fp32 (fp64) scalars; backward in the logits' dtype

at::Tensor load_balancing_loss(const at::Tensor& logits, const at::Tensor& topk_ids, std::string_view score);
at::Tensor load_balancing_loss_backward(const at::Tensor& grad, const at::Tensor& logits,
                                        const at::Tensor& topk_ids, std::string_view score);
at::Tensor z_loss(const at::Tensor& logits);
at::Tensor z_loss_backward(const at::Tensor& grad, const at::Tensor& logits);

// ---- detached reconciliation (reconcile.cpp)

// out = main + sum_i act(norm_i(aux_i @ W_i + b_i)) over [N, C] rows (main may be absent: the links
// alone); norm_i is a training-mode BatchNorm with batch_norm (bn_weight / bn_bias: [L, C] or
// absent). -> (out, stats [L, 3, C] fp32: batch mean of z + b, inv-std, biased variance; [0, 3, C]
// without batch_norm)
std::tuple<at::Tensor, at::Tensor> reconcile(const std::optional<at::Tensor>& main, at::TensorList aux,
                                             at::TensorList weights, at::TensorList bias,
                                             std::string_view activation, bool batch_norm,
                                             const std::optional<at::Tensor>& bn_weight,
                                             const std::optional<at::Tensor>& bn_bias, double eps);
// -> (grad weights, grad biases (an empty list without biases), grad bn_weight [L, C], grad bn_bias
// [L, C] (undefined unless batch_norm and the parameter is given)); recomputes aux_i @ W_i, keeps
// nothing
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor> reconcile_backward(
    const at::Tensor& grad_out, at::TensorList aux, at::TensorList weights, at::TensorList bias,
    std::string_view activation, bool batch_norm, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const std::optional<at::Tensor>& stats);

// workspace_bytes / workspace_release: workspace.h

}  // namespace cpu
}  // namespace moe_kernels
