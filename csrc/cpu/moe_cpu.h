// The CPU backend of the expert ops (see csrc/common/moe.h for what each function computes).
// grouped_gemm and its weight gradient live in grouped_gemm_kernel.cpp; the routing plan, the fused
// expert FFN (forward and backward, gathering token rows straight into their GEMM blocks) and combine in
// space_moe_kernel.cpp.
#pragma once

#include "../common/moe.h"

namespace raphael_ext::cpu {

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
  static at::Tensor combine(const at::Tensor& values, const at::Tensor& pair_index,
                            const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& z,
                            const std::optional<at::Tensor>& c);
  static int64_t rows_used(const at::Tensor& offsets, int64_t capacity);
  static at::Tensor constant_term_grad(const at::Tensor& z, const at::Tensor& grad);
};

}  // namespace raphael_ext::cpu
