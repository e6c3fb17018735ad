// CPU kernels of space_moe (docs/kernels.md): the routing plan (counting sort of (token, expert) pairs into
// a CSR by expert), the expert FFN and its backward fused per block of grouped rows, and combine
// (weighted reduction of the expert rows per token, plus sum_k z_jk c_k). Every output row or sum is
// owned by one token or one block and reduced in a fixed order, so the output and every gradient but the
// weights' do not depend on the number of threads; the weight gradients are one BLAS GEMM each, summed in
// the BLAS's order. The op itself is written once in csrc/common/moe.h.
#include "moe_cpu.h"
#include "row_buffer_cache.h"
#include "vec_math_avx2.h"
#include "vec_math_avx512.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

namespace raphael_ext::cpu {
namespace {

constexpr int64_t kTokenGrain = 32;  // image tokens per parallel task
// Grouped rows per block of the fused FFN, at most. Every single-threaded GEMM call packs its whole weight matrix
// again, so short blocks pay that once per few rows: on 2 cores a training step of the benchmark's shape is 3-6 %
// faster with 384 rows than with 128 (256: 1 %; 512 and more: slower). At F = 1024 a [384, F] block is 1.5 MiB.
constexpr int64_t kFfnRows = 384;

// A block of at most kFfnRows grouped rows of one expert.
struct RowBlock {
  int64_t expert, first, rows;
};

// Each expert's rows in an even number of blocks of nearly equal size: the backward runs one expert's blocks between
// two barriers, where with a ragged last block one thread would wait for the other. The split depends on the row
// counts alone, never on the number of threads, so the results do not either.
std::vector<RowBlock> row_blocks(const std::vector<int64_t>& ends) {
  std::vector<RowBlock> blocks;
  int64_t start = 0;
  for (size_t k = 0; k < ends.size(); ++k) {
    const int64_t len = ends[k] - start;
    int64_t count = (len + kFfnRows - 1) / kFfnRows;
    count += count % 2;
    for (int64_t b = 0, first = start; b < count; ++b) {
      const int64_t rows = len / count + (b < len % count ? 1 : 0);
      if (rows > 0) blocks.push_back({static_cast<int64_t>(k), first, rows});
      first += rows;
    }
    start = ends[k];
  }
  return blocks;
}

// The order in which the forward's parallel loop takes the blocks. The loop hands each of its threads one
// contiguous share of this order; ordered by their place within their expert (in as many slices as threads), the
// shares hold about as many rows of every expert each, where in expert order one thread would take the larger
// experts (on 2 threads the benchmark's 9197 rows split 4432 / 4765). Which thread runs a block never changes its
// result.
std::vector<int64_t> balanced_order(const std::vector<RowBlock>& blocks, int64_t threads) {
  std::vector<int64_t> slice(blocks.size()), order(blocks.size());
  for (size_t first = 0, last = 0; first < blocks.size(); first = last) {
    while (last < blocks.size() && blocks[last].expert == blocks[first].expert) ++last;
    for (size_t i = first; i < last; ++i) slice[i] = static_cast<int64_t>((i - first) * threads / (last - first));
  }
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t l, int64_t r) { return slice[l] < slice[r]; });
  return order;
}

// The image token of every grouped row (pair_index inverted), so blocks gather their rows themselves.
std::vector<int32_t> row_tokens(const at::Tensor& pair_index, int64_t rows) {
  const int64_t n = pair_index.size(0), E = pair_index.size(1);
  const int32_t* idx = pair_index.const_data_ptr<int32_t>();
  std::vector<int32_t> token(rows);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t k = 0; k < E; ++k) {
      if (idx[j * E + k] >= 0) token[idx[j * E + k]] = static_cast<int32_t>(j);
    }
  }
  return token;
}

