// CPU kernel of sigmoid_focal_loss (docs/kernels.md): one pass over logits and targets that writes
// d(loss)/d(logit) and reduces the loss. Parallel over fixed-size chunks whose partial sums are
// added in chunk order, so the result does not depend on the number of threads.
#include "../common/focal_loss.h"
#include "vec_math_avx2.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace raphael_ext {
namespace {

constexpr int64_t kChunk = int64_t{1} << 15;  // elements per parallel task
constexpr int64_t kBlock = 256;               // elements converted to float and summed in float at a time

// ---------------------------------------------------------------------------------------------
// Kernel bodies. Each processes n contiguous elements, writes dloss (and loss, when not null) and
// returns the sum of the loss.

template <typename acc_t>
double focal_scalar(const acc_t* x, const acc_t* t, acc_t* dloss, acc_t* loss, int64_t n, const FocalParams<acc_t>& p) {
  acc_t sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    acc_t l, d;
    focal_loss_element(x[i], t[i], p, l, d);
    dloss[i] = d;
    if (loss) loss[i] = l;
    sum += l;
  }
  return sum;
}

#if RAPHAEL_HAVE_AVX2_PATH
// The same math as focal_loss_element, 8 lanes at a time; returns how many elements it handled
// (a multiple of 8) and adds their loss to *sum.
RAPHAEL_AVX2 int64_t focal_avx2(const float* x, const float* t, float* dloss, float* loss, int64_t n,
                                const FocalParams<float>& p, double* sum) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps(), two = _mm256_set1_ps(2.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 alpha = _mm256_set1_ps(p.alpha), gamma = _mm256_set1_ps(p.gamma);
  __m256 acc = zero;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i), tv = _mm256_loadu_ps(t + i);
    const __m256 e = avx2::exp(_mm256_or_ps(xv, sign));  // exp(-|x|)
    const __m256 inv = _mm256_div_ps(one, _mm256_add_ps(one, e));
    const __m256 e_inv = _mm256_mul_ps(e, inv);
    const __m256 nonneg = _mm256_cmp_ps(xv, zero, _CMP_GE_OQ);
    const __m256 s = _mm256_blendv_ps(e_inv, inv, nonneg);
    const __m256 sbar = _mm256_blendv_ps(inv, e_inv, nonneg);
    const __m256 ce = _mm256_add_ps(_mm256_fnmadd_ps(xv, tv, _mm256_max_ps(xv, zero)), avx2::log1p(e, inv));
    const __m256 one_minus_t = _mm256_sub_ps(one, tv);
    const __m256 m = _mm256_fmadd_ps(tv, sbar, _mm256_mul_ps(one_minus_t, s));
    const __m256 a = p.alpha >= 0 ? _mm256_fmadd_ps(alpha, tv, _mm256_mul_ps(_mm256_sub_ps(one, alpha), one_minus_t))
                                  : one;
    __m256 m_pow, dm_pow;
    switch (p.gamma_kind) {
      case GammaKind::Zero: m_pow = one; dm_pow = zero; break;
      case GammaKind::One: m_pow = m; dm_pow = one; break;
      case GammaKind::Two: m_pow = _mm256_mul_ps(m, m); dm_pow = _mm256_mul_ps(two, m); break;
      default: {
        const __m256 positive = _mm256_cmp_ps(m, zero, _CMP_GT_OQ);
        m_pow = _mm256_and_ps(avx2::exp(_mm256_mul_ps(gamma, avx2::log(m))), positive);
        dm_pow = _mm256_and_ps(_mm256_div_ps(_mm256_mul_ps(gamma, m_pow), m), positive);
      }
    }
    const __m256 l = _mm256_mul_ps(_mm256_mul_ps(a, m_pow), ce);
    const __m256 focus = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(dm_pow, _mm256_fnmadd_ps(two, tv, one)),
                                                     _mm256_mul_ps(s, sbar)), ce);
    const __m256 d = _mm256_mul_ps(a, _mm256_fmadd_ps(m_pow, _mm256_sub_ps(s, tv), focus));
    _mm256_storeu_ps(dloss + i, d);
    if (loss) _mm256_storeu_ps(loss + i, l);
    acc = _mm256_add_ps(acc, l);
  }
  *sum += avx2::reduce_add(acc);
  return i;
}
#endif

