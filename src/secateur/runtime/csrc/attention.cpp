// Decode attention on AVX-512 CPUs: one query token against a preallocated (static) KV cache.
//
// A decode step's attention reads the whole cache of every layer. torch's flash kernel reads every
// position, masked or not, and pays a fixed cost per call (blocking, scratch buffers) that is large
// next to one query row. This kernel reads only the positions the mask allows (a static cache is
// mostly empty early in a generation), two passes per head: scores and their max, then the
// exponentials and the weighted sum of the values. Float32 throughout; exp is a degree-6 polynomial
// after range reduction (relative error about 2e-7, like the vectorised exp torch uses).
//
// Query heads that share a KV head (GQA) are handled by the same task, one after the other, so the
// later heads of a group find that KV head's rows in cache.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "simd.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using namespace secateur_simd;

// Rows are fetched this many positions ahead: the cache of a layer is not in L2 when its turn comes
// (the GEMVs in between stream tens of megabytes), and each row is only a few lines long.
constexpr int64_t kAhead = 8;

inline void prefetch_row(const float* row, int64_t d) {
  for (int64_t c = 0; c < d; c += 16) _mm_prefetch(reinterpret_cast<const char*>(row + c), _MM_HINT_T0);
}


// q [B, H, 1, D], k and v [B, KVH, L, D] (rows of D contiguous floats; other strides free), mask
// bool broadcastable to [B, H, 1, L] or absent. Returns [B, 1, H, D] contiguous: the layout the
// attention modules want after the heads are merged.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode_attention: q, k, v must be 4-D");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "decode_attention: float32 only");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KVH = k.size(1), L = k.size(2);
  TORCH_CHECK(q.size(2) == 1, "decode_attention: one query token");
  TORCH_CHECK(D % 16 == 0 && k.size(3) == D && v.size(3) == D, "decode_attention: head_dim must be a multiple of 16");
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == KVH && v.size(2) == L && KVH > 0 && H % KVH == 0,
              "decode_attention: k/v shapes do not match q");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: head_dim must be contiguous");
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 4 && mask->size(2) == 1 && mask->size(3) == L,
                "decode_attention: the mask must be bool [B or 1, H or 1, 1, L]");
    m = mask->expand({B, H, 1, L});
  }
  const int64_t groups = H / KVH;
  at::Tensor out = at::empty({B, 1, H, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = m.defined() ? m.data_ptr<bool>() : nullptr;
  float* op = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
  const int64_t dv = D / 16;

  at::parallel_for(0, B * KVH, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(static_cast<size_t>(groups * L));
    std::vector<int32_t> keep(static_cast<size_t>(L));
    std::vector<__m512> acc(static_cast<size_t>(dv));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / KVH, kvh = t % KVH;
      const float* kb = kp + b * k.stride(0) + kvh * k.stride(1);
      const float* vb = vp + b * v.stride(0) + kvh * v.stride(1);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t h = kvh * groups + g;
        const float* qh = qp + b * q.stride(0) + h * q.stride(1);
        // the positions this head may see (all heads of a group usually share them)
        int64_t n = 0;
        if (mp) {
          const bool* mh = mp + b * m.stride(0) + h * m.stride(1);
          for (int64_t j = 0; j < L; ++j)
            if (mh[j * m.stride(3)]) keep[n++] = static_cast<int32_t>(j);
        } else {
          for (int64_t j = 0; j < L; ++j) keep[n++] = static_cast<int32_t>(j);
        }
        float* out_h = op + (b * H + h) * D;
        if (n == 0) {  // nothing to attend to: zeros (torch's math path gives NaN here)
          for (int64_t d = 0; d < D; ++d) out_h[d] = 0.0f;
          continue;
        }
        float* sc = scores.data() + g * L;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < n; ++i) {
          const float* kr = kb + keep[i] * k.stride(2);
          if (i + kAhead < n) prefetch_row(kb + keep[i + kAhead] * k.stride(2), D);
          else if (i + kAhead - n < n) prefetch_row(vb + keep[i + kAhead - n] * v.stride(2), D);  // the value pass is next
          __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qh), _mm512_loadu_ps(kr));
          for (int64_t c = 1; c < dv; ++c) a = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * c), _mm512_loadu_ps(kr + 16 * c), a);
          const float x = _mm512_reduce_add_ps(a) * s;
          sc[i] = x;
          mx = x > mx ? x : mx;
        }
        __m512 total = _mm512_setzero_ps();
        const __m512 vmax = _mm512_set1_ps(mx);
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) {
          const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sc + i), vmax));
          _mm512_storeu_ps(sc + i, e);
          total = _mm512_add_ps(total, e);
        }
        if (i < n) {
          const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1u);
          const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sc + i), vmax));
          _mm512_mask_storeu_ps(sc + i, tail, e);
          total = _mm512_add_ps(total, _mm512_maskz_mov_ps(tail, e));
        }
        const float inv = 1.0f / _mm512_reduce_add_ps(total);
        for (int64_t c = 0; c < dv; ++c) acc[c] = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; ++j) {
          const float* vr = vb + keep[j] * v.stride(2);
          if (j + kAhead < n) prefetch_row(vb + keep[j + kAhead] * v.stride(2), D);
          const __m512 p = _mm512_set1_ps(sc[j]);
          for (int64_t c = 0; c < dv; ++c) acc[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vr + 16 * c), acc[c]);
        }
        const __m512 vinv = _mm512_set1_ps(inv);
        for (int64_t c = 0; c < dv; ++c) _mm512_storeu_ps(out_h + 16 * c, _mm512_mul_ps(acc[c], vinv));
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(secateur, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(secateur, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