#if RAPHAEL_HAVE_AVX2_PATH
// Phi(x) = (1 + erf(x / sqrt 2)) / 2 and phi(x) = exp(-x^2 / 2) / sqrt(2 pi) together, with erf as
// PyTorch's vectorised GELU computes it (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7): one exp for both.
RAPHAEL_AVX2 inline void normal_cdf_pdf(__m256 x, __m256* cdf, __m256* pdf) {
  const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
  const __m256 sign = _mm256_and_ps(z, _mm256_set1_ps(-0.0f));
  const __m256 az = _mm256_xor_ps(z, sign);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), az, one));
  __m256 poly = _mm256_fmadd_ps(_mm256_set1_ps(1.061405429f), t, _mm256_set1_ps(-1.453152027f));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(1.421413741f));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(-0.284496736f));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(0.254829592f));
  poly = _mm256_mul_ps(poly, t);
  const __m256 e = avx2::exp(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), z), z));
  const __m256 erf = _mm256_or_ps(_mm256_fnmadd_ps(poly, e, one), sign);
  *cdf = _mm256_fmadd_ps(_mm256_set1_ps(0.5f), erf, _mm256_set1_ps(0.5f));
  *pdf = _mm256_mul_ps(e, _mm256_set1_ps(0.39894228040143268f));
}

// Forward epilogue of the first GEMM on a [rows, F] block (F a multiple of 8): pre += bias (stored back when
// store_pre: the saved pre-activations), hidden = GELU(pre). Replaces addmm's bias copy and a GELU pass.
RAPHAEL_AVX2 void bias_gelu_avx2(float* pre, const float* bias, float* hidden, int64_t rows, int64_t F,
                                 bool store_pre) {
  for (int64_t r = 0; r < rows; ++r) {
    float* p = pre + r * F;
    float* h = hidden + r * F;
    for (int64_t f = 0; f < F; f += 8) {
      const __m256 x = _mm256_add_ps(_mm256_loadu_ps(p + f), _mm256_loadu_ps(bias + f));
      __m256 cdf, pdf;
      normal_cdf_pdf(x, &cdf, &pdf);
      if (store_pre) _mm256_storeu_ps(p + f, x);
      _mm256_storeu_ps(h + f, _mm256_mul_ps(x, cdf));
    }
  }
}

// Backward epilogue on a [rows, F] block: x = pre (+ bias when the GEMM was recomputed without it),
// hidden = GELU(x) for the weight gradient, dpre *= GELU'(x) = Phi(x) + x phi(x), and the bias gradient
// sum over rows of dpre into colsum (F floats, zeroed by the caller): one pass where ATen takes three.
RAPHAEL_AVX2 void gelu_backward_avx2(const float* pre, const float* bias, float* hidden, float* dpre, float* colsum,
                                     int64_t rows, int64_t F) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = pre + r * F;
    float* h = hidden + r * F;
    float* d = dpre + r * F;
    for (int64_t f = 0; f < F; f += 8) {
      __m256 x = _mm256_loadu_ps(p + f);
      if (bias != nullptr) x = _mm256_add_ps(x, _mm256_loadu_ps(bias + f));
      __m256 cdf, pdf;
      normal_cdf_pdf(x, &cdf, &pdf);
      _mm256_storeu_ps(h + f, _mm256_mul_ps(x, cdf));
      const __m256 dp = _mm256_mul_ps(_mm256_loadu_ps(d + f), _mm256_fmadd_ps(x, pdf, cdf));
      _mm256_storeu_ps(d + f, dp);
      _mm256_storeu_ps(colsum + f, _mm256_add_ps(_mm256_loadu_ps(colsum + f), dp));
    }
  }
}

#if RAPHAEL_HAVE_AVX512_PATH
// GCC 12 takes the intrinsics' deliberately undefined source lanes for uninitialised values (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// The two epilogues above on 16 lanes (F a multiple of 16), with the same operations in the same order: their
// results equal the AVX2 ones bit for bit.
RAPHAEL_AVX512 inline void normal_cdf_pdf(__m512 x, __m512* cdf, __m512* pdf) {
  const __m512i sign_bit = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
  const __m512i sign = _mm512_and_epi32(_mm512_castps_si512(z), sign_bit);
  const __m512 az = _mm512_castsi512_ps(_mm512_xor_epi32(_mm512_castps_si512(z), sign));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), az, one));
  __m512 poly = _mm512_fmadd_ps(_mm512_set1_ps(1.061405429f), t, _mm512_set1_ps(-1.453152027f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
  poly = _mm512_mul_ps(poly, t);
  const __m512 e = avx512::exp(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), z));
  const __m512 erf =
      _mm512_castsi512_ps(_mm512_or_epi32(_mm512_castps_si512(_mm512_fnmadd_ps(poly, e, one)), sign));
  *cdf = _mm512_fmadd_ps(_mm512_set1_ps(0.5f), erf, _mm512_set1_ps(0.5f));
  *pdf = _mm512_mul_ps(e, _mm512_set1_ps(0.39894228040143268f));
}

