// CPU kernels of cross_attention_mask (docs/kernels.md).
//
// Forward: parallel over (sample, tile of kRows query rows). A task loops over the heads, so the head
// mean is summed in a private [kRows, N_y] buffer and written once; the [B, H, N_x, N_y] probabilities
// never exist beyond one head's tile. Each task also writes its tile's column max, and a second, cheap
// pass (after all tiles are known) compares the map with alpha times the column max.
// Backward: parallel over (sample, head). A task owns that head's dK and dV, so the sums over queries
// need no reduction across threads and the result does not depend on the thread count.
#include "../common/cross_attention.h"
#include "vec_math_avx2.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace raphael_ext {
namespace {

constexpr int64_t kRows = 256;  // query rows per tile: a [kRows, N_y] fp32 score tile is at most 128 KiB
constexpr char kOp[] = "cross_attention_mask";
constexpr char kBackwardOp[] = "cross_attention_mask_backward";

// A [B, H, N, D] (or [B, N, N_y]) tensor read through its strides; the last dimension is contiguous.
template <typename T>
struct Rows4 {
  T* data;
  int64_t sb, sh, si;
  explicit Rows4(const at::Tensor& t) : data(t.data_ptr<std::remove_const_t<T>>()), sb(t.stride(0)), sh(t.stride(1)), si(t.stride(2)) {}
  T* row(int64_t b, int64_t h, int64_t i) const { return data + b * sb + h * sh + i * si; }
};

// text_lengths as contiguous int32 with every value in [0, N_y] (an empty tensor when not given).
at::Tensor checked_text_lengths(std::string_view op, const std::optional<at::Tensor>& text_lengths, int64_t keys) {
  if (!text_lengths.has_value()) return at::Tensor();
  const at::Tensor wide = text_lengths->to(at::kLong).contiguous();  // checked before narrowing to int32
  if (wide.numel() > 0) {
    const int64_t* p = wide.data_ptr<int64_t>();
    const auto [lo, hi] = std::minmax_element(p, p + wide.numel());
    TORCH_CHECK_VALUE(*lo >= 0 && *hi <= keys, op, ": text_lengths must lie in [0, N_y] = [0, ", keys, "], got values in [",
                      *lo, ", ", *hi, "]");
  }
  return wide.to(at::kInt);
}

// dst[r, :] = factor * src row (i0 + r) of head (b, h), in the accumulation type.
template <typename scalar_t, typename acc_t>
void load_rows(acc_t* dst, const Rows4<const scalar_t>& src, int64_t b, int64_t h, int64_t i0, int64_t n, int64_t d,
               acc_t factor = acc_t(1)) {
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* row = src.row(b, h, i0 + r);
    for (int64_t c = 0; c < d; ++c) dst[r * d + c] = factor * static_cast<acc_t>(row[c]);
  }
}

// Tasks per thread: problems below ~2 M multiply-adds run on one thread, where waking a thread pool
// costs more than it saves (gradcheck calls the op thousands of times on tiny inputs).
int64_t task_grain(const CrossAttentionArgs& a, int64_t tasks) {
  const int64_t work = a.batch * a.heads * a.queries * a.keys * a.head_dim;
  return work < (int64_t(1) << 21) ? std::max<int64_t>(tasks, 1) : 1;
}

// A row-major [rows, cols] matrix in a task's buffer, as a tensor for at::mm_out / at::addmm_out. The
// matrix products go through ATen (MKL/oneDNN on x86), single-threaded inside a parallel task.
template <typename acc_t>
at::Tensor matrix(acc_t* data, int64_t rows, int64_t cols) {
  return at::from_blob(data, {rows, cols}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

#if RAPHAEL_HAVE_AVX2_PATH
RAPHAEL_AVX2 double exp_shifted_avx2(float* x, int64_t n, float shift) {
  const __m256 s = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = avx2::exp(_mm256_sub_ps(_mm256_loadu_ps(x + j), s));
    _mm256_storeu_ps(x + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  double sum = avx2::reduce_add(acc);
  for (; j < n; ++j) sum += (x[j] = std::exp(x[j] - shift));
  return sum;
}
#endif

#if RAPHAEL_HAVE_AVX2_PATH
RAPHAEL_AVX2 float max_avx2(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + j));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float result = *std::max_element(lanes, lanes + 8);
  for (; j < n; ++j) result = std::max(result, x[j]);
  return result;
}
#endif

template <typename acc_t>
acc_t max_value(const acc_t* x, int64_t n) {
#if RAPHAEL_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx2::cpu_has_avx2_fma()) return max_avx2(x, n);
  }
#endif
  return *std::max_element(x, x + n);
}

