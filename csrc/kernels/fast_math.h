// exp over a row of floats, written so that gcc vectorises it at the baseline ISA (SSE2 on x86-64,
// NEON on arm64) without -ffast-math: a Cody-Waite range reduction and a degree-6 polynomial (the
// classic Cephes expf coefficients), 2^n built in the exponent bits. Within 1 ulp of the correctly
// rounded exp (checked on every float in [-100, 0]) on the range it handles, [-87.3, 0]: the
// softmax's exp(l - max) never exceeds 0. Below that range the few affected entries are recomputed
// with std::exp, so subnormal results stay right.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace moe_kernels {
namespace kernels {

inline float bits_to_float(int32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// out[i] = exp(x[i] - shift) for x[i] - shift <= 0; returns the sum of out in a fixed order
// (8 interleaved partial sums, then pairwise), the same whatever the thread count.
inline float exp_shifted_sum(const float* x, float shift, float* out, int64_t n) {
  constexpr float kLo = -87.3f;  // below: 2^n would be subnormal -> exact fallback
  int any_low = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v0 = x[i] - shift;
    any_low |= static_cast<int>(v0 < kLo);
    const float v = std::max(v0, kLo);
    const float t = v * 1.44269504088896341f + 0.5f;
    const int32_t ti = static_cast<int32_t>(t);  // truncation toward 0; floor for t < 0:
    const int32_t fi = ti - static_cast<int32_t>(static_cast<float>(ti) > t);
    const float fn = static_cast<float>(fi);
    float r = v - fn * 0.693359375f;
    r = r - fn * -2.12194440e-4f;
    const float z = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * z + r + 1.0f;
    out[i] = p * bits_to_float((fi + 127) << 23);
  }
  if (any_low)
    for (int64_t i = 0; i < n; ++i)
      if (x[i] - shift < kLo) out[i] = std::exp(x[i] - shift);
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += out[i + j];
  for (int j = 0; i + j < n; ++j) part[j] += out[i + j];
  return ((part[0] + part[4]) + (part[2] + part[6])) + ((part[1] + part[5]) + (part[3] + part[7]));
}

// The same contract in double precision (no fast path: fp64 routing is for checking, not speed).
inline double exp_shifted_sum(const double* x, double shift, double* out, int64_t n) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = std::exp(x[i] - shift);
    sum += out[i];
  }
  return sum;
}

// row[e] = upcast logits[e]; returns the largest (the shift for exp_shifted_sum).
template <typename in_t, typename acc_t>
inline acc_t upcast_row_max(const in_t* logits, int64_t E, acc_t* row) {
  acc_t m = static_cast<acc_t>(logits[0]);
  for (int64_t e = 0; e < E; ++e) {
    row[e] = static_cast<acc_t>(logits[e]);
    m = row[e] > m ? row[e] : m;
  }
  return m;
}

}  // namespace kernels
}  // namespace moe_kernels
