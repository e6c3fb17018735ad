// CPU grouped GEMM (docs/kernels.md): the at::mm loop of csrc/common/moe.h (at::mm parallelises each call
// itself), with the offsets read and checked on the host. space_moe's fused expert FFN is in
// space_moe_kernel.cpp.
#include "moe_cpu.h"

#include <torch/library.h>

namespace raphael_ext::cpu {

at::Tensor MoeBackend::grouped_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                                    const std::optional<at::Tensor>& bias, bool gelu, bool zero_tail) {
  return grouped_gemm_loop(a, b, host_offsets("grouped_gemm", offsets, a.size(0)), bias, gelu, zero_tail);
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
