// The GPU architectures this file was compiled for, as nvcc reports them (__CUDA_ARCH_LIST__),
// so build_info() shows what the binary holds rather than what the build was asked for.
#include <string>

namespace raphael_ext {

std::string compiled_cuda_archs() {
#if defined(__CUDA_ARCH_LIST__)
#define RAPHAEL_STR2(...) #__VA_ARGS__
#define RAPHAEL_STR(...) RAPHAEL_STR2(__VA_ARGS__)
  return RAPHAEL_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

}  // namespace raphael_ext
