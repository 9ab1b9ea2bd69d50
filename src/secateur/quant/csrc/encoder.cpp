// Fused row-wise passes of a W8A8 post-norm encoder layer (BERT) on AVX-512 CPUs.
//
// Between its int8 GEMMs a W8A8 encoder layer does elementwise work over every token: rescale the
// int32 products by the token's scale and add the bias, the activation or the residual add and
// LayerNorm, then quantize again for the next GEMM. As separate ops each is a full pass over a
// [tokens, width] float tensor in memory, and together they cost as much as the GEMMs. Here each
// chain is one pass per row, the row staying in L1 between its steps:
//
//   w8a8_gelu_quantize       y * xs + b -> GELU (erf) -> per-token int8 (the next GEMM's input)
//   w8a8_residual_layernorm  y * xs + b + residual -> LayerNorm -> float out (the residual stream),
//                            and optionally its per-token int8 (the next GEMM's input)
//
// `y` is the GEMM's float32 output with the weight scales applied (onednn.qlinear_pointwise with an
// activation scale of 1), `xs` the per-token activation scales. The rescale is one FMA, as in
// w8a8_epilogue; the quantization is quantize_row's (the integers of quantize_per_token).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

using namespace secateur_simd;

// GELU(x) = x/2 * (1 + erf(x / sqrt 2)) with erf from Abramowitz & Stegun 7.1.26 (absolute error
// below 1.5e-7): for z >= 0, erf(z) = 1 - P(t) exp(-z^2), t = 1 / (1 + p z). 1 + erf is formed as
// 2 - P exp(-z^2) or, for z < 0, directly as P exp(-z^2): no cancellation in the negative tail.
inline __m512 gelu512(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
  const __m512 az = _mm512_abs_ps(z);
  const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), az, one));
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  p = _mm512_mul_ps(p, t);
  const __m512 w = _mm512_mul_ps(p, exp512(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(az, az))));
  const __mmask16 negative = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 one_plus_erf = _mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_set1_ps(2.0f), w), w);
  return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), one_plus_erf);
}

struct Rows {
  int64_t rows, n;
  const float* y;
  const float* xs;
  const float* bias;  // nullptr: none
};

Rows check_rows(const at::Tensor& y, const at::Tensor& xs, const at::Tensor& b, const char* op) {
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == at::kFloat && y.is_contiguous(), op,
              ": y must be a contiguous 2-D float32 tensor");
  TORCH_CHECK(xs.scalar_type() == at::kFloat && xs.is_contiguous() && xs.numel() == y.size(0), op,
              ": xs must hold one float per row");
  TORCH_CHECK(!b.defined() || (b.scalar_type() == at::kFloat && b.is_contiguous() && b.numel() == y.size(1)), op,
              ": bias must be float32 with one entry per column");
  return {y.size(0), y.size(1), y.data_ptr<float>(), xs.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr};
}

