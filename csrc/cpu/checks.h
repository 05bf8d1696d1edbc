// The value checks the CPU kernels make themselves, with the exact messages of the op layer's
// validators (moe_kernels/_validation.py: check_index_range, check_offsets, check_finite), raised as
// c10::ValueError (a Python ValueError). They read the data before any work is done and run
// whatever the validation policy: on the CPU an id or offset out of range raises, it is never
// read out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace moe_kernels {
namespace cpu {

// Every value of the integer tensor t in [lo, hi), lo = -1 with allow_minus_one, else 0:
// "moe_kernels.{op}: argument '{name}' has value {bad} out of range [{lo}, {hi})", bad = the minimum
// if it is below lo, else the maximum. Nothing to check for an empty t.
void check_index_range(const at::Tensor& t, int64_t hi, const char* op, const char* name,
                       bool allow_minus_one = false);

// offsets[0] == 0, non-decreasing, offsets[-1] <= num_rows (in that order, as check_offsets).
void check_offsets(const at::Tensor& offsets, int64_t num_rows, const char* op);

// The first non-finite element of a 2-D floating tensor in row-major order: true and (i, j), or
// false when every element is finite. A full scan: for the error path.
bool first_nonfinite(const at::Tensor& t, int64_t* i, int64_t* j);

// "moe_kernels.{op}: argument '{name}' contains NaN or inf (first at index ({i}, {j}))"
[[noreturn]] void fail_nonfinite(const char* op, const char* name, int64_t i, int64_t j);

}  // namespace cpu
}  // namespace moe_kernels