RAPHAEL_AVX512 void bias_gelu_avx512(float* pre, const float* bias, float* hidden, int64_t rows, int64_t F,
                                     bool store_pre) {
  for (int64_t r = 0; r < rows; ++r) {
    float* p = pre + r * F;
    float* h = hidden + r * F;
    for (int64_t f = 0; f < F; f += 16) {
      const __m512 x = _mm512_add_ps(_mm512_loadu_ps(p + f), _mm512_loadu_ps(bias + f));
      __m512 cdf, pdf;
      normal_cdf_pdf(x, &cdf, &pdf);
      if (store_pre) _mm512_storeu_ps(p + f, x);
      _mm512_storeu_ps(h + f, _mm512_mul_ps(x, cdf));
    }
  }
}

RAPHAEL_AVX512 void gelu_backward_avx512(const float* pre, const float* bias, float* hidden, float* dpre,
                                         float* colsum, int64_t rows, int64_t F) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = pre + r * F;
    float* h = hidden + r * F;
    float* d = dpre + r * F;
    for (int64_t f = 0; f < F; f += 16) {
      __m512 x = _mm512_loadu_ps(p + f);
      if (bias != nullptr) x = _mm512_add_ps(x, _mm512_loadu_ps(bias + f));
      __m512 cdf, pdf;
      normal_cdf_pdf(x, &cdf, &pdf);
      _mm512_storeu_ps(h + f, _mm512_mul_ps(x, cdf));
      const __m512 dp = _mm512_mul_ps(_mm512_loadu_ps(d + f), _mm512_fmadd_ps(x, pdf, cdf));
      _mm512_storeu_ps(d + f, dp);
      _mm512_storeu_ps(colsum + f, _mm512_add_ps(_mm512_loadu_ps(colsum + f), dp));
    }
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

// One grouped row of the backward's gather (C a multiple of 8): g = s * dy, db2 += s * dy; returns
// dy . out, the gate's dweight of the pair.
RAPHAEL_AVX2 float gather_grad_row_avx2(const float* dy, const float* out, float s, float* g, float* db2, int64_t C) {
  const __m256 scale = _mm256_set1_ps(s);
  __m256 dot = _mm256_setzero_ps();
  for (int64_t c = 0; c < C; c += 8) {
    const __m256 d = _mm256_loadu_ps(dy + c);
    const __m256 sd = _mm256_mul_ps(scale, d);
    _mm256_storeu_ps(g + c, sd);
    _mm256_storeu_ps(db2 + c, _mm256_add_ps(_mm256_loadu_ps(db2 + c), sd));
    dot = _mm256_fmadd_ps(d, _mm256_loadu_ps(out + c), dot);
  }
  return static_cast<float>(avx2::reduce_add(dot));
}

// dst = sum_t scale[t] * rows[t] over C channels (a multiple of 8), the terms added in order: 32 channels at a
// time, their sums held in registers while every term's slice is read once.
RAPHAEL_AVX2 void weighted_sum_avx2(const float* const* rows, const float* scale, int64_t terms, float* dst,
                                    int64_t C) {
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int64_t t = 0; t < terms; ++t) {
      const __m256 s = _mm256_set1_ps(scale[t]);
      const float* r = rows[t] + c;
      a0 = _mm256_fmadd_ps(s, _mm256_loadu_ps(r), a0);
      a1 = _mm256_fmadd_ps(s, _mm256_loadu_ps(r + 8), a1);
      a2 = _mm256_fmadd_ps(s, _mm256_loadu_ps(r + 16), a2);
      a3 = _mm256_fmadd_ps(s, _mm256_loadu_ps(r + 24), a3);
    }
    _mm256_storeu_ps(dst + c, a0);
    _mm256_storeu_ps(dst + c + 8, a1);
    _mm256_storeu_ps(dst + c + 16, a2);
    _mm256_storeu_ps(dst + c + 24, a3);
  }
  for (; c < C; c += 8) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t t = 0; t < terms; ++t) a = _mm256_fmadd_ps(_mm256_set1_ps(scale[t]), _mm256_loadu_ps(rows[t] + c), a);
    _mm256_storeu_ps(dst + c, a);
  }
}
#endif

