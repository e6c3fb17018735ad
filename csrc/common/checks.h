// Argument checks shared by every op. Each check names the argument it rejects, so a user sees
// "sigmoid_focal_loss: targets must have the same shape as logits ([4, 5] vs [4, 6])" rather than
// an index error deep inside a kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string_view>

namespace raphael_ext {

inline void check_floating(std::string_view op, const at::Tensor& t, std::string_view name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              op, ": ", name, " must be float32, float16, bfloat16 or float64, got ", dtype);
}

inline void check_same_dtype(std::string_view op, const at::Tensor& ref, std::string_view ref_name,
                             const at::Tensor& t, std::string_view name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name,
              " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(std::string_view op, const at::Tensor& ref, std::string_view ref_name,
                              const at::Tensor& t, std::string_view name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

inline void check_same_shape(std::string_view op, const at::Tensor& ref, std::string_view ref_name,
                             const at::Tensor& t, std::string_view name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of ", ref_name, " (",
              ref.sizes(), "), got ", t.sizes());
}

inline void check_dim(std::string_view op, const at::Tensor& t, std::string_view name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

inline void check_dtype(std::string_view op, const at::Tensor& t, std::string_view name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

// Index tensors (routes, lengths) may come as int32 or int64.
inline void check_integral(std::string_view op, const at::Tensor& t, std::string_view name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
              " must be int32 or int64, got ", t.scalar_type());
}

inline void check_shape(std::string_view op, const at::Tensor& t, std::string_view name, at::IntArrayRef shape,
                        std::string_view meaning) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", meaning, " = ", shape, ", got ", t.sizes());
}

// dtype, device and shape of an optional argument in one call (nothing to check when it is absent).
inline void check_optional_like(std::string_view op, const at::Tensor& ref, std::string_view ref_name,
                                const std::optional<at::Tensor>& t, std::string_view name, at::IntArrayRef shape,
                                std::string_view meaning) {
  if (!t.has_value()) return;
  check_same_device(op, ref, ref_name, *t, name);
  check_same_dtype(op, ref, ref_name, *t, name);
  check_shape(op, *t, name, shape, meaning);
}

}  // namespace raphael_ext
