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

// (group, first row) of every block of at most kFfnRows rows within a group.
std::vector<std::pair<int64_t, int64_t>> row_blocks(const std::vector<int64_t>& ends) {
  std::vector<std::pair<int64_t, int64_t>> blocks;
  int64_t start = 0;
  for (size_t g = 0; g < ends.size(); ++g) {
    for (int64_t r = start; r < ends[g]; r += kFfnRows) blocks.emplace_back(static_cast<int64_t>(g), r);
    start = ends[g];
  }
  return blocks;
}

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
  const std::vector<std::pair<int64_t, int64_t>> blocks = row_blocks(ends);
  const int64_t start = ends.empty() ? 0 : ends.back();
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

// The backward of expert_ffn, fused per block of rows like the forward: the recomputed pre-activation
// stays in cache, GELU and its gradient are applied there, and only h and d(pre) are written out, for
// the weight gradients (one large GEMM per expert afterwards) .
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> MoeBackend::expert_ffn_backward(
    const at::Tensor& a, const at::Tensor& grad, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    const at::Tensor& offsets) {
  const int64_t rows = a.size(0), F = w1.size(2);
  const std::vector<int64_t> ends = host_offsets("space_moe", offsets, rows);
  const std::vector<std::pair<int64_t, int64_t>> blocks = row_blocks(ends);
  at::Tensor hidden = at::empty({rows, F}, a.options());
  at::Tensor dpre = at::empty({rows, F}, a.options());
  at::Tensor da = at::empty({rows, a.size(1)}, a.options());  // rows past the pairs are never read
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t first, int64_t last) {
    const at::NoGradGuard no_grad;  // grad mode is per thread: the pool's threads do not inherit the caller's
    at::Tensor pre_block = at::empty({kFfnRows, F}, a.options());
    for (int64_t i = first; i < last; ++i) {
      const auto [g, r] = blocks[i];
      const int64_t len = std::min(kFfnRows, ends[g] - r);
      at::Tensor pre = pre_block.narrow(0, 0, len);
      at::Tensor h = hidden.narrow(0, r, len);
      at::Tensor dp = dpre.narrow(0, r, len);
      at::Tensor da_rows = da.narrow(0, r, len);
      at::addmm_out(pre, b1[g], a.narrow(0, r, len), w1[g]);
      at::gelu_out(h, pre);
      at::mm_out(dp, grad.narrow(0, r, len), w2[g].t());
      at::gelu_backward_out(dp, dp, pre);
      at::mm_out(da_rows, dp, w1[g].t());
    }
  });
  auto [dw2, db2] = grouped_gemm_weight_grad_loop(hidden, grad, ends);
  auto [dw1, db1] = grouped_gemm_weight_grad_loop(a, dpre, ends);
  return {da, dw1, db1, dw2, db2};
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