// The fused GELU epilogues for float32 rows of F channels (AVX-512 or AVX2), or none where ATen's GELU ops run.
struct GeluEpilogues {
  void (*forward)(float* pre, const float* bias, float* hidden, int64_t rows, int64_t F, bool store_pre) = nullptr;
  void (*backward)(const float* pre, const float* bias, float* hidden, float* dpre, float* colsum, int64_t rows,
                   int64_t F) = nullptr;
  bool fused() const { return forward != nullptr; }
};

GeluEpilogues gelu_epilogues(const at::Tensor& x, int64_t F) {
#if RAPHAEL_HAVE_AVX2_PATH
  if (x.scalar_type() == at::kFloat && F % 8 == 0 && avx2::cpu_has_avx2_fma()) {
#if RAPHAEL_HAVE_AVX512_PATH
    if (F % 16 == 0 && avx512::enabled()) return {bias_gelu_avx512, gelu_backward_avx512};
#endif
    return {bias_gelu_avx2, gelu_backward_avx2};
  }
#endif
  return {};
}

// dst[i] = src[token[i]] for the block's rows (any dtype: rows are copied as bytes).
void gather_rows(const at::Tensor& src, const int32_t* token, at::Tensor& dst) {
  const int64_t bytes = src.size(1) * src.element_size();
  const char* from = static_cast<const char*>(src.const_data_ptr());
  char* to = static_cast<char*>(dst.mutable_data_ptr());
  for (int64_t i = 0; i < dst.size(0); ++i) std::memcpy(to + i * bytes, from + token[i] * bytes, bytes);
}

// Per image token j: w_jk, z_jk and whether pair (j, k) exists (pair_index = 1 for now).
template <typename acc_t>
void plan_tokens(const bool* mask, const int64_t* route, const acc_t* gate, const int64_t* lengths, int64_t n,
                 int64_t N_x, int64_t N_y, int64_t E, acc_t* weight, acc_t* z, int32_t* pair_index) {
  at::parallel_for(0, n, kTokenGrain, [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < last; ++j) {
      const int64_t b = j / N_x, n_y = lengths[b];
      const bool* m = mask + j * N_y;
      acc_t* w = weight + j * E;
      acc_t* zz = z + j * E;
      int32_t* present = pair_index + j * E;
      for (int64_t i = 0; i < n_y; ++i) {
        const int64_t k = route[b * N_y + i];
        const acc_t g = gate[b * N_y + i] / static_cast<acc_t>(n_y);
        if (m[i]) {
          w[k] += g;
          present[k] = 1;
        } else {
          zz[k] += g;
        }
      }
    }
  });
}

}  // namespace

MoePlan MoeBackend::plan(const at::Tensor& mask, const at::Tensor& route, const at::Tensor& gate,
                         const std::optional<at::Tensor>& text_lengths, int64_t num_experts, int64_t capacity) {
  constexpr std::string_view op = "space_moe";
  const int64_t B = mask.size(0), N_x = mask.size(1), N_y = mask.size(2), E = num_experts, n = B * N_x;
  const at::Tensor lengths = text_lengths.has_value() ? text_lengths->to(at::kLong).contiguous()
                                                      : at::full({B}, N_y, route.options().dtype(at::kLong));
  const at::Tensor r = route.to(at::kLong).contiguous();
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  const int64_t* rp = r.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len[b] >= 0 && len[b] <= N_y, op, ": text_lengths must be in [0, N_y = ", N_y, "], got ", len[b],
                " for sample ", b);
    for (int64_t i = 0; i < len[b]; ++i) {
      const int64_t k = rp[b * N_y + i];
      TORCH_CHECK(k >= 0 && k < E, op, ": route must be an expert index in [0, E = ", E,
                  ") for valid text tokens, got ", k, " at [", b, ", ", i, "]");
    }
  }
  const at::Tensor m = mask.contiguous();
  const auto acc = acc_dtype(gate.scalar_type());
  const at::Tensor g = gate.to(acc).contiguous();
  MoePlan plan;
  plan.weight = at::zeros({n, E}, gate.options().dtype(acc));
  plan.z = at::zeros({n, E}, gate.options().dtype(acc));
  plan.pair_index = at::zeros({n, E}, route.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(acc, "space_moe_plan_cpu", [&] {
    plan_tokens<scalar_t>(m.const_data_ptr<bool>(), rp, g.const_data_ptr<scalar_t>(), len, n, N_x, N_y, E,
                          plan.weight.mutable_data_ptr<scalar_t>(), plan.z.mutable_data_ptr<scalar_t>(),
                          plan.pair_index.mutable_data_ptr<int32_t>());
  });
  // Counting sort by expert, stable in the token index.
  int32_t* idx = plan.pair_index.mutable_data_ptr<int32_t>();
  std::vector<int64_t> next(E, 0);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t k = 0; k < E; ++k) next[k] += idx[j * E + k];
  }
  plan.offsets = at::empty({E}, route.options().dtype(at::kInt));
  int32_t* ends = plan.offsets.mutable_data_ptr<int32_t>();
  int64_t total = 0;
  for (int64_t k = 0; k < E; ++k) {
    const int64_t count = next[k];
    next[k] = total;
    total += count;
    ends[k] = static_cast<int32_t>(total);
  }
  TORCH_INTERNAL_ASSERT(total <= capacity);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t k = 0; k < E; ++k) {
      int32_t& slot = idx[j * E + k];
      slot = slot ? static_cast<int32_t>(next[k]++) : -1;
    }
  }
  return plan;
}

