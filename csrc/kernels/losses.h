// Router auxiliary losses on raw pointers (no torch headers): one pass over a token's row of logits.
//
// Semantics are those of moe_kernels/reference/losses.py (fp32 math; fp64 for fp64 logits):
//   scores q_t = softmax(l_t), or sigmoid(l_t) / sum_e sigmoid(l_te) for score = "sigmoid";
//   load balancing  L = E * sum_e f_e * P_e,  P_e = mean_t q_te,  f_e = chosen share of expert e;
//   z-loss          L = mean_t logsumexp(l_t)^2.
// Sums over tokens run over a fixed partition into blocks (each block in token order, then the
// blocks in order), so results do not depend on the thread count.
#pragma once

#include <cmath>
#include <cstdint>

#include "fast_math.h"

namespace moe_kernels {
namespace kernels {

// q (acc_t[E]) = the token's scores; `row` (acc_t[E]) receives the upcast logits.
template <typename in_t, typename acc_t>
inline void score_row(const in_t* logits, int64_t E, bool softmax, acc_t* row, acc_t* q) {
  const acc_t m = upcast_row_max(logits, E, row);
  if (softmax) {
    const acc_t inv = acc_t(1) / exp_shifted_sum(row, m, q, E);
    for (int64_t e = 0; e < E; ++e) q[e] *= inv;
  } else {
    acc_t tot = 0;
    for (int64_t e = 0; e < E; ++e) {
      q[e] = acc_t(1) / (acc_t(1) + std::exp(-row[e]));
      tot += q[e];
    }
    for (int64_t e = 0; e < E; ++e) q[e] /= tot;
  }
}

// d L_lb / d logits for one token: gq_e = c * f_e (c = dL * E / T); softmax: q * (gq - <gq, q>);
// sigmoid (q = s / sum s): gs = (gq - <gq, q>) / sum s, then * s * (1 - s).
template <typename in_t, typename acc_t, typename out_t>
inline void load_balancing_grad_row(const in_t* logits, const acc_t* f, acc_t c, int64_t E, bool softmax,
                                    acc_t* row, acc_t* q, out_t* out) {
  score_row(logits, E, softmax, row, q);
  acc_t dot = 0;
  for (int64_t e = 0; e < E; ++e) dot += c * f[e] * q[e];
  if (softmax) {
    for (int64_t e = 0; e < E; ++e) out[e] = static_cast<out_t>(q[e] * (c * f[e] - dot));
  } else {
    acc_t tot = 0;
    for (int64_t e = 0; e < E; ++e) {
      row[e] = acc_t(1) / (acc_t(1) + std::exp(-row[e]));  // s
      tot += row[e];
    }
    for (int64_t e = 0; e < E; ++e) {
      const acc_t gs = (c * f[e] - dot) / tot;
      out[e] = static_cast<out_t>(gs * row[e] * (acc_t(1) - row[e]));
    }
  }
}

// logsumexp of one row; `row` (acc_t[E]) is scratch, `ex` (acc_t[E]) receives exp(l - max) and
// `*sum` their sum (so softmax_e = ex[e] / *sum).
template <typename in_t, typename acc_t>
inline acc_t logsumexp_row(const in_t* logits, int64_t E, acc_t* row, acc_t* ex, acc_t* sum) {
  const acc_t m = upcast_row_max(logits, E, row);
  *sum = exp_shifted_sum(row, m, ex, E);
  return m + std::log(*sum);
}

}  // namespace kernels
}  // namespace moe_kernels
