// RAPHAEL_HOST_DEVICE marks math shared by the CPU (C++) and CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define RAPHAEL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RAPHAEL_HOST_DEVICE inline
#endif
