// CUDA kernels of cross_attention_mask (docs/kernels.md). Nothing here allocates [B, H, N_x, N_y].
//
// Forward (one block per tile of query rows of one sample, 4 warps, each warp owns 16 rows, or 8 rows
// on the SIMT path, 4 where 8 would exceed the GPU's shared memory per block): the block loops over the heads; all keys and values of a head sit in shared
// memory (N_y <= 128), so each row's softmax is final after one pass. Scores and P·V are tensor-core
// products (WMMA, fp32 accumulation) for float16/bfloat16 on sm_80+, SIMT fp32 FMAs for float32. The
// head mean accumulates in shared memory with no atomics (each warp owns its rows), is rounded to the
// output dtype once, and the tile's column max of the rounded values goes to a [B, N_y] buffer by
// atomicMax on the float's bits (probabilities are >= 0, so their bits order like integers). A second,
// elementwise kernel compares the map with alpha * column max. The log-sum-exp is kept for backward.
//
// Backward (SIMT, fp32 math): kernel 1, one warp per query row, recomputes P from the log-sum-exp,
// forms dP = dO·Vᵀ + dM/H, D = rowsum(P∘dP), dS = P∘(dP − D), writes dQ = scale·dS·K and keeps D.
// Kernel 2, one warp per 4 keys with dK and dV in registers, runs over a slice of the queries and
// writes its partial sums to a [splits, B, H, N_y, D] fp32 workspace; kernel 3 adds the slices in a
// fixed order. So dK and dV need no float atomics and are deterministic on a given GPU.
#include "../common/cross_attention.h"
#include "cuda_utils.cuh"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string_view>

namespace raphael_ext {
namespace {

// float32, float16, bfloat16: the dtypes of the CUDA kernels (float64 is rejected by the argument check).
#define DISPATCH_CUDA_FLOATING_TYPES(TYPE, NAME, ...)                                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                             \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                           \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

using cuda::Pack;
using cuda::warp_allreduce_max;
using cuda::warp_allreduce_sum;

constexpr char kOp[] = "cross_attention_mask";
constexpr char kBackwardOp[] = "cross_attention_mask_backward";
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kKeyChunks = kMaxTextTokens / 32;  // keys per lane in a row-wise warp loop

struct RowStrides {  // element strides of a [B, H, N, D] tensor whose last dimension is contiguous
  int64_t b, h, row;
};

RowStrides row_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

template <typename T>
struct WmmaType {
  using type = T;
};
template <>
struct WmmaType<c10::Half> {
  using type = __half;
};
template <>
struct WmmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

__host__ __device__ constexpr int round_up(int x, int multiple) { return (x + multiple - 1) / multiple * multiple; }
__host__ __device__ constexpr size_t align32(size_t bytes) { return (bytes + 31) / 32 * 32; }

// Shared-memory layout of the forward kernel, computed the same way by the launcher and the kernel.
// Row paddings keep WMMA's 32-byte fragment alignment (16-bit: +8 elements) or, on the SIMT path,
// make a column walk across rows hit different banks (+1). Buffers with disjoint lifetimes share rows:
// a warp's P (16-bit) overwrites its own Q rows once its scores exist, and its O tile (fp32) overwrites
// its own S rows once P exists, so D = 64, N_y = 77 needs 76 KiB and D = N_y = 128 needs 150 KiB.
struct ForwardSmem {
  int keys_pad;
  int ld_kv;  // K and V rows (elements)
  int ld_qp;  // Q rows, then P rows (elements)
  int ld_so;  // S rows, then O rows (floats)
  size_t k_off, v_off, qp_off, so_off, m_off, bytes;
};

__host__ __device__ inline ForwardSmem forward_smem(int keys, int head_dim, int elem_bytes, bool tensor_cores,
                                                   int block_rows) {
  ForwardSmem s{};
  s.keys_pad = round_up(keys, 16);
  s.ld_kv = tensor_cores ? head_dim + 8 : head_dim + 1;
  s.ld_qp = tensor_cores ? max(head_dim, s.keys_pad) + 8 : head_dim + 1;
  s.ld_so = tensor_cores ? max(head_dim, s.keys_pad) + 4 : s.keys_pad + 4;
  size_t off = 0;
  s.k_off = off;
  off = align32(off + size_t(s.keys_pad) * s.ld_kv * elem_bytes);
  s.v_off = off;
  off = align32(off + size_t(s.keys_pad) * s.ld_kv * elem_bytes);
  s.qp_off = off;
  off = align32(off + size_t(block_rows) * s.ld_qp * elem_bytes);
  s.so_off = off;
  off = align32(off + size_t(block_rows) * s.ld_so * sizeof(float));
  s.m_off = off;
  off = align32(off + size_t(block_rows) * s.keys_pad * sizeof(float));
  s.bytes = off;
  return s;
}

// Copies `rows` rows of kHeadDim elements into shared memory (leading dimension ld); rows at and after
// valid_rows are zero, so padded keys and tail queries contribute exact zeros to every product.
template <typename scalar_t, int kHeadDim>
__device__ void load_rows(scalar_t* dst, int ld, const scalar_t* src, int64_t row_stride, int rows, int valid_rows,
                          bool vector_loads) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  constexpr int kPacks = kHeadDim / kVec;
  for (int idx = threadIdx.x; idx < rows * kPacks; idx += blockDim.x) {
    const int r = idx / kPacks, c = (idx % kPacks) * kVec;
    Pack<scalar_t, kVec> pack;
    if (r < valid_rows) {
      const scalar_t* p = src + r * row_stride + c;
      if (vector_loads) {  // one 16-byte load
        const uint4 raw = *reinterpret_cast<const uint4*>(p);
        memcpy(&pack, &raw, sizeof(raw));
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) pack.v[e] = p[e];
      }
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) pack.v[e] = scalar_t(0);
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) dst[r * ld + c + e] = pack.v[e];
  }
}

