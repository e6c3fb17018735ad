// CUDA kernel of sigmoid_focal_loss (docs/kernels.md). One memory-bound pass reads logits and targets
// with 16-byte loads, writes d(loss)/d(logit) (and the per-element loss for reduction='none') and
// leaves one partial sum per block; a one-block kernel adds the partials in a fixed order (so the
// loss is deterministic) and applies the 'mean' normalisation. No host synchronisation: the op can
// be captured in a CUDA graph.
#include "../common/focal_loss.h"
#include "cuda_utils.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace raphael_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kFinalizeThreads = 1024;

// ---------------------------------------------------------------------------------------------
// Kernel bodies.

// kReduce: leave a per-block partial sum (reduction 'mean'/'sum'); otherwise write the per-element
// loss (reduction 'none'). kVec = 16 bytes / sizeof(scalar_t) when every pointer is 16-byte aligned, else 1.
template <typename scalar_t, int kVec, bool kReduce>
__global__ void __launch_bounds__(kThreads)
    focal_loss_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ t, scalar_t* __restrict__ dloss,
                      scalar_t* __restrict__ loss, const bool* __restrict__ keep, int64_t per_sample, int64_t n,
                      FocalParams<at::opmath_type<scalar_t>> p, at::opmath_type<scalar_t>* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  using PackT = cuda::Pack<scalar_t, kVec>;
  acc_t sum = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t num_packs = n / kVec;
  // With per_sample >= kVec a pack spans at most two samples, so one division per pack finds both;
  // shorter samples (rare: per-sample maps are images) take one division per element.
  const bool long_samples = keep != nullptr && per_sample >= kVec;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < num_packs; v += stride) {
    const int64_t first = v * kVec;
    int64_t sample = 0, next_start = n;
    if (long_samples) {
      sample = first / per_sample;
      next_start = (sample + 1) * per_sample;
      if (!keep[sample] && (next_start >= first + kVec || !keep[sample + 1])) {
        // The whole pack is dropped (the t > T_c samples): zeros without reading the inputs.
        const PackT zeros{};
        reinterpret_cast<PackT*>(dloss)[v] = zeros;
        if constexpr (!kReduce) reinterpret_cast<PackT*>(loss)[v] = zeros;
        continue;
      }
    }
    const PackT xv = reinterpret_cast<const PackT*>(x)[v];
    const PackT tv = reinterpret_cast<const PackT*>(t)[v];
    PackT dv, lv;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t i = first + j;
      bool kept = true;
      if (long_samples) {
        kept = keep[sample + (i >= next_start)];
      } else if (keep != nullptr) {
        kept = keep[i / per_sample];
      }
      acc_t l = 0, d = 0;
      if (kept) focal_loss_element<acc_t>(xv.v[j], tv.v[j], p, l, d);
      dv.v[j] = static_cast<scalar_t>(d);
      lv.v[j] = static_cast<scalar_t>(l);
      sum += l;
    }
    reinterpret_cast<PackT*>(dloss)[v] = dv;
    if constexpr (!kReduce) reinterpret_cast<PackT*>(loss)[v] = lv;
  }
  // The last n % kVec elements, one per thread.
  for (int64_t i = num_packs * kVec + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    acc_t l = 0, d = 0;
    if (keep == nullptr || keep[i / per_sample]) focal_loss_element<acc_t>(x[i], t[i], p, l, d);
    dloss[i] = static_cast<scalar_t>(d);
    if constexpr (!kReduce) loss[i] = static_cast<scalar_t>(l);
    sum += l;
  }
  if constexpr (kReduce) {
    sum = cuda::block_sum(sum);
    if (threadIdx.x == 0) partials[blockIdx.x] = sum;
  }
}

// One block: loss = (sum of partials) * norm, norm = 1 / (elements of kept samples) for 'mean'
// (0 when none is kept), 1 for 'sum'.
template <typename scalar_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    focal_loss_finalize_kernel(const at::opmath_type<scalar_t>* __restrict__ partials, int num_partials,
                               const bool* __restrict__ keep, int64_t batch, int64_t per_sample, int64_t n, bool mean,
                               scalar_t* __restrict__ loss, at::opmath_type<scalar_t>* __restrict__ norm) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t sum = 0;
  for (int i = threadIdx.x; i < num_partials; i += blockDim.x) sum += partials[i];
  sum = cuda::block_sum(sum);
  long long kept = 0;
  if (keep != nullptr) {
    for (int64_t b = threadIdx.x; b < batch; b += blockDim.x) kept += keep[b];
    kept = cuda::block_sum(kept);
  }
  if (threadIdx.x == 0) {
    const int64_t counted = keep != nullptr ? kept * per_sample : n;
    // In double, as on the CPU: 1 / counted rounds once even past 2^24 elements.
    const acc_t scale = mean ? (counted > 0 ? static_cast<acc_t>(1.0 / static_cast<double>(counted)) : acc_t(0)) : acc_t(1);
    *loss = static_cast<scalar_t>(sum * scale);
    *norm = scale;
  }
}

