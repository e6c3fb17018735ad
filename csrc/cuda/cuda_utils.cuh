// Small device helpers shared by the CUDA kernels.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace raphael_ext::cuda {

// Multiprocessor count of a device, read once per device (thread-safe: a race only repeats the query).
inline int multiprocessor_count(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "raphael_ext supports CUDA devices 0..", kMaxDevices - 1);
  int count = cache[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// 16-byte (or smaller, for kVec * sizeof(T) < 16) packet of kVec elements, loaded in one instruction.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

inline bool is_aligned(const void* ptr, std::size_t bytes) {
  return reinterpret_cast<std::uintptr_t>(ptr) % bytes == 0;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum / max over the warp, valid in every lane (butterfly), for warp-uniform loops that need the result.
template <typename T>
__device__ __forceinline__ T warp_allreduce_sum(T v) {
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) v += __shfl_xor_sync(0xffffffffu, v, mask);
  return v;
}

__device__ __forceinline__ float warp_allreduce_max(float v) {
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, mask));
  return v;
}

// Sum over the block, in a fixed order (deterministic); the result is valid in thread 0.
// blockDim.x must be a multiple of 32 and at most 1024.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T warp_partials[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) warp_partials[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? warp_partials[lane] : T(0);
    v = warp_sum(v);
  }
  __syncthreads();  // warp_partials may be reused by a following call
  return v;
}

}  // namespace raphael_ext::cuda
