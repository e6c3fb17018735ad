// What the CUDA part of this binary holds, as nvcc saw it while compiling, so build_info() reports what
// was built rather than what the build was asked for.
#if defined(RAPHAEL_EXT_WITH_CUTLASS)
#include <cutlass/arch/config.h>
#endif

#include <string>

// __CUDA_ARCH_LIST__ says 900 for both sm_90 and sm_90a, so the build system declares sm_90a with
// RAPHAEL_EXT_SM90A (setup.py, CMakeLists.txt); compiling sm_90a code without it is an error here.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && !defined(RAPHAEL_EXT_SM90A)
#error "building sm_90a device code: define RAPHAEL_EXT_SM90A so that build_info() reports the sm_90a kernels"
#endif

namespace raphael_ext {

// The GPU architectures of the device code, e.g. "800,900".
std::string compiled_cuda_archs() {
#if defined(__CUDA_ARCH_LIST__)
#define RAPHAEL_STR2(...) #__VA_ARGS__
#define RAPHAEL_STR(...) RAPHAEL_STR2(__VA_ARGS__)
  return RAPHAEL_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

// Whether the Hopper grouped GEMM (CUTLASS 3.x, TMA + wgmma; grouped_gemm_sm90*.cu) was compiled: it
// needs CUTLASS, an nvcc with modifiable TMA and sm_90a device code.
bool sm90a_kernels_compiled() {
#if defined(RAPHAEL_EXT_SM90A) && defined(CUTLASS_ARCH_MMA_MODIFIABLE_TMA_SM90_SUPPORTED)
  return true;
#else
  return false;
#endif
}

}  // namespace raphael_ext
