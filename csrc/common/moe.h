// Expert GEMMs (docs/kernels.md): argument checks, and the ops grouped_gemm, space_moe and
// space_moe_backward written once over a backend (csrc/cpu/moe_cpu.h, csrc/cuda/moe_cuda.h), so CPU
// and CUDA run the same plan and can only differ in how each primitive is computed.
//
// A backend is a struct of static functions:
//   grouped_gemm(a, b, offsets, bias?, gelu, zero_tail) -> c [T, N]: c[rows of g] = act(a[rows of g] @ b[g]
//       + bias[g]); rows from offsets[E-1] on are zeroed when zero_tail, else left unwritten.
//   expert_ffn(tokens [n, C], plan, w1, b1, w2, b2, rows, save_pre) -> (out [rows, C], pre): for every pair
//       (token j, expert k) at row p = pair_index[j, k], out[p] = GELU(pre[p]) w2[k] + b2[k] with
//       pre[p] = tokens[j] w1[k] + b1[k]; rows past offsets[E-1] zero. pre [rows, F] is returned (rows past the
//       pairs zero) when save_pre, else it is empty [0, F] and never written at T x F.
//   expert_ffn_backward(tokens, grad [n, C], plan, expert_out, pre?, w1, b1, w2, rows)
//       -> (dtokens [n, C], dweight [n, E], dw1, db1, dw2, db2): the gradients of y_j = sum_k weight[j, k] out[p]
//       for the output gradient grad, with dweight[j, k] = grad[j] . expert_out[p] (0 where no pair). Reads
//       the saved pre-activations when given, else recomputes the first GEMM.
//   grouped_gemm_weight_grad(a, grad, offsets) -> (db [E, K, N], dbias [E, N]): db[g] = a[rows g]^T grad[rows g].
//   plan(mask, route, gate, text_lengths, num_experts, capacity) -> MoePlan (below).
//   dispatch(src [n, C], pair_index, weight?, rows) -> [rows, C]: out[pair_index[j, k]] = weight[j, k] * src[j].
//   combine(values, pair_index, weight?, z?, c?) -> [n, C]:
//       out[j] = sum_k z[j, k] c[k] + sum_k weight[j, k] values[pair_index[j, k]], in that order (deterministic).
//   pair_dot(rows [n, C], values, pair_index) -> [n, E]: rows[j] . values[pair_index[j, k]] (0 where no pair).
//   rows_used(offsets, capacity): rows that hold pairs, or capacity where reading the count would
//       synchronise with the device.
// dispatch and combine are adjoint: both run over image tokens, so neither needs atomics. The CPU backend
// gathers inside its fused expert_ffn and expert_ffn_backward instead, and has no dispatch or pair_dot.
#pragma once

#include "checks.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

namespace raphael_ext {

// The routing plan of space_moe: pairs (image token j, expert k) that exist when some valid text
// token i routed to k has mask[j, i] = 1, counting-sorted by expert into a CSR.
struct MoePlan {
  at::Tensor offsets;     // int32 [E]: cumulative pair counts (row ends of each expert's group)
  at::Tensor pair_index;  // int32 [B*N_x, E]: row of pair (j, k) in the grouped operands, -1 if none
  at::Tensor weight;      // acc dtype [B*N_x, E]: w_jk = sum over i routed to k with mask 1 of g_i / n_y
  at::Tensor z;           // acc dtype [B*N_x, E]: z_jk = the same sum where mask is 0 (weights of c_k = e_k(0))
};

// float32 math for float32/float16/bfloat16, float64 for float64.
inline at::ScalarType acc_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

inline bool parse_activation(std::string_view op, const std::optional<c10::string_view>& activation) {
  if (!activation.has_value()) return false;
  if (*activation == "gelu") return true;
  TORCH_CHECK_VALUE(false, op, ": activation must be None or 'gelu', got '", *activation, "'");
}

// Shapes shared by grouped_gemm and its weight gradient: a [T, K], offsets int32 [E].
inline void check_rows_and_offsets(std::string_view op, const at::Tensor& a, const at::Tensor& offsets,
                                   int64_t num_groups) {
  check_floating(op, a, "a");
  check_dim(op, a, "a", 2);
  check_same_device(op, a, "a", offsets, "offsets");
  check_dtype(op, offsets, "offsets", at::kInt);
  check_shape(op, offsets, "offsets", {num_groups}, "[E]");
  TORCH_CHECK(a.size(0) <= std::numeric_limits<int32_t>::max(), op, ": a has ", a.size(0),
              " rows, more than int32 offsets can address");
}

// Returns whether the GELU epilogue is on.
inline bool check_grouped_gemm_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<c10::string_view>& activation) {
  constexpr std::string_view op = "grouped_gemm";
  const bool gelu = parse_activation(op, activation);
  check_dim(op, b, "b", 3);
  check_rows_and_offsets(op, a, offsets, b.size(0));
  check_same_device(op, a, "a", b, "b");
  check_same_dtype(op, a, "a", b, "b");
  TORCH_CHECK(b.size(1) == a.size(1), op, ": b must have shape [E, K, N] with K = a.size(1) = ", a.size(1),
              ", got ", b.sizes());
  check_optional_like(op, a, "a", bias, "bias", {b.size(0), b.size(2)}, "[E, N]");
  return gelu;
}