// scores[r, j] = q[r] · k[j] (unscaled) for the warp's rows and key_tiles * 16 keys.
template <typename scalar_t, int kHeadDim, bool kTensorCores, int kRowsPerWarp>
__device__ void warp_scores(float* scores, const scalar_t* qs, const scalar_t* ks, const ForwardSmem& L,
                            int key_tiles, int lane) {
  if constexpr (kTensorCores) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    using namespace nvcuda;
    using T = typename WmmaType<scalar_t>::type;
    for (int nt = 0; nt < key_tiles; ++nt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kt = 0; kt < kHeadDim / 16; ++kt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // K row-major is Kᵀ column-major
        wmma::load_matrix_sync(a, reinterpret_cast<const T*>(qs) + kt * 16, L.ld_qp);
        wmma::load_matrix_sync(b, reinterpret_cast<const T*>(ks) + nt * 16 * L.ld_kv + kt * 16, L.ld_kv);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(scores + nt * 16, acc, L.ld_so, wmma::mem_row_major);
    }
#elif defined(__CUDA_ARCH__)
    __trap();  // never launched: the launcher takes this path only for kernels built for sm_80+
#endif
  } else {
    for (int r = 0; r < kRowsPerWarp; ++r) {
      for (int j = lane; j < key_tiles * 16; j += 32) {
        float acc = 0.0f;
#pragma unroll 8
        for (int d = 0; d < kHeadDim; ++d)
          acc += static_cast<float>(qs[r * L.ld_qp + d]) * static_cast<float>(ks[j * L.ld_kv + d]);
        scores[r * L.ld_so + j] = acc;
      }
    }
  }
}

// out rows of the warp = P·V, written to global memory (rows at and after valid_rows are skipped).
template <typename scalar_t, int kHeadDim, bool kTensorCores, int kRowsPerWarp>
__device__ void warp_attend_values(scalar_t* out, int64_t out_row_stride, const float* probs_f32,
                                   const scalar_t* probs_16, float* out_tile, const scalar_t* vs, const ForwardSmem& L,
                                   int nv, int key_tiles, int valid_rows, int lane) {
  if constexpr (kTensorCores) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    using namespace nvcuda;
    using T = typename WmmaType<scalar_t>::type;
#pragma unroll
    for (int dt = 0; dt < kHeadDim / 16; ++dt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
      for (int kt = 0; kt < key_tiles; ++kt) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, reinterpret_cast<const T*>(probs_16) + kt * 16, L.ld_qp);
        wmma::load_matrix_sync(b, reinterpret_cast<const T*>(vs) + kt * 16 * L.ld_kv + dt * 16, L.ld_kv);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(out_tile + dt * 16, acc, L.ld_so, wmma::mem_row_major);
    }
    __syncwarp();
    for (int idx = lane; idx < kRowsPerWarp * kHeadDim; idx += 32) {
      const int r = idx / kHeadDim, d = idx % kHeadDim;
      if (r < valid_rows) out[r * out_row_stride + d] = static_cast<scalar_t>(out_tile[r * L.ld_so + d]);
    }
#elif defined(__CUDA_ARCH__)
    __trap();
#endif
  } else {
    for (int r = 0; r < min(kRowsPerWarp, valid_rows); ++r) {
#pragma unroll
      for (int c = 0; c < kHeadDim / 32; ++c) {
        const int d = lane + 32 * c;
        float acc = 0.0f;
        for (int j = 0; j < nv; ++j) acc += probs_f32[r * L.ld_so + j] * static_cast<float>(vs[j * L.ld_kv + d]);
        out[r * out_row_stride + d] = static_cast<scalar_t>(acc);
      }
    }
  }
}

