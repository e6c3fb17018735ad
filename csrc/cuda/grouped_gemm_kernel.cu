// CUDA grouped GEMM (docs/kernels.md): picks the kernel per call. Hopper (sm_90a build) runs 16-bit types on
// the CUTLASS 3.x pointer-array kernel (grouped_gemm_sm90.cu); sm_80 and later run 16-bit types, and
// float32 as TF32 where PyTorch's flags allow TF32 matmuls, on CUTLASS 2.x GemmGrouped
// (grouped_gemm_sm80.cu). Anything else (float64, float32 without TF32, K or N not a multiple of 16
// bytes, operands off 16-byte alignment, older GPUs, a build without CUTLASS) takes the at::mm loop of
// csrc/common/moe.h, which copies the offsets to the host: that path synchronises, the tensor-core paths
// never do.
#include "cuda_utils.cuh"
#include "moe_cuda.h"

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

namespace raphael_ext::cuda {
namespace {

constexpr int kThreads = 256;

// ---------------------------------------------------------------------------------------------
// Kernel bodies.

// out[r, :] = 0 for rows r >= offsets[groups - 1] (the rows no group owns).
template <typename scalar_t>
__global__ void zero_tail_kernel(scalar_t* __restrict__ out, const int32_t* __restrict__ offsets, int groups,
                                 int64_t rows, int64_t cols) {
  const int64_t first = static_cast<int64_t>(offsets[groups - 1]) * cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = first + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * cols; i += stride) {
    out[i] = scalar_t(0);
  }
}

// dbias[g, n] = sum of grad[r, n] over the rows r of group g. One block per (group, kSumCols columns):
// threadIdx.x picks the column (a warp reads kSumCols consecutive elements), threadIdx.y strides the
// group's rows in kSumRowLanes interleaved lanes, and the lanes' partial sums are added in lane order,
// so the result is deterministic. Grid x: groups times column tiles (no 65535 limit on the groups).
constexpr int kSumCols = 32;
constexpr int kSumRowLanes = kThreads / kSumCols;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    group_column_sum_kernel(const scalar_t* __restrict__ grad, const int32_t* __restrict__ offsets, int64_t rows,
                            int64_t cols, scalar_t* __restrict__ dbias) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t partial[kSumRowLanes][kSumCols];
  const int64_t col_tiles = (cols + kSumCols - 1) / kSumCols;
  const int64_t g = blockIdx.x / col_tiles;
  const int64_t n = blockIdx.x % col_tiles * kSumCols + threadIdx.x;
  const int64_t start = g == 0 ? 0 : offsets[g - 1], end = offsets[g];
  CUDA_KERNEL_ASSERT(start <= end && end <= rows && "grouped_gemm: offsets must be non-decreasing row ends in [0, T]");
  acc_t sum = 0;
  if (n < cols) {
    for (int64_t r = start + threadIdx.y; r < end; r += kSumRowLanes) sum += static_cast<acc_t>(grad[r * cols + n]);
  }
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && n < cols) {
#pragma unroll
    for (int lane = 1; lane < kSumRowLanes; ++lane) sum += partial[lane][threadIdx.x];
    dbias[g * cols + n] = static_cast<scalar_t>(sum);
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers.

// float32 runs on tensor cores only as TF32, so only where PyTorch's own float32 matmuls may
// (torch.backends.cuda.matmul.allow_tf32, or torch.set_float32_matmul_precision("high"/"medium"));
// otherwise it takes the at::mm loop, which follows the same flags.
bool is_tensor_core_shape(at::ScalarType dtype, int64_t K, int64_t N, std::initializer_list<const void*> pointers) {
  if (dtype == at::kFloat && !at::globalContext().allowTF32CuBLAS()) return false;
  if (dtype != at::kHalf && dtype != at::kBFloat16 && dtype != at::kFloat) return false;
  const int64_t vec = 16 / static_cast<int64_t>(c10::elementSize(dtype));  // CUTLASS's 16-byte accesses
  if (K % vec != 0 || N % vec != 0) return false;
  return std::all_of(pointers.begin(), pointers.end(), [](const void* p) { return p == nullptr || is_aligned(p, 16); });
}

bool run_tensor_core(const GroupedGemmProblem& p, at::ScalarType dtype, cudaStream_t stream) {
#if defined(RAPHAEL_EXT_WITH_CUTLASS)
  return grouped_gemm_sm90(p, dtype, stream) || grouped_gemm_sm80(p, dtype, stream);
#else
  return false;
#endif
}

void launch_zero_tail(at::Tensor& out, const at::Tensor& offsets, cudaStream_t stream) {
  const int64_t n = out.numel();
  if (n == 0 || offsets.numel() == 0) return;
  const int64_t wave = 4LL * multiprocessor_count(out.get_device());
  const int blocks = static_cast<int>(std::min(wave, (n + kThreads - 1) / kThreads));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "grouped_gemm_zero_tail", [&] {
    zero_tail_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        out.mutable_data_ptr<scalar_t>(), offsets.const_data_ptr<int32_t>(), static_cast<int>(offsets.numel()),
        out.size(0), out.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

at::Tensor MoeBackend::grouped_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                                    const std::optional<at::Tensor>& bias, bool gelu, bool zero_tail) {
  const c10::cuda::CUDAGuard device_guard(a.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = a.size(0), K = a.size(1), N = b.size(2), groups = b.size(0);
  const at::Tensor A = a.contiguous(), B = b.contiguous(), off = offsets.contiguous();
  const std::optional<at::Tensor> bias_c = bias.has_value() ? std::optional(bias->contiguous()) : std::nullopt;
  at::Tensor out = at::empty({rows, N}, a.options());
  if (groups == 0) return zero_tail ? out.zero_() : out;  // no group owns a row
  const bool empty = rows == 0 || N == 0;
  bool done = empty;
  if (!empty && K > 0 &&
      is_tensor_core_shape(a.scalar_type(), K, N,
                           {A.const_data_ptr(), B.const_data_ptr(), out.const_data_ptr(),
                            bias_c.has_value() ? bias_c->const_data_ptr() : nullptr})) {
    const GroupedGemmProblem p{GemmKind::Forward, A.const_data_ptr(), B.const_data_ptr(),
                               bias_c.has_value() ? bias_c->const_data_ptr() : nullptr, out.mutable_data_ptr(),
                               off.const_data_ptr<int32_t>(), static_cast<int>(groups), rows, K, N, gelu};
    done = run_tensor_core(p, a.scalar_type(), stream);
  }
  if (!done) return grouped_gemm_loop(A, B, host_offsets("grouped_gemm", off, rows), bias_c, gelu, zero_tail);
  if (zero_tail) launch_zero_tail(out, off, stream);
  return out;
}

std::tuple<at::Tensor, at::Tensor> MoeBackend::expert_ffn(const at::Tensor& tokens, const MoePlan& plan,
                                                          const at::Tensor& w1, const at::Tensor& b1,
                                                          const at::Tensor& w2, const at::Tensor& b2, int64_t rows,
                                                          bool save_pre) {
  return expert_ffn_sequence<MoeBackend>(tokens, plan, w1, b1, w2, b2, rows, save_pre);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> MoeBackend::expert_ffn_backward(
    const at::Tensor& tokens, const at::Tensor& grad, const MoePlan& plan, const at::Tensor& expert_out,
    const std::optional<at::Tensor>& pre, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    int64_t rows) {
  return expert_ffn_backward_sequence<MoeBackend>(tokens, grad, plan, expert_out, pre, w1, b1, w2, rows);
}

std::tuple<at::Tensor, at::Tensor> MoeBackend::grouped_gemm_weight_grad(const at::Tensor& a, const at::Tensor& grad,
                                                                        const at::Tensor& offsets) {
  const c10::cuda::CUDAGuard device_guard(a.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = a.size(0), K = a.size(1), N = grad.size(1), groups = offsets.size(0);
  const at::Tensor A = a.contiguous(), G = grad.contiguous(), off = offsets.contiguous();
  at::Tensor db = at::zeros({groups, K, N}, a.options());
  at::Tensor dbias = at::zeros({groups, N}, a.options());
  if (rows == 0 || N == 0 || groups == 0) return {db, dbias};
  // K = 0: db is empty, but dbias still holds the column sums.
  bool done = K == 0;
  if (!done &&
      is_tensor_core_shape(a.scalar_type(), K, N, {A.const_data_ptr(), G.const_data_ptr(), db.const_data_ptr()})) {
    const GroupedGemmProblem p{GemmKind::WeightGrad, A.const_data_ptr(), G.const_data_ptr(), nullptr,
                               db.mutable_data_ptr(), off.const_data_ptr<int32_t>(), static_cast<int>(groups),
                               rows, K, N, false};
    done = run_tensor_core(p, a.scalar_type(), stream);
  }
  if (!done) return grouped_gemm_weight_grad_loop(A, G, host_offsets("grouped_gemm_weight_grad", off, rows));
  const int64_t blocks = groups * ((N + kSumCols - 1) / kSumCols);
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "grouped_gemm_weight_grad: E * ceil(N / 32) = ", blocks,
              " thread blocks exceed one CUDA grid");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "grouped_gemm_bias_grad", [&] {
    group_column_sum_kernel<scalar_t><<<static_cast<unsigned>(blocks), dim3(kSumCols, kSumRowLanes), 0, stream>>>(
        G.const_data_ptr<scalar_t>(), off.const_data_ptr<int32_t>(), rows, N, dbias.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {db, dbias};
}

TORCH_LIBRARY_IMPL(raphael_ext, CUDA, m) {
  m.impl("grouped_gemm", &grouped_gemm_op<MoeBackend>);
  m.impl("grouped_gemm_weight_grad", &grouped_gemm_weight_grad_op<MoeBackend>);
}

}  // namespace raphael_ext::cuda
