// CPU kernels of cross_attention_mask (SPEC §3.1).
//
// Forward: parallel over (sample, tile of kRows query rows). A task loops over the heads, so the head
// mean is summed in a private [kRows, N_y] buffer and written once; the [B, H, N_x, N_y] probabilities
// never exist beyond one head's tile. Each task also writes its tile's column max, and a second, cheap
// pass (after all tiles are known) compares the map with alpha times the column max.
// Backward: parallel over (sample, head). A task owns that head's dK and dV, so the sums over queries
// need no reduction across threads and the result does not depend on the thread count.
#include "../common/cross_attention.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace raphael_ext {
namespace {

constexpr int64_t kRows = 32;  // query rows per task: a [kRows, N_y] tile of scores stays in L1/L2
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
  at::Tensor lengths = text_lengths->to(at::kInt).contiguous();
  if (lengths.numel() > 0) {
    const int* p = lengths.data_ptr<int>();
    const auto [lo, hi] = std::minmax_element(p, p + lengths.numel());
    TORCH_CHECK_VALUE(*lo >= 0 && *hi <= keys, op, ": text_lengths must lie in [0, N_y] = [0, ", keys, "], got values in [",
                      *lo, ", ", *hi, "]");
  }
  return lengths;
}

template <typename scalar_t, typename acc_t>
void load_rows(acc_t* dst, const Rows4<const scalar_t>& src, int64_t b, int64_t h, int64_t i0, int64_t n, int64_t d) {
  for (int64_t r = 0; r < n; ++r) {
    const scalar_t* row = src.row(b, h, i0 + r);
    for (int64_t c = 0; c < d; ++c) dst[r * d + c] = static_cast<acc_t>(row[c]);
  }
}

// scores[r, j] = scale * q[r] · k[j] for the nv valid keys; kt is the head's keys transposed [D, N_y],
// so the inner loop runs over contiguous keys and vectorises. Forward and backward both call this, so
// the recomputed probabilities are the forward's, bit for bit.
template <typename acc_t>
void tile_scores(acc_t* __restrict__ scores, const acc_t* __restrict__ qf, const acc_t* __restrict__ kt, int64_t n,
                 int64_t nv, int64_t keys, int64_t d, acc_t scale) {
  for (int64_t r = 0; r < n; ++r) {
    acc_t* __restrict__ s = scores + r * keys;
    std::fill(s, s + nv, acc_t(0));
    for (int64_t c = 0; c < d; ++c) {
      const acc_t qc = qf[r * d + c] * scale;
      const acc_t* __restrict__ kc = kt + c * keys;
      for (int64_t j = 0; j < nv; ++j) s[j] += qc * kc[j];
    }
  }
}