at::Tensor MoeBackend::combine(const at::Tensor& values, const at::Tensor& pair_index,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& z,
                               const std::optional<at::Tensor>& c) {
  const int64_t n = pair_index.size(0), E = pair_index.size(1), C = values.size(1);
  const at::Tensor v = values.contiguous(), pi = pair_index.contiguous();
  const auto contiguous = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? std::optional(t->contiguous()) : std::nullopt;
  };
  const std::optional<at::Tensor> wc = contiguous(weight), zc = contiguous(z), cc = contiguous(c);
  at::Tensor out = at::empty({n, C}, values.options());
  const int32_t* idx = pi.const_data_ptr<int32_t>();
#if RAPHAEL_HAVE_AVX2_PATH
  if (v.scalar_type() == at::kFloat && C % 8 == 0 && avx2::cpu_has_avx2_fma()) {
    const float* vp = v.const_data_ptr<float>();
    const float* w = wc.has_value() ? wc->const_data_ptr<float>() : nullptr;
    const float* zp = zc.has_value() ? zc->const_data_ptr<float>() : nullptr;
    const float* cp = cc.has_value() ? cc->const_data_ptr<float>() : nullptr;
    float* op = out.mutable_data_ptr<float>();
    at::parallel_for(0, n, kTokenGrain, [&](int64_t first, int64_t last) {
      std::vector<const float*> rows(2 * E);
      std::vector<float> scale(2 * E);
      for (int64_t j = first; j < last; ++j) {
        int64_t terms = 0;
        for (int64_t k = 0; zp != nullptr && k < E; ++k) {
          if (zp[j * E + k] == 0.0f) continue;
          rows[terms] = cp + k * C;
          scale[terms++] = zp[j * E + k];
        }
        for (int64_t k = 0; k < E; ++k) {
          if (idx[j * E + k] < 0) continue;
          rows[terms] = vp + idx[j * E + k] * C;
          scale[terms++] = w != nullptr ? w[j * E + k] : 1.0f;
        }
        weighted_sum_avx2(rows.data(), scale.data(), terms, op + j * C, C);
      }
    });
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "space_moe_combine_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t* w = wc.has_value() ? wc->const_data_ptr<acc_t>() : nullptr;
    const acc_t* zp = zc.has_value() ? zc->const_data_ptr<acc_t>() : nullptr;
    const acc_t* cp = cc.has_value() ? cc->const_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, n, kTokenGrain, [&](int64_t first, int64_t last) {
      std::vector<acc_t> acc(C);
      for (int64_t j = first; j < last; ++j) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        if (zp != nullptr) {
          for (int64_t k = 0; k < E; ++k) {
            const acc_t s = zp[j * E + k];
            if (s == acc_t(0)) continue;
            for (int64_t ch = 0; ch < C; ++ch) acc[ch] += s * cp[k * C + ch];
          }
        }
        for (int64_t k = 0; k < E; ++k) {
          const int32_t p = idx[j * E + k];
          if (p < 0) continue;
          const acc_t s = w != nullptr ? w[j * E + k] : acc_t(1);
          const scalar_t* row = vp + p * C;
          for (int64_t ch = 0; ch < C; ++ch) acc[ch] += s * static_cast<acc_t>(row[ch]);
        }
        scalar_t* dst = op + j * C;
        for (int64_t ch = 0; ch < C; ++ch) dst[ch] = static_cast<scalar_t>(acc[ch]);
      }
    });
  });
  return out;
}

