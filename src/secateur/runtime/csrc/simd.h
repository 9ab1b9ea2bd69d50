// Small AVX-512 helpers shared by the kernel files (header-only, inline, internal linkage).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace secateur_simd {

constexpr int64_t kVec = 16;  // floats per zmm register

// Grain for at::parallel_for over rows of n floats: about 64 KiB of a row-wise pass per task.
inline int64_t row_grain(int64_t n) {
  const int64_t g = 16384 / (n > 1 ? n : 1);
  return g > 1 ? g : 1;
}

inline __mmask16 tail_mask(int64_t n_left) {
  return n_left >= kVec ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n_left) - 1u);
}

inline __m512 exp512(__m512 x) {
  // exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2; exp(r) by its Taylor polynomial
  const __m512 lo = _mm512_set1_ps(-87.33654f), hi = _mm512_set1_ps(88.72283f);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 split in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// One row of per-token quantization: returns the scale and stores q + offset as bytes (offset 128
// for the GEMV's unsigned operand, 0 for the signed int8 of the oneDNN path).
inline float quantize_row(const float* xr, int64_t k, int32_t offset, uint8_t* qr) {
  __m512 vmax = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xr + i)));
  if (i < k) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail_mask(k - i), xr + i)));
  const float amax = _mm512_reduce_max_ps(vmax);
  float scale = amax / 127.0f;
  if (!(scale >= 1e-12f)) scale = 1e-12f;
  const __m512 vs = _mm512_set1_ps(scale);
  const __m512i voffset = _mm512_set1_epi32(offset);
  for (i = 0; i < k; i += 16) {
    const __mmask16 mask = tail_mask(k - i);
    __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(mask, xr + i), vs);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i u = _mm512_add_epi32(_mm512_cvtps_epi32(v), voffset);
    _mm_mask_storeu_epi8(qr + i, mask, _mm512_cvtepi32_epi8(u));  // |q| <= 127 by construction
  }
  return scale;
}

}  // namespace secateur_simd
