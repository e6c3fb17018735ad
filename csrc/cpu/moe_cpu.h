// The CPU backend of the expert ops (see csrc/common/moe.h for what each function computes).
// grouped_gemm and its weight gradient live in grouped_gemm_kernel.cpp; the routing plan, dispatch,
// combine and pair_dot in space_moe_kernel.cpp.
#pragma once

#include "../common/moe.h"

namespace raphael_ext::cpu {

struct MoeBackend {
  static at::Tensor grouped_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                                 const std::optional<at::Tensor>& bias, bool gelu, bool zero_tail);
  static at::Tensor expert_ffn(const at::Tensor& a, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                               const at::Tensor& b2, const at::Tensor& offsets);
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_ffn_backward(
      const at::Tensor& a, const at::Tensor& grad, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
      const at::Tensor& offsets);
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
  static int64_t rows_used(const at::Tensor& offsets, int64_t capacity);
};

}  // namespace raphael_ext::cpu
