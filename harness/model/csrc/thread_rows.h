// Per-thread accumulation rows for the fused CPU kernels' parameter gradients.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace vwn {

// One zeroed row of `width` floats per thread, for sums each thread of an at::parallel_for accumulates alone,
// added up afterwards by `total`. Each row starts on its own 64-byte cache line with a line of padding after
// it: rows packed end to end shared a line at the boundary, and every write there by one thread evicted the
// other's copy (false sharing: half of the (2, 3) GHC write backward's time went to two such stores).
class ThreadRows {
 public:
  explicit ThreadRows(int64_t width)
      : stride_((width + 15) / 16 * 16 + 16), threads_(at::get_num_threads()), storage_(threads_ * stride_ + 16, 0.0f) {
    const auto misalignment = reinterpret_cast<std::uintptr_t>(storage_.data()) % 64;  // malloc: 16-aligned
    base_ = storage_.data() + (misalignment ? (64 - misalignment) / sizeof(float) : 0);
  }

  float* row() { return base_ + at::get_thread_num() * stride_; }  // the calling thread's
  const float* row(int64_t thread) const { return base_ + thread * stride_; }
  int64_t threads() const { return threads_; }

  float total(int64_t column) const {  // column summed over the threads' rows
    float sum = 0.0f;
    for (int64_t t = 0; t < threads_; ++t) sum += base_[t * stride_ + column];
    return sum;
  }

 private:
  int64_t stride_, threads_;
  std::vector<float> storage_;
  float* base_;
};

}  // namespace vwn