inline void check_grouped_gemm_weight_grad_args(const at::Tensor& a, const at::Tensor& grad,
                                                const at::Tensor& offsets) {
  constexpr std::string_view op = "grouped_gemm_weight_grad";
  check_rows_and_offsets(op, a, offsets, offsets.dim() == 1 ? offsets.size(0) : -1);
  check_dim(op, grad, "grad", 2);
  check_same_device(op, a, "a", grad, "grad");
  check_same_dtype(op, a, "a", grad, "grad");
  TORCH_CHECK(grad.size(0) == a.size(0), op, ": grad must have as many rows as a (", a.size(0), "), got ",
              grad.sizes());
}

// An argument that must match x's device and dtype and have a given shape.
inline void check_param(std::string_view op, const at::Tensor& x, const at::Tensor& t, std::string_view name,
                        at::IntArrayRef shape, std::string_view meaning) {
  check_same_device(op, x, "x", t, name);
  check_same_dtype(op, x, "x", t, name);
  check_shape(op, t, name, shape, meaning);
}

// Expert FFN weights for features of width C = x.size(-1): w1 [E, C, F], b1 [E, F], w2 [E, F, C], b2 [E, C].
inline void check_expert_weights(std::string_view op, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                                 const at::Tensor& w2, const at::Tensor& b2) {
  check_dim(op, w1, "w1", 3);
  const int64_t E = w1.size(0), C = x.size(-1), F = w1.size(2);
  TORCH_CHECK(E >= 1, op, ": w1 must hold at least one expert, got shape ", w1.sizes());
  check_param(op, x, w1, "w1", {E, C, F}, "[E, C, F]");
  check_param(op, x, b1, "b1", {E, F}, "[E, F]");
  check_param(op, x, w2, "w2", {E, F, C}, "[E, F, C]");
  check_param(op, x, b2, "b2", {E, C}, "[E, C]");
}

// B * N_x * min(E, N_y): the most (token, expert) pairs a plan can hold, known without reading the device;
// the pairs' rows are int32 offsets of the grouped GEMMs, so it must fit in int32.
inline int64_t routing_capacity(std::string_view op, int64_t batch, int64_t image_tokens, int64_t text_tokens,
                                int64_t experts) {
  const int64_t capacity = batch * image_tokens * std::min(experts, text_tokens);
  TORCH_CHECK(capacity <= std::numeric_limits<int32_t>::max(), op, ": B * N_x * min(E, N_y) = ", capacity,
              " routed rows exceed the int32 offsets of the grouped GEMM");
  return capacity;
}

struct SpaceMoeShape {
  int64_t batch, image_tokens, text_tokens, channels, hidden, experts;
  int64_t capacity;  // B * N_x * min(E, N_y): most pairs possible, known without reading the device
};

