// Large CPU buffers of the expert kernels, recycled between calls (docs/kernels.md, "CPU memory").
#pragma once

#include <ATen/core/Tensor.h>

namespace raphael_ext::cpu {

// at::empty for the kernels' large row buffers (the saved pre-activations, the backward's gathered rows).
// glibc maps every allocation over 32 MiB afresh and unmaps it when freed, so without a cache each training
// step pays page faults, and the kernel's zeroing, on all of its saved activations again. Buffers freed
// by their tensors are kept idle, up to RAPHAEL_EXT_CPU_CACHE_MIB (default 1024; 0 turns the cache off),
// and handed to the next call that fits, like PyTorch's CUDA caching allocator. Every hand-out and return
// is reported to the profiler as an allocation and a free, so its memory timeline shows what the op holds.
// New buffers are 2 MiB-aligned and asked for transparent huge pages (madvise) where Linux offers them.
at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees the idle buffers (raphael_ext.ops.empty_cpu_cache()); buffers held by tensors are kept.
void release_idle_buffers();

}  // namespace raphael_ext::cpu
