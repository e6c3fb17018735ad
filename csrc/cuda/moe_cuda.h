// The CUDA backend of the expert ops (see csrc/common/moe.h for what each function computes), and the
// description of one grouped GEMM that the tensor-core kernels (grouped_gemm_sm80.cu: CUTLASS 2.x
// GemmGrouped; grouped_gemm_sm90.cu: CUTLASS 3.x pointer-array, TMA + wgmma) take. Their arguments are
// filled on the device from the device-side offsets, so no launch reads the device.
#pragma once

#include "../common/moe.h"

#include <cuda_runtime.h>

namespace raphael_ext::cuda {

struct MoeBackend {
  static at::Tensor grouped_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                                 const std::optional<at::Tensor>& bias, bool gelu, bool zero_tail);
  static std::tuple<at::Tensor, at::Tensor> expert_ffn(const at::Tensor& tokens, const MoePlan& plan,
                                                        const at::Tensor& w1, const at::Tensor& b1,
                                                        const at::Tensor& w2, const at::Tensor& b2, int64_t rows,
                                                        bool save_pre);
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_ffn_backward(
      const at::Tensor& tokens, const at::Tensor& grad, const MoePlan& plan, const at::Tensor& expert_out,
      const std::optional<at::Tensor>& pre, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
      int64_t rows);
  static std::tuple<at::Tensor, at::Tensor> grouped_gemm_weight_grad(const at::Tensor& a, const at::Tensor& grad,
                                                                     const at::Tensor& offsets);
  static MoePlan plan(const at::Tensor& mask, const at::Tensor& route, const at::Tensor& gate,
                      const std::optional<at::Tensor>& text_lengths, int64_t num_experts, int64_t capacity);
  static at::Tensor dispatch(const at::Tensor& src, const at::Tensor& pair_index,
                             const std::optional<at::Tensor>& weight, int64_t rows);
  static at::Tensor combine(const at::Tensor& values, const at::Tensor& pair_index,
                            const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& z,
                            const std::optional<at::Tensor>& c);
  static at::Tensor pair_dot(const at::Tensor& rows, const at::Tensor& values, const at::Tensor& pair_index);
  static int64_t rows_used(const at::Tensor& offsets, int64_t capacity) { return capacity; }  // no device read
  static at::Tensor constant_term_grad(const at::Tensor& z, const at::Tensor& grad) { return at::mm(z.t(), grad); }
};

enum class GemmKind {
  Forward,     // D_g [m_g, N] = act(A_g [m_g, K] B_g [K, N] + bias_g): a row-major, b[g] row-major
  WeightGrad,  // D_g [K, N] = A_g^T [K, m_g] G_g [m_g, N]: the rows of a and grad of group g
};

// One grouped GEMM over contiguous, 16-byte aligned operands. For Forward: a [rows, K], b [E, K, N],
// bias [E, N] or null, d [rows, N]. For WeightGrad: a [rows, K], b = grad [rows, N], d [E, K, N] zeroed
// beforehand (empty groups get no tile). m_g comes from offsets on the device.
struct GroupedGemmProblem {
  GemmKind kind;
  const void* a;
  const void* b;
  const void* bias;
  void* d;
  const int32_t* offsets;
  int groups;
  int64_t rows, K, N;
  bool gelu;
};

// One group's GEMM in CUTLASS terms (M x N x K, row-major D), computed on the device.
struct GroupGemm {
  int M, N, K;
  int64_t a_offset, b_offset, d_offset;  // in elements from the problem's base pointers
  int64_t lda, ldb, ldd;
};

#if defined(__CUDACC__)
__device__ inline GroupGemm describe_group(const GroupedGemmProblem& p, int g) {
  const int32_t start = g == 0 ? 0 : p.offsets[g - 1];
  const int32_t end = p.offsets[g];
  // Host code checks everything else; checking these values there would synchronise.
  CUDA_KERNEL_ASSERT(start <= end && end <= p.rows &&
                     "grouped_gemm: offsets must be non-decreasing row ends in [0, T]");
  const int m = end - start;
  if (p.kind == GemmKind::Forward) {
    return {m, int(p.N), int(p.K), start * p.K, g * p.K * p.N, start * p.N, p.K, p.N, p.N};
  }
  // a^T of the group is column-major [K, m] with leading dimension K. An empty group gets M = 0 (no
  // tile) rather than a zero-length reduction, which not every kernel schedule handles.
  return {m == 0 ? 0 : int(p.K), int(p.N), m, start * p.K, start * p.N, g * p.K * p.N, p.K, p.N, p.N};
}
#endif

// The tensor-core paths; each returns false when it does not apply (dtype, device arch, or not compiled
// for that arch), and the caller falls back to the at::mm loop.
bool grouped_gemm_sm80(const GroupedGemmProblem& p, at::ScalarType dtype, cudaStream_t stream);
bool grouped_gemm_sm90(const GroupedGemmProblem& p, at::ScalarType dtype, cudaStream_t stream);

// Whether this binary holds device code (from nvcc's __CUDA_ARCH_LIST__, e.g. 800,900) that runs on a GPU
// of compute capability major.minor: code for sm_XY runs on sm_XZ with Z >= Y.
constexpr bool compiled_for(int major, int minor) {
#if defined(__CUDA_ARCH_LIST__)
  constexpr int archs[] = {__CUDA_ARCH_LIST__};
  for (int arch : archs) {
    if (arch / 100 == major && (arch / 10) % 10 <= minor) return true;
  }
#endif
  return false;
}

}  // namespace raphael_ext::cuda
