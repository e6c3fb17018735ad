// The Hopper grouped GEMM kernels for float16 (grouped_gemm_sm90.cuh), in a file of their own so the
// element types compile in parallel.

// CUTLASS's device-side asserts are function calls; inside the wgmma mainloop they make ptxas serialise the
// asynchronous MMAs (warning C7510, a large loss on Hopper). Release builds of CUTLASS (and PyTorch's)
// define NDEBUG and torch extensions do not pass it to nvcc, so every file of this kernel does, first.
#ifndef NDEBUG
#define NDEBUG
#endif

#include "grouped_gemm_sm90.cuh"

namespace raphael_ext::cuda {

#if defined(RAPHAEL_SM90_GROUPED_GEMM)
void grouped_gemm_sm90_fp16(const GroupedGemmProblem& p, cudaStream_t stream) {
  sm90::run_sm90<cutlass::half_t>(p, stream);
}
#endif

}  // namespace raphael_ext::cuda