// Both GEMMs of each expert on blocks of kFfnRows rows, one block per task (BLAS runs single-threaded
// inside the parallel region): each block gathers its token rows itself, and its hidden activations
// stay in cache; they are written out at T x F only when saved for the backward.
std::tuple<at::Tensor, at::Tensor> MoeBackend::expert_ffn(const at::Tensor& tokens, const MoePlan& plan,
                                                          const at::Tensor& w1, const at::Tensor& b1,
                                                          const at::Tensor& w2, const at::Tensor& b2, int64_t rows,
                                                          bool save_pre) {
  const int64_t C = tokens.size(1), F = w1.size(2);
  const std::vector<int64_t> ends = host_offsets("space_moe", plan.offsets, rows);
  const int64_t used = ends.empty() ? 0 : ends.back();
  const std::vector<RowBlock> blocks = row_blocks(ends);
  const std::vector<int32_t> token = row_tokens(plan.pair_index.contiguous(), used);
  const at::Tensor x = tokens.contiguous();
  at::Tensor out = empty_cached({rows, C}, x.options());
  at::Tensor pre = empty_cached({save_pre ? rows : 0, F}, x.options());
  const GeluEpilogues epilogue = gelu_epilogues(x, F);
  const at::Tensor bias1 = b1.contiguous();
  const std::vector<int64_t> order = balanced_order(blocks, at::get_num_threads());
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t first, int64_t last) {
    const at::NoGradGuard no_grad;  // grad mode is per thread: the pool's threads do not inherit the caller's
    at::Tensor a_block = at::empty({kFfnRows, C}, x.options());
    at::Tensor pre_block = save_pre ? at::Tensor() : at::empty({kFfnRows, F}, x.options());
    at::Tensor hidden_block = at::empty({kFfnRows, F}, x.options());
    for (int64_t i = first; i < last; ++i) {
      const RowBlock& blk = blocks[order[i]];
      at::Tensor a = a_block.narrow(0, 0, blk.rows);
      gather_rows(x, token.data() + blk.first, a);
      at::Tensor p = save_pre ? pre.narrow(0, blk.first, blk.rows) : pre_block.narrow(0, 0, blk.rows);
      at::Tensor h = hidden_block.narrow(0, 0, blk.rows);
      if (epilogue.fused()) {
        at::mm_out(p, a, w1[blk.expert]);
        epilogue.forward(p.data_ptr<float>(), bias1.const_data_ptr<float>() + blk.expert * F, h.data_ptr<float>(),
                         blk.rows, F, save_pre);
      } else {
        at::addmm_out(p, b1[blk.expert], a, w1[blk.expert]);
        at::gelu_out(h, p);
      }
      at::Tensor y = out.narrow(0, blk.first, blk.rows);
      at::addmm_out(y, b2[blk.expert], h, w2[blk.expert]);
    }
  });
  if (used < rows) {
    out.narrow(0, used, rows - used).zero_();
    if (save_pre) pre.narrow(0, used, rows - used).zero_();
  }
  return {out, pre};
}

