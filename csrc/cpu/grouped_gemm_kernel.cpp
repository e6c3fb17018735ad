// CPU grouped GEMM (SPEC §3.2): one BLAS call per non-empty group on its rows (a contiguous slice of
// a, so nothing is copied), bias added by the same call, GELU applied once over all grouped rows.
// at::mm parallelises each call itself.
#include "moe_cpu.h"

#include <torch/library.h>

namespace raphael_ext::cpu {
namespace {

// Host copy of the offsets, checked: non-decreasing row ends within a's rows.
std::vector<int64_t> read_offsets(std::string_view op, const at::Tensor& offsets, int64_t rows) {
  const at::Tensor o = offsets.contiguous();
  const int32_t* p = o.const_data_ptr<int32_t>();
  std::vector<int64_t> ends(p, p + o.numel());
  int64_t prev = 0;
  for (size_t g = 0; g < ends.size(); ++g) {
    TORCH_CHECK(ends[g] >= prev && ends[g] <= rows, op, ": offsets must be non-decreasing row ends in [0, ", rows,
                "], got offsets[", g, "] = ", ends[g], " after ", prev);
    prev = ends[g];
  }
  return ends;
}

}  // namespace

at::Tensor MoeBackend::grouped_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                                    const std::optional<at::Tensor>& bias, bool gelu, bool zero_tail) {
  const int64_t rows = a.size(0);
  const std::vector<int64_t> ends = read_offsets("grouped_gemm", offsets, rows);
  at::Tensor c = at::empty({rows, b.size(2)}, a.options());
  int64_t start = 0;
  for (size_t g = 0; g < ends.size(); ++g) {
    const int64_t len = ends[g] - start;
    if (len > 0) {
      at::Tensor out = c.narrow(0, start, len);
      const at::Tensor lhs = a.narrow(0, start, len);
      if (bias.has_value()) {
        at::addmm_out(out, (*bias)[g], lhs, b[g]);
      } else {
        at::mm_out(out, lhs, b[g]);
      }
    }
    start = ends[g];
  }
  if (gelu && start > 0) {
    at::Tensor grouped = c.narrow(0, 0, start);
    at::gelu_(grouped);
  }
  if (zero_tail && start < rows) c.narrow(0, start, rows - start).zero_();
  return c;
}

std::tuple<at::Tensor, at::Tensor> MoeBackend::grouped_gemm_weight_grad(const at::Tensor& a, const at::Tensor& grad,
                                                                        const at::Tensor& offsets) {
  const std::vector<int64_t> ends = read_offsets("grouped_gemm_weight_grad", offsets, a.size(0));
  const int64_t E = offsets.size(0);
  at::Tensor db = at::zeros({E, a.size(1), grad.size(1)}, a.options());
  at::Tensor dbias = at::zeros({E, grad.size(1)}, a.options());
  int64_t start = 0;
  for (int64_t g = 0; g < E; ++g) {
    const int64_t len = ends[g] - start;
    if (len > 0) {
      const at::Tensor rows_grad = grad.narrow(0, start, len);
      at::Tensor db_g = db[g], dbias_g = dbias[g];
      at::mm_out(db_g, a.narrow(0, start, len).t(), rows_grad);
      at::sum_out(dbias_g, rows_grad, 0);
    }
    start = ends[g];
  }
  return {db, dbias};
}

TORCH_LIBRARY_IMPL(raphael_ext, CPU, m) {
  m.impl("grouped_gemm", &grouped_gemm_op<MoeBackend>);
  m.impl("grouped_gemm_weight_grad", &grouped_gemm_weight_grad_op<MoeBackend>);
}

}  // namespace raphael_ext::cpu
