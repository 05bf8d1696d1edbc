// run_isa(f): run f compiled for the widest vector ISA the CPU has.
//
// The extension is built for the baseline ISA (SSE2 on x86-64: 4 floats per instruction), which
// leaves the row loops (reconcile's passes, the gather-sums and the fused layer's gate step) at a
// quarter of what the machine can do. Each variant below is a `flatten` function, so f and the
// kernel templates it calls are inlined into it and vectorised for its target (inlining a baseline
// function into a wider-target one is allowed). The arithmetic is the same in every variant (no FMA
// contraction: -ffp-contract=off) and the kernels keep their partial sums in fixed lanes or per
// column, so results do not depend on the variant, only the vector width changes.
#pragma once

namespace moe_kernels {
namespace cpu {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MK_MULTI_ISA 1
template <typename F>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), flatten)) void run_avx512(const F& f) {
  f();
}
template <typename F>
__attribute__((target("avx2"), flatten)) void run_avx2(const F& f) {
  f();
}
inline int isa_level() {
  static const int level = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")
                               ? 2
                               : (__builtin_cpu_supports("avx2") ? 1 : 0);
  return level;
}
#endif
template <typename F>
__attribute__((flatten)) void run_baseline(const F& f) {
  f();
}
template <typename F>
void run_isa(const F& f) {
#ifdef MK_MULTI_ISA
  switch (isa_level()) {
    case 2: run_avx512(f); return;
    case 1: run_avx2(f); return;
    default: break;
  }
#endif
  run_baseline(f);
}

}  // namespace cpu
}  // namespace moe_kernels
