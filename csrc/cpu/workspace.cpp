// The CPU kernels' buffer pool (see workspace.h).
#include "workspace.h"

#include <ATen/EmptyTensor.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

namespace moe_kernels {
namespace cpu {

namespace {

constexpr int64_t kMinBytes = int64_t(1) << 20;  // smaller buffers: the allocator is fast enough
constexpr int64_t kAlign = 64;
constexpr int64_t kIdleCap = int64_t(64) << 20;  // idle bytes always allowed (see the miss path)

std::mutex pool_mutex;
std::vector<at::Tensor> pool;  // 1-D uint8 buffers

bool enabled() {
  static const bool on = [] {
    const char* e = std::getenv("MOE_KERNELS_CPU_WORKSPACE");
    return !(e && std::string(e) == "0");
  }();
  return on;
}

// only the pool references the buffer's storage (views handed out hold the storage too)
bool idle(const at::Tensor& buf) { return buf.unsafeGetTensorImpl()->storage().use_count() == 1; }

}  // namespace

at::Tensor workspace_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const auto dtype = c10::typeMetaToScalarType(options.dtype());
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(dtype));
  if (!options.device().is_cpu()) return at::empty(sizes, options);
  // small buffers: straight from the CPU allocator (at::empty's CPU kernel, without the dispatcher)
  if (!enabled() || bytes < kMinBytes) return at::detail::empty_cpu(sizes, dtype);
  const int64_t want = (bytes + kAlign - 1) / kAlign * kAlign;
  // The view is made under the lock: copying the pool's tensor handle does not count as a storage
  // reference, only the view does, so another thread would otherwise see the buffer as idle.
  std::lock_guard<std::mutex> lock(pool_mutex);
  at::Tensor buf;
  {
    // best fit among idle buffers at most 1.25x the request (a much larger buffer stays for a
    // request of its size instead of being pinned under a small tensor)
    const at::Tensor* best = nullptr;
    for (const auto& b : pool)
      if (b.numel() >= want && b.numel() * 4 <= want * 5 && idle(b) && (!best || b.numel() < best->numel()))
        best = &b;
    if (best) {
      buf = *best;
    } else {
      // A miss. Idle buffers too small for this request are what a growing shape leaves behind:
      // drop them. A shrinking shape leaves larger ones: drop idle buffers, largest first, while
      // the idle bytes exceed both kIdleCap and the bytes in use. A steady state never misses, so
      // this never runs there.
      pool.erase(std::remove_if(pool.begin(), pool.end(),
                                [&](const at::Tensor& b) { return b.numel() < want && idle(b); }),
                 pool.end());
      int64_t idle_bytes = 0, used_bytes = 0;
      for (const auto& b : pool) (idle(b) ? idle_bytes : used_bytes) += b.numel();
      std::sort(pool.begin(), pool.end(), [](const at::Tensor& a, const at::Tensor& b) { return a.numel() > b.numel(); });
      for (auto it = pool.begin(); it != pool.end() && idle_bytes > std::max(kIdleCap, used_bytes);) {
        if (idle(*it)) {
          idle_bytes -= it->numel();
          it = pool.erase(it);
        } else {
          ++it;
        }
      }
      buf = at::empty({want}, at::TensorOptions().dtype(at::kByte).device(at::kCPU));
      pool.push_back(buf);
    }
  }
  return buf.narrow(0, 0, bytes).view(dtype).view(sizes);
}

at::Tensor workspace_empty_like(const at::Tensor& like) { return workspace_empty(like.sizes(), like.options()); }

int64_t workspace_bytes() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  int64_t total = 0;
  for (const auto& b : pool) total += b.numel();
  return total;
}

int64_t workspace_release() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  int64_t freed = 0;
  pool.erase(std::remove_if(pool.begin(), pool.end(),
                            [&](const at::Tensor& b) {
                              if (!idle(b)) return false;
                              freed += b.numel();
                              return true;
                            }),
             pool.end());
  return freed;
}

}  // namespace cpu
}  // namespace moe_kernels
