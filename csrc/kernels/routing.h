// Top-k selection and dispatch-plan construction on raw pointers (no torch headers).
//
// Semantics are those of moe_kernels/reference/routing.py, reproduced exactly for the integer
// outputs: top-k by score with ties to the lower expert id (ids ordered by descending score, then
// ascending id); assignments a = t*k + j; "position" keeps the first C assignments of an expert in
// token order, "score" the C with the highest score (ties: lower token); kept rows grouped by expert
// in token order, each segment padded to a multiple of pad_to. A token whose logits are not all
// finite routes to experts 0..k-1 with NaN weights and, under "score", the lowest priority (-inf).
//
// Determinism: every result depends only on token order, never on how tokens are split into blocks,
// so any thread count gives identical output.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "fast_math.h"

namespace moe_kernels {
namespace kernels {

// Top-k of one row of scores, descending; a later (higher-id) score must be strictly greater to
// displace an earlier one, which gives ties to the lower id.
template <typename acc_t>
inline void topk_row(const acc_t* s, int64_t E, int k, int32_t* ids, acc_t* vals) {
  int n = 0;
  for (int64_t e = 0; e < E; ++e) {
    const acc_t v = s[e];
    if (n == k && !(v > vals[k - 1])) continue;
    int pos = n < k ? n++ : k - 1;
    while (pos > 0 && v > vals[pos - 1]) {
      vals[pos] = vals[pos - 1];
      ids[pos] = ids[pos - 1];
      --pos;
    }
    vals[pos] = v;
    ids[pos] = static_cast<int32_t>(e);
  }
}

// One token's routing from its logits: upcast the row into `row` (acc_t[E]), rank it (the top-k of
// the logits is the top-k of the scores: softmax and sigmoid are monotone), then compute the k
// scores and the weights. Softmax: p_e = exp(l_e - max) / sum over every expert, with `ex`
// (acc_t[E]) as scratch for the exps. Returns false when the row holds NaN or inf: the token then
// gets the ids 0, 1, ..., k-1 and k NaN weights (the sync-free semantics of a non-finite token;
// its drop priority, -inf, is the plan builder's business).
template <typename in_t, typename acc_t>
inline bool route_row(const in_t* logits, int64_t E, int k, bool softmax, bool renormalize, acc_t* row,
                      acc_t* ex, int32_t* ids, acc_t* weights) {
  int finite = 1;
  for (int64_t e = 0; e < E; ++e) {
    row[e] = static_cast<acc_t>(logits[e]);
    finite &= static_cast<int>(std::isfinite(row[e]));
  }
  if (!finite) {
    for (int j = 0; j < k; ++j) {
      ids[j] = static_cast<int32_t>(j);
      weights[j] = std::numeric_limits<acc_t>::quiet_NaN();
    }
    return false;
  }
  topk_row(row, E, k, ids, weights);
  if (softmax) {
    const acc_t sum = exp_shifted_sum(row, weights[0], ex, E);  // weights[0]: the largest logit
    for (int j = 0; j < k; ++j) weights[j] = ex[ids[j]] / sum;
  } else {
    for (int j = 0; j < k; ++j) weights[j] = acc_t(1) / (acc_t(1) + std::exp(-weights[j]));
  }
  if (renormalize) {
    acc_t sum = 0;
    for (int j = 0; j < k; ++j) sum += weights[j];
    const acc_t tiny = static_cast<acc_t>(std::numeric_limits<float>::min());
    const acc_t denom = sum > tiny ? sum : tiny;
    for (int j = 0; j < k; ++j) weights[j] /= denom;
  }
  return true;
}

// d loss / d logits of one token from d loss / d weights (g[k], overwritten) for the k chosen ids.
// `row` and `p` (acc_t[E]) and `top` (acc_t[k]) are scratch; the result goes to `out` (E entries).
template <typename in_t, typename acc_t, typename out_t>
inline void route_grad_row(const in_t* logits, const int32_t* ids, acc_t* g, int64_t E, int k, bool softmax,
                           bool renormalize, acc_t* row, acc_t* p, acc_t* top, out_t* out) {
  const acc_t m = upcast_row_max(logits, E, row);
  if (softmax) {
    const acc_t inv = acc_t(1) / exp_shifted_sum(row, m, p, E);
    for (int64_t e = 0; e < E; ++e) p[e] *= inv;
    for (int j = 0; j < k; ++j) top[j] = p[ids[j]];
  } else {
    for (int j = 0; j < k; ++j) top[j] = acc_t(1) / (acc_t(1) + std::exp(-row[ids[j]]));
  }
  if (renormalize) {  // w = top / s  =>  dL/dtop = (g - <g, w>) / s
    acc_t s = 0, gw = 0;
    for (int j = 0; j < k; ++j) s += top[j];
    const acc_t tiny = static_cast<acc_t>(std::numeric_limits<float>::min());
    s = s > tiny ? s : tiny;
    for (int j = 0; j < k; ++j) gw += g[j] * (top[j] / s);
    for (int j = 0; j < k; ++j) g[j] = (g[j] - gw) / s;
  }
  if (softmax) {  // dL/dl_e = p_e * (dense_e - <dense, p>), dense = g scattered to the chosen ids
    acc_t dot = 0;
    for (int j = 0; j < k; ++j) dot += g[j] * top[j];
    for (int64_t e = 0; e < E; ++e) out[e] = static_cast<out_t>(-(p[e] * dot));
    for (int j = 0; j < k; ++j) out[ids[j]] = static_cast<out_t>(top[j] * (g[j] - dot));
  } else {  // dL/dl_e = dense_e * s_e * (1 - s_e)
    for (int64_t e = 0; e < E; ++e) out[e] = static_cast<out_t>(acc_t(0));
    for (int j = 0; j < k; ++j) out[ids[j]] = static_cast<out_t>(g[j] * top[j] * (acc_t(1) - top[j]));
  }
}

// Blocks of consecutive tokens: the unit of parallel work for plan building.
// About `target` blocks of equal size; T = 0 gives one empty block.
struct Blocks {
  int64_t T, n, size;
  Blocks(int64_t T_, int64_t target) : T(T_) {
    const int64_t want = std::max<int64_t>(1, std::min<int64_t>(T_, target));
    size = std::max<int64_t>(1, (T_ + want - 1) / want);
    n = std::max<int64_t>(1, (T_ + size - 1) / size);
  }
  int64_t begin(int64_t b) const { return std::min(T, b * size); }
  int64_t end(int64_t b) const { return std::min(T, (b + 1) * size); }
};

// Per-block histogram of the experts chosen (keep == nullptr) or kept (keep[a] != 0).
inline void block_histogram(const int32_t* ids, const uint8_t* keep, int64_t t0, int64_t t1, int k,
                            int64_t* hist /* [E] */) {
  for (int64_t t = t0; t < t1; ++t)
    for (int j = 0; j < k; ++j) {
      const int64_t a = t * k + j;
      if (!keep || keep[a]) ++hist[ids[a]];
    }
}

// keep[a] = (rank of a inside its expert, in token order) < capacity; `base` is the number of
// assignments of each expert in earlier blocks (a private copy: it is advanced). With `local`
// (plan from given ids), an assignment to an expert not on this rank (local[a] == 0) is not kept
// and counts for no expert.
inline void keep_by_position(const int32_t* ids, const uint8_t* local, int64_t t0, int64_t t1, int k,
                             int64_t capacity, int64_t* base, uint8_t* keep) {
  for (int64_t t = t0; t < t1; ++t)
    for (int j = 0; j < k; ++j) {
      const int64_t a = t * k + j;
      if (local && !local[a]) {
        keep[a] = 0;
        continue;
      }
      keep[a] = base[ids[a]]++ < capacity ? 1 : 0;
    }
}

// Assign rows to the kept assignments of tokens [t0, t1): `next` holds, per expert, the row the
// block's first kept assignment gets (a private copy: it is advanced).
inline void assign_slots(const int32_t* ids, const uint8_t* keep, int64_t t0, int64_t t1, int k,
                         int64_t* next, int32_t* slots, int32_t* sources) {
  for (int64_t t = t0; t < t1; ++t)
    for (int j = 0; j < k; ++j) {
      const int64_t a = t * k + j;
      if (!keep || keep[a]) {
        const int64_t r = next[ids[a]]++;
        slots[a] = static_cast<int32_t>(r);
        sources[r] = static_cast<int32_t>(t);
      } else {
        slots[a] = -1;
      }
    }
}

// "score" policy for one expert whose assignments (flat indices, token order) are `members`:
// keep the `capacity` with the highest score, ties to the lower token (= lower flat index).
template <typename acc_t>
inline void keep_by_score(const acc_t* top_scores, std::vector<int64_t>& members, int64_t capacity,
                          uint8_t* keep) {
  for (int64_t a : members) keep[a] = 0;
  const int64_t c = std::min<int64_t>(capacity, static_cast<int64_t>(members.size()));
  auto better = [&](int64_t x, int64_t y) {
    return top_scores[x] > top_scores[y] || (top_scores[x] == top_scores[y] && x < y);
  };
  std::nth_element(members.begin(), members.begin() + c, members.end(), better);
  for (int64_t i = 0; i < c; ++i) keep[members[i]] = 1;
}

}  // namespace kernels
}  // namespace moe_kernels
