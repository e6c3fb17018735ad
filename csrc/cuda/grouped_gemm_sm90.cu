// Grouped GEMM on Hopper (sm_90a): CUTLASS 3.x pointer-array grouped kernel with TMA loads and wgmma
// (CUTLASS examples/57_hopper_grouped_gemm; the bf16 recipe of PyTorch's GroupMM.cu), float16 and
// bfloat16. Problem shapes, pointers and strides are filled on the device from the offsets, and the
// kernel reads them there (no host problem sizes: no synchronisation). Groups of up to 128 rows on
// average, or N <= 128, run the ping-pong schedule with 64 x 128 x 128 tiles (two consumer warp groups
// alternate, hiding the epilogue of small tiles); larger ones the cooperative schedule with 128 x 256 x 64
// tiles. The epilogue is an EVT: act(acc + bias[g] broadcast over rows), with the per-group bias pointers
// read by Sm90RowBroadcast (a null array means no bias), act = identity or exact-erf GELU.
//
// The kernels exist only in the sm_90a device code (CUTLASS compiles their bodies under
// __CUDA_ARCH_FEAT_SM90_ALL); a device variable tells at run time whether the binary loaded for this
// GPU holds them.
//
// This file holds the run-time dispatch; the kernels are instantiated per element type in
// grouped_gemm_sm90_bf16.cu and grouped_gemm_sm90_fp16.cu (templates in grouped_gemm_sm90.cuh).

// CUTLASS's device-side asserts are function calls; inside the wgmma mainloop they make ptxas serialise the
// asynchronous MMAs (warning C7510, a large loss on Hopper). Release builds of CUTLASS (and PyTorch's)
// define NDEBUG and torch extensions do not pass it to nvcc, so every file of this kernel does, first.
#ifndef NDEBUG
#define NDEBUG
#endif

#include "grouped_gemm_sm90.cuh"

#include <ATen/cuda/CUDAContext.h>

#include <atomic>

namespace raphael_ext::cuda {

#if defined(RAPHAEL_SM90_GROUPED_GEMM)
namespace {

// 1 in the sm_90a device code, 0 in every other arch's.
__device__ int sm90a_kernels_compiled =
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    1;
#else
    0;
#endif

// Whether the code loaded for the current device holds the sm_90a kernels. Read once per device; the
// read is a synchronous copy, so while the stream is being captured into a CUDA graph an unread device
// answers false (the Sm80 kernels run instead).
bool sm90a_kernels_loaded(int device, cudaStream_t stream) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};  // 0 unknown, 1 absent, 2 present
  if (device < 0 || device >= kMaxDevices) return false;
  int state = cache[device].load(std::memory_order_relaxed);
  if (state == 0) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone) return false;
    int compiled = 0;
    C10_CUDA_CHECK(cudaMemcpyFromSymbol(&compiled, sm90a_kernels_compiled, sizeof(int)));
    state = compiled ? 2 : 1;
    cache[device].store(state, std::memory_order_relaxed);
  }
  return state == 2;
}

}  // namespace

bool grouped_gemm_sm90(const GroupedGemmProblem& p, at::ScalarType dtype, cudaStream_t stream) {
  if (dtype != at::kHalf && dtype != at::kBFloat16) return false;
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  if (props->major != 9 || props->minor != 0 || !compiled_for(9, 0)) return false;
  if (!sm90a_kernels_loaded(c10::cuda::current_device(), stream)) return false;
  if (dtype == at::kHalf) {
    grouped_gemm_sm90_fp16(p, stream);
  } else {
    grouped_gemm_sm90_bf16(p, stream);
  }
  return true;
}

#else

bool grouped_gemm_sm90(const GroupedGemmProblem&, at::ScalarType, cudaStream_t) { return false; }

#endif  // RAPHAEL_SM90_GROUPED_GEMM

}  // namespace raphael_ext::cuda
