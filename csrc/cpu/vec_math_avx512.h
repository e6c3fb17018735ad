// AVX-512 exp for float lanes, for the CPU kernels' widest hot loops (space_moe's GELU epilogues), chosen at run
// time like vec_math_avx2.h's functions. Used only where PyTorch itself runs its AVX-512 kernels
// (at::get_cpu_capability(): the CPU has them and ATEN_CPU_CAPABILITY does not ask for less), so setting
// ATEN_CPU_CAPABILITY=avx2 holds both libraries at AVX2. Same Cephes polynomial as avx2::exp.
#pragma once

#include "vec_math_avx2.h"

#if RAPHAEL_HAVE_AVX2_PATH
#define RAPHAEL_HAVE_AVX512_PATH 1

#include <ATen/Version.h>

#define RAPHAEL_AVX512 __attribute__((target("avx512f")))

namespace raphael_ext::avx512 {

inline bool enabled() {
  static const bool on = __builtin_cpu_supports("avx512f") && at::get_cpu_capability() == "AVX512";
  return on;
}

// exp(x) for x <= 88, clamped below at -87.33 as avx2::exp is.
RAPHAEL_AVX512 inline __m512 exp(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3365448f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f),
                                                        _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i pow2n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(pow2n));
}

}  // namespace raphael_ext::avx512

#endif  // RAPHAEL_HAVE_AVX2_PATH
