// time_moe (docs/kernels.md): every sample through the expert its timestep chose. Written with
// ATen ops and grouped_gemm, registered as CompositeImplicitAutograd, so CPU, CUDA, autograd,
// fake tensors and torch.compile all come from those ops. Samples (whole [N, C] blocks, never
// single tokens) are stably sorted by expert, so each expert's rows are contiguous and the grouped
// GEMM and its weight gradient apply unchanged; one expert per sample means the gradients of the
// permutation are plain copies (deterministic). No host synchronisation: counts and offsets stay on
// the device.
#include "../common/moe.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>

namespace raphael_ext {
namespace {

at::Tensor time_moe(const at::Tensor& x, const at::Tensor& route, const at::Tensor& w1, const at::Tensor& b1,
                    const at::Tensor& w2, const at::Tensor& b2, bool recompute) {
  constexpr std::string_view op = "time_moe";
  check_floating(op, x, "x");
  check_dim(op, x, "x", 3);
  check_expert_weights(op, x, w1, b1, w2, b2);
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), E = w1.size(0);
  check_integral(op, route, "route");
  check_same_device(op, x, "x", route, "route");
  check_shape(op, route, "route", {B}, "[B]");
  TORCH_CHECK(B * N <= std::numeric_limits<int32_t>::max(), op, ": B * N = ", B * N,
              " rows exceed the int32 offsets of the grouped GEMM");
  // Checked on the device (an assert there, not a synchronisation; on the CPU a RuntimeError).
  at::_assert_async(at::logical_and(route >= 0, route < E).all(),
                    "time_moe: route must hold expert indices in [0, E = " + std::to_string(E) + ")");

  static const auto grouped_gemm =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("raphael_ext::grouped_gemm", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            std::optional<c10::string_view>)>();
  const at::Tensor r = route.to(at::kLong);
  const at::Tensor order = std::get<1>(at::sort(r, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  const at::Tensor counts = at::zeros({E}, r.options()).scatter_add(0, r, at::ones_like(r));
  const at::Tensor offsets = (counts.cumsum(0) * N).to(at::kInt);
  const at::Tensor sorted = x.index_select(0, order).reshape({B * N, C});
  // GELU inside the grouped GEMM: its backward recomputes the pre-activation (one more GEMM, nothing [T, F] kept
  // but the input). GELU as its own op: autograd keeps the pre-activation, and the backward skips that GEMM.
  const at::Tensor hidden = recompute ? grouped_gemm.call(sorted, w1, offsets, b1, c10::string_view("gelu"))
                                      : at::gelu(grouped_gemm.call(sorted, w1, offsets, b1, std::nullopt));
  const at::Tensor out = grouped_gemm.call(hidden, w2, offsets, b2, std::nullopt);
  const at::Tensor inverse = at::empty_like(order).scatter_(0, order, at::arange(B, order.options()));
  return out.view({B, N, C}).index_select(0, inverse);
}

}  // namespace

TORCH_LIBRARY_IMPL(raphael_ext, CompositeImplicitAutograd, m) { m.impl("time_moe", &time_moe); }

}  // namespace raphael_ext
