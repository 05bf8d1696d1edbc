// The kernels' value checks (see checks.h).
#include "checks.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../kernels/checks.h"
#include "isa.h"

namespace moe_kernels {
namespace cpu {

namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per parallel task of the min/max pass

template <typename T>
void min_max_parallel(const T* p, int64_t n, int64_t* mn, int64_t* mx) {
  const int64_t nc = (n + kChunk - 1) / kChunk;
  std::vector<T> lo(static_cast<size_t>(nc)), hi(static_cast<size_t>(nc));
  at::parallel_for(0, nc, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c * kChunk, e = std::min(n, b + kChunk);
      run_isa([&] { kernels::min_max(p + b, e - b, &lo[c], &hi[c]); });
    }
  });
  *mn = static_cast<int64_t>(*std::min_element(lo.begin(), lo.end()));
  *mx = static_cast<int64_t>(*std::max_element(hi.begin(), hi.end()));
}

}  // namespace

void check_index_range(const at::Tensor& t, int64_t hi, const char* op, const char* name, bool allow_minus_one) {
  if (t.numel() == 0) return;
  const at::Tensor c = t.contiguous();
  int64_t mn = 0, mx = 0;
  AT_DISPATCH_INTEGRAL_TYPES(c.scalar_type(), "moe_kernels_check_index_range", [&] {
    min_max_parallel(c.const_data_ptr<scalar_t>(), c.numel(), &mn, &mx);
  });
  const int64_t lo = allow_minus_one ? -1 : 0;
  TORCH_CHECK_VALUE(mn >= lo && mx < hi, "moe_kernels.", op, ": argument '", name, "' has value ",
                    mn < lo ? mn : mx, " out of range [", lo, ", ", hi, ")");
}

void check_offsets(const at::Tensor& offsets, int64_t num_rows, const char* op) {
  TORCH_CHECK_VALUE(offsets.numel() > 0, "moe_kernels.", op, ": argument 'offsets' must not be empty");
  const at::Tensor c = offsets.contiguous();
  AT_DISPATCH_INTEGRAL_TYPES(c.scalar_type(), "moe_kernels_check_offsets", [&] {
    const scalar_t* o = c.const_data_ptr<scalar_t>();
    const int64_t n = c.numel();
    int64_t i = 0;
    switch (kernels::offsets_problem(o, n, num_rows, &i)) {
      case 1:
        C10_THROW_ERROR(ValueError, c10::str("moe_kernels.", op, ": argument 'offsets' must start at 0, got offsets[0]=",
                                             static_cast<int64_t>(o[0])));
      case 2:
        C10_THROW_ERROR(ValueError, c10::str("moe_kernels.", op,
                                             ": argument 'offsets' must be non-decreasing, got offsets[", i, "]=",
                                             static_cast<int64_t>(o[i]), " > offsets[", i + 1, "]=",
                                             static_cast<int64_t>(o[i + 1])));
      case 3:
        C10_THROW_ERROR(ValueError, c10::str("moe_kernels.", op, ": argument 'offsets' ends at ",
                                             static_cast<int64_t>(o[n - 1]), " but the input has only ", num_rows,
                                             " rows"));
      default:
        break;
    }
  });
}

bool first_nonfinite(const at::Tensor& t, int64_t* i, int64_t* j) {
  TORCH_CHECK(t.dim() == 2, "moe_kernels cpu: first_nonfinite needs a 2-D tensor");
  const at::Tensor c = t.contiguous();
  const int64_t n = c.numel(), cols = c.size(1);
  int64_t first = -1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "moe_kernels_first_nonfinite", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (int64_t a = 0; a < n; ++a)
      if (!std::isfinite(static_cast<double>(p[a]))) {
        first = a;
        break;
      }
  });
  if (first < 0) return false;
  *i = first / cols;
  *j = first % cols;
  return true;
}

void fail_nonfinite(const char* op, const char* name, int64_t i, int64_t j) {
  C10_THROW_ERROR(ValueError, c10::str("moe_kernels.", op, ": argument '", name,
                                       "' contains NaN or inf (first at index (", i, ", ", j, "))"));
}

}  // namespace cpu
}  // namespace moe_kernels
