// Row gather / weighted gather-sum kernels on raw pointers (no torch headers).
//
// dispatch:      out[r] = x[sources[r]] (bit-exact copy), zero where sources[r] == -1.
// gather_sum:    out[t] = sum_j w[t,j] * y[slots[t,j]] over slots >= 0, accumulated in acc_t in j
//                order (w == nullptr: unit weights), rounded once to scalar_t. Built with
//                -ffp-contract=off, this is the reference's exact sequence of roundings.
// scatter_rows:  gy[r] = w[a] * g[a / k] for the assignment a that row r holds (each row written
//                once), zero for rows that hold none.
// weight_grad:   gw[t,j] = <g[t], y[slots[t,j]]> in acc_t, 0 when dropped.
#pragma once

#include <cstdint>
#include <cstring>

namespace moe_kernels {
namespace kernels {

template <typename scalar_t>
inline void dispatch_rows(const scalar_t* x, const int32_t* sources, int64_t r0, int64_t r1, int64_t d,
                          scalar_t* out) {
  const size_t bytes = static_cast<size_t>(d) * sizeof(scalar_t);
  for (int64_t r = r0; r < r1; ++r) {
    const int32_t s = sources[r];
    if (s < 0)
      std::memset(out + r * d, 0, bytes);
    else
      std::memcpy(out + r * d, x + static_cast<int64_t>(s) * d, bytes);
  }
}

template <typename scalar_t, typename w_t, typename acc_t>
inline void gather_sum_rows(const scalar_t* y, const w_t* w, const int32_t* slots, int64_t t0, int64_t t1,
                            int k, int64_t d, acc_t* acc /* [d] scratch */, scalar_t* out) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t c = 0; c < d; ++c) acc[c] = acc_t(0);
    for (int j = 0; j < k; ++j) {
      const int32_t s = slots[t * k + j];
      if (s < 0) continue;
      const scalar_t* row = y + static_cast<int64_t>(s) * d;
      if (w) {
        const acc_t wj = static_cast<acc_t>(w[t * k + j]);
        for (int64_t c = 0; c < d; ++c) acc[c] += static_cast<acc_t>(row[c]) * wj;
      } else {
        for (int64_t c = 0; c < d; ++c) acc[c] += static_cast<acc_t>(row[c]);
      }
    }
    scalar_t* o = out + t * d;
    for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(acc[c]);
  }
}

// inv[r] = the flat assignment t*k + j that row r holds, or -1 (padding / no assignment).
template <typename scalar_t, typename w_t, typename acc_t>
inline void scatter_rows(const scalar_t* g, const w_t* w, const int64_t* inv, int64_t r0, int64_t r1,
                         int k, int64_t d, scalar_t* gy) {
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* o = gy + r * d;
    const int64_t a = inv[r];
    if (a < 0) {
      std::memset(o, 0, static_cast<size_t>(d) * sizeof(scalar_t));
      continue;
    }
    const acc_t wa = static_cast<acc_t>(w[a]);
    const scalar_t* gt = g + (a / k) * d;
    for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(static_cast<acc_t>(gt[c]) * wa);
  }
}

template <typename scalar_t, typename w_t, typename acc_t>
inline void weight_grad_rows(const scalar_t* g, const scalar_t* y, const int32_t* slots, int64_t t0,
                             int64_t t1, int k, int64_t d, w_t* gw) {
  for (int64_t t = t0; t < t1; ++t)
    for (int j = 0; j < k; ++j) {
      const int32_t s = slots[t * k + j];
      acc_t dot = acc_t(0);
      if (s >= 0) {
        const scalar_t* row = y + static_cast<int64_t>(s) * d;
        const scalar_t* gt = g + t * d;
        for (int64_t c = 0; c < d; ++c) dot += static_cast<acc_t>(gt[c]) * static_cast<acc_t>(row[c]);
      }
      gw[t * k + j] = static_cast<w_t>(dot);
    }
}

}  // namespace kernels
}  // namespace moe_kernels
