// Scans behind the kernels' value checks, on raw pointers (no torch headers): the minimum and
// maximum of an index array, and the first inconsistency of an offsets array. The launchers turn
// what they find into the op layer's messages (csrc/cpu/checks.h).
#pragma once

#include <cstdint>

namespace moe_kernels {
namespace kernels {

// min and max of p[0..n), n >= 1 (branch-free: gcc vectorises it)
template <typename T>
inline void min_max(const T* p, int64_t n, T* mn, T* mx) {
  T lo = p[0], hi = p[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = p[i] < lo ? p[i] : lo;
    hi = p[i] > hi ? p[i] : hi;
  }
  *mn = lo;
  *mx = hi;
}

// What is wrong with offsets o[0..n) (n >= 1) for an input of `rows` rows, in the order the op layer
// checks it: 1 = o[0] != 0; 2 = o[*i] > o[*i + 1] for the first such *i; 3 = o[n-1] > rows; 0 = ok.
template <typename T>
inline int offsets_problem(const T* o, int64_t n, int64_t rows, int64_t* i) {
  if (o[0] != 0) return 1;
  for (int64_t j = 0; j + 1 < n; ++j)
    if (o[j] > o[j + 1]) {
      *i = j;
      return 2;
    }
  return static_cast<int64_t>(o[n - 1]) > rows ? 3 : 0;
}

}  // namespace kernels
}  // namespace moe_kernels