// Grid: one block per (sample, tile of query rows), both on x (x takes 2^31 - 1 blocks, y only 65535).
template <typename scalar_t, int kHeadDim, bool kTensorCores, int kRowsPerWarp>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                   scalar_t* __restrict__ out, scalar_t* __restrict__ attn_map, float* __restrict__ lse,
                   float* __restrict__ column_max, const int* __restrict__ lengths, RowStrides qs, RowStrides ks,
                   RowStrides vs, int heads, int queries, int keys, float scale, bool vector_loads) {
  static_assert(!kTensorCores || kRowsPerWarp == 16, "a WMMA tile has 16 rows");
  constexpr int kBlockRows = kWarps * kRowsPerWarp;
  extern __shared__ __align__(128) unsigned char smem[];
  const ForwardSmem L = forward_smem(keys, kHeadDim, sizeof(scalar_t), kTensorCores, kBlockRows);
  scalar_t* k_tile = reinterpret_cast<scalar_t*>(smem + L.k_off);
  scalar_t* v_tile = reinterpret_cast<scalar_t*>(smem + L.v_off);
  scalar_t* q_tile = reinterpret_cast<scalar_t*>(smem + L.qp_off);  // then P (tensor-core path)
  scalar_t* p_tile = q_tile;
  float* s_tile = reinterpret_cast<float*>(smem + L.so_off);  // then O (tensor-core path)
  float* o_tile = s_tile;
  float* map_acc = reinterpret_cast<float*>(smem + L.m_off);

  const int row_tiles = (queries + kBlockRows - 1) / kBlockRows;
  const int b = blockIdx.x / row_tiles;
  const int row0 = blockIdx.x % row_tiles * kBlockRows;
  const int block_rows = min(kBlockRows, queries - row0);
  const int nv = valid_keys(lengths, b, keys);
  const int key_tiles = (nv + 15) / 16;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_row0 = warp * kRowsPerWarp;                          // first tile row of this warp
  const int warp_rows = max(0, min(kRowsPerWarp, block_rows - warp_row0));  // of them, rows < queries

  for (int idx = threadIdx.x; idx < kBlockRows * L.keys_pad; idx += blockDim.x) map_acc[idx] = 0.0f;

  for (int h = 0; h < heads; ++h) {
    // out is [B, N_x, H, D]: consecutive query rows of one head are H * D apart.
    scalar_t* out_rows = out + ((int64_t(b) * queries + row0 + warp_row0) * heads + h) * kHeadDim;
    const int64_t out_row_stride = int64_t(heads) * kHeadDim;
    float* lse_rows = lse + (int64_t(b) * heads + h) * queries + row0 + warp_row0;
    if (nv == 0) {  // no valid key (text_lengths = 0): out = 0, lse = -inf, nothing added to the map
      for (int idx = lane; idx < warp_rows * kHeadDim; idx += 32)
        out_rows[(idx / kHeadDim) * out_row_stride + idx % kHeadDim] = scalar_t(0);
      if (lane < warp_rows) lse_rows[lane] = -INFINITY;
      continue;
    }
    __syncthreads();  // every warp is done with the previous head's tiles
    load_rows<scalar_t, kHeadDim>(k_tile, L.ld_kv, k + b * ks.b + h * ks.h, ks.row, key_tiles * 16, nv, vector_loads);
    load_rows<scalar_t, kHeadDim>(v_tile, L.ld_kv, v + b * vs.b + h * vs.h, vs.row, key_tiles * 16, nv, vector_loads);
    load_rows<scalar_t, kHeadDim>(q_tile, L.ld_qp, q + b * qs.b + h * qs.h + row0 * qs.row, qs.row, kBlockRows,
                                  block_rows, vector_loads);
    __syncthreads();

    float* scores = s_tile + warp_row0 * L.ld_so;
    warp_scores<scalar_t, kHeadDim, kTensorCores, kRowsPerWarp>(scores, q_tile + warp_row0 * L.ld_qp, k_tile, L,
                                                                key_tiles, lane);
    __syncwarp();
    // Row softmax over the nv valid keys (lanes over keys), the head-mean accumulation and the lse.
    for (int r = 0; r < kRowsPerWarp; ++r) {
      float e[kKeyChunks];
      float row_max = -INFINITY;
#pragma unroll
      for (int c = 0; c < kKeyChunks; ++c) {
        const int j = lane + 32 * c;
        e[c] = j < nv ? scores[r * L.ld_so + j] * scale : -INFINITY;
        row_max = fmaxf(row_max, e[c]);
      }
      row_max = warp_allreduce_max(row_max);
      float sum = 0.0f;
#pragma unroll
      for (int c = 0; c < kKeyChunks; ++c) {
        e[c] = lane + 32 * c < nv ? expf(e[c] - row_max) : 0.0f;
        sum += e[c];
      }
      sum = warp_allreduce_sum(sum);
      const float inv = 1.0f / sum;
#pragma unroll
      for (int c = 0; c < kKeyChunks; ++c) {
        const int j = lane + 32 * c;
        if (j < key_tiles * 16) {
          const float p = e[c] * inv;  // 0 for the padded keys nv <= j < key_tiles * 16
          if constexpr (kTensorCores) {
            p_tile[(warp_row0 + r) * L.ld_qp + j] = static_cast<scalar_t>(p);
          } else {
            scores[r * L.ld_so + j] = p;
          }
          map_acc[(warp_row0 + r) * L.keys_pad + j] += p;
        }
      }
      if (lane == 0 && r < warp_rows) lse_rows[r] = row_max + logf(sum);
    }
    __syncwarp();
    warp_attend_values<scalar_t, kHeadDim, kTensorCores, kRowsPerWarp>(
        out_rows, out_row_stride, scores, p_tile + warp_row0 * L.ld_qp, o_tile + warp_row0 * L.ld_so, v_tile, L, nv,
        key_tiles, warp_rows, lane);
  }
  __syncthreads();

  // Head mean, rounded once to the output dtype; the tile's column max is taken over the rounded values.
  const float inv_heads = 1.0f / static_cast<float>(heads);
  for (int idx = threadIdx.x; idx < kBlockRows * keys; idx += blockDim.x) {
    const int r = idx / keys, j = idx % keys;
    float rounded = 0.0f;
    if (r < block_rows) {
      const scalar_t value = static_cast<scalar_t>(j < nv ? map_acc[r * L.keys_pad + j] * inv_heads : 0.0f);
      attn_map[(int64_t(b) * queries + row0 + r) * keys + j] = value;
      rounded = static_cast<float>(value);
    }
    map_acc[r * L.keys_pad + j] = rounded;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < keys; j += blockDim.x) {
    float m = 0.0f;
    for (int r = 0; r < block_rows; ++r) m = fmaxf(m, map_acc[r * L.keys_pad + j]);
    atomicMax(reinterpret_cast<int*>(column_max + int64_t(b) * keys + j), __float_as_int(m));
  }
}

