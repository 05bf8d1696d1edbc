// Row gather / weighted gather-sum kernels on raw pointers (of torch, only c10's BFloat16 type).
//
// dispatch:      out[r] = x[sources[r]] (bit-exact copy), zero where sources[r] == -1.
// gather_sum:    out[t] = sum_j w[t,j] * y[slots[t,j]] over slots >= 0, accumulated in acc_t in j
//                order (w == nullptr: unit weights), rounded once to scalar_t. Built with
//                -ffp-contract=off, this is the reference's exact sequence of roundings.
// scatter_rows:  gy[r] = w[a] * g[a / k] for the assignment a that row r holds (each row written
//                once), zero for rows that hold none.
// weight_grad:   gw[t,j] = <g[t], y[slots[t,j]]> in acc_t, 0 when dropped.
// assigned_rows: out[i] = g[inv[lo+i] / k] for the rows of one expert segment (unweighted; zero
//                for rows that hold no assignment), the fused moe_mlp backward's per-expert input.
// weigh_rows:    the fused backward's gate step on one segment: gw[a] = <u[i], h[i]> in acc_t (the
//                gate-weight gradient: <g, act(z) W2 + b2> = <g W2^T, act(z)> + <g, b2>, the
//                second term only with a bias b2), then g[i] *= w[a] and u[i] *= w[a], each rounded
//                once to scalar_t.
#pragma once

#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>

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

// Element loads/stores for the weighing loops. bf16 goes through its bits (a shift up, and
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

template <typename scalar_t, typename w_t, typename acc_t>
inline void weigh_rows(const int64_t* inv, const w_t* w, int64_t lo, int64_t n, const scalar_t* h,
                       int64_t dh, scalar_t* u, scalar_t* g, int64_t dg, const scalar_t* b2 /* nullable */,
                       w_t* gw /* nullable */) {
  using E = Elem<scalar_t, acc_t>;
  constexpr int kLanes = 8;  // independent partial sums: a fixed order that gcc can vectorise
  for (int64_t i = 0; i < n; ++i) {
    const int64_t a = inv[lo + i];
    if (a < 0) continue;  // padding row: g is already zero, and so is u = g W2^T
    scalar_t* ui = u + i * dh;
    scalar_t* gi = g + i * dg;
    if (gw) {
      acc_t part[kLanes] = {};
      const scalar_t* hi = h + i * dh;
      int64_t c = 0;
      for (; c + kLanes <= dh; c += kLanes)
        for (int j = 0; j < kLanes; ++j) part[j] += E::load(ui, c + j) * E::load(hi, c + j);
      for (; c < dh; ++c) part[0] += E::load(ui, c) * E::load(hi, c);
      if (b2) {
        int64_t cb = 0;
        for (; cb + kLanes <= dg; cb += kLanes)
          for (int j = 0; j < kLanes; ++j) part[j] += E::load(gi, cb + j) * E::load(b2, cb + j);
        for (; cb < dg; ++cb) part[0] += E::load(gi, cb) * E::load(b2, cb);
      }
      acc_t dot = acc_t(0);
      for (int j = 0; j < kLanes; ++j) dot += part[j];
      gw[a] = static_cast<w_t>(dot);
    }
    const acc_t wa = static_cast<acc_t>(w[a]);
    for (int64_t c = 0; c < dh; ++c) E::store(ui, c, E::load(ui, c) * wa);
    for (int64_t c = 0; c < dg; ++c) E::store(gi, c, E::load(gi, c) * wa);
  }
}

}  // namespace kernels
}  // namespace moe_kernels
