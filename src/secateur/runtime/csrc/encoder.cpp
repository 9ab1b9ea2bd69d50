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
//   w8a8_encoder_attention   self-attention on the joint q/k/v GEMM output, rescaled as it is read
//
// `y` is the GEMM's float32 output with the weight scales applied (onednn.qlinear_pointwise with an
// activation scale of 1), or its int32 products (torch._int_mm) with the weight scales `ws` still
// to apply: float(y) * ws, the floats torch.mul(y, ws) would give, so both forms read the same
// values and the float form's separate pass is saved. `xs` holds the per-token activation scales.
// The rescale is one FMA, as in w8a8_epilogue; the quantization is quantize_row's (the integers of
// quantize_per_token).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using namespace secateur_simd;

// GELU(x) = x/2 * (1 + erf(x / sqrt 2)) with erf from Abramowitz & Stegun 7.1.28 (absolute error
// below 3e-7, no exp): for z >= 0, erf(z) = 1 - 1 / P(z)^16, P(z) = 1 + a1 z + ... + a6 z^6.
// 1 + erf is formed as 2 - P^-16 or, for z < 0, directly as P(|z|)^-16: no cancellation in the
// negative tail. 1 / P by the 14-bit reciprocal and one Newton step (relative error ~1e-8).
inline __m512 gelu512(__m512 x) {
  const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
  const __m512 az = _mm512_abs_ps(z);
  __m512 p = _mm512_set1_ps(0.0000430638f);
  p = _mm512_fmadd_ps(p, az, _mm512_set1_ps(0.0002765672f));
  p = _mm512_fmadd_ps(p, az, _mm512_set1_ps(0.0001520143f));
  p = _mm512_fmadd_ps(p, az, _mm512_set1_ps(0.0092705272f));
  p = _mm512_fmadd_ps(p, az, _mm512_set1_ps(0.0422820123f));
  p = _mm512_fmadd_ps(p, az, _mm512_set1_ps(0.0705230784f));
  p = _mm512_fmadd_ps(p, az, _mm512_set1_ps(1.0f));
  const __m512 r0 = _mm512_rcp14_ps(p);
  __m512 w = _mm512_mul_ps(r0, _mm512_fnmadd_ps(p, r0, _mm512_set1_ps(2.0f)));  // 1 / P
  w = _mm512_mul_ps(w, w);  // P^-2
  w = _mm512_mul_ps(w, w);  // P^-4
  w = _mm512_mul_ps(w, w);  // P^-8
  w = _mm512_mul_ps(w, w);  // P^-16 = 1 - erf(|z|)
  const __mmask16 negative = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 one_plus_erf = _mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_set1_ps(2.0f), w), w);
  return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), one_plus_erf);
}

struct Rows {
  int64_t rows, n;
  const float* y;  // float32 products with the weight scales applied, or nullptr
  const int32_t* yi;  // int32 products (then ws holds the weight scales), or nullptr
  const float* ws;
  const float* xs;
  const float* bias;  // nullptr: none
};

at::Tensor optional_float(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

Rows check_rows(const at::Tensor& y, const at::Tensor& xs, const at::Tensor& b, const at::Tensor& ws, const char* op) {
  const bool integer = y.scalar_type() == at::kInt;
  TORCH_CHECK(y.dim() == 2 && (y.scalar_type() == at::kFloat || integer) && y.is_contiguous(), op,
              ": y must be a contiguous 2-D float32 or int32 tensor");
  TORCH_CHECK(integer == ws.defined(), op, ": int32 products need their weight scales ws (and float32 ones none)");
  TORCH_CHECK(!ws.defined() || ws.numel() == y.size(1), op, ": ws must hold one float per column");
  TORCH_CHECK(xs.scalar_type() == at::kFloat && xs.is_contiguous() && xs.numel() == y.size(0), op,
              ": xs must hold one float per row");
  TORCH_CHECK(!b.defined() || (b.scalar_type() == at::kFloat && b.is_contiguous() && b.numel() == y.size(1)), op,
              ": bias must be float32 with one entry per column");
  return {y.size(0), y.size(1), integer ? nullptr : y.data_ptr<float>(), integer ? y.data_ptr<int32_t>() : nullptr,
          ws.defined() ? ws.data_ptr<float>() : nullptr, xs.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr};
}

// y[m, j] (times ws[j] for int32 products) * xs[m] + bias[j] for one row (the float of w8a8_epilogue).
inline __m512 rescale(const Rows& r, int64_t m, int64_t j, __mmask16 mask) {
  const __m512 v = r.yi ? _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mask, r.yi + m * r.n + j)),
                                        _mm512_maskz_loadu_ps(mask, r.ws + j))
                        : _mm512_maskz_loadu_ps(mask, r.y + m * r.n + j);
  const __m512 s = _mm512_set1_ps(r.xs[m]);
  return r.bias ? _mm512_fmadd_ps(v, s, _mm512_maskz_loadu_ps(mask, r.bias + j)) : _mm512_mul_ps(v, s);
}

