// Grouped GEMM on Ampere-class tensor cores (sm_80 and later): CUTLASS 2.x GemmGrouped
// (CUTLASS examples/24_gemm_grouped), float16/bfloat16, and float32 as TF32. The per-group problem
// sizes, pointers and leading dimensions are filled on the device from the offsets, and the kernel's
// device-only scheduler reads them there (no host precomputation, so no synchronisation and empty
// groups simply own no tile). The bias is the epilogue's C operand with leading dimension 0 (every row
// of group g reads bias[g]), and GELU (exact erf) is the epilogue's activation.

// CUTLASS's device-side asserts are function calls; in the mainloop they cost registers and branches.
// Release builds of CUTLASS (and PyTorch's) define NDEBUG, and torch extensions do not pass it to nvcc,
// so this file does.
#ifndef NDEBUG
#define NDEBUG
#endif

#include "cuda_utils.cuh"
#include "moe_cuda.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>

#if defined(RAPHAEL_EXT_WITH_CUTLASS)
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/epilogue/thread/linear_combination_gelu.h>
#include <cutlass/gemm/device/gemm_grouped.h>
#include <cutlass/gemm/kernel/default_gemm_grouped.h>
#endif

namespace raphael_ext::cuda {

#if defined(RAPHAEL_EXT_WITH_CUTLASS)
namespace {

// Tiles of CUTLASS's own Sm80 examples: 16-bit types as in 24_gemm_grouped, float32 (TF32) as in
// 14_ampere_tf32_tensorop_gemm.
template <typename Element>
struct Sm80Tiles {
  using Block = cutlass::gemm::GemmShape<128, 128, 32>;
  using Warp = cutlass::gemm::GemmShape<64, 64, 32>;
  using Instruction = cutlass::gemm::GemmShape<16, 8, 16>;
  static constexpr int kStages = 4;
};
template <>
struct Sm80Tiles<float> {
  using Block = cutlass::gemm::GemmShape<128, 128, 16>;
  using Warp = cutlass::gemm::GemmShape<64, 64, 16>;
  using Instruction = cutlass::gemm::GemmShape<16, 8, 8>;
  static constexpr int kStages = 4;
};

template <typename Element>
constexpr int kAlignment = 16 / sizeof(Element);  // elements per 16-byte access

template <typename Element, bool kGelu>
using Sm80Epilogue = std::conditional_t<
    kGelu, cutlass::epilogue::thread::LinearCombinationGELU<Element, kAlignment<Element>, float, float>,
    cutlass::epilogue::thread::LinearCombination<Element, kAlignment<Element>, float, float>>;

template <typename Element, typename LayoutA, bool kGelu>
using Sm80GroupedGemm = cutlass::gemm::device::GemmGrouped<typename cutlass::gemm::kernel::DefaultGemmGrouped<
    Element, LayoutA, cutlass::ComplexTransform::kNone, kAlignment<Element>, Element, cutlass::layout::RowMajor,
    cutlass::ComplexTransform::kNone, kAlignment<Element>, Element, cutlass::layout::RowMajor, float,
    cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, typename Sm80Tiles<Element>::Block,
    typename Sm80Tiles<Element>::Warp, typename Sm80Tiles<Element>::Instruction, Sm80Epilogue<Element, kGelu>,
    cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle, Sm80Tiles<Element>::kStages>::GemmKernel>;

// The per-group argument arrays of GemmGrouped, carved out of one device buffer.
template <typename Element>
struct Sm80Arguments {
  Element** a;
  Element** b;
  Element** c;
  Element** d;
  int64_t* lda;
  int64_t* ldb;
  int64_t* ldc;
  int64_t* ldd;
  cutlass::gemm::GemmCoord* problems;

