// A small caching pool for the CPU kernels' large buffers.
//
// A fresh multi-megabyte CPU tensor is zero pages until first touch: every step that allocates its
// big buffers anew pays a page fault per 4 KiB (measured here: 21.7 ms to clone 64 MB against 1.8 ms
// to copy into a reused buffer). The pool hands out typed views of byte buffers it keeps and reuses a
// buffer once nothing but the pool references its storage (the storage's reference count is 1), so
// a buffer still held anywhere -- saved for backward, kept as a .grad, returned to the caller -- is
// never handed out twice. Buffers under 1 MiB come from the ordinary allocator. A request with no
// idle buffer between its size and 1.25x it allocates a new one; on such a miss, idle buffers that
// are too small are freed, and so are idle ones (largest first) while the idle bytes exceed both
// 64 MiB and the bytes in use, so shapes that shrink step by step do not pile up buffers.
//
// Set MOE_KERNELS_CPU_WORKSPACE=0 to turn it off; workspace_bytes() reports what it holds and
// workspace_release() frees the idle buffers (moe_kernels.cpu_backend.workspace_bytes / empty_cache).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace moe_kernels {
namespace cpu {

at::Tensor workspace_empty(at::IntArrayRef sizes, const at::TensorOptions& options);
// same shape, dtype and device as `like`
at::Tensor workspace_empty_like(const at::Tensor& like);
// bytes of all pooled buffers (idle or in use)
int64_t workspace_bytes();
// frees the buffers nothing else references; returns the bytes freed
int64_t workspace_release();

}  // namespace cpu
}  // namespace moe_kernels
