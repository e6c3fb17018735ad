// CUDA kernels of space_moe (docs/kernels.md), the same plan as csrc/cpu/space_moe_kernel.cpp: per-token
// weights and pair flags, a counting sort of the (token, expert) pairs into a CSR by expert (a stable
// scan over tokens, so pair order and results are deterministic), dispatch/combine between token rows
// and grouped rows (one block per token, each token owns the rows it writes: no atomics), and pair_dot
// for the gate gradient. Nothing here reads the device from the host: the capacity is
// B * N_x * min(E, N_y), the grouped GEMMs read the offsets on the device, and the whole forward can be
// captured in a CUDA graph. Bad routes or text lengths trip device-side asserts (checking them on the
// host would synchronise).
#include "cuda_utils.cuh"
#include "moe_cuda.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace raphael_ext::cuda {
namespace {

constexpr int kThreads = 128;  // per token in the row kernels; C = 1024 bf16 is one 16-byte pack per thread

// ---------------------------------------------------------------------------------------------
// Kernel bodies.

// One thread per image token j: w_jk += g_i / n_y where mask[j, i], else z_jk; flags the pairs. The
// thread zeroes its own rows first, so the outputs need no separate fill (one launch fewer per output),
// and reads route, lengths and gate in their own dtypes (no conversion launches): the plan is a handful
// of launches, which is what it costs at RAPHAEL's sizes.
template <typename scalar_t, typename index_t>
__global__ void plan_tokens_kernel(const bool* __restrict__ mask, const index_t* __restrict__ route,
                                   const scalar_t* __restrict__ gate, const index_t* __restrict__ lengths, int64_t n,
                                   int64_t N_x, int64_t N_y, int64_t E, at::opmath_type<scalar_t>* __restrict__ weight,
                                   at::opmath_type<scalar_t>* __restrict__ z, int32_t* __restrict__ present) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    for (int64_t k = 0; k < E; ++k) {
      weight[j * E + k] = acc_t(0);
      z[j * E + k] = acc_t(0);
      present[j * E + k] = 0;
    }
    const int64_t b = j / N_x;
    const int64_t n_y = lengths != nullptr ? static_cast<int64_t>(lengths[b]) : N_y;
    CUDA_KERNEL_ASSERT(n_y >= 0 && n_y <= N_y && "space_moe: text_lengths must be in [0, N_y]");
    for (int64_t i = 0; i < n_y; ++i) {
      const int64_t k = route[b * N_y + i];
      CUDA_KERNEL_ASSERT(k >= 0 && k < E && "space_moe: route must be an expert index in [0, E)");
      const acc_t g = static_cast<acc_t>(gate[b * N_y + i]) / static_cast<acc_t>(n_y);
      if (mask[j * N_y + i]) {
        weight[j * E + k] += g;
        present[j * E + k] = 1;
      } else {
        z[j * E + k] += g;
      }
    }
  }
}

// One thread per (token, expert): the pair's row from the inclusive scan of the flags over tokens
// (scan[n-1, k] is expert k's count); thread (0, k) writes offsets[k].
__global__ void plan_rows_kernel(const int32_t* __restrict__ present, const int32_t* __restrict__ scan, int64_t n,
                                 int64_t E, int32_t* __restrict__ pair_index, int32_t* __restrict__ offsets) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int32_t* totals = scan + (n - 1) * E;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n * E; idx += stride) {
    const int64_t j = idx / E, k = idx % E;
    int32_t start = 0;
    for (int64_t e = 0; e < k; ++e) start += totals[e];
    pair_index[idx] = present[idx] ? start + scan[idx] - 1 : -1;
    if (j == 0) offsets[k] = start + totals[k];
  }
}

template <typename scalar_t, int kVec>
using PackOf = Pack<scalar_t, kVec>;

