// CPU kernels of space_moe (SPEC §2.4): the routing plan (counting sort of (token, expert) pairs into
// a CSR by expert), dispatch (gather of token rows into the grouped operand), combine (weighted
// reduction of the expert rows per token, plus sum_k z_jk c_k) and pair_dot (gate gradient). All run
// over image tokens in parallel; each token owns its output rows, so results do not depend on the
// number of threads. The op itself is written once in csrc/common/moe.h.
#include "moe_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

namespace raphael_ext::cpu {
namespace {

constexpr int64_t kTokenGrain = 32;  // image tokens per parallel task

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

at::Tensor MoeBackend::dispatch(const at::Tensor& src, const at::Tensor& pair_index,
                                const std::optional<at::Tensor>& weight, int64_t rows) {
  const int64_t n = src.size(0), C = src.size(1), E = pair_index.size(1);
  const at::Tensor x = src.contiguous(), pi = pair_index.contiguous();
  const std::optional<at::Tensor> wc = weight.has_value() ? std::optional(weight->contiguous()) : std::nullopt;
  at::Tensor out = at::empty({rows, C}, src.options());
  const int32_t* idx = pi.const_data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "space_moe_dispatch_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t* w = wc.has_value() ? wc->const_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, n, kTokenGrain, [&](int64_t first, int64_t last) {
      for (int64_t j = first; j < last; ++j) {
        const scalar_t* row = xp + j * C;
        for (int64_t k = 0; k < E; ++k) {
          const int32_t p = idx[j * E + k];
          if (p < 0) continue;
          scalar_t* dst = op + p * C;
          if (w == nullptr) {
            std::memcpy(dst, row, C * sizeof(scalar_t));
          } else {
            const acc_t s = w[j * E + k];
            for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(s * static_cast<acc_t>(row[c]));
          }
        }
      }
    });
  });
  return out;
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

at::Tensor MoeBackend::pair_dot(const at::Tensor& rows, const at::Tensor& values, const at::Tensor& pair_index) {
  const int64_t n = pair_index.size(0), E = pair_index.size(1), C = values.size(1);
  const at::Tensor r = rows.contiguous(), v = values.contiguous(), pi = pair_index.contiguous();
  at::Tensor out = at::zeros({n, E}, values.options().dtype(acc_dtype(values.scalar_type())));
  const int32_t* idx = pi.const_data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "space_moe_pair_dot_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    acc_t* op = out.mutable_data_ptr<acc_t>();
    at::parallel_for(0, n, kTokenGrain, [&](int64_t first, int64_t last) {
      for (int64_t j = first; j < last; ++j) {
        for (int64_t k = 0; k < E; ++k) {
          const int32_t p = idx[j * E + k];
          if (p < 0) continue;
          acc_t sum = 0;
          for (int64_t ch = 0; ch < C; ++ch) {
            sum += static_cast<acc_t>(rp[j * C + ch]) * static_cast<acc_t>(vp[p * C + ch]);
          }
          op[j * E + k] = sum;
        }
      }
    });
  });
  return out;
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