  static int64_t bytes(int groups) {
    return groups * (4 * sizeof(Element*) + 4 * sizeof(int64_t) + sizeof(cutlass::gemm::GemmCoord));
  }
  Sm80Arguments(void* buffer, int groups) {
    auto** pointers = static_cast<Element**>(buffer);
    a = pointers;
    b = a + groups;
    c = b + groups;
    d = c + groups;
    lda = reinterpret_cast<int64_t*>(d + groups);
    ldb = lda + groups;
    ldc = ldb + groups;
    ldd = ldc + groups;
    problems = reinterpret_cast<cutlass::gemm::GemmCoord*>(ldd + groups);
  }
};

// ---------------------------------------------------------------------------------------------
// Kernel bodies.

template <typename Element>
__global__ void fill_sm80_arguments(GroupedGemmProblem p, Sm80Arguments<Element> args) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= p.groups) return;
  const GroupGemm group = describe_group(p, g);
  args.problems[g] = cutlass::gemm::GemmCoord(group.M, group.N, group.K);
  args.a[g] = const_cast<Element*>(static_cast<const Element*>(p.a)) + group.a_offset;
  args.b[g] = const_cast<Element*>(static_cast<const Element*>(p.b)) + group.b_offset;
  args.d[g] = static_cast<Element*>(p.d) + group.d_offset;
  // C is read only when beta != 0, i.e. when there is a bias: then it is bias[g] broadcast over the rows.
  args.c[g] = p.bias != nullptr ? const_cast<Element*>(static_cast<const Element*>(p.bias)) + g * p.N : args.d[g];
  args.lda[g] = group.lda;
  args.ldb[g] = group.ldb;
  args.ldc[g] = p.bias != nullptr ? 0 : group.ldd;
  args.ldd[g] = group.ldd;
}

// ---------------------------------------------------------------------------------------------
// Launchers.

template <typename Gemm, typename Element>
void run_grouped(const GroupedGemmProblem& p, cudaStream_t stream) {
  const int device = c10::cuda::current_device();
  at::Tensor buffer = at::empty({Sm80Arguments<Element>::bytes(p.groups)},
                                at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
  const Sm80Arguments<Element> args(buffer.mutable_data_ptr(), p.groups);
  constexpr int kFillThreads = 128;
  fill_sm80_arguments<Element><<<(p.groups + kFillThreads - 1) / kFillThreads, kFillThreads, 0, stream>>>(p, args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // One full wave of persistent blocks; the kernel's scheduler walks the groups' tiles on the device.
  static const int blocks_per_sm = Gemm::maximum_active_blocks();
  TORCH_CHECK(blocks_per_sm > 0, "grouped_gemm: the CUTLASS Sm80 kernel does not fit on this GPU");
  const int blocks = blocks_per_sm * multiprocessor_count(device);
  typename Gemm::EpilogueOutputOp::Params epilogue(1.0f, p.bias != nullptr ? 1.0f : 0.0f);
  typename Gemm::Arguments arguments(args.problems, p.groups, blocks, epilogue, args.a, args.b, args.c, args.d,
                                     args.lda, args.ldb, args.ldc, args.ldd);
  Gemm gemm;
  cutlass::Status status = gemm.initialize(arguments, nullptr, stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "grouped_gemm: CUTLASS Sm80 initialize failed: ",
              cutlassGetStatusString(status));
  status = gemm.run(stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, "grouped_gemm: CUTLASS Sm80 run failed: ",
              cutlassGetStatusString(status));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Element>
void run_for_kind(const GroupedGemmProblem& p, cudaStream_t stream) {
  using cutlass::layout::ColumnMajor;
  using cutlass::layout::RowMajor;
  if (p.kind == GemmKind::WeightGrad) {
    run_grouped<Sm80GroupedGemm<Element, ColumnMajor, false>, Element>(p, stream);
  } else if (p.gelu) {
    run_grouped<Sm80GroupedGemm<Element, RowMajor, true>, Element>(p, stream);
  } else {
    run_grouped<Sm80GroupedGemm<Element, RowMajor, false>, Element>(p, stream);
  }
}

}  // namespace

bool grouped_gemm_sm80(const GroupedGemmProblem& p, at::ScalarType dtype, cudaStream_t stream) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  if (props->major < 8 || !compiled_for(props->major, props->minor)) return false;
  switch (dtype) {
    case at::kHalf: run_for_kind<cutlass::half_t>(p, stream); return true;
    case at::kBFloat16: run_for_kind<cutlass::bfloat16_t>(p, stream); return true;
    case at::kFloat: run_for_kind<float>(p, stream); return true;
    default: return false;
  }
}

#else

bool grouped_gemm_sm80(const GroupedGemmProblem&, at::ScalarType, cudaStream_t) { return false; }

#endif  // RAPHAEL_EXT_WITH_CUTLASS

}  // namespace raphael_ext::cuda