double focal_float(const float* x, const float* t, float* dloss, float* loss, int64_t n, const FocalParams<float>& p) {
  double sum = 0;
  int64_t done = 0;
#if RAPHAEL_HAVE_AVX2_PATH
  if (avx2::cpu_has_avx2_fma()) done = focal_avx2(x, t, dloss, loss, n, p, &sum);
#endif
  return sum + focal_scalar(x + done, t + done, dloss + done, loss ? loss + done : nullptr, n - done, p);
}

// Any dtype: float runs in place, half/bfloat16 through float buffers of kBlock elements, double
// in double.
template <typename scalar_t>
double focal_range(const scalar_t* x, const scalar_t* t, scalar_t* dloss, scalar_t* loss, int64_t n,
                   const FocalParams<at::opmath_type<scalar_t>>& p) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return focal_scalar(x, t, dloss, loss, n, p);
  } else {
    double sum = 0;
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t len = std::min(kBlock, n - b);
      if constexpr (std::is_same_v<scalar_t, float>) {
        sum += focal_float(x + b, t + b, dloss + b, loss ? loss + b : nullptr, len, p);
      } else {
        float xf[kBlock], tf[kBlock], df[kBlock], lf[kBlock];
        for (int64_t i = 0; i < len; ++i) {
          xf[i] = static_cast<float>(x[b + i]);
          tf[i] = static_cast<float>(t[b + i]);
        }
        sum += focal_float(xf, tf, df, loss ? lf : nullptr, len, p);
        for (int64_t i = 0; i < len; ++i) dloss[b + i] = static_cast<scalar_t>(df[i]);
        if (loss) {
          for (int64_t i = 0; i < len; ++i) loss[b + i] = static_cast<scalar_t>(lf[i]);
        }
      }
    }
    return sum;
  }
}

// ---------------------------------------------------------------------------------------------
// Launcher.

std::tuple<at::Tensor, at::Tensor, at::Tensor> sigmoid_focal_loss_cpu(const at::Tensor& logits,
                                                                      const at::Tensor& targets, double alpha,
                                                                      double gamma, c10::string_view reduction,
                                                                      const std::optional<at::Tensor>& sample_mask) {
  // Plain locals, not a structured binding: the dispatch lambdas capture them (C++20 only for bindings,
  // and older torch builds extensions as C++17).
  const FocalLossArgs args = check_focal_loss_args(logits, targets, alpha, gamma, reduction, sample_mask);
  const int64_t per_sample = args.per_sample;
  const Reduction mode = args.mode;
  const at::Tensor x = logits.contiguous();
  const at::Tensor t = targets.contiguous();
  at::Tensor dloss = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor loss_elem = mode == Reduction::None ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::Tensor();
  const at::Tensor mask = sample_mask.has_value() ? sample_mask->contiguous() : at::Tensor();
  const bool* keep = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;

  const int64_t n = x.numel();
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(num_chunks, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sigmoid_focal_loss_cpu", [&] {
    const auto params = make_focal_params<at::opmath_type<scalar_t>>(alpha, gamma);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* dp = dloss.mutable_data_ptr<scalar_t>();
    scalar_t* lp = loss_elem.defined() ? loss_elem.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, num_chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        const int64_t end = std::min(n, (c + 1) * kChunk);
        double sum = 0;
        // Split the chunk where samples begin, so a dropped sample is skipped as a whole.
        for (int64_t i = c * kChunk; i < end;) {
          const int64_t sample = keep ? i / per_sample : 0;
          const int64_t stop = keep ? std::min(end, (sample + 1) * per_sample) : end;
          if (!keep || keep[sample]) {
            sum += focal_range<scalar_t>(xp + i, tp + i, dp + i, lp ? lp + i : nullptr, stop - i, params);
          } else {
            std::fill(dp + i, dp + stop, scalar_t(0));
            if (lp) std::fill(lp + i, lp + stop, scalar_t(0));
          }
          i = stop;
        }
        partial[c] = sum;
      }
    });
  });

  double total = 0;
  for (double s : partial) total += s;
  int64_t counted = n;
  if (keep) counted = per_sample * std::count(keep, keep + mask.numel(), true);
  const double norm = mode == Reduction::Mean ? (counted > 0 ? 1.0 / counted : 0.0) : 1.0;
  const auto norm_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor norm_t = at::scalar_tensor(norm, x.options().dtype(norm_dtype));
  if (mode == Reduction::None) return {loss_elem, dloss, norm_t};
  return {at::scalar_tensor(total * norm, x.options()), dloss, norm_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(raphael_ext, CPU, m) { m.impl("sigmoid_focal_loss", &sigmoid_focal_loss_cpu); }

}  // namespace raphael_ext