// out[pair_index[j, k]] = weight[j, k] * src[j] (weight null: 1), one block per token.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    dispatch_kernel(const scalar_t* __restrict__ src, const int32_t* __restrict__ pair_index,
                    const at::opmath_type<scalar_t>* __restrict__ weight, int64_t n, int64_t E, int64_t C,
                    scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = PackOf<scalar_t, kVec>;
  const int64_t packs = C / kVec;
  for (int64_t j = blockIdx.x; j < n; j += gridDim.x) {
    const P* row = reinterpret_cast<const P*>(src + j * C);
    for (int64_t k = 0; k < E; ++k) {
      const int32_t p = pair_index[j * E + k];
      if (p < 0) continue;
      P* dst = reinterpret_cast<P*>(out + static_cast<int64_t>(p) * C);
      const acc_t s = weight != nullptr ? weight[j * E + k] : acc_t(1);
      for (int64_t c = threadIdx.x; c < packs; c += blockDim.x) {
        P v = row[c];
        if (weight != nullptr) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) v.v[e] = static_cast<scalar_t>(s * static_cast<acc_t>(v.v[e]));
        }
        dst[c] = v;
      }
    }
  }
}

// out[j] = sum_k z[j, k] c[k] + sum_k weight[j, k] values[pair_index[j, k]], in that order, one block per token.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const scalar_t* __restrict__ values, const int32_t* __restrict__ pair_index,
                   const at::opmath_type<scalar_t>* __restrict__ weight,
                   const at::opmath_type<scalar_t>* __restrict__ z,
                   const at::opmath_type<scalar_t>* __restrict__ c, int64_t n, int64_t E, int64_t C,
                   scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = PackOf<scalar_t, kVec>;
  const int64_t packs = C / kVec;
  for (int64_t j = blockIdx.x; j < n; j += gridDim.x) {
    for (int64_t ch = threadIdx.x; ch < packs; ch += blockDim.x) {
      acc_t acc[kVec] = {};
      if (z != nullptr) {
        for (int64_t k = 0; k < E; ++k) {
          const acc_t s = z[j * E + k];
          if (s == acc_t(0)) continue;
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[e] += s * c[k * C + ch * kVec + e];
        }
      }
      for (int64_t k = 0; k < E; ++k) {
        const int32_t p = pair_index[j * E + k];
        if (p < 0) continue;
        const acc_t s = weight != nullptr ? weight[j * E + k] : acc_t(1);
        const P v = reinterpret_cast<const P*>(values + static_cast<int64_t>(p) * C)[ch];
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[e] += s * static_cast<acc_t>(v.v[e]);
      }
      P result;
#pragma unroll
      for (int e = 0; e < kVec; ++e) result.v[e] = static_cast<scalar_t>(acc[e]);
      reinterpret_cast<P*>(out + j * C)[ch] = result;
    }
  }
}

// out[j, k] = rows[j] . values[pair_index[j, k]] (0 where no pair), one block per token.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    pair_dot_kernel(const scalar_t* __restrict__ rows, const scalar_t* __restrict__ values,
                    const int32_t* __restrict__ pair_index, int64_t n, int64_t E, int64_t C,
                    at::opmath_type<scalar_t>* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = PackOf<scalar_t, kVec>;
  const int64_t packs = C / kVec;
  for (int64_t j = blockIdx.x; j < n; j += gridDim.x) {
    const P* row = reinterpret_cast<const P*>(rows + j * C);
    for (int64_t k = 0; k < E; ++k) {
      const int32_t p = pair_index[j * E + k];  // the same for the whole block
      if (p < 0) continue;
      const P* other = reinterpret_cast<const P*>(values + static_cast<int64_t>(p) * C);
      acc_t sum = 0;
      for (int64_t ch = threadIdx.x; ch < packs; ch += blockDim.x) {
        const P a = row[ch], b = other[ch];
#pragma unroll
        for (int e = 0; e < kVec; ++e) sum += static_cast<acc_t>(a.v[e]) * static_cast<acc_t>(b.v[e]);
      }
      sum = block_sum(sum);
      if (threadIdx.x == 0) out[j * E + k] = sum;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers.

int row_blocks(int64_t n, int device) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n, 16LL * multiprocessor_count(device))));
}

