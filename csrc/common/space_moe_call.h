// space_moe through the dispatcher, for the C++ callers of the op (the pybind module, the time_moe composite):
// autograd, fake tensors and torch.compile apply as to any call of torch.ops.raphael_ext.space_moe.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace raphael_ext {

// y of space_moe; save_hidden: the forward keeps the first GEMM's pre-activations for the backward.
inline at::Tensor call_space_moe(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& route,
                                 const at::Tensor& gate, const at::Tensor& w1, const at::Tensor& b1,
                                 const at::Tensor& w2, const at::Tensor& b2,
                                 const std::optional<at::Tensor>& text_lengths, bool save_hidden) {
  using Out = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("raphael_ext::space_moe", "")
                             .typed<Out(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const std::optional<at::Tensor>&, bool)>();
  return std::get<0>(op.call(x, mask, route, gate, w1, b1, w2, b2, text_lengths, save_hidden));
}

}  // namespace raphael_ext