constexpr int64_t kQ = 8;  // query rows per pass of encoder attention

std::tuple<at::Tensor, at::Tensor> w8a8_gelu_quantize(const at::Tensor& y, const at::Tensor& xs,
                                                     const c10::optional<at::Tensor>& bias,
                                                     const c10::optional<at::Tensor>& ws) {
  const at::Tensor b = optional_float(bias), w = optional_float(ws);
  const Rows r = check_rows(y, xs, b, w, "w8a8_gelu_quantize");
  at::Tensor q = at::empty({r.rows, r.n}, y.options().dtype(at::kChar));
  at::Tensor scale = at::empty({r.rows, 1}, y.options().dtype(at::kFloat));
  uint8_t* qp = reinterpret_cast<uint8_t*>(q.data_ptr<int8_t>());
  float* sp = scale.data_ptr<float>();
  at::parallel_for(0, r.rows, row_grain(r.n), [&](int64_t r0, int64_t r1) {
    std::vector<float> row(r.n);
    for (int64_t m = r0; m < r1; ++m) {
      __m512 vmax = _mm512_setzero_ps();
      for (int64_t j = 0; j < r.n; j += kVec) {
        const __mmask16 mask = tail_mask(r.n - j);
        const __m512 g = gelu512(rescale(r, m, j, mask));
        _mm512_mask_storeu_ps(row.data() + j, mask, g);
        vmax = _mm512_mask_max_ps(vmax, mask, vmax, _mm512_abs_ps(g));
      }
      float scale = _mm512_reduce_max_ps(vmax) / 127.0f;
      if (!(scale >= 1e-12f)) scale = 1e-12f;
      sp[m] = scale;
      // times the reciprocal: one rounding more than quantize_row's division, so a value within a
      // float ulp of a half step may round the other way (the division costs a quarter of the pass)
      const __m512 inv = _mm512_set1_ps(1.0f / scale);
      for (int64_t j = 0; j < r.n; j += kVec) {
        const __mmask16 mask = tail_mask(r.n - j);
        const __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row.data() + j), inv),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_mask_storeu_epi8(qp + m * r.n + j, mask, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
      }
    }
  });
  return {q, scale};
}