template <typename scalar_t>
__global__ void mask_kernel(const scalar_t* __restrict__ attn_map, const float* __restrict__ column_max,
                            const int* __restrict__ lengths, bool* __restrict__ mask, int64_t total, int queries,
                            int keys, float alpha) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(idx % keys);
    const int64_t b = idx / (int64_t(queries) * keys);
    mask[idx] = j < valid_keys(lengths, b, keys) &&
                mask_value(static_cast<float>(attn_map[idx]), alpha, column_max[b * keys + j]);
  }
}

int elementwise_blocks(int64_t total, int threads) {
  const int64_t wave = int64_t(cuda::multiprocessor_count(c10::cuda::current_device())) * 8;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((total + threads - 1) / threads, wave)));
}

bool rows_vector_aligned(const at::Tensor& t) {
  const int64_t vec = 16 / t.element_size();
  return cuda::is_aligned(t.data_ptr(), 16) && t.stride(0) % vec == 0 && t.stride(1) % vec == 0 &&
         t.stride(2) % vec == 0;
}

// Shared memory a block may use: the device's opt-in limit, or less where the environment variable
// RAPHAEL_EXT_MAX_SMEM_PER_BLOCK (bytes) says so. The tests set it to run, on a large GPU, the paths
// that GPUs with less shared memory take (an A100 has 163 KiB per block, sm_86/89 99 KiB, Hopper 227 KiB).
size_t smem_per_block_limit() {
  size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  if (const char* cap = std::getenv("RAPHAEL_EXT_MAX_SMEM_PER_BLOCK"); cap != nullptr && *cap != '\0') {
    limit = std::min<size_t>(limit, std::strtoull(cap, nullptr, 10));
  }
  return limit;
}

template <typename Kernel>
void set_dynamic_smem(std::string_view op, Kernel kernel, size_t bytes) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(bytes <= smem_per_block_limit(), op, ": needs ", bytes, " bytes of shared memory per block, the ",
              prop->name, " offers ", smem_per_block_limit());
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

void check_grid_x(std::string_view op, int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), op, ": the input needs ", blocks,
              " thread blocks, more than one CUDA grid holds (2^31 - 1)");
}

size_t forward_smem_bytes(const CrossAttentionArgs& a, int elem_bytes, bool tensor_cores, int rows_per_warp) {
  return forward_smem(a.keys, a.head_dim, elem_bytes, tensor_cores, kWarps * rows_per_warp).bytes;
}

