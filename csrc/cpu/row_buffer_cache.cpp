#include "row_buffer_cache.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <unordered_map>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace raphael_ext::cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kSmallest = size_t(1) << 20;  // below this glibc's own free lists do well

size_t limit_from_env() {
  const char* value = std::getenv("RAPHAEL_EXT_CPU_CACHE_MIB");
  if (value == nullptr || *value == '\0') return size_t(1024) << 20;
  char* end = nullptr;
  const long long mib = std::strtoll(value, &end, 10);
  TORCH_CHECK(end != value && *end == '\0' && mib >= 0 && static_cast<unsigned long long>(mib) <= (SIZE_MAX >> 20),
              "RAPHAEL_EXT_CPU_CACHE_MIB must be a number of MiB >= 0, got '", value, "'");
  return static_cast<size_t>(mib) << 20;
}

class Cache {
 public:
  static Cache& instance() {
    static Cache* cache = new Cache();  // never destroyed: tensors freed during static destruction still return here
    return *cache;
  }

  void* take(size_t bytes) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      // The smallest idle buffer that fits and wastes at most half of itself.
      auto it = idle_.lower_bound(bytes);
      if (it != idle_.end() && it->first <= 2 * bytes) {
        void* ptr = it->second;
        lent_[ptr] = it->first;
        idle_bytes_ -= it->first;
        lent_bytes_ += it->first;
        idle_.erase(it);
        report(ptr, static_cast<int64_t>(bytes));
        return ptr;
      }
    }
    const size_t size = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = nullptr;
    TORCH_CHECK(posix_memalign(&ptr, kHugePage, size) == 0, "raphael_ext: out of memory allocating ", size, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(ptr, size, MADV_HUGEPAGE);  // a hint: errors are fine
#endif
    const std::lock_guard<std::mutex> lock(mutex_);
    lent_[ptr] = size;
    lent_bytes_ += size;
    report(ptr, static_cast<int64_t>(bytes));
    return ptr;
  }

  void give_back(void* ptr, size_t bytes) {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto it = lent_.find(ptr);
    TORCH_INTERNAL_ASSERT(it != lent_.end());
    const size_t size = it->second;
    lent_.erase(it);
    lent_bytes_ -= size;
    idle_.emplace(size, ptr);
    idle_bytes_ += size;
    report(ptr, -static_cast<int64_t>(bytes));
    // Over the limit: free the largest idle buffers first (the least likely to be asked for again).
    while (idle_bytes_ > limit_ && !idle_.empty()) free_idle(std::prev(idle_.end()));
  }

  void release_idle() {
    const std::lock_guard<std::mutex> lock(mutex_);
    while (!idle_.empty()) free_idle(idle_.begin());
  }

  size_t limit() const { return limit_; }

 private:
  void free_idle(std::multimap<size_t, void*>::iterator it) {
    idle_bytes_ -= it->first;
    std::free(it->second);
    idle_.erase(it);
  }

  void report(void* ptr, int64_t bytes) const {
    c10::reportMemoryUsageToProfiler(ptr, bytes, lent_bytes_, lent_bytes_ + idle_bytes_, c10::Device(c10::kCPU));
  }

  const size_t limit_ = limit_from_env();
  std::mutex mutex_;
  std::multimap<size_t, void*> idle_;        // size -> buffer
  std::unordered_map<void*, size_t> lent_;   // buffer -> size
  size_t idle_bytes_ = 0, lent_bytes_ = 0;
};

}  // namespace

at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  Cache& cache = Cache::instance();
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(options.dtype().toScalarType());
  if (cache.limit() == 0 || bytes < kSmallest) return at::empty(sizes, options);
  void* ptr = cache.take(bytes);
  try {
    return at::from_blob(ptr, sizes, [bytes](void* p) { Cache::instance().give_back(p, bytes); }, options);
  } catch (...) {
    cache.give_back(ptr, bytes);
    throw;
  }
}

void release_idle_buffers() { Cache::instance().release_idle(); }

}  // namespace raphael_ext::cpu