// ---------------------------------------------------------------------------------------------
// Launcher.

// Launches the main kernel on a grid of one full wave of resident blocks (from the occupancy of this
// instantiation, whose register use depends on dtype and packet width); returns the number of blocks,
// i.e. of partial sums written when reducing.
template <typename scalar_t, int kVec, bool kReduce>
int launch_focal_loss(const at::Tensor& x, const at::Tensor& t, at::Tensor& dloss, at::Tensor& loss,
                      const bool* keep, int64_t per_sample, double alpha, double gamma, at::Tensor& partials,
                      cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto kernel = focal_loss_kernel<scalar_t, kVec, kReduce>;
  static const int blocks_per_sm = [&] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0));
    return std::max(blocks, 1);
  }();
  const int64_t n = x.numel();
  const int64_t work_items = std::max<int64_t>(n / kVec, n % kVec);
  const int64_t wave = int64_t{blocks_per_sm} * cuda::multiprocessor_count(x.get_device());
  const int blocks = static_cast<int>(std::min(wave, (work_items + kThreads - 1) / kThreads));
  if (kReduce) partials = at::empty({blocks}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  if (blocks > 0) {
    kernel<<<blocks, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
                                            dloss.mutable_data_ptr<scalar_t>(),
                                            kReduce ? nullptr : loss.mutable_data_ptr<scalar_t>(), keep, per_sample, n,
                                            make_focal_params<acc_t>(alpha, gamma),
                                            kReduce ? partials.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return blocks;
}

template <typename scalar_t, bool kReduce>
int launch_focal_loss(bool aligned, const at::Tensor& x, const at::Tensor& t, at::Tensor& dloss, at::Tensor& loss,
                      const bool* keep, int64_t per_sample, double alpha, double gamma, at::Tensor& partials,
                      cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  return aligned ? launch_focal_loss<scalar_t, kVec, kReduce>(x, t, dloss, loss, keep, per_sample, alpha, gamma,
                                                              partials, stream)
                 : launch_focal_loss<scalar_t, 1, kReduce>(x, t, dloss, loss, keep, per_sample, alpha, gamma,
                                                           partials, stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sigmoid_focal_loss_cuda(const at::Tensor& logits,
                                                                       const at::Tensor& targets, double alpha,
                                                                       double gamma, c10::string_view reduction,
                                                                       const std::optional<at::Tensor>& sample_mask) {
  // Plain locals, not a structured binding: the dispatch lambdas capture them (C++20 only for bindings,
  // and older torch builds extensions as C++17).
  const FocalLossArgs args = check_focal_loss_args(logits, targets, alpha, gamma, reduction, sample_mask);
  const int64_t per_sample = args.per_sample;
  const Reduction mode = args.mode;
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor x = logits.contiguous();
  const at::Tensor t = targets.contiguous();
  const at::Tensor mask = sample_mask.has_value() ? sample_mask->contiguous() : at::Tensor();
  const bool* keep = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  at::Tensor dloss = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor loss = mode == Reduction::None ? at::empty_like(x, at::MemoryFormat::Contiguous)
                                            : at::empty({}, x.options());
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor norm = mode == Reduction::None ? at::ones({}, x.options().dtype(acc_dtype))
                                            : at::empty({}, x.options().dtype(acc_dtype));
  const bool aligned = cuda::is_aligned(x.const_data_ptr(), 16) && cuda::is_aligned(t.const_data_ptr(), 16) &&
                       cuda::is_aligned(dloss.const_data_ptr(), 16) && cuda::is_aligned(loss.const_data_ptr(), 16);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sigmoid_focal_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partials;
    if (mode == Reduction::None) {
      launch_focal_loss<scalar_t, false>(aligned, x, t, dloss, loss, keep, per_sample, alpha, gamma, partials, stream);
      return;
    }
    const int blocks =
        launch_focal_loss<scalar_t, true>(aligned, x, t, dloss, loss, keep, per_sample, alpha, gamma, partials, stream);
    const int64_t batch = mask.defined() ? mask.numel() : 0;
    focal_loss_finalize_kernel<scalar_t><<<1, kFinalizeThreads, 0, stream>>>(
        partials.const_data_ptr<acc_t>(), blocks, keep, batch, per_sample, x.numel(), mode == Reduction::Mean,
        loss.mutable_data_ptr<scalar_t>(), norm.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, dloss, norm};
}

}  // namespace

TORCH_LIBRARY_IMPL(raphael_ext, CUDA, m) { m.impl("sigmoid_focal_loss", &sigmoid_focal_loss_cuda); }

}  // namespace raphael_ext