// The backward of expert_ffn, one expert after the other, fused per block of rows like the forward: each
// block gathers its token rows and weighted output gradients, computes the gate's dweight from the saved
// expert output, gets its pre-activations (saved, or recomputed in cache), applies GELU and its gradient,
// sums its bias gradients and computes its input gradient. h and d(pre) are written out for one expert
// at a time only, for its weight gradients (one GEMM each), so the backward never holds them at T x F.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> MoeBackend::expert_ffn_backward(
    const at::Tensor& tokens, const at::Tensor& grad, const MoePlan& plan, const at::Tensor& expert_out,
    const std::optional<at::Tensor>& saved_pre, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    int64_t rows) {
  const int64_t n = tokens.size(0), C = tokens.size(1), F = w1.size(2), E = w1.size(0);
  const std::vector<int64_t> ends = host_offsets("space_moe", plan.offsets, rows);
  const int64_t used = ends.empty() ? 0 : ends.back();
  const std::vector<RowBlock> blocks = row_blocks(ends);
  const int64_t num_blocks = static_cast<int64_t>(blocks.size());
  const at::Tensor pair_index = plan.pair_index.contiguous();
  const std::vector<int32_t> token = row_tokens(pair_index, used);
  const at::Tensor x = tokens.contiguous(), dy = grad.contiguous(), out = expert_out.contiguous();
  const at::Tensor weight = plan.weight.contiguous();
  const auto options = x.options();
  const auto acc = acc_dtype(x.scalar_type());
  int64_t most_rows = 0;
  for (int64_t k = 0; k < E; ++k) most_rows = std::max(most_rows, ends[k] - (k == 0 ? 0 : ends[k - 1]));
  at::Tensor a = empty_cached({used, C}, options);  // gathered tokens
  at::Tensor g = empty_cached({used, C}, options);  // gathered, weighted output gradients
  at::Tensor da = empty_cached({used, C}, options);
  at::Tensor hidden = empty_cached({most_rows, F}, options);  // GELU(pre) of one expert
  at::Tensor dpre = empty_cached({most_rows, F}, options);
  at::Tensor dweight = at::zeros({n, E}, weight.options());
  at::Tensor dw1 = at::empty({E, C, F}, options), dw2 = at::empty({E, F, C}, options);
  at::Tensor db1 = at::zeros({E, F}, options.dtype(acc)), db2 = at::zeros({E, C}, options.dtype(acc));
  // Per-block bias gradients in the accumulation dtype, summed per expert in block order.
  at::Tensor db1_blocks = at::zeros({num_blocks, F}, options.dtype(acc));
  at::Tensor db2_blocks = at::zeros({num_blocks, C}, options.dtype(acc));
  const GeluEpilogues epilogue = gelu_epilogues(x, F);
  const at::Tensor bias1 = b1.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "space_moe_ffn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* outp = out.const_data_ptr<scalar_t>();
    const acc_t* wp = weight.const_data_ptr<acc_t>();
    acc_t* dwp = dweight.mutable_data_ptr<acc_t>();
    scalar_t* gp = g.mutable_data_ptr<scalar_t>();
    int64_t first_block = 0;
    for (int64_t k = 0; k < E; ++k) {
      const int64_t start = k == 0 ? 0 : ends[k - 1], len = ends[k] - start;
      int64_t last_block = first_block;
      while (last_block < num_blocks && blocks[last_block].expert == k) ++last_block;
      if (len == 0) {
        dw1[k].zero_();
        dw2[k].zero_();
        continue;
      }
      at::parallel_for(first_block, last_block, 1, [&](int64_t first, int64_t last) {
        const at::NoGradGuard no_grad;  // grad mode is per thread: the pool's threads do not inherit the caller's
        at::Tensor pre_block = saved_pre.has_value() ? at::Tensor() : at::empty({kFfnRows, F}, options);
        for (int64_t i = first; i < last; ++i) {
          const RowBlock& blk = blocks[i];
          at::Tensor a_rows = a.narrow(0, blk.first, blk.rows);
          gather_rows(x, token.data() + blk.first, a_rows);
          acc_t* db2_i = db2_blocks.mutable_data_ptr<acc_t>() + i * C;
          for (int64_t r = blk.first; r < blk.first + blk.rows; ++r) {
            const int64_t j = token[r];
            const scalar_t* dyj = dyp + j * C;
            const scalar_t* outr = outp + r * C;
            scalar_t* gr = gp + r * C;
            const acc_t s = wp[j * E + k];
#if RAPHAEL_HAVE_AVX2_PATH
            if (std::is_same_v<scalar_t, float> && epilogue.fused() && C % 8 == 0) {  // casts are no-ops when taken
              dwp[j * E + k] = gather_grad_row_avx2(reinterpret_cast<const float*>(dyj),
                                                    reinterpret_cast<const float*>(outr), static_cast<float>(s),
                                                    reinterpret_cast<float*>(gr), reinterpret_cast<float*>(db2_i), C);
              continue;
            }
#endif
            acc_t dot = 0;
            for (int64_t c = 0; c < C; ++c) {
              const acc_t d = static_cast<acc_t>(dyj[c]);
              gr[c] = static_cast<scalar_t>(s * d);
              db2_i[c] += s * d;
              dot += d * static_cast<acc_t>(outr[c]);
            }
            dwp[j * E + k] = dot;
          }
          at::Tensor g_rows = g.narrow(0, blk.first, blk.rows);
          at::Tensor dp = dpre.narrow(0, blk.first - start, blk.rows);
          at::mm_out(dp, g_rows, w2[k].t());
          at::Tensor h = hidden.narrow(0, blk.first - start, blk.rows);
          at::Tensor p = saved_pre.has_value() ? saved_pre->narrow(0, blk.first, blk.rows)
                                               : pre_block.narrow(0, 0, blk.rows);
          if (epilogue.fused()) {
            // Recomputed without the bias: the epilogue adds it on the fly.
            if (!saved_pre.has_value()) at::mm_out(p, a_rows, w1[k]);
            epilogue.backward(p.const_data_ptr<float>(),
                              saved_pre.has_value() ? nullptr : bias1.const_data_ptr<float>() + k * F,
                              h.data_ptr<float>(), dp.data_ptr<float>(), db1_blocks.data_ptr<float>() + i * F,
                              blk.rows, F);
          } else {
            if (!saved_pre.has_value()) at::addmm_out(p, b1[k], a_rows, w1[k]);
            at::gelu_out(h, p);
            at::gelu_backward_out(dp, dp, p);
            at::Tensor db1_i = db1_blocks[i];
            at::sum_out(db1_i, dp, 0, false, acc);
          }
          at::Tensor da_rows = da.narrow(0, blk.first, blk.rows);
          at::mm_out(da_rows, dp, w1[k].t());
        }
      });
      // With up to two threads, the expert's two weight-gradient GEMMs run side by side, one thread each: their
      // long inner dimension (the expert's rows) splits worse across threads inside one GEMM (on 2 cores 4 % of the
      // op faster, and 6 % faster than slicing each GEMM across the threads). With more threads each GEMM gets them all.
      at::Tensor dw1_k = dw1[k], dw2_k = dw2[k], db1_k = db1[k], db2_k = db2[k];
      const auto weight_grad = [&](int64_t which) {
        if (which == 0) {
          at::mm_out(dw1_k, a.narrow(0, start, len).t(), dpre.narrow(0, 0, len));
        } else {
          at::mm_out(dw2_k, hidden.narrow(0, 0, len).t(), g.narrow(0, start, len));
        }
      };
      if (at::get_num_threads() <= 2) {
        at::parallel_for(0, 2, 1, [&](int64_t first, int64_t last) {
          const at::NoGradGuard no_grad;
          for (int64_t which = first; which < last; ++which) weight_grad(which);
        });
      } else {
        weight_grad(0);
        weight_grad(1);
      }
      at::sum_out(db1_k, db1_blocks.narrow(0, first_block, last_block - first_block), 0);
      at::sum_out(db2_k, db2_blocks.narrow(0, first_block, last_block - first_block), 0);
      first_block = last_block;
    }
  });
  const at::Tensor dx = combine(da, pair_index, std::nullopt, std::nullopt, std::nullopt);
  return {dx, dweight, dw1, db1.to(x.scalar_type()), dw2, db2.to(x.scalar_type())};
}

