// time_moe (docs/kernels.md): every sample through the expert its timestep chose. Written with
// ATen ops and raphael_ext's ops, registered as CompositeImplicitAutograd, so autograd, fake tensors
// and torch.compile all come from those ops.
// On the GPU, samples (whole [N, C] blocks, never single tokens) are stably sorted by expert, so each
// expert's rows are contiguous and the grouped GEMM and its weight gradient apply unchanged; one
// expert per sample means the gradients of the permutation are plain copies (deterministic). No host
// synchronisation: counts and offsets stay on the device.
// On the CPU it is space_moe with one text token per sample, routed to the sample's expert with gate
// 1 and covering every image token: y = e_route(x) exactly, through space_moe's fused expert FFN
// (rows gathered, both GEMMs and GELU per block of rows while they are in cache), which outruns the
// grouped GEMMs with GELU over the whole [B * N, F] activations, and a loop over samples, by about
// 1.2x for forward + backward on 2 cores; it also keeps less for the backward (no GELU output).
#include "../common/moe.h"
#include "../common/space_moe_call.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
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

  if (x.device().is_cpu()) {
    const bool needs_grad = at::GradMode::is_enabled() && (x.requires_grad() || w1.requires_grad() ||
                                                           b1.requires_grad() || w2.requires_grad() ||
                                                           b2.requires_grad());
    const at::Tensor mask = at::ones({B, N, 1}, x.options().dtype(at::kBool));
    const at::Tensor gate = at::ones({B, 1}, x.options());
    return call_space_moe(x, mask, route.unsqueeze(1), gate, w1, b1, w2, b2, std::nullopt,
                          /*save_hidden=*/!recompute && needs_grad);
  }
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
