// Fused cross-attention-to-mask (docs/kernels.md): the argument validation shared by the CPU and CUDA
// launchers, and the few scalar rules both backends must apply identically (which keys are valid,
// the scale, the mask threshold), so the two can only differ through rounding.
#pragma once

#include "checks.h"
#include "host_device.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

namespace raphael_ext {

// Limits of the contract: every key and value of a head fits one tile, so the softmax is final after
// one pass and the head mean / column max need no second look at the scores.
constexpr int64_t kMaxTextTokens = 128;

struct CrossAttentionArgs {
  int64_t batch, heads, queries, keys, head_dim;
  double scale;  // multiplies q·k before the softmax
};

inline double resolve_attention_scale(const std::optional<double>& scale, int64_t head_dim) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

// q [B, H, N_x, D], k and v [B, H, N_y, D]; text_lengths [B] integers. Tensor values of text_lengths
// are checked by the CPU launcher only (reading them on a GPU would need a host sync; the CUDA kernels
// clamp them to [0, N_y] instead).
inline CrossAttentionArgs check_cross_attention_args(std::string_view op, const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const std::optional<at::Tensor>& text_lengths,
                                                     const std::optional<double>& scale) {
  check_floating(op, q, "q");
  check_same_dtype(op, q, "q", k, "k");
  check_same_dtype(op, q, "q", v, "v");
  check_same_device(op, q, "q", k, "k");
  check_same_device(op, q, "q", v, "v");
  check_dim(op, q, "q", 4);
  check_dim(op, k, "k", 4);
  check_same_shape(op, k, "k", v, "v");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), op,
              ": k must have shape [B, H, N_y, D] with B, H, D of q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(q.size(1) >= 1, op, ": q needs at least one head (dim 1), got shape ", q.sizes());
  const int64_t head_dim = q.size(3);
  TORCH_CHECK(head_dim == 32 || head_dim == 64 || head_dim == 128, op,
              ": the head dimension (last dim of q) must be 32, 64 or 128, got ", head_dim);
  TORCH_CHECK(k.size(2) >= 1 && k.size(2) <= kMaxTextTokens, op, ": k must have 1 to ", kMaxTextTokens,
              " text tokens (dim 2), got ", k.size(2));
  TORCH_CHECK(!(q.is_cuda() && q.scalar_type() == at::kDouble), op,
              ": float64 runs on CPU only (it is there for gradcheck); use float32, float16 or bfloat16 on CUDA");
  if (text_lengths.has_value()) {
    const at::Tensor& lengths = *text_lengths;
    check_same_device(op, q, "q", lengths, "text_lengths");
    TORCH_CHECK(lengths.scalar_type() == at::kInt || lengths.scalar_type() == at::kLong, op,
                ": text_lengths must be int32 or int64, got ", lengths.scalar_type());
    TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == q.size(0), op, ": text_lengths must have shape [B] = [",
                q.size(0), "], got ", lengths.sizes());
  }
  const double resolved = resolve_attention_scale(scale, head_dim);
  TORCH_CHECK_VALUE(std::isfinite(resolved), op, ": scale must be finite, got ", resolved);
  return {q.size(0), q.size(1), q.size(2), k.size(2), head_dim, resolved};
}

// The backward's extra arguments: the gradients of out and attn_map (either may be absent) and the
// saved log-sum-exp.
inline CrossAttentionArgs check_cross_attention_backward_args(
    std::string_view op, const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_attn_map,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
    const std::optional<at::Tensor>& text_lengths, double scale) {
  const CrossAttentionArgs a = check_cross_attention_args(op, q, k, v, text_lengths, scale);
  if (grad_out.has_value()) {
    check_same_shape(op, q, "q", *grad_out, "grad_out");
    check_same_dtype(op, q, "q", *grad_out, "grad_out");
    check_same_device(op, q, "q", *grad_out, "grad_out");
  }
  if (grad_attn_map.has_value()) {
    const at::Tensor& gm = *grad_attn_map;
    TORCH_CHECK(gm.dim() == 3 && gm.size(0) == a.batch && gm.size(1) == a.queries && gm.size(2) == a.keys, op,
                ": grad_attn_map must have shape [B, N_x, N_y] = [", a.batch, ", ", a.queries, ", ", a.keys,
                "], got ", gm.sizes());
    check_same_dtype(op, q, "q", gm, "grad_attn_map");
    check_same_device(op, q, "q", gm, "grad_attn_map");
  }
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == a.batch && lse.size(1) == a.heads && lse.size(2) == a.queries, op,
              ": lse must have shape [B, H, N_x], got ", lse.sizes());
  check_dtype(op, lse, "lse", q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  check_same_device(op, q, "q", lse, "lse");
  return a;
}

// The kernels read rows through their strides but need the last dimension contiguous.
inline at::Tensor unit_inner_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Number of valid keys of a sample: text_lengths[b] clamped to [0, N_y] (the CPU launcher rejects
// values outside that range before any kernel runs).
RAPHAEL_HOST_DEVICE int valid_keys(const int* lengths, int64_t b, int64_t keys) {
  if (lengths == nullptr) return static_cast<int>(keys);
  const int n = lengths[b];
  return n < 0 ? 0 : (n > keys ? static_cast<int>(keys) : n);
}

// mask = attn_map >= alpha * (column max of attn_map), with both sides in the accumulation type and
// attn_map as returned (already rounded to its dtype), so anyone can recompute the mask from the map.
template <typename acc_t>
RAPHAEL_HOST_DEVICE bool mask_value(acc_t map_value, acc_t alpha, acc_t column_max) {
  return map_value >= alpha * column_max;
}

}  // namespace raphael_ext