// dc[k] = sum_j z[j, k] grad[j] ([E, C]), each expert's row summed over the tokens in order by one task: the same bits
// on any number of threads, where a BLAS GEMM splits this long inner dimension (the tokens) by threads.
at::Tensor MoeBackend::constant_term_grad(const at::Tensor& z, const at::Tensor& grad) {
  const at::Tensor g = grad.contiguous(), zz = z.to(grad.scalar_type()).contiguous();
  const int64_t n = g.size(0), C = g.size(1), E = zz.size(1);
  at::Tensor dc = at::zeros({E, C}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "space_moe_constant_term_grad_cpu", [&] {
    const scalar_t* zp = zz.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* out = dc.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, E, 1, [&](int64_t first, int64_t last) {
      for (int64_t k = first; k < last; ++k) {
        scalar_t* row = out + k * C;
        for (int64_t j = 0; j < n; ++j) {
          const scalar_t s = zp[j * E + k];
          const scalar_t* src = gp + j * C;
          for (int64_t c = 0; c < C; ++c) row[c] += s * src[c];
        }
      }
    });
  });
  return dc;
}

int64_t MoeBackend::rows_used(const at::Tensor& offsets, int64_t /*capacity*/) {
  return offsets.numel() == 0 ? 0 : offsets.const_data_ptr<int32_t>()[offsets.numel() - 1];
}

TORCH_LIBRARY_IMPL(raphael_ext, CPU, m) {
  m.impl("space_moe", &space_moe_forward<MoeBackend>);
  m.impl("space_moe_backward", &space_moe_backward<MoeBackend>);
  m.impl("space_moe_plan", &space_moe_plan_op<MoeBackend>);
}

}  // namespace raphael_ext::cpu