// Whether rows of C elements of `bytes` each can be moved in 16-byte packs: C a multiple of the pack
// and every row base 16-byte aligned.
bool fits_packs(int64_t C, size_t bytes, std::initializer_list<const void*> pointers) {
  return C % static_cast<int64_t>(16 / bytes) == 0 &&
         std::all_of(pointers.begin(), pointers.end(), [](const void* p) { return p == nullptr || is_aligned(p, 16); });
}

// Launches kernel<scalar_t, 16-byte packs> when `packs`, else kernel<scalar_t, 1>, with one block per token.
#define RAPHAEL_LAUNCH_ROWS(kernel, packs, n, device, stream, ...)                                     \
  do {                                                                                                \
    if (packs) {                                                                                      \
      kernel<scalar_t, 16 / sizeof(scalar_t)><<<row_blocks(n, device), kThreads, 0, stream>>>(__VA_ARGS__); \
    } else {                                                                                          \
      kernel<scalar_t, 1><<<row_blocks(n, device), kThreads, 0, stream>>>(__VA_ARGS__);               \
    }                                                                                                 \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                   \
  } while (false)

template <typename T>
const T* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional(t->contiguous()) : std::nullopt;
}

}  // namespace

MoePlan MoeBackend::plan(const at::Tensor& mask, const at::Tensor& route, const at::Tensor& gate,
                         const std::optional<at::Tensor>& text_lengths, int64_t num_experts, int64_t capacity) {
  const c10::cuda::CUDAGuard device_guard(mask.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = mask.size(0), N_x = mask.size(1), N_y = mask.size(2), E = num_experts, n = B * N_x;
  TORCH_INTERNAL_ASSERT(n * std::min(E, N_y) <= capacity);
  const auto int_options = route.options().dtype(at::kInt);
  const auto acc_options = gate.options().dtype(acc_dtype(gate.scalar_type()));
  MoePlan plan;
  if (n == 0) {
    plan.offsets = at::zeros({E}, int_options);
    plan.pair_index = at::empty({0, E}, int_options);
    plan.weight = at::empty({0, E}, acc_options);
    plan.z = at::empty({0, E}, acc_options);
    return plan;
  }
  const at::Tensor m = mask.contiguous(), r = route.contiguous(), g = gate.contiguous();
  // Same index dtype as route (a no-op for the usual int64 pair).
  const std::optional<at::Tensor> lengths =
      text_lengths.has_value() ? std::optional(text_lengths->to(route.scalar_type()).contiguous()) : std::nullopt;
  plan.weight = at::empty({n, E}, acc_options);  // written in full by plan_tokens_kernel
  plan.z = at::empty({n, E}, acc_options);
  at::Tensor present = at::empty({n, E}, int_options);
  constexpr int kPlanThreads = 256;
  const int64_t max_blocks = 8LL * multiprocessor_count(mask.get_device());
  const int token_blocks = static_cast<int>(std::min<int64_t>((n + kPlanThreads - 1) / kPlanThreads, max_blocks));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "space_moe_plan_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    AT_DISPATCH_INDEX_TYPES(r.scalar_type(), "space_moe_plan_cuda_index", [&] {
      plan_tokens_kernel<scalar_t, index_t><<<token_blocks, kPlanThreads, 0, stream>>>(
          m.const_data_ptr<bool>(), r.const_data_ptr<index_t>(), g.const_data_ptr<scalar_t>(),
          optional_ptr<index_t>(lengths), n, N_x, N_y, E, plan.weight.mutable_data_ptr<acc_t>(),
          plan.z.mutable_data_ptr<acc_t>(), present.mutable_data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  const at::Tensor scan = at::cumsum(present, 0, at::kInt);
  plan.pair_index = at::empty({n, E}, int_options);
  plan.offsets = at::empty({E}, int_options);  // written by the threads of token 0
  const int pair_blocks = static_cast<int>(std::min<int64_t>((n * E + kPlanThreads - 1) / kPlanThreads, max_blocks));
  plan_rows_kernel<<<pair_blocks, kPlanThreads, 0, stream>>>(present.const_data_ptr<int32_t>(),
                                                             scan.const_data_ptr<int32_t>(), n, E,
                                                             plan.pair_index.mutable_data_ptr<int32_t>(),
                                                             plan.offsets.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return plan;
}

at::Tensor MoeBackend::dispatch(const at::Tensor& src, const at::Tensor& pair_index,
                                const std::optional<at::Tensor>& weight, int64_t rows) {
  const c10::cuda::CUDAGuard device_guard(src.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = src.size(0), C = src.size(1), E = pair_index.size(1);
  const at::Tensor x = src.contiguous(), pi = pair_index.contiguous();
  const std::optional<at::Tensor> w = contiguous(weight);
  at::Tensor out = at::empty({rows, C}, src.options());
  if (n == 0 || C == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "space_moe_dispatch_cuda", [&] {
    const bool packs = fits_packs(C, sizeof(scalar_t), {x.const_data_ptr(), out.const_data_ptr()});
    RAPHAEL_LAUNCH_ROWS(dispatch_kernel, packs, n, src.get_device(), stream, x.const_data_ptr<scalar_t>(),
                        pi.const_data_ptr<int32_t>(), optional_ptr<at::opmath_type<scalar_t>>(w), n, E, C,
                        out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor MoeBackend::combine(const at::Tensor& values, const at::Tensor& pair_index,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& z,
                               const std::optional<at::Tensor>& c) {
  const c10::cuda::CUDAGuard device_guard(values.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = pair_index.size(0), E = pair_index.size(1), C = values.size(1);
  const at::Tensor v = values.contiguous(), pi = pair_index.contiguous();
  const std::optional<at::Tensor> w = contiguous(weight), zc = contiguous(z), cc = contiguous(c);
  at::Tensor out = at::empty({n, C}, values.options());
  if (n == 0 || C == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "space_moe_combine_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool packs = fits_packs(C, sizeof(scalar_t), {v.const_data_ptr(), out.const_data_ptr()});
    RAPHAEL_LAUNCH_ROWS(combine_kernel, packs, n, values.get_device(), stream, v.const_data_ptr<scalar_t>(),
                        pi.const_data_ptr<int32_t>(), optional_ptr<acc_t>(w), optional_ptr<acc_t>(zc),
                        optional_ptr<acc_t>(cc), n, E, C, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor MoeBackend::pair_dot(const at::Tensor& rows, const at::Tensor& values, const at::Tensor& pair_index) {
  const c10::cuda::CUDAGuard device_guard(values.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = pair_index.size(0), E = pair_index.size(1), C = values.size(1);
  const at::Tensor r = rows.contiguous(), v = values.contiguous(), pi = pair_index.contiguous();
  at::Tensor out = at::zeros({n, E}, values.options().dtype(acc_dtype(values.scalar_type())));
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "space_moe_pair_dot_cuda", [&] {
    const bool packs = fits_packs(C, sizeof(scalar_t), {r.const_data_ptr(), v.const_data_ptr()});
    RAPHAEL_LAUNCH_ROWS(pair_dot_kernel, packs, n, values.get_device(), stream, r.const_data_ptr<scalar_t>(),
                        v.const_data_ptr<scalar_t>(), pi.const_data_ptr<int32_t>(), n, E, C,
                        out.mutable_data_ptr<at::opmath_type<scalar_t>>());
  });
  return out;
}

TORCH_LIBRARY_IMPL(raphael_ext, CUDA, m) {
  m.impl("space_moe", &space_moe_forward<MoeBackend>);
  m.impl("space_moe_backward", &space_moe_backward<MoeBackend>);
  m.impl("space_moe_plan", &space_moe_plan_op<MoeBackend>);
}

}  // namespace raphael_ext::cuda
