// The op schemas (TORCH_LIBRARY) and the pybind11 module raphael_ext._C.
//
// Kernels register themselves per dispatch key in csrc/cpu/ and csrc/cuda/; autograd and fake
// (meta) kernels are registered from Python (raphael_ext/ops/). The pybind11 functions below call
// the ops through the dispatcher, so a C++/pybind11 caller gets the same autograd as torch.ops.

// pybind.h (pybind11 with torch's tensor casters) rather than torch/extension.h, which adds the whole C++
// frontend and triples this file's compile time.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>
#include <torch/version.h>

#include "common/space_moe_call.h"
#include "cpu/row_buffer_cache.h"
#include "cpu/vec_math_avx2.h"
#include "cpu/vec_math_avx512.h"

#if defined(RAPHAEL_EXT_WITH_CUTLASS)
#include <cutlass/version.h>
#endif
#if defined(RAPHAEL_EXT_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#include <optional>
#include <string>

namespace raphael_ext {

#if defined(RAPHAEL_EXT_WITH_CUDA)
std::string compiled_cuda_archs();  // csrc/cuda/build_info.cu
bool sm90a_kernels_compiled();
#endif

TORCH_LIBRARY(raphael_ext, m) {
  // Returns (loss, dloss, norm): dloss[i] = d(unreduced loss[i]) / d(logits[i]) and the reduction's
  // scale norm (1 / counted elements for 'mean', else 1), so backward is grad * norm * dloss.
  m.def(
      "sigmoid_focal_loss(Tensor logits, Tensor targets, float alpha, float gamma, str reduction, "
      "Tensor? sample_mask) -> (Tensor, Tensor, Tensor)");
  // Returns (out, attn_map, mask, lse); lse [B, H, N_x] (float32, float64 for float64) is the
  // log-sum-exp of each row's scaled scores, kept so backward recomputes the probabilities.
  m.def(
      "cross_attention_mask(Tensor q, Tensor k, Tensor v, float alpha, Tensor? text_lengths, float? scale) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // (dq, dk, dv) from the gradients of out and attn_map (either may be absent); scale is resolved.
  m.def(
      "cross_attention_mask_backward(Tensor? grad_out, Tensor? grad_attn_map, Tensor q, Tensor k, Tensor v, "
      "Tensor lse, Tensor? text_lengths, float scale) -> (Tensor, Tensor, Tensor)");
  // Expert GEMMs (docs/kernels.md; csrc/common/moe.h). grouped_gemm: c[rows of g] = act(a[rows of g] @ b[g] + bias[g])
  // with offsets int32 [E] the cumulative row ends; rows past offsets[E-1] are zero.
  m.def("grouped_gemm(Tensor a, Tensor b, Tensor offsets, Tensor? bias=None, str? activation=None) -> Tensor");
  // (db [E, K, N], dbias [E, N]) with db[g] = a[rows of g]^T grad[rows of g]: grouped_gemm's weight gradient.
  m.def("grouped_gemm_weight_grad(Tensor a, Tensor grad, Tensor offsets) -> (Tensor, Tensor)");
  // Returns (y, expert_out, offsets, pair_index, weight, z, hidden): y, the routing plan the backward reuses
  // and, when save_hidden, the first GEMM's pre-activations [B * N_x * min(E, N_y), F] (else empty [0, F]).
  m.def(
      "space_moe(Tensor x, Tensor mask, Tensor route, Tensor gate, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
      "Tensor? text_lengths=None, bool save_hidden=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // (dx, dgate, dw1, db1, dw2, db2) from grad_y, the forward's inputs and its saved outputs; without hidden
  // the first GEMM is recomputed.
  m.def(
      "space_moe_backward(Tensor grad_y, Tensor x, Tensor mask, Tensor route, Tensor gate, Tensor w1, Tensor b1, "
      "Tensor w2, Tensor b2, Tensor? text_lengths, Tensor expert_out, Tensor offsets, Tensor pair_index, "
      "Tensor weight, Tensor z, Tensor? hidden) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // space_moe's routing plan alone: (offsets, pair_index, weight, z), see MoePlan in csrc/common/moe.h.
  m.def(
      "space_moe_plan(Tensor mask, Tensor route, Tensor gate, Tensor? text_lengths, int num_experts) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Composite (csrc/composite/time_moe.cpp): autograd comes from the ops it calls (space_moe on the CPU, grouped_gemm
  // and GELU on the GPU). recompute: the backward recomputes the first GEMM instead of keeping its output.
  m.def(
      "time_moe(Tensor x, Tensor route, Tensor w1, Tensor b1, Tensor w2, Tensor b2, bool recompute=False) -> Tensor");
}

namespace {

pybind11::dict build_info() {
  namespace py = pybind11;
  py::dict info;
  info["torch"] = TORCH_VERSION;
  info["cpu_avx2"] =
#if RAPHAEL_HAVE_AVX2_PATH
      avx2::cpu_has_avx2_fma();
#else
      false;
#endif
  info["cpu_avx512"] =
#if RAPHAEL_HAVE_AVX512_PATH
      avx512::enabled();
#else
      false;
#endif
#if defined(RAPHAEL_EXT_WITH_CUDA)
  info["cuda"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  py::list archs;
  const std::string list = compiled_cuda_archs();
  size_t start = 0;
  while (start < list.size()) {
    size_t comma = list.find(',', start);
    if (comma == std::string::npos) comma = list.size();
    archs.append(list.substr(start, comma - start));
    start = comma + 1;
  }
  info["cuda_archs"] = archs;
  info["sm90a_kernels"] = sm90a_kernels_compiled();
#else
  info["cuda"] = py::none();
  info["cuda_archs"] = py::list();
  info["sm90a_kernels"] = false;
#endif
#if defined(RAPHAEL_EXT_WITH_CUTLASS)
  info["cutlass"] = std::to_string(CUTLASS_MAJOR) + "." + std::to_string(CUTLASS_MINOR) + "." +
                    std::to_string(CUTLASS_PATCH);
#else
  info["cutlass"] = py::none();
#endif
  return info;
}

at::Tensor sigmoid_focal_loss(const at::Tensor& logits, const at::Tensor& targets, double alpha, double gamma,
                              const std::string& reduction, const std::optional<at::Tensor>& sample_mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("raphael_ext::sigmoid_focal_loss", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, double, double, c10::string_view,
                                 const std::optional<at::Tensor>&)>();
  return std::get<0>(op.call(logits, targets, alpha, gamma, reduction, sample_mask));
}

at::Tensor grouped_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                        const std::optional<at::Tensor>& bias, std::optional<std::string> activation) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("raphael_ext::grouped_gemm", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&, std::optional<c10::string_view>)>();
  return op.call(a, b, offsets, bias,
                 activation.has_value() ? std::optional<c10::string_view>(*activation) : std::nullopt);
}

at::Tensor space_moe(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& route, const at::Tensor& gate,
                     const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                     const std::optional<at::Tensor>& text_lengths) {
  // save_hidden = false: this entry point cannot tell whether a backward follows, so that backward recomputes.
  return call_space_moe(x, mask, route, gate, w1, b1, w2, b2, text_lengths, /*save_hidden=*/false);
}

at::Tensor time_moe(const at::Tensor& x, const at::Tensor& route, const at::Tensor& w1, const at::Tensor& b1,
                    const at::Tensor& w2, const at::Tensor& b2, bool recompute) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("raphael_ext::time_moe", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(x, route, w1, b1, w2, b2, recompute);
}

}  // namespace
}  // namespace raphael_ext

PYBIND11_MODULE(_C, m) {
  namespace py = pybind11;
  m.doc() = "raphael_ext native ops (CPU and CUDA kernels registered under torch.ops.raphael_ext)";
  m.def("build_info", &raphael_ext::build_info,
        "Versions the extension was built with (torch, CUDA, CUTLASS), the GPU archs it holds, whether "
        "it holds the Hopper (sm_90a) grouped-GEMM kernels and whether the CPU kernels use AVX2 and AVX-512.");
  m.def("empty_cpu_cache", &raphael_ext::cpu::release_idle_buffers,
        "Frees the idle buffers the CPU expert kernels keep for their next call (tensors keep theirs).");
  m.def("sigmoid_focal_loss", &raphael_ext::sigmoid_focal_loss, py::arg("logits"), py::arg("targets"),
        py::arg("alpha") = 0.5, py::arg("gamma") = 2.0, py::arg("reduction") = "mean",
        py::arg("sample_mask") = py::none(),
        "torch.ops.raphael_ext.sigmoid_focal_loss through the dispatcher; returns the loss (autograd "
        "included once raphael_ext is imported).");
  m.def("grouped_gemm", &raphael_ext::grouped_gemm, py::arg("a"), py::arg("b"), py::arg("offsets"),
        py::arg("bias") = py::none(), py::arg("activation") = py::none(),
        "torch.ops.raphael_ext.grouped_gemm through the dispatcher (autograd once raphael_ext is imported).");
  m.def("space_moe", &raphael_ext::space_moe, py::arg("x"), py::arg("mask"), py::arg("route"), py::arg("gate"),
        py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"), py::arg("text_lengths") = py::none(),
        "torch.ops.raphael_ext.space_moe through the dispatcher; returns y (autograd once raphael_ext is imported).");
  m.def("time_moe", &raphael_ext::time_moe, py::arg("x"), py::arg("route"), py::arg("w1"), py::arg("b1"),
        py::arg("w2"), py::arg("b2"), py::arg("recompute") = false,
        "torch.ops.raphael_ext.time_moe through the dispatcher.");
}