inline SpaceMoeShape check_space_moe_args(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& route,
                                          const at::Tensor& gate, const at::Tensor& w1, const at::Tensor& b1,
                                          const at::Tensor& w2, const at::Tensor& b2,
                                          const std::optional<at::Tensor>& text_lengths) {
  constexpr std::string_view op = "space_moe";
  check_floating(op, x, "x");
  check_dim(op, x, "x", 3);
  check_dim(op, mask, "mask", 3);
  check_dim(op, w1, "w1", 3);
  const int64_t B = x.size(0), N_x = x.size(1), C = x.size(2), N_y = mask.size(2);
  const int64_t E = w1.size(0), F = w1.size(2);
  check_dtype(op, mask, "mask", at::kBool);
  check_shape(op, mask, "mask", {B, N_x, N_y}, "[B, N_x, N_y]");
  check_integral(op, route, "route");
  check_shape(op, route, "route", {B, N_y}, "[B, N_y]");
  check_param(op, x, gate, "gate", {B, N_y}, "[B, N_y]");
  check_expert_weights(op, x, w1, b1, w2, b2);
  check_same_device(op, x, "x", mask, "mask");
  check_same_device(op, x, "x", route, "route");
  if (text_lengths.has_value()) {
    check_integral(op, *text_lengths, "text_lengths");
    check_same_device(op, x, "x", *text_lengths, "text_lengths");
    check_shape(op, *text_lengths, "text_lengths", {B}, "[B]");
  }
  return {B, N_x, N_y, C, F, E, routing_capacity(op, B, N_x, N_y, E)};
}