// LayerNorm of v = y * xs + b + residual over each row: mean, then the mean of squared deviations
// (two passes over the row in L1), (v - mean) / sqrt(var + eps) * gamma + beta.
std::tuple<at::Tensor, at::Tensor, at::Tensor> w8a8_residual_layernorm(
    const at::Tensor& y, const at::Tensor& xs, const c10::optional<at::Tensor>& bias, const at::Tensor& residual,
    const at::Tensor& gamma, const at::Tensor& beta, double eps, bool quantize, const c10::optional<at::Tensor>& ws) {
  const at::Tensor b = optional_float(bias), w = optional_float(ws);
  const Rows r = check_rows(y, xs, b, w, "w8a8_residual_layernorm");
  TORCH_CHECK(residual.scalar_type() == at::kFloat && residual.is_contiguous() && residual.numel() == r.rows * r.n,
              "w8a8_residual_layernorm: residual must be contiguous float32 of y's shape");
  const at::Tensor g = gamma.to(at::kFloat).contiguous(), be = beta.to(at::kFloat).contiguous();
  TORCH_CHECK(g.numel() == r.n && be.numel() == r.n, "w8a8_residual_layernorm: gamma and beta need one entry per column");
  at::Tensor out = at::empty({r.rows, r.n}, y.options().dtype(at::kFloat));
  at::Tensor q = at::empty({quantize ? r.rows : 0, r.n}, y.options().dtype(at::kChar));
  at::Tensor scale = at::empty({quantize ? r.rows : 0, 1}, y.options().dtype(at::kFloat));
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


// Self-attention of a W8A8 encoder block read straight from its joint q/k/v GEMM output, so the
// rescaled q/k/v are never written out: y [B*T, 3W] (W = H * D, q then k then v, head h at columns
// h*D .. h*D+D of each), xs [B*T, 1], bias [3W] or none, mask bool broadcastable to [B, H, T, T]
// (true: may attend) or none. One task per (sequence, head): its keys are rescaled into a
// transposed buffer [D, T] (16 keys per FMA), its values into [T, D]; then per query row the
// scores, a max-subtracted softmax over the allowed keys (exp as exp512) and the weighted sum of
// the values. A row with no allowed key gives zeros. Returns [B*T, W]: each token's heads side by
// side, the layout the output projection reads. scale multiplies q (HF: D^-0.5).
at::Tensor w8a8_encoder_attention(const at::Tensor& y, const at::Tensor& xs, const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& mask, int64_t batch, int64_t heads, double scale,
                                  const c10::optional<at::Tensor>& ws) {
  const at::Tensor b = optional_float(bias), w = optional_float(ws);
  const Rows r = check_rows(y, xs, b, w, "w8a8_encoder_attention");
  TORCH_CHECK(batch > 0 && heads > 0 && r.rows % batch == 0 && r.n % (3 * heads) == 0,
              "w8a8_encoder_attention: y must be [batch * length, 3 * heads * head_dim]");
  const int64_t T = r.rows / batch, W = r.n / 3, D = W / heads, Tp = (T + kVec - 1) / kVec * kVec;
  TORCH_CHECK(D % kVec == 0, "w8a8_encoder_attention: head_dim must be a multiple of 16");
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 4,
                "w8a8_encoder_attention: the mask must be a 4-D bool tensor");
    m = mask->expand({batch, heads, T, T});
    if (m.stride(3) != 1) m = m.contiguous();  // key masks are read 16 bytes at a time
  }
  at::Tensor out = at::empty({r.rows, W}, y.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const bool* mp = m.defined() ? m.data_ptr<bool>() : nullptr;
  const float qscale = static_cast<float>(scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, batch * heads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> kt(D * Tp), vb(T * D), sc(kQ * Tp), qv(kQ * D), tmp(kVec);
    std::vector<__mmask16> allowed(kQ * (Tp / kVec));
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t bi = task / heads, h = task % heads, row0 = bi * T;
      // keys from L on are masked for every query (padding at the end of a shorter sequence): they
      // are never read (they would only add exact zeros)
      int64_t L = T;
      if (mp) {
        L = 0;
        for (int64_t i = 0; i < T; ++i) {
          const bool* mrow = mp + bi * m.stride(0) + h * m.stride(1) + i * m.stride(2);
          for (int64_t j = T - 1; j >= L; --j)
            if (mrow[j]) {
              L = j + 1;
              break;
            }
        }
      }
      const int64_t blocks = (L + kVec - 1) / kVec;
      for (int64_t d = 0; d < D; ++d) std::fill(kt.begin() + d * Tp + L, kt.begin() + d * Tp + blocks * kVec, 0.0f);
      for (int64_t j = 0; j < L; ++j) {
        for (int64_t d = 0; d < D; d += kVec) {
          _mm512_storeu_ps(tmp.data(), rescale(r, row0 + j, W + h * D + d, 0xFFFF));
          for (int64_t e = 0; e < kVec; ++e) kt[(d + e) * Tp + j] = tmp[e];
          _mm512_storeu_ps(vb.data() + j * D + d, rescale(r, row0 + j, 2 * W + h * D + d, 0xFFFF));
        }
      }
      // kQ query rows at a time: kQ independent FMA chains per key block and per value column block
      for (int64_t i0 = 0; i0 < T; i0 += kQ) {
        const int64_t nq = std::min<int64_t>(kQ, T - i0);
        for (int64_t qi = 0; qi < kQ; ++qi)
          for (int64_t d = 0; d < D; d += kVec)
            _mm512_storeu_ps(qv.data() + qi * D + d,
                             qi < nq ? _mm512_mul_ps(rescale(r, row0 + i0 + qi, h * D + d, 0xFFFF), _mm512_set1_ps(qscale))
                                     : _mm512_setzero_ps());
        __m512 vmax[kQ];
        for (int64_t qi = 0; qi < kQ; ++qi) vmax[qi] = _mm512_set1_ps(neg_inf);
        for (int64_t jb = 0; jb < blocks; ++jb) {
          const int64_t j = jb * kVec;
          __m512 acc[kQ];
          for (int64_t qi = 0; qi < kQ; ++qi) acc[qi] = _mm512_setzero_ps();
          for (int64_t d = 0; d < D; ++d) {
            const __m512 kv = _mm512_loadu_ps(kt.data() + d * Tp + j);
            for (int64_t qi = 0; qi < kQ; ++qi) acc[qi] = _mm512_fmadd_ps(_mm512_set1_ps(qv[qi * D + d]), kv, acc[qi]);
          }
          for (int64_t qi = 0; qi < nq; ++qi) {
            __mmask16 ok = tail_mask(L - j);
            if (mp) {
              const bool* mrow = mp + bi * m.stride(0) + h * m.stride(1) + (i0 + qi) * m.stride(2);
              ok &= _mm_test_epi8_mask(_mm_maskz_loadu_epi8(ok, mrow + j), _mm_set1_epi8(1));
            }
            allowed[qi * blocks + jb] = ok;
            const __m512 sv = _mm512_mask_blend_ps(ok, _mm512_set1_ps(neg_inf), acc[qi]);
            _mm512_storeu_ps(sc.data() + qi * Tp + j, sv);
            vmax[qi] = _mm512_max_ps(vmax[qi], sv);
          }
        }
        float inv[kQ];
        for (int64_t qi = 0; qi < kQ; ++qi) {
          float* sq = sc.data() + qi * Tp;
          const float mx = qi < nq ? _mm512_reduce_max_ps(vmax[qi]) : neg_inf;
          if (mx == neg_inf) {  // no allowed key (or no such row): zero weights, zero output
            std::fill(sq, sq + Tp, 0.0f);
            inv[qi] = 0.0f;
            continue;
          }
          const __m512 vm = _mm512_set1_ps(mx);
          __m512 total = _mm512_setzero_ps();
          for (int64_t jb = 0; jb < blocks; ++jb) {
            const __m512 e = _mm512_maskz_mov_ps(allowed[qi * blocks + jb],
                                                 exp512(_mm512_sub_ps(_mm512_loadu_ps(sq + jb * kVec), vm)));
            _mm512_storeu_ps(sq + jb * kVec, e);
            total = _mm512_add_ps(total, e);
          }
          inv[qi] = 1.0f / _mm512_reduce_add_ps(total);
        }
        for (int64_t d = 0; d < D; d += kVec) {
          __m512 acc[kQ];
          for (int64_t qi = 0; qi < kQ; ++qi) acc[qi] = _mm512_setzero_ps();
          for (int64_t j = 0; j < L; ++j) {
            const __m512 vv = _mm512_loadu_ps(vb.data() + j * D + d);
            for (int64_t qi = 0; qi < kQ; ++qi) acc[qi] = _mm512_fmadd_ps(_mm512_set1_ps(sc[qi * Tp + j]), vv, acc[qi]);
          }
          for (int64_t qi = 0; qi < nq; ++qi)
            _mm512_storeu_ps(op + (row0 + i0 + qi) * W + h * D + d, _mm512_mul_ps(acc[qi], _mm512_set1_ps(inv[qi])));
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(secateur, m) {
  m.def("w8a8_gelu_quantize(Tensor y, Tensor xs, Tensor? bias, Tensor? ws=None) -> (Tensor, Tensor)");
  m.def("w8a8_residual_layernorm(Tensor y, Tensor xs, Tensor? bias, Tensor residual, Tensor gamma, Tensor beta, "
        "float eps, bool quantize, Tensor? ws=None) -> (Tensor, Tensor, Tensor)");
  m.def("w8a8_encoder_attention(Tensor y, Tensor xs, Tensor? bias, Tensor? mask, int batch, int heads, float scale, "
        "Tensor? ws=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(secateur, CPU, m) {
  m.impl("w8a8_gelu_quantize", &w8a8_gelu_quantize);
  m.impl("w8a8_residual_layernorm", &w8a8_residual_layernorm);
  m.impl("w8a8_encoder_attention", &w8a8_encoder_attention);
}
