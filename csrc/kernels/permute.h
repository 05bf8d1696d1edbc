// Row gather / weighted gather-sum kernels on raw pointers (of torch, only c10's BFloat16 type).
//
// dispatch:      out[r] = x[sources[r]] (bit-exact copy), zero where sources[r] == -1.
// gather_sum:    out[t] = sum_j w[t,j] * y[slots[t,j]] over slots >= 0, accumulated in acc_t in j
//                order (w == nullptr: unit weights), rounded once to scalar_t. Built with
//                -ffp-contract=off, this is the reference's exact sequence of roundings. A dropped
//                assignment (slot < 0) adds 0 * w: nothing for a finite weight, NaN to the whole
//                row for a non-finite one (a non-finite token's NaN weights never vanish).
// scatter_rows:  gy[r] = w[a] * g[a / k] for the assignment a that row r holds (each row written
//                once), zero for rows that hold none.
// weight_grad:   gw[t,j] = <g[t], y[slots[t,j]]> in acc_t (row_dot's order), 0 when dropped.
// assigned_rows: out[i] = g[inv[lo+i] / k] for the rows of one expert segment (unweighted; zero
//                for rows that hold no assignment), the fused moe_mlp backward's per-expert input.
// weigh_rows:    the fused backward's gate step on one segment: gw[a] = <u[i], h[i]> in acc_t (the
//                gate-weight gradient: <g, act(z) W2 + b2> = <g W2^T, act(z)> + <g, b2>, the
//                second term only with a bias b2), then g[i] *= w[a] and u[i] *= w[a], each rounded
//                once to scalar_t.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <c10/util/BFloat16.h>

namespace moe_kernels {
namespace kernels {

// Element loads/stores for the row loops. bf16 goes through its bits (a shift up, and
// round-to-nearest-even down with NaN kept quiet: c10's own conversion, written without branches)
// so gcc vectorises the loops; other types use their conversions.
template <typename scalar_t, typename acc_t>
struct Elem {
  static inline acc_t load(const scalar_t* p, int64_t i) { return static_cast<acc_t>(p[i]); }
  static inline void store(scalar_t* p, int64_t i, acc_t v) { p[i] = static_cast<scalar_t>(v); }
};

template <>
struct Elem<c10::BFloat16, float> {
  static inline float load(const c10::BFloat16* p, int64_t i) {
    const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
  static inline void store(c10::BFloat16* p, int64_t i, float v) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
  }
};


// <a, b> over n elements in acc_t: 8 independent partial sums (a fixed order, the same whatever
// the thread count, that gcc can vectorise without reassociating), then added in lane order.
template <typename scalar_t, typename acc_t>
inline acc_t row_dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  using E = Elem<scalar_t, acc_t>;
  constexpr int kLanes = 8;
  acc_t part[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int j = 0; j < kLanes; ++j) part[j] += E::load(a, c + j) * E::load(b, c + j);
  for (; c < n; ++c) part[0] += E::load(a, c) * E::load(b, c);
  acc_t dot = acc_t(0);
  for (int j = 0; j < kLanes; ++j) dot += part[j];
  return dot;
}

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
  using E = Elem<scalar_t, acc_t>;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t c = 0; c < d; ++c) acc[c] = acc_t(0);
    for (int j = 0; j < k; ++j) {
      const int32_t s = slots[t * k + j];
      if (s < 0) {
        if (w && !std::isfinite(static_cast<acc_t>(w[t * k + j])))
          for (int64_t c = 0; c < d; ++c) acc[c] += std::numeric_limits<acc_t>::quiet_NaN();
        continue;
      }
      const scalar_t* row = y + static_cast<int64_t>(s) * d;
      if (w) {
        const acc_t wj = static_cast<acc_t>(w[t * k + j]);
        for (int64_t c = 0; c < d; ++c) acc[c] += E::load(row, c) * wj;
      } else {
        for (int64_t c = 0; c < d; ++c) acc[c] += E::load(row, c);
      }
    }
    scalar_t* o = out + t * d;
    for (int64_t c = 0; c < d; ++c) E::store(o, c, acc[c]);
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
    for (int64_t c = 0; c < d; ++c) Elem<scalar_t, acc_t>::store(o, c, Elem<scalar_t, acc_t>::load(gt, c) * wa);
  }
}

template <typename scalar_t, typename w_t, typename acc_t>
inline void weight_grad_rows(const scalar_t* g, const scalar_t* y, const int32_t* slots, int64_t t0,
                             int64_t t1, int k, int64_t d, w_t* gw) {
  for (int64_t t = t0; t < t1; ++t)
    for (int j = 0; j < k; ++j) {
      const int32_t s = slots[t * k + j];
      acc_t dot = acc_t(0);
      if (s >= 0) dot = row_dot<scalar_t, acc_t>(g + t * d, y + static_cast<int64_t>(s) * d, d);
      gw[t * k + j] = static_cast<w_t>(dot);
    }
}

template <typename scalar_t>
inline void assigned_rows(const scalar_t* g, const int64_t* inv, int64_t lo, int64_t n, int k, int64_t d,
                          scalar_t* out) {
  const size_t bytes = static_cast<size_t>(d) * sizeof(scalar_t);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t a = inv[lo + i];
    if (a < 0)
      std::memset(out + i * d, 0, bytes);
    else
      std::memcpy(out + i * d, g + (a / k) * d, bytes);
  }
}

template <typename scalar_t, typename w_t, typename acc_t>
inline void weigh_rows(const int64_t* inv, const w_t* w, int64_t lo, int64_t n, const scalar_t* h,
                       int64_t dh, scalar_t* u, scalar_t* g, int64_t dg, const scalar_t* b2 /* nullable */,
                       w_t* gw /* nullable */) {
  using E = Elem<scalar_t, acc_t>;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t a = inv[lo + i];
    if (a < 0) continue;  // padding row: g is already zero, and so is u = g W2^T
    scalar_t* ui = u + i * dh;
    scalar_t* gi = g + i * dg;
    if (gw) {
      acc_t dot = row_dot<scalar_t, acc_t>(ui, h + i * dh, dh);
      if (b2) dot += row_dot<scalar_t, acc_t>(gi, b2, dg);
      gw[a] = static_cast<w_t>(dot);
    }
    const acc_t wa = static_cast<acc_t>(w[a]);
    for (int64_t c = 0; c < dh; ++c) E::store(ui, c, E::load(ui, c) * wa);
    for (int64_t c = 0; c < dg; ++c) E::store(gi, c, E::load(gi, c) * wa);
  }
}

}  // namespace kernels
}  // namespace moe_kernels