// dst[r] (+)= Σ_j coef[r, j] · rows[j] for the nv valid keys: P·V and dS·K.
template <typename acc_t>
void tile_combine_rows(acc_t* __restrict__ dst, const acc_t* __restrict__ coef, const acc_t* __restrict__ rows,
                       int64_t n, int64_t nv, int64_t keys, int64_t d, acc_t scale) {
  for (int64_t r = 0; r < n; ++r) {
    acc_t* __restrict__ o = dst + r * d;
    std::fill(o, o + d, acc_t(0));
    for (int64_t j = 0; j < nv; ++j) {
      const acc_t c = coef[r * keys + j] * scale;
      const acc_t* __restrict__ row = rows + j * d;
      for (int64_t e = 0; e < d; ++e) o[e] += c * row[e];
    }
  }
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths,
                    const CrossAttentionArgs& a, double alpha, at::Tensor& out, at::Tensor& attn_map,
                    at::Tensor& mask, at::Tensor& lse) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = a.batch, H = a.heads, Nx = a.queries, Ny = a.keys, D = a.head_dim;
  const int64_t tiles = (Nx + kRows - 1) / kRows;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor kt = k.to(acc_dtype).transpose(2, 3).contiguous();  // [B, H, D, N_y]
  const at::Tensor vf = v.to(acc_dtype).contiguous();                  // [B, H, N_y, D]
  const at::Tensor qv = unit_inner_stride(q);
  at::Tensor column_max_part = at::empty({B, tiles, Ny}, q.options().dtype(acc_dtype));

  const Rows4<const scalar_t> q_rows(qv);
  const Rows4<scalar_t> out_rows(out);
  const acc_t* kt_data = kt.data_ptr<acc_t>();
  const acc_t* v_data = vf.data_ptr<acc_t>();
  scalar_t* map_data = attn_map.data_ptr<scalar_t>();
  acc_t* lse_data = lse.data_ptr<acc_t>();
  acc_t* part_data = column_max_part.data_ptr<acc_t>();
  const int* len_data = lengths.defined() ? lengths.data_ptr<int>() : nullptr;
  const acc_t scale = static_cast<acc_t>(a.scale);
  const acc_t inv_heads = acc_t(1) / static_cast<acc_t>(H);

  at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qf(kRows * D), probs(kRows * Ny), map_acc(kRows * Ny), of(kRows * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles, tile = task % tiles;
      const int64_t i0 = tile * kRows, n = std::min(kRows, Nx - i0);
      const int64_t nv = valid_keys(len_data, b, Ny);
      std::fill(map_acc.begin(), map_acc.end(), acc_t(0));
      for (int64_t h = 0; h < H; ++h) {
        const acc_t* kt_h = kt_data + (b * H + h) * D * Ny;
        const acc_t* v_h = v_data + (b * H + h) * Ny * D;
        acc_t* lse_h = lse_data + (b * H + h) * Nx + i0;
        load_rows(qf.data(), q_rows, b, h, i0, n, D);
        tile_scores(probs.data(), qf.data(), kt_h, n, nv, Ny, D, scale);
        for (int64_t r = 0; r < n; ++r) {
          acc_t* p = probs.data() + r * Ny;
          if (nv == 0) {  // no valid key: out and map are 0 (a decision, documented in the wrapper)
            lse_h[r] = -std::numeric_limits<acc_t>::infinity();
            continue;
          }
          const acc_t m = *std::max_element(p, p + nv);
          acc_t sum = 0;
          for (int64_t j = 0; j < nv; ++j) sum += (p[j] = std::exp(p[j] - m));
          const acc_t inv = acc_t(1) / sum;
          for (int64_t j = 0; j < nv; ++j) {
            p[j] *= inv;
            map_acc[r * Ny + j] += p[j];
          }
          lse_h[r] = m + std::log(sum);
        }
        tile_combine_rows(of.data(), probs.data(), v_h, n, nv, Ny, D, acc_t(1));
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
  const at::Tensor kf = k.to(acc_dtype).contiguous();                  // [B, H, N_y, D]
  const at::Tensor kt = kf.transpose(2, 3).contiguous();               // [B, H, D, N_y]
  const at::Tensor vt = v.to(acc_dtype).transpose(2, 3).contiguous();  // [B, H, D, N_y]
  const at::Tensor qv = unit_inner_stride(q);
  const at::Tensor lse_c = lse.contiguous();
  const bool has_grad_out = grad_out.defined(), has_grad_map = grad_map.defined();
  const at::Tensor go = has_grad_out ? unit_inner_stride(grad_out) : at::Tensor();
  const at::Tensor gm = has_grad_map ? grad_map.contiguous() : at::Tensor();

  const Rows4<const scalar_t> q_rows(qv);
  const Rows4<scalar_t> dq_rows(dq);
  const acc_t* kf_data = kf.data_ptr<acc_t>();
  const acc_t* kt_data = kt.data_ptr<acc_t>();
  const acc_t* vt_data = vt.data_ptr<acc_t>();
  const acc_t* lse_data = lse_c.data_ptr<acc_t>();
  const scalar_t* gm_data = has_grad_map ? gm.data_ptr<scalar_t>() : nullptr;
  scalar_t* dk_data = dk.data_ptr<scalar_t>();
  scalar_t* dv_data = dv.data_ptr<scalar_t>();
  const int* len_data = lengths.defined() ? lengths.data_ptr<int>() : nullptr;
  const acc_t scale = static_cast<acc_t>(a.scale);
  const acc_t inv_heads = acc_t(1) / static_cast<acc_t>(H);

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qf(kRows * D), gof(kRows * D), probs(kRows * Ny), dscores(kRows * Ny), dqf(kRows * D);
    std::vector<acc_t> dk_acc(Ny * D), dv_acc(Ny * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H;
      const int64_t nv = valid_keys(len_data, b, Ny);
      const acc_t* kf_h = kf_data + task * Ny * D;
      const acc_t* kt_h = kt_data + task * D * Ny;
      const acc_t* vt_h = vt_data + task * D * Ny;
      std::fill(dk_acc.begin(), dk_acc.end(), acc_t(0));
      std::fill(dv_acc.begin(), dv_acc.end(), acc_t(0));
      for (int64_t i0 = 0; i0 < Nx; i0 += kRows) {
        const int64_t n = std::min(kRows, Nx - i0);
        load_rows(qf.data(), q_rows, b, h, i0, n, D);
        tile_scores(probs.data(), qf.data(), kt_h, n, nv, Ny, D, scale);
        for (int64_t r = 0; r < n; ++r) {  // P, recomputed from the saved log-sum-exp
          const acc_t l = lse_data[task * Nx + i0 + r];
          for (int64_t j = 0; j < nv; ++j) probs[r * Ny + j] = std::exp(probs[r * Ny + j] - l);
        }
        // dP = dO·Vᵀ + dM / H (the map is the head mean, so each head gets dM / H)
        if (has_grad_out) {
          const Rows4<const scalar_t> go_rows(go);
          load_rows(gof.data(), go_rows, b, h, i0, n, D);
          tile_scores(dscores.data(), gof.data(), vt_h, n, nv, Ny, D, acc_t(1));
        } else {
          std::fill(dscores.begin(), dscores.end(), acc_t(0));
        }
        if (has_grad_map) {
          for (int64_t r = 0; r < n; ++r) {
            const scalar_t* gm_row = gm_data + (b * Nx + i0 + r) * Ny;
            for (int64_t j = 0; j < nv; ++j) dscores[r * Ny + j] += static_cast<acc_t>(gm_row[j]) * inv_heads;
          }
        }
        // dS = P ∘ (dP − rowsum(P ∘ dP)); the whole row is here, so the rowsum needs no saved output.
        for (int64_t r = 0; r < n; ++r) {
          const acc_t* p = probs.data() + r * Ny;
          acc_t* ds = dscores.data() + r * Ny;
          acc_t dot = 0;
          for (int64_t j = 0; j < nv; ++j) dot += p[j] * ds[j];
          for (int64_t j = 0; j < nv; ++j) ds[j] = p[j] * (ds[j] - dot);
        }
        tile_combine_rows(dqf.data(), dscores.data(), kf_h, n, nv, Ny, D, scale);  // dQ = scale · dS·K
        for (int64_t r = 0; r < n; ++r) {
          scalar_t* row = dq_rows.row(b, h, i0 + r);
          for (int64_t e = 0; e < D; ++e) row[e] = static_cast<scalar_t>(dqf[r * D + e]);
        }
        for (int64_t r = 0; r < n; ++r) {  // dK += scale · dSᵀ·Q, dV += Pᵀ·dO
          for (int64_t j = 0; j < nv; ++j) {
            const acc_t cs = dscores[r * Ny + j] * scale;
            acc_t* __restrict__ dkj = dk_acc.data() + j * D;
            const acc_t* __restrict__ qr = qf.data() + r * D;
            for (int64_t e = 0; e < D; ++e) dkj[e] += cs * qr[e];
            if (has_grad_out) {
              const acc_t cp = probs[r * Ny + j];
              acc_t* __restrict__ dvj = dv_acc.data() + j * D;
              const acc_t* __restrict__ gr = gof.data() + r * D;
              for (int64_t e = 0; e < D; ++e) dvj[e] += cp * gr[e];
            }
          }
        }
      }
      for (int64_t idx = 0; idx < Ny * D; ++idx) {
        dk_data[task * Ny * D + idx] = static_cast<scalar_t>(dk_acc[idx]);
        dv_data[task * Ny * D + idx] = static_cast<scalar_t>(dv_acc[idx]);
      }
    }
  });
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