// Host copy of the offsets, checked: non-decreasing row ends within [0, rows]. On a GPU this copy
// synchronises, so only the at::mm fallback there uses it (the tensor-core paths read the offsets on
// the device).
inline std::vector<int64_t> host_offsets(std::string_view op, const at::Tensor& offsets, int64_t rows) {
  const at::Tensor o = offsets.to(at::kCPU).contiguous();
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

// Grouped GEMM as one at::mm per non-empty group on its rows (a contiguous slice of a: nothing is
// copied), the bias added by the same call and GELU applied once over all grouped rows. The CPU
// kernel, and the GPU fallback for shapes and dtypes the tensor-core kernels do not take.
inline at::Tensor grouped_gemm_loop(const at::Tensor& a, const at::Tensor& b, const std::vector<int64_t>& ends,
                                    const std::optional<at::Tensor>& bias, bool gelu, bool zero_tail) {
  const int64_t rows = a.size(0);
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

// (db, dbias) of grouped_gemm_loop: db[g] = a[rows of g]^T grad[rows of g], dbias[g] = column sums; 0 for empty groups.
inline std::tuple<at::Tensor, at::Tensor> grouped_gemm_weight_grad_loop(const at::Tensor& a, const at::Tensor& grad,
                                                                        const std::vector<int64_t>& ends) {
  const int64_t E = static_cast<int64_t>(ends.size());
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

// expert_ffn as a sequence of the backend's kernels (the GPU's; the CPU fuses it per block of rows).
template <class Backend>
std::tuple<at::Tensor, at::Tensor> expert_ffn_sequence(const at::Tensor& tokens, const MoePlan& plan,
                                                       const at::Tensor& w1, const at::Tensor& b1,
                                                       const at::Tensor& w2, const at::Tensor& b2, int64_t rows,
                                                       bool save_pre) {
  const at::Tensor a = Backend::dispatch(tokens, plan.pair_index, std::nullopt, rows);
  if (!save_pre) {
    const at::Tensor hidden = Backend::grouped_gemm(a, w1, plan.offsets, b1, /*gelu=*/true, /*zero_tail=*/false);
    return {Backend::grouped_gemm(hidden, w2, plan.offsets, b2, false, true), at::empty({0, w1.size(2)}, a.options())};
  }
  const at::Tensor pre = Backend::grouped_gemm(a, w1, plan.offsets, b1, /*gelu=*/false, /*zero_tail=*/true);
  return {Backend::grouped_gemm(at::gelu(pre), w2, plan.offsets, b2, false, true), pre};
}

// expert_ffn_backward as a sequence of the backend's kernels (the GPU's; the CPU fuses it per block of rows).
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> expert_ffn_backward_sequence(
    const at::Tensor& tokens, const at::Tensor& grad, const MoePlan& plan, const at::Tensor& expert_out,
    const std::optional<at::Tensor>& saved_pre, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
    int64_t rows) {
  const int64_t used = Backend::rows_used(plan.offsets, rows);
  const at::Tensor dweight = Backend::pair_dot(grad, expert_out, plan.pair_index);
  const at::Tensor g = Backend::dispatch(grad, plan.pair_index, plan.weight, rows).narrow(0, 0, used);
  const at::Tensor a = Backend::dispatch(tokens, plan.pair_index, std::nullopt, rows).narrow(0, 0, used);
  const at::Tensor pre = saved_pre.has_value() ? saved_pre->narrow(0, 0, used)
                                               : Backend::grouped_gemm(a, w1, plan.offsets, b1, false, false);
  const at::Tensor dhidden = Backend::grouped_gemm(g, w2.transpose(1, 2), plan.offsets, std::nullopt, false, false);
  auto [dw2, db2] = Backend::grouped_gemm_weight_grad(at::gelu(pre), g, plan.offsets);
  const at::Tensor dpre = at::gelu_backward(dhidden, pre);
  const at::Tensor da = Backend::grouped_gemm(dpre, w1.transpose(1, 2), plan.offsets, std::nullopt, false, false);
  auto [dw1, db1] = Backend::grouped_gemm_weight_grad(a, dpre, plan.offsets);
  const at::Tensor dtokens = Backend::combine(da, plan.pair_index, std::nullopt, std::nullopt, std::nullopt);
  return {dtokens, dweight, dw1, db1, dw2, db2};
}

// The public grouped_gemm op: rows past offsets[E-1] are zero, so they also get a zero gradient.
template <class Backend>
at::Tensor grouped_gemm_op(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                           const std::optional<at::Tensor>& bias, std::optional<c10::string_view> activation) {
  const bool gelu = check_grouped_gemm_args(a, b, offsets, bias, activation);
  return Backend::grouped_gemm(a, b, offsets, bias, gelu, /*zero_tail=*/true);
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> grouped_gemm_weight_grad_op(const at::Tensor& a, const at::Tensor& grad,
                                                               const at::Tensor& offsets) {
  check_grouped_gemm_weight_grad_args(a, grad, offsets);
  return Backend::grouped_gemm_weight_grad(a, grad, offsets);
}

// The routing plan alone (for inspection and benchmarks): (offsets, pair_index, weight, z).
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> space_moe_plan_op(
    const at::Tensor& mask, const at::Tensor& route, const at::Tensor& gate,
    const std::optional<at::Tensor>& text_lengths, int64_t num_experts) {
  constexpr std::string_view op = "space_moe_plan";
  check_floating(op, gate, "gate");
  check_dim(op, mask, "mask", 3);
  check_dtype(op, mask, "mask", at::kBool);
  const int64_t B = mask.size(0), N_y = mask.size(2);
  check_integral(op, route, "route");
  check_shape(op, route, "route", {B, N_y}, "[B, N_y]");
  check_shape(op, gate, "gate", {B, N_y}, "[B, N_y]");
  check_same_device(op, mask, "mask", route, "route");
  check_same_device(op, mask, "mask", gate, "gate");
  if (text_lengths.has_value()) {
    check_integral(op, *text_lengths, "text_lengths");
    check_same_device(op, mask, "mask", *text_lengths, "text_lengths");
    check_shape(op, *text_lengths, "text_lengths", {B}, "[B]");
  }
  TORCH_CHECK_VALUE(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
  MoePlan plan = Backend::plan(mask, route, gate, text_lengths, num_experts,
                               routing_capacity(op, B, mask.size(1), N_y, num_experts));
  return {plan.offsets, plan.pair_index, plan.weight, plan.z};
}

// c_k = e_k(0) = GELU(b1_k) w2_k + b2_k, [E, C] in the accumulation dtype: what an expert returns for
// the zeroed features where the mask is 0.
inline at::Tensor expert_at_zero(const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2) {
  return at::baddbmm(b2.unsqueeze(1), at::gelu(b1).unsqueeze(1), w2).squeeze(1).to(acc_dtype(b1.scalar_type()));
}

// Returns (y, expert_out, offsets, pair_index, weight, z, hidden); all but y are saved for the backward.
// hidden holds the pre-activations [capacity, F] of the first GEMM when save_hidden (the backward then
// skips recomputing it), else it is empty [0, F].
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> space_moe_forward(
    const at::Tensor& x, const at::Tensor& mask, const at::Tensor& route, const at::Tensor& gate,
    const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
    const std::optional<at::Tensor>& text_lengths, bool save_hidden) {
  const SpaceMoeShape s = check_space_moe_args(x, mask, route, gate, w1, b1, w2, b2, text_lengths);
  const at::Tensor tokens = x.reshape({s.batch * s.image_tokens, s.channels});
  MoePlan plan = Backend::plan(mask, route, gate, text_lengths, s.experts, s.capacity);
  // Rows past the pairs are zeroed in expert_out and hidden (outputs of the op: no uninitialised memory leaves it).
  auto [expert_out, hidden] = Backend::expert_ffn(tokens, plan, w1, b1, w2, b2, s.capacity, save_hidden);
  const at::Tensor y =
      Backend::combine(expert_out, plan.pair_index, plan.weight, plan.z, expert_at_zero(b1, w2, b2));
  return {y.view({s.batch, s.image_tokens, s.channels}), expert_out, plan.offsets, plan.pair_index, plan.weight,
          plan.z, hidden};
}

// d(loss)/d(gate[b, i]) = (1/n_y) sum_j (mask[j, i] ? dweight[j, r_i] : dz[j, r_i]) for valid i, else 0.
inline at::Tensor space_moe_gate_grad(const at::Tensor& dweight, const at::Tensor& dz, const at::Tensor& mask,
                                      const at::Tensor& route, const std::optional<at::Tensor>& text_lengths,
                                      const SpaceMoeShape& s, at::ScalarType gate_dtype) {
  const at::Tensor r =
      route.clamp(0, s.experts - 1).to(at::kLong).unsqueeze(1).expand({s.batch, s.image_tokens, s.text_tokens});
  const at::Tensor dw = dweight.view({s.batch, s.image_tokens, s.experts}).gather(2, r);
  const at::Tensor dzz = dz.view({s.batch, s.image_tokens, s.experts}).gather(2, r);
  const at::Tensor per_token = at::where(mask, dw, dzz).sum(1);  // [B, N_y]
  const auto opts = dweight.options();
  const at::Tensor lengths = text_lengths.has_value() ? text_lengths->to(opts)
                                                      : at::full({s.batch}, double(s.text_tokens), opts);
  const at::Tensor valid = at::arange(s.text_tokens, opts).unsqueeze(0) < lengths.unsqueeze(1);
  const at::Tensor scale = at::where(valid, lengths.clamp_min(1).reciprocal().unsqueeze(1), at::zeros({}, opts));
  return (per_token * scale).to(gate_dtype);
}

// Gradients (dx, dgate, dw1, db1, dw2, db2). With hidden (the forward's saved pre-activations) the backward
// reads them; without, it recomputes the first GEMM, which keeps T x F activations out of memory between
// the passes (like activation checkpointing). The second GEMM's output, which the gate gradient needs, is
// always saved (T x C).
template <class Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> space_moe_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mask, const at::Tensor& route,
    const at::Tensor& gate, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
    const std::optional<at::Tensor>& text_lengths, const at::Tensor& expert_out, const at::Tensor& offsets,
    const at::Tensor& pair_index, const at::Tensor& weight, const at::Tensor& z,
    const std::optional<at::Tensor>& hidden) {
  constexpr std::string_view op = "space_moe_backward";
  const SpaceMoeShape s = check_space_moe_args(x, mask, route, gate, w1, b1, w2, b2, text_lengths);
  check_same_shape(op, x, "x", grad_y, "grad_y");
  if (hidden.has_value()) check_param(op, x, *hidden, "hidden", {s.capacity, s.hidden}, "[B * N_x * min(E, N_y), F]");
  const int64_t n = s.batch * s.image_tokens;
  const at::Tensor dy = grad_y.reshape({n, s.channels}).to(x.scalar_type());
  const at::Tensor tokens = x.reshape({n, s.channels});
  const at::Tensor c = expert_at_zero(b1, w2, b2);

  // Experts, and through dweight the gate: y_j depends on g_i through w_jk (pairs: dy_j . e_k(x_j)) and
  // z_jk (dy_j . c_k).
  const MoePlan plan{offsets, pair_index, weight, z};
  auto [dx, dweight, dw1, db1, dw2, db2] =
      Backend::expert_ffn_backward(tokens, dy, plan, expert_out, hidden, w1, b1, w2, s.capacity);
  const at::Tensor dy_acc = dy.to(c.scalar_type());
  const at::Tensor dz = at::mm(dy_acc, c.t());
  const at::Tensor dgate = space_moe_gate_grad(dweight, dz, mask, route, text_lengths, s, gate.scalar_type());

  // The constant term sum_k z_jk c_k: dc_k = sum_j z_jk dy_j.
  const at::Tensor dc = Backend::constant_term_grad(z, dy_acc).to(x.scalar_type());
  dw2.baddbmm_(at::gelu(b1).unsqueeze(2), dc.unsqueeze(1));
  db2.add_(dc);
  db1.add_(at::bmm(w2, dc.unsqueeze(2)).squeeze(2) * at::gelu_backward(at::ones_like(b1), b1));
  return {dx.view(x.sizes()), dgate, dw1, db1, dw2, db2};
}

}  // namespace raphael_ext
