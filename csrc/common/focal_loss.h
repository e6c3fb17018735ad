// Sigmoid focal loss (docs/kernels.md): the per-element math shared by the CPU and CUDA kernels, and the
// argument validation shared by both launchers. Keeping one copy of the formula means the two
// backends can only disagree through rounding, never through algebra.
#pragma once

#include "checks.h"
#include "host_device.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string_view>
#include <tuple>

namespace raphael_ext {

enum class Reduction { None, Mean, Sum };

// How m^gamma is evaluated. gamma = 2 (the paper's) and the other small integers avoid pow().
enum class GammaKind { Zero, One, Two, General };

// Parameters in the kernel's accumulation type, so the per-element code does no conversions.
template <typename acc_t>
struct FocalParams {
  acc_t alpha;  // < 0: no class weighting (torchvision's convention)
  acc_t gamma;
  GammaKind gamma_kind;
};

template <typename acc_t>
inline FocalParams<acc_t> make_focal_params(double alpha, double gamma) {
  const GammaKind kind = gamma == 0.0   ? GammaKind::Zero
                         : gamma == 1.0 ? GammaKind::One
                         : gamma == 2.0 ? GammaKind::Two
                                        : GammaKind::General;
  return {static_cast<acc_t>(alpha), static_cast<acc_t>(gamma), kind};
}

// Loss of one element and d(loss)/d(logit). acc_t is float for float/half/bfloat16 inputs and
// double for float64. Written so that no intermediate overflows for |x| up to the dtype's max:
// the only exponential is exp(-|x|) <= 1.
template <typename acc_t>
RAPHAEL_HOST_DEVICE void focal_loss_element(acc_t x, acc_t t, const FocalParams<acc_t>& p, acc_t& loss,
                                            acc_t& dloss) {
  using std::exp;
  using std::log1p;
  using std::pow;
  const acc_t one = 1;
  const acc_t e = exp(-(x < 0 ? -x : x));
  const acc_t inv = one / (one + e);
  const acc_t s = x >= 0 ? inv : e * inv;     // sigmoid(x)
  const acc_t sbar = x >= 0 ? e * inv : inv;  // sigmoid(-x) = 1 - sigmoid(x), without cancellation
  const acc_t ce = (x > 0 ? x : acc_t(0)) - x * t + log1p(e);
  const acc_t m = t * sbar + (one - t) * s;   // 1 - p_t
  const acc_t a = p.alpha >= 0 ? p.alpha * t + (one - p.alpha) * (one - t) : one;
  acc_t m_pow, dm_pow;  // m^gamma and gamma * m^(gamma - 1) (defined as 0 where m = 0)
  switch (p.gamma_kind) {
    case GammaKind::Zero: m_pow = one; dm_pow = 0; break;
    case GammaKind::One: m_pow = m; dm_pow = one; break;
    case GammaKind::Two: m_pow = m * m; dm_pow = acc_t(2) * m; break;
    default:
      m_pow = pow(m, p.gamma);
      dm_pow = m > 0 ? p.gamma * m_pow / m : acc_t(0);
  }
  loss = a * m_pow * ce;
  dloss = a * (m_pow * (s - t) + dm_pow * (one - acc_t(2) * t) * s * sbar * ce);
}

inline Reduction parse_reduction(std::string_view op, std::string_view reduction) {
  if (reduction == "mean") return Reduction::Mean;
  if (reduction == "sum") return Reduction::Sum;
  if (reduction == "none") return Reduction::None;
  TORCH_CHECK_VALUE(false, op, ": reduction must be 'none', 'mean' or 'sum', got '", reduction, "'");
}

struct FocalLossArgs {
  int64_t per_sample;  // elements per sample (what one sample_mask entry keeps or drops)
  Reduction mode;
};

// Validates the op's arguments, the same for every backend.
inline FocalLossArgs check_focal_loss_args(const at::Tensor& logits, const at::Tensor& targets, double alpha,
                                           double gamma, std::string_view reduction,
                                           const std::optional<at::Tensor>& sample_mask) {
  constexpr std::string_view op = "sigmoid_focal_loss";
  const Reduction mode = parse_reduction(op, reduction);
  check_floating(op, logits, "logits");
  check_same_device(op, logits, "logits", targets, "targets");
  check_same_dtype(op, logits, "logits", targets, "targets");
  check_same_shape(op, logits, "logits", targets, "targets");
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha <= 1.0, op, ": alpha must be <= 1 (or < 0 for no weighting), got ", alpha);
  TORCH_CHECK_VALUE(std::isfinite(gamma) && gamma >= 0.0, op, ": gamma must be finite and >= 0, got ", gamma);
  if (!sample_mask.has_value()) return {logits.numel(), mode};
  const at::Tensor& mask = *sample_mask;
  TORCH_CHECK(logits.dim() >= 1, op, ": sample_mask needs logits with a batch dimension, got a 0-dim tensor");
  check_dtype(op, mask, "sample_mask", at::kBool);
  check_same_device(op, logits, "logits", mask, "sample_mask");
  TORCH_CHECK(mask.dim() == 1 && mask.size(0) == logits.size(0), op,
              ": sample_mask must have shape [B] with B = logits.size(0) = ", logits.size(0), ", got ", mask.sizes());
  return {logits.size(0) == 0 ? 0 : logits.numel() / logits.size(0), mode};
}

}  // namespace raphael_ext
