// CPU grouped GEMM (SPEC §3.2): the at::mm loop of csrc/common/moe.h (at::mm parallelises each call
// itself), with the offsets read and checked on the host; and the fused expert FFN of space_moe.
#include "moe_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <utility>

namespace raphael_ext::cpu {
namespace {

constexpr int64_t kFfnRows = 128;  // rows per task of the fused FFN: the [128, F] hidden block stays in L2

}  // namespace

at::Tensor MoeBackend::grouped_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                                    const std::optional<at::Tensor>& bias, bool gelu, bool zero_tail) {
  return grouped_gemm_loop(a, b, host_offsets("grouped_gemm", offsets, a.size(0)), bias, gelu, zero_tail);
}

// Both GEMMs of each expert on blocks of kFfnRows rows, one block per task (BLAS runs single-threaded
// inside the parallel region): the hidden activations never leave the cache and are never allocated
// at T x F, which the two-pass version pays for in memory traffic and page faults.
at::Tensor MoeBackend::expert_ffn(const at::Tensor& a, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                  const at::Tensor& b2, const at::Tensor& offsets) {
  const int64_t rows = a.size(0), F = w1.size(2);
  const std::vector<int64_t> ends = host_offsets("space_moe", offsets, rows);
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (group, first row)
  int64_t start = 0;
  for (size_t g = 0; g < ends.size(); ++g) {
    for (int64_t r = start; r < ends[g]; r += kFfnRows) blocks.emplace_back(static_cast<int64_t>(g), r);
    start = ends[g];
  }
  at::Tensor out = at::empty({rows, w2.size(2)}, a.options());
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t first, int64_t last) {
    const at::NoGradGuard no_grad;  // grad mode is per thread: the pool's threads do not inherit the caller's
    at::Tensor hidden = at::empty({kFfnRows, F}, a.options());
    for (int64_t i = first; i < last; ++i) {
      const auto [g, r] = blocks[i];
      const int64_t len = std::min(kFfnRows, ends[g] - r);
      at::Tensor h = hidden.narrow(0, 0, len);
      at::Tensor y = out.narrow(0, r, len);
      at::addmm_out(h, b1[g], a.narrow(0, r, len), w1[g]);
      at::gelu_(h);
      at::addmm_out(y, b2[g], h, w2[g]);
    }
  });
  if (start < rows) out.narrow(0, start, rows - start).zero_();
  return out;
}

std::tuple<at::Tensor, at::Tensor> MoeBackend::grouped_gemm_weight_grad(const at::Tensor& a, const at::Tensor& grad,
                                                                        const at::Tensor& offsets) {
  return grouped_gemm_weight_grad_loop(a, grad, host_offsets("grouped_gemm_weight_grad", offsets, a.size(0)));
}

TORCH_LIBRARY_IMPL(raphael_ext, CPU, m) {
  m.impl("grouped_gemm", &grouped_gemm_op<MoeBackend>);
  m.impl("grouped_gemm_weight_grad", &grouped_gemm_weight_grad_op<MoeBackend>);
}

}  // namespace raphael_ext::cpu