at::Tensor optional_float(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

// y[m, j] * xs[m] + bias[j] for one row (the float of w8a8_epilogue).
inline __m512 rescale(const Rows& r, int64_t m, int64_t j, __mmask16 mask) {
  const __m512 v = _mm512_maskz_loadu_ps(mask, r.y + m * r.n + j);
  const __m512 s = _mm512_set1_ps(r.xs[m]);
  return r.bias ? _mm512_fmadd_ps(v, s, _mm512_maskz_loadu_ps(mask, r.bias + j)) : _mm512_mul_ps(v, s);
}

inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

std::tuple<at::Tensor, at::Tensor> w8a8_gelu_quantize(const at::Tensor& y, const at::Tensor& xs,
                                                     const c10::optional<at::Tensor>& bias) {
  const at::Tensor b = optional_float(bias);
  const Rows r = check_rows(y, xs, b, "w8a8_gelu_quantize");
  at::Tensor q = at::empty({r.rows, r.n}, y.options().dtype(at::kChar));
  at::Tensor scale = at::empty({r.rows, 1}, y.options());
  uint8_t* qp = reinterpret_cast<uint8_t*>(q.data_ptr<int8_t>());
  float* sp = scale.data_ptr<float>();
  at::parallel_for(0, r.rows, row_grain(r.n), [&](int64_t r0, int64_t r1) {
    std::vector<float> row(r.n);
    for (int64_t m = r0; m < r1; ++m) {
      for (int64_t j = 0; j < r.n; j += kVec) {
        const __mmask16 mask = tail_mask(r.n - j);
        _mm512_mask_storeu_ps(row.data() + j, mask, gelu512(rescale(r, m, j, mask)));
      }
      sp[m] = quantize_row(row.data(), r.n, 0, qp + m * r.n);
    }
  });
  return {q, scale};
}

// LayerNorm of v = y * xs + b + residual over each row: mean, then the mean of squared deviations
// (two passes over the row in L1), (v - mean) / sqrt(var + eps) * gamma + beta.
std::tuple<at::Tensor, at::Tensor, at::Tensor> w8a8_residual_layernorm(
    const at::Tensor& y, const at::Tensor& xs, const c10::optional<at::Tensor>& bias, const at::Tensor& residual,
    const at::Tensor& gamma, const at::Tensor& beta, double eps, bool quantize) {
  const at::Tensor b = optional_float(bias);
  const Rows r = check_rows(y, xs, b, "w8a8_residual_layernorm");
  TORCH_CHECK(residual.scalar_type() == at::kFloat && residual.is_contiguous() && residual.numel() == r.rows * r.n,
              "w8a8_residual_layernorm: residual must be contiguous float32 of y's shape");
  const at::Tensor g = gamma.to(at::kFloat).contiguous(), be = beta.to(at::kFloat).contiguous();
  TORCH_CHECK(g.numel() == r.n && be.numel() == r.n, "w8a8_residual_layernorm: gamma and beta need one entry per column");
  at::Tensor out = at::empty({r.rows, r.n}, y.options());
  at::Tensor q = at::empty({quantize ? r.rows : 0, r.n}, y.options().dtype(at::kChar));
  at::Tensor scale = at::empty({quantize ? r.rows : 0, 1}, y.options());
  const float* rp = residual.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const float* bp = be.data_ptr<float>();
  float* op = out.data_ptr<float>();
  uint8_t* qp = reinterpret_cast<uint8_t*>(q.data_ptr<int8_t>());
  float* sp = scale.data_ptr<float>();
  const float inv_n = 1.0f / static_cast<float>(r.n);
  at::parallel_for(0, r.rows, row_grain(r.n), [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) {
      float* o = op + m * r.n;
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < r.n; j += kVec) {
        const __mmask16 mask = tail_mask(r.n - j);
        const __m512 v = _mm512_add_ps(rescale(r, m, j, mask), _mm512_maskz_loadu_ps(mask, rp + m * r.n + j));
        _mm512_mask_storeu_ps(o + j, mask, v);
        sum = _mm512_add_ps(sum, v);  // masked lanes are 0
      }
      const float mean = _mm512_reduce_add_ps(sum) * inv_n;
      const __m512 vmean = _mm512_set1_ps(mean);
      __m512 sq = _mm512_setzero_ps();
      for (int64_t j = 0; j < r.n; j += kVec) {
        const __mmask16 mask = tail_mask(r.n - j);
        const __m512 d = _mm512_maskz_sub_ps(mask, _mm512_maskz_loadu_ps(mask, o + j), vmean);
        sq = _mm512_fmadd_ps(d, d, sq);
      }
      const float rstd = 1.0f / std::sqrt(_mm512_reduce_add_ps(sq) * inv_n + static_cast<float>(eps));
      const __m512 vrstd = _mm512_set1_ps(rstd);
      for (int64_t j = 0; j < r.n; j += kVec) {
        const __mmask16 mask = tail_mask(r.n - j);
        const __m512 d = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, o + j), vmean), vrstd);
        const __m512 h = _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(mask, gp + j), _mm512_maskz_loadu_ps(mask, bp + j));
        _mm512_mask_storeu_ps(o + j, mask, h);
      }
      if (quantize) sp[m] = quantize_row(o, r.n, 0, qp + m * r.n);
    }
  });
  return {out, q, scale};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(secateur, m) {
  m.def("w8a8_gelu_quantize(Tensor y, Tensor xs, Tensor? bias) -> (Tensor, Tensor)");
  m.def("w8a8_residual_layernorm(Tensor y, Tensor xs, Tensor? bias, Tensor residual, Tensor gamma, Tensor beta, "
        "float eps, bool quantize) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(secateur, CPU, m) {
  m.impl("w8a8_gelu_quantize", &w8a8_gelu_quantize);
  m.impl("w8a8_residual_layernorm", &w8a8_residual_layernorm);
}