template <typename scalar_t, int kHeadDim, bool kTensorCores, int kRowsPerWarp>
void launch_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths,
                    const CrossAttentionArgs& a, at::Tensor& out, at::Tensor& attn_map, at::Tensor& lse,
                    at::Tensor& column_max) {
  constexpr int kBlockRows = kWarps * kRowsPerWarp;
  const ForwardSmem L = forward_smem(a.keys, kHeadDim, sizeof(scalar_t), kTensorCores, kBlockRows);
  auto kernel = forward_kernel<scalar_t, kHeadDim, kTensorCores, kRowsPerWarp>;
  set_dynamic_smem(kOp, kernel, L.bytes);
  const bool vector_loads = rows_vector_aligned(q) && rows_vector_aligned(k) && rows_vector_aligned(v);
  const int64_t blocks = (a.queries + kBlockRows - 1) / kBlockRows * a.batch;
  check_grid_x(kOp, blocks);
  kernel<<<static_cast<unsigned>(blocks), kThreads, L.bytes, at::cuda::getCurrentCUDAStream()>>>(
      q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
      attn_map.data_ptr<scalar_t>(), lse.data_ptr<float>(), column_max.data_ptr<float>(),
      lengths.defined() ? lengths.data_ptr<int>() : nullptr, row_strides(q), row_strides(k), row_strides(v),
      static_cast<int>(a.heads), static_cast<int>(a.queries), static_cast<int>(a.keys), static_cast<float>(a.scale),
      vector_loads);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls body.template operator()<kHeadDim>() with the head dimension as a compile-time constant.
template <typename Body>
void dispatch_head_dim(int64_t head_dim, Body&& body) {
  switch (head_dim) {
    case 32: body(std::integral_constant<int, 32>{}); break;
    case 64: body(std::integral_constant<int, 64>{}); break;
    case 128: body(std::integral_constant<int, 128>{}); break;
    default: TORCH_CHECK(false, kOp, ": unsupported head dimension ", head_dim);
  }
}

void check_launch_limits(const CrossAttentionArgs& a) {
  TORCH_CHECK(a.queries * a.heads * a.head_dim < (int64_t(1) << 31), kOp,
              ": N_x * H * D must stay below 2^31 per sample on CUDA, got ", a.queries * a.heads * a.head_dim);
}

// Clamped to [0, N_y] before the cast, so large int64 values cannot wrap (no host sync needed).
at::Tensor device_lengths(const std::optional<at::Tensor>& text_lengths, int64_t keys) {
  return text_lengths.has_value() ? text_lengths->clamp(0, keys).to(at::kInt).contiguous() : at::Tensor();
}

// The tensor-core forward needs code generated for sm_80+: a build for older archs (e.g. "7.5+PTX")
// JIT-compiled on a newer GPU gets the SIMT path instead.
template <typename Kernel>
bool built_for_sm80(Kernel kernel) {
  cudaFuncAttributes attributes{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  return attributes.ptxVersion >= 80;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_attention_mask_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double alpha,
    const std::optional<at::Tensor>& text_lengths, std::optional<double> scale) {
  const CrossAttentionArgs a = check_cross_attention_args(kOp, q_in, k_in, v_in, text_lengths, scale);
  TORCH_CHECK_VALUE(std::isfinite(alpha), kOp, ": alpha must be finite, got ", alpha);
  check_launch_limits(a);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = unit_inner_stride(q_in), k = unit_inner_stride(k_in), v = unit_inner_stride(v_in);
  const at::Tensor lengths = device_lengths(text_lengths, a.keys);
  at::Tensor out = at::empty({a.batch, a.queries, a.heads, a.head_dim}, q.options()).transpose(1, 2);
  at::Tensor attn_map = at::empty({a.batch, a.queries, a.keys}, q.options());
  at::Tensor mask = at::empty({a.batch, a.queries, a.keys}, q.options().dtype(at::kBool));
  at::Tensor lse = at::empty({a.batch, a.heads, a.queries}, q.options().dtype(at::kFloat));
  if (a.batch * a.queries == 0) return {out, attn_map, mask, lse};
  at::Tensor column_max = at::zeros({a.batch, a.keys}, q.options().dtype(at::kFloat));
  DISPATCH_CUDA_FLOATING_TYPES(q.scalar_type(), kOp, [&] {
    dispatch_head_dim(a.head_dim, [&](auto head_dim) {
      constexpr int kHeadDim = decltype(head_dim)::value;
      // Tensor cores for 16-bit types where the code and the shared memory allow; otherwise SIMT with
      // 8 rows per warp, or 4 where 8 do not fit (A100, float32, D = 128, N_y > 112).
      const size_t limit = smem_per_block_limit();
      const int elem_bytes = sizeof(scalar_t);
      bool done = false;
      if constexpr (!std::is_same_v<scalar_t, float>) {
        if (at::cuda::getCurrentDeviceProperties()->major >= 8 &&
            built_for_sm80(forward_kernel<scalar_t, kHeadDim, true, 16>) &&
            forward_smem_bytes(a, elem_bytes, true, 16) <= limit) {
          launch_forward<scalar_t, kHeadDim, true, 16>(q, k, v, lengths, a, out, attn_map, lse, column_max);
          done = true;
        }
      }
      if (done) return;
      if (forward_smem_bytes(a, elem_bytes, false, 8) <= limit) {
        launch_forward<scalar_t, kHeadDim, false, 8>(q, k, v, lengths, a, out, attn_map, lse, column_max);
      } else {
        launch_forward<scalar_t, kHeadDim, false, 4>(q, k, v, lengths, a, out, attn_map, lse, column_max);
      }
    });
    const int64_t total = attn_map.numel();
    mask_kernel<scalar_t><<<elementwise_blocks(total, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        attn_map.data_ptr<scalar_t>(), column_max.data_ptr<float>(),
        lengths.defined() ? lengths.data_ptr<int>() : nullptr, mask.data_ptr<bool>(), total,
        static_cast<int>(a.queries), static_cast<int>(a.keys), static_cast<float>(alpha));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, attn_map, mask, lse};
}

// ---------------------------------------------------------------------------------------------
// Backward.

constexpr int kBackwardRowsPerBlock = 32;  // kernel 1: query rows per block (8 per warp)
constexpr int kKeysPerWarp = 4;            // kernel 2: keys whose dK, dV rows a warp keeps in registers
constexpr int kKeysPerBlock = kWarps * kKeysPerWarp;

struct BackwardInputs {
  const void* grad_out;  // [B, H, N_x, D] with strides go, or null
  const void* grad_map;  // contiguous [B, N_x, N_y], or null
  RowStrides go, qs, ks, vs;
};

// Kernel 1: dQ and D = rowsum(P∘dP) per (sample, head, query). K and V of the head are held in shared
// memory as fp32 (row padding +1: lanes walking keys hit different banks). Grid x: (sample, head) pairs
// times blocks of kBackwardRowsPerBlock query rows.
template <typename scalar_t, int kHeadDim>
__global__ void __launch_bounds__(kThreads)
    backward_dq_kernel(BackwardInputs in, const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                       const scalar_t* __restrict__ v, const float* __restrict__ lse, const int* __restrict__ lengths,
                       scalar_t* __restrict__ dq, float* __restrict__ delta, int heads, int queries, int keys,
                       float scale) {
  constexpr int kLd = kHeadDim + 1;
  extern __shared__ __align__(128) unsigned char smem[];
  float* k_tile = reinterpret_cast<float*>(smem);
  float* v_tile = k_tile + keys * kLd;
  float* warp_buffers = v_tile + keys * kLd;  // per warp: q row, dO row, dS row
  const int row_blocks = (queries + kBackwardRowsPerBlock - 1) / kBackwardRowsPerBlock;
  const int bh = blockIdx.x / row_blocks, b = bh / heads, h = bh % heads;
  const int row_block = blockIdx.x % row_blocks;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* q_row = warp_buffers + warp * (2 * kHeadDim + kMaxTextTokens);
  float* go_row = q_row + kHeadDim;
  float* ds_row = go_row + kHeadDim;
  const int nv = valid_keys(lengths, b, keys);
  const auto* grad_out = static_cast<const scalar_t*>(in.grad_out);
  const auto* grad_map = static_cast<const scalar_t*>(in.grad_map);
  const float inv_heads = 1.0f / static_cast<float>(heads);

  for (int idx = threadIdx.x; idx < nv * kHeadDim; idx += blockDim.x) {
    const int j = idx / kHeadDim, d = idx % kHeadDim;
    k_tile[j * kLd + d] = static_cast<float>(k[b * in.ks.b + h * in.ks.h + j * in.ks.row + d]);
    v_tile[j * kLd + d] = static_cast<float>(v[b * in.vs.b + h * in.vs.h + j * in.vs.row + d]);
  }
  __syncthreads();

  const int row_end = min(queries, (row_block + 1) * kBackwardRowsPerBlock);
  for (int i = row_block * kBackwardRowsPerBlock + warp; i < row_end; i += kWarps) {
    const int64_t lse_idx = int64_t(bh) * queries + i;
    scalar_t* dq_row = dq + ((int64_t(b) * queries + i) * heads + h) * kHeadDim;
    if (nv == 0) {
      for (int d = lane; d < kHeadDim; d += 32) dq_row[d] = scalar_t(0);
      if (lane == 0) delta[lse_idx] = 0.0f;
      continue;
    }
    for (int d = lane; d < kHeadDim; d += 32) {
      q_row[d] = static_cast<float>(q[b * in.qs.b + h * in.qs.h + i * in.qs.row + d]);
      go_row[d] = grad_out ? static_cast<float>(grad_out[b * in.go.b + h * in.go.h + i * in.go.row + d]) : 0.0f;
    }
    __syncwarp();
    const float row_lse = lse[lse_idx];
    float p[kKeyChunks], dp[kKeyChunks];
    float dot = 0.0f;
#pragma unroll
    for (int c = 0; c < kKeyChunks; ++c) {
      const int j = lane + 32 * c;
      p[c] = 0.0f;
      dp[c] = 0.0f;
      if (j < nv) {
        float s = 0.0f, g = 0.0f;
        for (int d = 0; d < kHeadDim; ++d) {
          s += q_row[d] * k_tile[j * kLd + d];
          g += go_row[d] * v_tile[j * kLd + d];
        }
        p[c] = expf(s * scale - row_lse);
        dp[c] = g;
        if (grad_map) dp[c] += static_cast<float>(grad_map[(int64_t(b) * queries + i) * keys + j]) * inv_heads;
        dot += p[c] * dp[c];
      }
    }
    dot = warp_allreduce_sum(dot);
#pragma unroll
    for (int c = 0; c < kKeyChunks; ++c) {
      const int j = lane + 32 * c;
      if (j < nv) ds_row[j] = p[c] * (dp[c] - dot);
    }
    __syncwarp();
    for (int d = lane; d < kHeadDim; d += 32) {
      float acc = 0.0f;
      for (int j = 0; j < nv; ++j) acc += ds_row[j] * k_tile[j * kLd + d];
      dq_row[d] = static_cast<scalar_t>(acc * scale);
    }
    if (lane == 0) delta[lse_idx] = dot;
    __syncwarp();  // q_row, go_row and ds_row are rewritten for the warp's next row
  }
}

// Kernel 2: partial dK and dV of kKeysPerWarp keys per warp over the query slice of blockIdx.y;
// lanes hold the head dimension, so every product is a warp reduction. Grid x: (sample, head) pairs
// times blocks of kKeysPerBlock keys.
template <typename scalar_t, int kHeadDim>
__global__ void __launch_bounds__(kThreads)
    backward_dkv_kernel(BackwardInputs in, const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                        const scalar_t* __restrict__ v, const float* __restrict__ lse,
                        const float* __restrict__ delta, const int* __restrict__ lengths,
                        float* __restrict__ dk_partial, float* __restrict__ dv_partial, int batch, int heads,
                        int queries, int keys, int rows_per_slice, float scale) {
  constexpr int kPerLane = kHeadDim / 32;
  const int key_blocks = (keys + kKeysPerBlock - 1) / kKeysPerBlock;
  const int bh = blockIdx.x / key_blocks, b = bh / heads, h = bh % heads;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int key0 = blockIdx.x % key_blocks * kKeysPerBlock + warp * kKeysPerWarp;
  const int nv = valid_keys(lengths, b, keys);
  const auto* grad_out = static_cast<const scalar_t*>(in.grad_out);
  const auto* grad_map = static_cast<const scalar_t*>(in.grad_map);
  const float inv_heads = 1.0f / static_cast<float>(heads);

  float kr[kKeysPerWarp][kPerLane], vr[kKeysPerWarp][kPerLane];
  float dk[kKeysPerWarp][kPerLane] = {}, dv[kKeysPerWarp][kPerLane] = {};
#pragma unroll
  for (int kk = 0; kk < kKeysPerWarp; ++kk) {
    const int j = min(key0 + kk, keys - 1);
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      kr[kk][c] = static_cast<float>(k[b * in.ks.b + h * in.ks.h + j * in.ks.row + lane + 32 * c]);
      vr[kk][c] = static_cast<float>(v[b * in.vs.b + h * in.vs.h + j * in.vs.row + lane + 32 * c]);
    }
  }
  const int row_begin = blockIdx.y * rows_per_slice;
  const int row_end = min(queries, row_begin + rows_per_slice);
  if (key0 < nv) {
    for (int i = row_begin; i < row_end; ++i) {
      float qv[kPerLane], gv[kPerLane];
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        qv[c] = static_cast<float>(q[b * in.qs.b + h * in.qs.h + i * in.qs.row + lane + 32 * c]);
        gv[c] = grad_out ? static_cast<float>(grad_out[b * in.go.b + h * in.go.h + i * in.go.row + lane + 32 * c])
                         : 0.0f;
      }
      const int64_t row_idx = int64_t(bh) * queries + i;
      const float row_lse = lse[row_idx], row_delta = delta[row_idx];
#pragma unroll
      for (int kk = 0; kk < kKeysPerWarp; ++kk) {
        const int j = key0 + kk;
        if (j >= nv) break;  // warp-uniform
        float s = 0.0f, g = 0.0f;
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) {
          s += qv[c] * kr[kk][c];
          g += gv[c] * vr[kk][c];
        }
        s = warp_allreduce_sum(s);
        g = warp_allreduce_sum(g);
        const float p = expf(s * scale - row_lse);
        if (grad_map) g += static_cast<float>(grad_map[(int64_t(b) * queries + i) * keys + j]) * inv_heads;
        const float ds = p * (g - row_delta);
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) {
          dk[kk][c] += ds * qv[c];
          dv[kk][c] += p * gv[c];
        }
      }
    }
  }
  const int64_t slice_offset = (int64_t(blockIdx.y) * batch * heads + bh) * keys;
