// See output_pool.h.
#include "output_pool.h"

#include <cstdlib>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace fcl {
namespace {

constexpr int64_t kMinPooledBytes = int64_t{4} << 20;
constexpr size_t kAlignment = 64;

int64_t limit_bytes() {
  static const int64_t limit = [] {
    const char* v = std::getenv("FUSED_COSLOSS_NATIVE_POOL_MB");
    const int64_t mb = (v == nullptr || *v == '\0') ? 1024 : std::atoll(v);
    return mb > 0 ? mb << 20 : int64_t{0};
  }();
  return limit;
}

class Pool {
 public:
  void* take(int64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = 0; i < free_.size(); ++i) {
        if (free_[i].first == bytes) {
          void* p = free_[i].second;
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
          cached_ -= bytes;
          return p;
        }
      }
    }
    void* p = nullptr;
    const size_t rounded = (static_cast<size_t>(bytes) + kAlignment - 1) / kAlignment * kAlignment;
    if (posix_memalign(&p, kAlignment, rounded) != 0) p = nullptr;
    TORCH_CHECK(p != nullptr, "fused_cosloss native: out of memory allocating ", bytes, " bytes");
    return p;
  }

  // The newest buffer is kept; older ones of other sizes make room for it, oldest first.
  void give_back(void* p, int64_t bytes) {
    std::vector<void*> release;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (bytes > limit_bytes()) {
        release.push_back(p);
      } else {
        while (cached_ + bytes > limit_bytes() && !free_.empty()) {
          release.push_back(free_.front().second);
          cached_ -= free_.front().first;
          free_.erase(free_.begin());
        }
        free_.emplace_back(bytes, p);
        cached_ += bytes;
      }
    }
    for (void* q : release) std::free(q);
  }

  int64_t release_all() {
    std::vector<std::pair<int64_t, void*>> taken;
    int64_t released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      taken.swap(free_);
      released = cached_;
      cached_ = 0;
    }
    for (auto& entry : taken) std::free(entry.second);
    return released;
  }

  int64_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

 private:
  std::mutex mutex_;
  std::vector<std::pair<int64_t, void*>> free_;  // (bytes, buffer), oldest first
  int64_t cached_ = 0;
};

// Never destroyed: tensors may release their buffers during interpreter shutdown.
Pool& pool() {
  static Pool* instance = new Pool();
  return *instance;
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t size : sizes) numel *= size;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (limit_bytes() == 0 || bytes < kMinPooledBytes) return at::empty(sizes, options);
  void* p = pool().take(bytes);
  return at::from_blob(p, sizes, [bytes](void* q) { pool().give_back(q, bytes); }, options);
}

int64_t release_cached_buffers() { return pool().release_all(); }

int64_t cached_bytes() { return pool().cached(); }

}  // namespace fcl
