// Row-block kernels of the fused reconciliation op on raw pointers (no torch headers).
//
// Each link i has a pre-activation z_i = aux_i @ W_i ([rows, C], row-major, computed by the
// launcher with ATen's GEMM) and per-channel constants: u = (z - m[c]) * s[c] + t[c], y = act(u).
//   plain link:        m = -bias, s = 1, t = 0            (u = z + bias)
//   BatchNorm (train): m = batch mean of z, s = gamma * invstd, t = beta
// The functions below are the passes over [rows, C] that surround the GEMMs:
//   column_moments   per-channel sums of (z - shift) and (z - shift)^2   (batch statistics)
//   apply_rows       dst = src + sum_i act(u_i)           (bias/BN + act + residual in one pass)
//   bn_grad_moments  per-channel sums of gu and gu * (z - m), gu = g * act'(u)
//   bn_grad_rows     gz = A[c] * gu + B[c] * (z - m[c]) + K[c]   (written over z, in place)
//   act_grad_rows    gz = g * act'(z + bias) (over z, in place) and its column sums
// scalar_t is float or a 16-bit float type convertible to and from float (the launcher uses
// c10::BFloat16 / c10::Half); every computation is in float, sums in float over blocks of
// kBlockRows rows, added into double per block. Callers give each call a fixed row range, so the
// results do not depend on the number of threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace moe_kernels {
namespace kernels {
namespace reconcile {

enum class Act { None, Relu, Gelu, Silu };

constexpr int64_t kBlockRows = 16;

// Every pointer argument of a kernel below points to its own array (no two overlap): without the
// promise the vectoriser needs a runtime overlap check per pair and gives up past ~10 of them.
#if defined(__GNUC__) || defined(__clang__)
#define MK_RESTRICT __restrict__
#else
#define MK_RESTRICT
#endif

template <Act A>
inline float act(float u) {
  if constexpr (A == Act::Relu) {
    return u < 0.f ? 0.f : u;  // NaN passes through, as torch.relu
  } else if constexpr (A == Act::Gelu) {
    return 0.5f * u * (1.f + std::erf(u * static_cast<float>(M_SQRT1_2)));
  } else if constexpr (A == Act::Silu) {
    return u / (1.f + std::exp(-u));
  } else {
    return u;
  }
}

// d act(u) / du, times g (ATen's threshold_backward / gelu_backward / silu_backward formulas)
template <Act A>
inline float act_grad(float u, float g) {
  if constexpr (A == Act::Relu) {
    return u > 0.f ? g : 0.f;
  } else if constexpr (A == Act::Gelu) {
    const float cdf = 0.5f * (1.f + std::erf(u * static_cast<float>(M_SQRT1_2)));
    const float pdf = std::exp(-0.5f * u * u) * static_cast<float>(M_2_SQRTPI * M_SQRT1_2 * 0.5);
    return g * (cdf + u * pdf);
  } else if constexpr (A == Act::Silu) {
    const float sig = 1.f / (1.f + std::exp(-u));
    return g * sig * (1.f + u * (1.f - sig));
  } else {
    return g;
  }
}

// s1[c] += sum_r (z[r,c] - shift[c]), s2[c] += sum_r (z[r,c] - shift[c])^2 over rows [r0, r1).
// f1, f2: float scratch [C] each.
template <typename scalar_t>
inline void column_moments(const scalar_t* MK_RESTRICT z, int64_t r0, int64_t r1, int64_t C,
                           const float* MK_RESTRICT shift, float* MK_RESTRICT f1, float* MK_RESTRICT f2,
                           double* MK_RESTRICT s1, double* MK_RESTRICT s2) {
  for (int64_t b = r0; b < r1; b += kBlockRows) {
    const int64_t e = std::min(r1, b + kBlockRows);
    for (int64_t c = 0; c < C; ++c) f1[c] = f2[c] = 0.f;
    for (int64_t r = b; r < e; ++r) {
      const scalar_t* zr = z + r * C;
      for (int64_t c = 0; c < C; ++c) {
        const float d = static_cast<float>(zr[c]) - shift[c];
        f1[c] += d;
        f2[c] += d * d;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += f1[c];
      s2[c] += f2[c];
    }
  }
}

// One link term of apply_rows.
template <typename scalar_t>
struct Term {
  const scalar_t* z;
  const float* m;
  const float* s;
  const float* t;
};

template <typename src_t>
inline void load_row(const src_t* MK_RESTRICT src, int64_t C, float* MK_RESTRICT acc) {
  for (int64_t c = 0; c < C; ++c) acc[c] = static_cast<float>(src[c]);
}

template <Act A, typename scalar_t>
inline void add_term(const scalar_t* MK_RESTRICT z, const float* MK_RESTRICT m, const float* MK_RESTRICT s,
                     const float* MK_RESTRICT t, int64_t C, float* MK_RESTRICT acc) {
  for (int64_t c = 0; c < C; ++c) acc[c] += act<A>((static_cast<float>(z[c]) - m[c]) * s[c] + t[c]);
}

template <typename dst_t>
inline void store_row(const float* MK_RESTRICT acc, int64_t C, dst_t* MK_RESTRICT dst) {
  for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<dst_t>(acc[c]);
}

// dst[r, :] = (src ? src[r, :] : 0) + sum_i act(u_i[r, :]) for rows [r0, r1), summed in float in i
// order, rounded once. dst may be src (in place). acc: float scratch [C].
template <Act A, typename scalar_t, typename src_t, typename dst_t>
inline void apply_rows(const src_t* src, const Term<scalar_t>* terms, int nterms, int64_t r0, int64_t r1,
                       int64_t C, float* acc, dst_t* dst) {
  for (int64_t r = r0; r < r1; ++r) {
    if (src) {
      load_row(src + r * C, C, acc);
    } else {
      for (int64_t c = 0; c < C; ++c) acc[c] = 0.f;
    }
    for (int i = 0; i < nterms; ++i) add_term<A>(terms[i].z + r * C, terms[i].m, terms[i].s, terms[i].t, C, acc);
    store_row(acc, C, dst + r * C);
  }
}

// sg[c] += sum_r gu, sgd[c] += sum_r gu * (z - m[c]) with gu = g * act'((z - m) * s + t).
// f1, f2: float scratch [C] each.
template <Act A, typename scalar_t, typename grad_t>
inline void bn_grad_moments(const scalar_t* MK_RESTRICT z, const grad_t* MK_RESTRICT g, int64_t r0, int64_t r1,
                            int64_t C, const float* MK_RESTRICT m, const float* MK_RESTRICT s,
                            const float* MK_RESTRICT t, float* MK_RESTRICT f1, float* MK_RESTRICT f2,
                            double* MK_RESTRICT sg, double* MK_RESTRICT sgd) {
  for (int64_t b = r0; b < r1; b += kBlockRows) {
    const int64_t e = std::min(r1, b + kBlockRows);
    for (int64_t c = 0; c < C; ++c) f1[c] = f2[c] = 0.f;
    for (int64_t r = b; r < e; ++r) {
      const scalar_t* zr = z + r * C;
      const grad_t* gr = g + r * C;
      for (int64_t c = 0; c < C; ++c) {
        const float d = static_cast<float>(zr[c]) - m[c];
        const float gu = act_grad<A>(d * s[c] + t[c], static_cast<float>(gr[c]));
        f1[c] += gu;
        f2[c] += gu * d;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      sg[c] += f1[c];
      sgd[c] += f2[c];
    }
  }
}

// z[r, c] <- A[c] * gu + B[c] * (z - m[c]) + K[c], gu = g * act'((z - m) * s + t), rows [r0, r1).
template <Act Ac, typename scalar_t, typename grad_t>
inline void bn_grad_rows(scalar_t* MK_RESTRICT z, const grad_t* MK_RESTRICT g, int64_t r0, int64_t r1, int64_t C,
                         const float* MK_RESTRICT m, const float* MK_RESTRICT s, const float* MK_RESTRICT t,
                         const float* MK_RESTRICT A, const float* MK_RESTRICT B, const float* MK_RESTRICT K) {
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* zr = z + r * C;
    const grad_t* gr = g + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const float d = static_cast<float>(zr[c]) - m[c];
      const float gu = act_grad<Ac>(d * s[c] + t[c], static_cast<float>(gr[c]));
      zr[c] = static_cast<scalar_t>(A[c] * gu + B[c] * d + K[c]);
    }
  }
}

// z[r, c] <- g * act'(z + bias[c]) in place for rows [r0, r1); sb[c] += sum_r of it (the bias
// gradient; in float per block of kBlockRows, then double). fs: float scratch [C].
template <Act A, typename scalar_t, typename grad_t>
inline void act_grad_rows(scalar_t* MK_RESTRICT z, const grad_t* MK_RESTRICT g, int64_t r0, int64_t r1, int64_t C,
                          const float* MK_RESTRICT bias, float* MK_RESTRICT fs, double* MK_RESTRICT sb) {
  for (int64_t b = r0; b < r1; b += kBlockRows) {
    const int64_t e = std::min(r1, b + kBlockRows);
    for (int64_t c = 0; c < C; ++c) fs[c] = 0.f;
    for (int64_t r = b; r < e; ++r) {
      scalar_t* zr = z + r * C;
      const grad_t* gr = g + r * C;
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t gz = static_cast<scalar_t>(act_grad<A>(static_cast<float>(zr[c]) + bias[c],
                                                              static_cast<float>(gr[c])));
        zr[c] = gz;
        fs[c] += static_cast<float>(gz);
      }
    }
    for (int64_t c = 0; c < C; ++c) sb[c] += fs[c];
  }
}

// sb[c] += sum_r g[r, c] over rows [r0, r1). fs: float scratch [C].
template <typename grad_t>
inline void column_sums(const grad_t* MK_RESTRICT g, int64_t r0, int64_t r1, int64_t C, float* MK_RESTRICT fs,
                        double* MK_RESTRICT sb) {
  for (int64_t b = r0; b < r1; b += kBlockRows) {
    const int64_t e = std::min(r1, b + kBlockRows);
    for (int64_t c = 0; c < C; ++c) fs[c] = 0.f;
    for (int64_t r = b; r < e; ++r) {
      const grad_t* gr = g + r * C;
      for (int64_t c = 0; c < C; ++c) fs[c] += static_cast<float>(gr[c]);
    }
    for (int64_t c = 0; c < C; ++c) sb[c] += fs[c];
  }
}

}  // namespace reconcile
}  // namespace kernels
}  // namespace moe_kernels