#pragma unroll
  for (int kk = 0; kk < kKeysPerWarp; ++kk) {
    const int j = key0 + kk;
    if (j >= keys) break;
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      dk_partial[(slice_offset + j) * kHeadDim + lane + 32 * c] = dk[kk][c] * scale;
      dv_partial[(slice_offset + j) * kHeadDim + lane + 32 * c] = dv[kk][c];
    }
  }
}

// Kernel 3: dK, dV = the slices' partial sums added in slice order.
template <typename scalar_t>
__global__ void sum_slices_kernel(const float* __restrict__ dk_partial, const float* __restrict__ dv_partial,
                                  scalar_t* __restrict__ dk, scalar_t* __restrict__ dv, int64_t total, int slices) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    float sk = 0.0f, sv = 0.0f;
    for (int s = 0; s < slices; ++s) {
      sk += dk_partial[s * total + idx];
      sv += dv_partial[s * total + idx];
    }
    dk[idx] = static_cast<scalar_t>(sk);
    dv[idx] = static_cast<scalar_t>(sv);
  }
}

template <typename scalar_t, int kHeadDim>
void launch_backward(const at::Tensor& go, const at::Tensor& gm, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& lse, const at::Tensor& lengths, const CrossAttentionArgs& a,
                     at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int* len = lengths.defined() ? lengths.data_ptr<int>() : nullptr;
  const BackwardInputs in{go.defined() ? go.data_ptr() : nullptr, gm.defined() ? gm.data_ptr() : nullptr,
                          go.defined() ? row_strides(go) : RowStrides{0, 0, 0}, row_strides(q), row_strides(k),
                          row_strides(v)};
  const int heads = static_cast<int>(a.heads), queries = static_cast<int>(a.queries), keys = static_cast<int>(a.keys);
  const float scale = static_cast<float>(a.scale);
  at::Tensor delta = at::empty({a.batch, a.heads, a.queries}, q.options().dtype(at::kFloat));

  const size_t dq_smem = (2 * size_t(keys) * (kHeadDim + 1) + kWarps * (2 * kHeadDim + kMaxTextTokens)) * sizeof(float);
  auto dq_kernel = backward_dq_kernel<scalar_t, kHeadDim>;
  set_dynamic_smem(kBackwardOp, dq_kernel, dq_smem);
  const int64_t dq_blocks = (a.queries + kBackwardRowsPerBlock - 1) / kBackwardRowsPerBlock * a.batch * a.heads;
  check_grid_x(kBackwardOp, dq_blocks);
  dq_kernel<<<static_cast<unsigned>(dq_blocks), kThreads, dq_smem, stream>>>(in, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                                    v.data_ptr<scalar_t>(), lse.data_ptr<float>(), len,
                                                    dq.data_ptr<scalar_t>(), delta.data_ptr<float>(), heads, queries,
                                                    keys, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Enough query slices for about four blocks per multiprocessor, each slice at least 64 rows.
  const int64_t key_blocks = (a.keys + kKeysPerBlock - 1) / kKeysPerBlock;
  const int64_t target = 4 * int64_t(cuda::multiprocessor_count(q.get_device()));
  const int64_t max_slices = std::max<int64_t>(1, (a.queries + 63) / 64);
  const int slices = static_cast<int>(
      std::clamp<int64_t>((target + key_blocks * a.batch * a.heads - 1) / (key_blocks * a.batch * a.heads), 1,
                          std::min<int64_t>(max_slices, 65535)));
  const int rows_per_slice = static_cast<int>((a.queries + slices - 1) / slices);
  at::Tensor dk_partial = at::empty({slices, a.batch, a.heads, a.keys, a.head_dim}, q.options().dtype(at::kFloat));
  at::Tensor dv_partial = at::empty_like(dk_partial);
  check_grid_x(kBackwardOp, key_blocks * a.batch * a.heads);
  const dim3 dkv_grid(static_cast<unsigned>(key_blocks * a.batch * a.heads), slices);
  backward_dkv_kernel<scalar_t, kHeadDim><<<dkv_grid, kThreads, 0, stream>>>(
      in, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), lse.data_ptr<float>(),
      delta.data_ptr<float>(), len, dk_partial.data_ptr<float>(), dv_partial.data_ptr<float>(),
      static_cast<int>(a.batch), heads, queries, keys, rows_per_slice, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t total = dk.numel();
  sum_slices_kernel<scalar_t><<<elementwise_blocks(total, 256), 256, 0, stream>>>(
      dk_partial.data_ptr<float>(), dv_partial.data_ptr<float>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
      total, slices);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_mask_backward_cuda(
    const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_attn_map, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& lse_in,
    const std::optional<at::Tensor>& text_lengths, double scale) {
  const CrossAttentionArgs a = check_cross_attention_backward_args(kBackwardOp, grad_out, grad_attn_map, q_in, k_in,
                                                                   v_in, lse_in, text_lengths, scale);
  check_launch_limits(a);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = unit_inner_stride(q_in), k = unit_inner_stride(k_in), v = unit_inner_stride(v_in);
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor go = grad_out.has_value() ? unit_inner_stride(*grad_out) : at::Tensor();
  const at::Tensor gm = grad_attn_map.has_value() ? grad_attn_map->contiguous() : at::Tensor();
  const at::Tensor lengths = device_lengths(text_lengths, a.keys);
  at::Tensor dq = at::empty({a.batch, a.queries, a.heads, a.head_dim}, q.options()).transpose(1, 2);
  at::Tensor dk = at::empty({a.batch, a.heads, a.keys, a.head_dim}, q.options());
  at::Tensor dv = at::empty({a.batch, a.heads, a.keys, a.head_dim}, q.options());
  if (!go.defined() && !gm.defined()) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  if (dk.numel() == 0) return {dq, dk, dv};
  if (a.queries == 0) {  // no query: the sums over queries are empty
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  DISPATCH_CUDA_FLOATING_TYPES(q.scalar_type(), kBackwardOp, [&] {
    dispatch_head_dim(a.head_dim, [&](auto head_dim) {
      launch_backward<scalar_t, decltype(head_dim)::value>(go, gm, q, k, v, lse, lengths, a, dq, dk, dv);
    });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(raphael_ext, CUDA, m) {
  m.impl("cross_attention_mask", &cross_attention_mask_cuda);
  m.impl("cross_attention_mask_backward", &cross_attention_mask_backward_cuda);
}

}  // namespace raphael_ext