// x[j] = exp(x[j] - shift) for j < n; returns the sum. Forward and backward both use it, so the
// probabilities the backward recomputes from the log-sum-exp are the forward's.
template <typename acc_t>
acc_t exp_shifted(acc_t* x, int64_t n, acc_t shift) {
#if RAPHAEL_HAVE_AVX2_PATH
  if constexpr (std::is_same_v<acc_t, float>) {
    if (avx2::cpu_has_avx2_fma()) return static_cast<float>(exp_shifted_avx2(x, n, shift));
  }
#endif
  acc_t sum = 0;
  for (int64_t j = 0; j < n; ++j) sum += (x[j] = std::exp(x[j] - shift));
  return sum;
}

// Tiles below are row-major with leading dimension nv (the sample's valid keys) or D.

template <typename scalar_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths,
                    const CrossAttentionArgs& a, double alpha, at::Tensor& out, at::Tensor& attn_map,
                    at::Tensor& mask, at::Tensor& lse) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = a.batch, H = a.heads, Nx = a.queries, Ny = a.keys, D = a.head_dim;
  const int64_t tiles = (Nx + kRows - 1) / kRows;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor kf = k.to(acc_dtype).contiguous();  // [B, H, N_y, D]
  const at::Tensor vf = v.to(acc_dtype).contiguous();
  const at::Tensor qv = unit_inner_stride(q);
  at::Tensor column_max_part = at::empty({B, tiles, Ny}, q.options().dtype(acc_dtype));

  const Rows4<const scalar_t> q_rows(qv);
  const Rows4<scalar_t> out_rows(out);
  acc_t* kf_data = kf.data_ptr<acc_t>();
  acc_t* vf_data = vf.data_ptr<acc_t>();
  scalar_t* map_data = attn_map.data_ptr<scalar_t>();
  acc_t* lse_data = lse.data_ptr<acc_t>();
  acc_t* part_data = column_max_part.data_ptr<acc_t>();
  const int* len_data = lengths.defined() ? lengths.data_ptr<int>() : nullptr;
  const acc_t scale = static_cast<acc_t>(a.scale);
  const acc_t inv_heads = acc_t(1) / static_cast<acc_t>(H);

  at::parallel_for(0, B * tiles, task_grain(a, B * tiles), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qf(kRows * D), probs(kRows * Ny), map_acc(kRows * Ny), of(kRows * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles, tile = task % tiles;
      const int64_t i0 = tile * kRows, n = std::min(kRows, Nx - i0);
      const int64_t nv = valid_keys(len_data, b, Ny);
      std::fill(map_acc.begin(), map_acc.end(), acc_t(0));
      for (int64_t h = 0; h < H; ++h) {
        acc_t* lse_h = lse_data + (b * H + h) * Nx + i0;
        if (nv == 0) {  // no valid key: out and map are 0 (a decision, documented in the wrapper)
          for (int64_t r = 0; r < n; ++r) {
            std::fill(out_rows.row(b, h, i0 + r), out_rows.row(b, h, i0 + r) + D, scalar_t(0));
            lse_h[r] = -std::numeric_limits<acc_t>::infinity();
          }
          continue;
        }
        at::Tensor k_h = matrix(kf_data + (b * H + h) * Ny * D, nv, D);
        at::Tensor v_h = matrix(vf_data + (b * H + h) * Ny * D, nv, D);
        load_rows(qf.data(), q_rows, b, h, i0, n, D, scale);  // scores = (scale·q)·kᵀ, also in backward
        at::Tensor s = matrix(probs.data(), n, nv);
        at::mm_out(s, matrix(qf.data(), n, D), k_h.t());
        for (int64_t r = 0; r < n; ++r) {
          acc_t* p = probs.data() + r * nv;
          const acc_t m = max_value(p, nv);
          const acc_t sum = exp_shifted(p, nv, m);
          const acc_t inv = acc_t(1) / sum;
          acc_t* acc = map_acc.data() + r * Ny;
          for (int64_t j = 0; j < nv; ++j) acc[j] += (p[j] *= inv);
          lse_h[r] = m + std::log(sum);
        }
        at::Tensor o_t = matrix(of.data(), n, D);
        at::mm_out(o_t, s, v_h);
        for (int64_t r = 0; r < n; ++r) {
          scalar_t* o = out_rows.row(b, h, i0 + r);
          for (int64_t e = 0; e < D; ++e) o[e] = static_cast<scalar_t>(of[r * D + e]);
        }
      }
      acc_t* part = part_data + task * Ny;
      std::fill(part, part + Ny, acc_t(0));
      for (int64_t r = 0; r < n; ++r) {
        scalar_t* map_row = map_data + (b * Nx + i0 + r) * Ny;
        for (int64_t j = 0; j < Ny; ++j) {
          const scalar_t value = static_cast<scalar_t>(j < nv ? map_acc[r * Ny + j] * inv_heads : acc_t(0));
          map_row[j] = value;
          part[j] = std::max(part[j], static_cast<acc_t>(value));  // the max of the values as returned
        }
      }
    }
  });

  const at::Tensor column_max = column_max_part.amax(1).contiguous();  // [B, N_y]; Nx = 0 never reaches here
  const acc_t* cmax = column_max.data_ptr<acc_t>();
  bool* mask_data = mask.data_ptr<bool>();
  const acc_t alpha_acc = static_cast<acc_t>(alpha);
  at::parallel_for(0, B * Nx, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / Nx;
      const int64_t nv = valid_keys(len_data, b, Ny);
      for (int64_t j = 0; j < Ny; ++j) {
        mask_data[row * Ny + j] =
            j < nv && mask_value(static_cast<acc_t>(map_data[row * Ny + j]), alpha_acc, cmax[b * Ny + j]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_attention_mask_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double alpha,
    const std::optional<at::Tensor>& text_lengths, std::optional<double> scale) {
  const CrossAttentionArgs a = check_cross_attention_args(kOp, q, k, v, text_lengths, scale);
  TORCH_CHECK_VALUE(std::isfinite(alpha), kOp, ": alpha must be finite, got ", alpha);
  const at::Tensor lengths = checked_text_lengths(kOp, text_lengths, a.keys);
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // out is laid out as [B, N_x, H, D] (returned as its [B, H, N_x, D] view), so merging the heads
  // afterwards (out.transpose(1, 2).reshape(B, N_x, H * D)) is free.
  at::Tensor out = at::empty({a.batch, a.queries, a.heads, a.head_dim}, q.options()).transpose(1, 2);
  at::Tensor attn_map = at::empty({a.batch, a.queries, a.keys}, q.options());
  at::Tensor mask = at::empty({a.batch, a.queries, a.keys}, q.options().dtype(at::kBool));
  at::Tensor lse = at::empty({a.batch, a.heads, a.queries}, q.options().dtype(acc_dtype));
  if (a.batch * a.queries > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), kOp, [&] {
      forward_kernel<scalar_t>(q, k, v, lengths, a, alpha, out, attn_map, mask, lse);
    });
  }
  return {out, attn_map, mask, lse};
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& grad_map, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& lse, const at::Tensor& lengths, const CrossAttentionArgs& a,
                     at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = a.batch, H = a.heads, Nx = a.queries, Ny = a.keys, D = a.head_dim;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor kf = k.to(acc_dtype).contiguous();  // [B, H, N_y, D]
  const at::Tensor vf = v.to(acc_dtype).contiguous();
  const at::Tensor qv = unit_inner_stride(q);
  const at::Tensor lse_c = lse.contiguous();
  const bool has_grad_out = grad_out.defined(), has_grad_map = grad_map.defined();
  const at::Tensor go = has_grad_out ? unit_inner_stride(grad_out) : at::Tensor();
  const at::Tensor gm = has_grad_map ? grad_map.contiguous() : at::Tensor();
  // dK and dV in the accumulation type, one [N_y, D] block per (sample, head), owned by one task.
  at::Tensor dk_acc = at::zeros({B, H, Ny, D}, q.options().dtype(acc_dtype));
  at::Tensor dv_acc = at::zeros({B, H, Ny, D}, q.options().dtype(acc_dtype));

  const Rows4<const scalar_t> q_rows(qv);
  const Rows4<scalar_t> dq_rows(dq);
  acc_t* kf_data = kf.data_ptr<acc_t>();
  acc_t* vf_data = vf.data_ptr<acc_t>();
  acc_t* dk_data = dk_acc.data_ptr<acc_t>();
  acc_t* dv_data = dv_acc.data_ptr<acc_t>();
  const acc_t* lse_data = lse_c.data_ptr<acc_t>();
  const scalar_t* gm_data = has_grad_map ? gm.data_ptr<scalar_t>() : nullptr;
  const int* len_data = lengths.defined() ? lengths.data_ptr<int>() : nullptr;
  const acc_t scale = static_cast<acc_t>(a.scale);
  const acc_t inv_heads = acc_t(1) / static_cast<acc_t>(H);

  at::parallel_for(0, B * H, task_grain(a, B * H), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qf(kRows * D), gof(kRows * D), probs(kRows * Ny), dscores(kRows * Ny), dqf(kRows * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H;
      const int64_t nv = valid_keys(len_data, b, Ny);
      if (nv == 0) {  // no key took part: dQ is 0 (dK, dV stay 0)
        for (int64_t i = 0; i < Nx; ++i) std::fill(dq_rows.row(b, h, i), dq_rows.row(b, h, i) + D, scalar_t(0));
        continue;
      }
      const at::Tensor k_h = matrix(kf_data + task * Ny * D, nv, D);
      const at::Tensor v_h = matrix(vf_data + task * Ny * D, nv, D);
      at::Tensor dk_h = matrix(dk_data + task * Ny * D, nv, D);
      at::Tensor dv_h = matrix(dv_data + task * Ny * D, nv, D);
      for (int64_t i0 = 0; i0 < Nx; i0 += kRows) {
        const int64_t n = std::min(kRows, Nx - i0);
        const at::Tensor q_t = matrix(qf.data(), n, D), go_t = matrix(gof.data(), n, D);
        at::Tensor p_t = matrix(probs.data(), n, nv), ds_t = matrix(dscores.data(), n, nv);
        load_rows(qf.data(), q_rows, b, h, i0, n, D, scale);  // scale·q, as in the forward
        at::mm_out(p_t, q_t, k_h.t());
        for (int64_t r = 0; r < n; ++r) {  // P, recomputed from the saved log-sum-exp
          exp_shifted(probs.data() + r * nv, nv, lse_data[task * Nx + i0 + r]);
        }
        // dP = dO·Vᵀ + dM / H (the map is the head mean, so each head gets dM / H)
        if (has_grad_out) {
          const Rows4<const scalar_t> go_rows(go);
          load_rows(gof.data(), go_rows, b, h, i0, n, D);
          at::mm_out(ds_t, go_t, v_h.t());
        } else {
          std::fill(dscores.begin(), dscores.begin() + n * nv, acc_t(0));
        }
        if (has_grad_map) {
          for (int64_t r = 0; r < n; ++r) {
            const scalar_t* gm_row = gm_data + (b * Nx + i0 + r) * Ny;
            for (int64_t j = 0; j < nv; ++j) dscores[r * nv + j] += static_cast<acc_t>(gm_row[j]) * inv_heads;
          }
        }
        // dS = P ∘ (dP − rowsum(P ∘ dP)); the whole row is here, so the rowsum needs no saved output.
        for (int64_t r = 0; r < n; ++r) {
          const acc_t* p = probs.data() + r * nv;
          acc_t* ds = dscores.data() + r * nv;
          acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t j = 0; j < nv; ++j) dot += p[j] * ds[j];
          for (int64_t j = 0; j < nv; ++j) ds[j] = p[j] * (ds[j] - dot);
        }
        at::Tensor dq_t = matrix(dqf.data(), n, D);
        at::mm_out(dq_t, ds_t, k_h);  // dQ = scale · dS·K
        for (int64_t r = 0; r < n; ++r) {
          scalar_t* row = dq_rows.row(b, h, i0 + r);
          for (int64_t e = 0; e < D; ++e) row[e] = static_cast<scalar_t>(dqf[r * D + e] * scale);
        }
        at::addmm_out(dk_h, dk_h, ds_t.t(), q_t);  // dK += dSᵀ·(scale·Q)
        if (has_grad_out) at::addmm_out(dv_h, dv_h, p_t.t(), go_t);  // dV += Pᵀ·dO
      }
    }
  });
  dk.copy_(dk_acc);
  dv.copy_(dv_acc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_attention_mask_backward_cpu(
    const std::optional<at::Tensor>& grad_out, const std::optional<at::Tensor>& grad_attn_map, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse, const std::optional<at::Tensor>& text_lengths,
    double scale) {
  const CrossAttentionArgs a =
      check_cross_attention_backward_args(kBackwardOp, grad_out, grad_attn_map, q, k, v, lse, text_lengths, scale);
  const at::Tensor go = grad_out.has_value() ? *grad_out : at::Tensor();
  const at::Tensor gm = grad_attn_map.has_value() ? *grad_attn_map : at::Tensor();
  const at::Tensor lengths = checked_text_lengths(kBackwardOp, text_lengths, a.keys);
  at::Tensor dq = at::empty({a.batch, a.queries, a.heads, a.head_dim}, q.options()).transpose(1, 2);
  at::Tensor dk = at::empty({a.batch, a.heads, a.keys, a.head_dim}, q.options());
  at::Tensor dv = at::empty({a.batch, a.heads, a.keys, a.head_dim}, q.options());
  if (!go.defined() && !gm.defined()) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
  } else if (dk.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), kBackwardOp, [&] {
      backward_kernel<scalar_t>(go, gm, q, k, v, lse, lengths, a, dq, dk, dv);
    });
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(raphael_ext, CPU, m) {
  m.impl("cross_attention_mask", &cross_attention_mask_cpu);
  m.impl("cross_attention_mask_backward", &cross_attention_mask_backward_cpu);
}

}  // namespace raphael_ext
