// The CUTLASS 3.x pointer-array grouped GEMM for Hopper (sm_90a), as templates: included by
// grouped_gemm_sm90.cu (run-time dispatch) and instantiated once per element type by
// grouped_gemm_sm90_bf16.cu and grouped_gemm_sm90_fp16.cu, so the two heavy instantiation sets compile
// in parallel. See grouped_gemm_sm90.cu for the design. Every includer defines NDEBUG first (see there).
#pragma once

#include "cuda_utils.cuh"
#include "moe_cuda.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAFunctions.h>

#if defined(RAPHAEL_EXT_WITH_CUTLASS)
#include <cutlass/arch/config.h>
#endif

#if defined(RAPHAEL_EXT_WITH_CUTLASS) && defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
#define RAPHAEL_SM90_GROUPED_GEMM 1
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/epilogue/thread/activation.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>
#endif

namespace raphael_ext::cuda {

#if defined(RAPHAEL_SM90_GROUPED_GEMM)

// Defined in grouped_gemm_sm90_bf16.cu and grouped_gemm_sm90_fp16.cu.
void grouped_gemm_sm90_bf16(const GroupedGemmProblem& p, cudaStream_t stream);
void grouped_gemm_sm90_fp16(const GroupedGemmProblem& p, cudaStream_t stream);

namespace sm90 {

using namespace cute;

struct Cooperative {
  using Kernel = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
  using Tile = Shape<_128, _256, _64>;
};
struct PingPong {
  using Kernel = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
  using Tile = Shape<_64, _128, _128>;
};

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K) per group
using ClusterShape = Shape<_2, _1, _1>;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

// act(acc + bias row of the group): children first, then the node's operation.
template <class Element, class Tile, template <class> class Act>
using BiasActivation = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<Act, Element, float, kRound>,
    cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, float, float, kRound>,
        cutlass::epilogue::fusion::Sm90AccFetch,
        cutlass::epilogue::fusion::Sm90RowBroadcast<0, Tile, Element*, float>>>;

template <class Element, class LayoutA, class Schedule, template <class> class Act>
struct Sm90Grouped {
  static constexpr int kAlignment = 16 / sizeof(Element);
  using LayoutB = cutlass::layout::RowMajor;
  using LayoutD = cutlass::layout::RowMajor;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Schedule::Tile, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD*, kAlignment, Element, LayoutD*,
      kAlignment, typename Schedule::Epilogue, BiasActivation<Element, typename Schedule::Tile, Act>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment, Element, LayoutB*, kAlignment,
      float, typename Schedule::Tile, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      typename Schedule::Kernel>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

// The per-group argument arrays, carved out of one device buffer (pointer arrays first, each padded to
// 16 bytes as TMA descriptor setup expects of them).
template <class Config, class Element>
struct Sm90Arguments {
  const Element** a;
  const Element** b;
  const Element** bias;
  Element** d;
  typename Config::StrideA* stride_a;
  typename Config::StrideB* stride_b;
  typename Config::StrideD* stride_d;
  ProblemShape::UnderlyingProblemShape* problems;

  static int padded(int groups) { return (groups + 1) / 2 * 2; }
  static int64_t bytes(int groups) {
    return 4 * padded(groups) * sizeof(void*) +
           groups * (sizeof(typename Config::StrideA) + sizeof(typename Config::StrideB) +
                     sizeof(typename Config::StrideD) + sizeof(ProblemShape::UnderlyingProblemShape));
  }
  Sm90Arguments(void* buffer, int groups) {
    const int n = padded(groups);
    a = static_cast<const Element**>(buffer);
    b = a + n;
    bias = b + n;
    d = const_cast<Element**>(bias + n);
    stride_a = reinterpret_cast<typename Config::StrideA*>(d + n);
    stride_b = reinterpret_cast<typename Config::StrideB*>(stride_a + groups);
    stride_d = reinterpret_cast<typename Config::StrideD*>(stride_b + groups);
    problems = reinterpret_cast<ProblemShape::UnderlyingProblemShape*>(stride_d + groups);
  }
};

// ---------------------------------------------------------------------------------------------
// Kernel bodies.

template <class Config, class Element>
__global__ void fill_sm90_arguments(GroupedGemmProblem p, Sm90Arguments<Config, Element> args) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= p.groups) return;
  const GroupGemm group = describe_group(p, g);
  args.problems[g] = cute::make_shape(group.M, group.N, group.K);
  args.a[g] = static_cast<const Element*>(p.a) + group.a_offset;
  args.b[g] = static_cast<const Element*>(p.b) + group.b_offset;
  args.d[g] = static_cast<Element*>(p.d) + group.d_offset;
  if (p.bias != nullptr) args.bias[g] = static_cast<const Element*>(p.bias) + g * p.N;
  // make_cute_packed_stride sets the one dynamic stride of each layout from the shape it is given; the
  // leading dimension is passed in both slots so row- and column-major A take the right one (PyTorch's trick).
  args.stride_a[g] = cutlass::make_cute_packed_stride(typename Config::StrideA{}, {int(group.lda), int(group.lda), 1});
  args.stride_b[g] = cutlass::make_cute_packed_stride(typename Config::StrideB{}, {int(group.ldb), int(group.ldb), 1});
  args.stride_d[g] = cutlass::make_cute_packed_stride(typename Config::StrideD{}, {group.M, int(group.ldd), 1});
}

