// Top-k selection and dispatch-plan construction on raw pointers (no torch headers).
//
// Semantics are those of moe_kernels/reference/routing.py, reproduced exactly for the integer
// outputs: top-k by score with ties to the lower expert id (ids ordered by descending score, then
// ascending id); assignments a = t*k + j; "position" keeps the first C assignments of an expert in
// token order, "score" the C with the highest score (ties: lower token); kept rows grouped by expert
// in token order, each segment padded to a multiple of pad_to.
//
// Determinism: every result depends only on token order, never on how tokens are split into blocks,
// so any thread count gives identical output.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

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
// assignments of each expert in earlier blocks (a private copy: it is advanced).
inline void keep_by_position(const int32_t* ids, int64_t t0, int64_t t1, int k, int64_t capacity,
                             int64_t* base, uint8_t* keep) {
  for (int64_t t = t0; t < t1; ++t)
    for (int j = 0; j < k; ++j) {
      const int64_t a = t * k + j;
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
