// AVX2 + FMA exp/log for float lanes, for the CPU kernels' hot loops.
//
// Why not at::vec::Vectorized: an extension is compiled once for the baseline ISA, so Vectorized<float>
// falls back to its scalar loop; compiling the whole extension with -mavx2 would make it crash on
// older CPUs. Instead, only the functions marked RAPHAEL_AVX2 are compiled for AVX2/FMA and the
// callers choose them at run time (cpu_has_avx2_fma()). The polynomials are Cephes' expf/logf
// (about 1 ulp on their domain); the tests compare the kernels that use them with a float64 reference.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define RAPHAEL_HAVE_AVX2_PATH 1

#include <immintrin.h>

#include <cfloat>

#define RAPHAEL_AVX2 __attribute__((target("avx2,fma")))

namespace raphael_ext::avx2 {

inline bool cpu_has_avx2_fma() {
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
}

// exp(x) for x <= 88. Below -87.33 the result is clamped to FLT_MIN (~1.2e-38) instead of
// underflowing to a denormal or 0: the callers only add or multiply it into values of order 1.
RAPHAEL_AVX2 inline __m256 exp(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3365448f)), _mm256_set1_ps(88.0f));
  // x = n ln2 + r, |r| <= ln2 / 2, with ln2 split in two for an exact product n * ln2_hi.
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

// log(x) for x > 0; inputs below FLT_MIN (denormals, 0) are treated as FLT_MIN.
RAPHAEL_AVX2 inline __m256 log(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(FLT_MIN));
  const __m256i bits = _mm256_castps_si256(x);
  // x = f * 2^e with f in [0.5, 1).
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  __m256 f = _mm256_or_ps(_mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x007fffff))),
                          _mm256_set1_ps(0.5f));
  // Move f into [sqrt(1/2), sqrt(2)) and take f - 1.
  const __m256 small = _mm256_cmp_ps(f, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(_mm256_set1_ps(1.0f), small));
  f = _mm256_add_ps(_mm256_sub_ps(f, _mm256_set1_ps(1.0f)), _mm256_and_ps(f, small));
  const __m256 z = _mm256_mul_ps(f, f);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, f), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y));
}

// log1p(u) for u >= 0 given inv = 1 / (1 + u) (the callers have it already): log(w) for w = fl(1 + u),
// corrected to first order for the rounding of w, log1p(u) = log(w) + (u - (w - 1)) / w. Where w rounds
// to 1 this gives u * inv, which equals log1p(u) to float precision; no division, no branch.
RAPHAEL_AVX2 inline __m256 log1p(__m256 u, __m256 inv) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 w = _mm256_add_ps(one, u);
  return _mm256_fmadd_ps(_mm256_sub_ps(u, _mm256_sub_ps(w, one)), inv, log(w));
}

// Sum of the 8 lanes, in double.
RAPHAEL_AVX2 inline double reduce_add(__m256 v) {
  const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
  const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
  const __m256d s = _mm256_add_pd(lo, hi);
  const __m128d s2 = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s2, _mm_unpackhi_pd(s2, s2)));
}

}  // namespace raphael_ext::avx2

#endif  // x86-64