// ---------------------------------------------------------------------------------------------
// Launchers.

template <class Config, class Element>
void run_grouped(const GroupedGemmProblem& p, cudaStream_t stream) {
  using Gemm = typename Config::Gemm;
  const int device = c10::cuda::current_device();
  const auto bytes_options = at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device);
  at::Tensor buffer = at::empty({Sm90Arguments<Config, Element>::bytes(p.groups)}, bytes_options);
  const Sm90Arguments<Config, Element> args(buffer.mutable_data_ptr(), p.groups);
  constexpr int kFillThreads = 128;
  fill_sm90_arguments<Config, Element>
      <<<(p.groups + kFillThreads - 1) / kFillThreads, kFillThreads, 0, stream>>>(p, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = device;
  hw_info.sm_count = multiprocessor_count(device);
  typename Gemm::Arguments arguments{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {p.groups, args.problems, nullptr},
      {args.a, args.stride_a, args.b, args.stride_b},
      {{}, nullptr, args.stride_d, args.d, args.stride_d},
      hw_info};
  // EVT arguments, children before the node: {{acc, bias row, plus}, activation}.
  arguments.epilogue.thread = {{{}, {p.bias != nullptr ? args.bias : nullptr, Element(0), {}}, {}}, {}};

  Gemm gemm;
  cutlass::Status status = gemm.can_implement(arguments);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "grouped_gemm: CUTLASS Sm90 cannot implement: ",
              cutlassGetStatusString(status));
  at::Tensor workspace = at::empty({static_cast<int64_t>(Gemm::get_workspace_size(arguments))}, bytes_options);
  status = gemm.initialize(arguments, workspace.mutable_data_ptr(), stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "grouped_gemm: CUTLASS Sm90 initialize failed: ",
              cutlassGetStatusString(status));
  status = gemm.run(stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "grouped_gemm: CUTLASS Sm90 run failed: ",
              cutlassGetStatusString(status));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Picks the schedule and epilogue for the problem and runs it (what the per-dtype files instantiate).
template <class Element>
void run_sm90(const GroupedGemmProblem& p, cudaStream_t stream) {
  using cutlass::epilogue::thread::GELU;
  using cutlass::epilogue::thread::Identity;
  using cutlass::layout::ColumnMajor;
  using cutlass::layout::RowMajor;
  if (p.kind == GemmKind::WeightGrad) {  // M = K of the forward: the large tile fits
    run_grouped<Sm90Grouped<Element, ColumnMajor, Cooperative, Identity>, Element>(p, stream);
    return;
  }
  const bool small = p.rows <= 128LL * p.groups || p.N <= 128;
  if (small && p.gelu) {
    run_grouped<Sm90Grouped<Element, RowMajor, PingPong, GELU>, Element>(p, stream);
  } else if (small) {
    run_grouped<Sm90Grouped<Element, RowMajor, PingPong, Identity>, Element>(p, stream);
  } else if (p.gelu) {
    run_grouped<Sm90Grouped<Element, RowMajor, Cooperative, GELU>, Element>(p, stream);
  } else {
    run_grouped<Sm90Grouped<Element, RowMajor, Cooperative, Identity>, Element>(p, stream);
  }
}

}  // namespace sm90

#endif  // RAPHAEL_SM90_GROUPED_GEMM

}  // namespace raphael_ext::cuda
