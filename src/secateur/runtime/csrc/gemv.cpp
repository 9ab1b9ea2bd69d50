// Few-token GEMV kernels for quantized linear layers on AVX-512 CPUs (VNNI + BF16).
//
// Decoding one token reads every weight once and does two flops per weight, so a decode step is
// bound by memory traffic: the kernels stream the packed weights once, in the order they are
// stored, with every multiply on low-precision vector units and nothing widened in memory.
//
//   w8a8_gemv  int8 weights x int8 per-token activations (exact int32 dot products, VPDPBUSD)
//   w4_gemv    4-bit weights x bf16 activations (nibbles turned into bf16 in registers, VDPBF16PS)
//
// The weight layouts are made by secateur/runtime/native.py (see the pack functions there); both
// put 16 output channels side by side so that one 512-bit register holds 16 running sums and no
// horizontal reduction is needed. Channels are padded to a multiple of 16 with zero weights.
//
// Registered as torch operators (secateur::...), so torch.compile calls them as opaque kernels.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "simd.h"

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

using namespace secateur_simd;

constexpr int64_t kLanes = 16;  // output channels per block (one zmm of fp32 / int32)
// Software prefetch distance in the weight stream. Between two layers' GEMVs the attention and
// the other layers evict the weights from L2, and the hardware prefetcher alone left the kernels
// at about half their cache-resident speed; 2 KiB ahead measured best of 0.5 / 1 / 2 / 4 KiB.
constexpr int64_t kPrefetch = 2048;

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p) + kPrefetch, _MM_HINT_T0); }

bool cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("avx512bf16");
}

inline int32_t load32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}


// The bias as contiguous float32 with n entries, or an undefined tensor without one.
at::Tensor float_bias(const c10::optional<at::Tensor>& bias, int64_t n, const char* op) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  at::Tensor b = bias->to(at::kFloat).contiguous();
  TORCH_CHECK(b.numel() == n, op, ": bias must have n entries");
  return b;
}

// Grain for at::parallel_for over channel blocks: enough blocks per task that the threads are not
// woken for a few kilobytes of weights.
inline int64_t grain(int64_t blocks, int64_t bytes_per_block) {
  const int64_t min_bytes = 32 * 1024;
  int64_t g = (min_bytes + bytes_per_block - 1) / bytes_per_block;
  return g < 1 ? 1 : (g > blocks ? blocks : g);
}

// ---------------------------------------------------------------------------------------------
// W8A8: per-token symmetric int8 activations (scale = max|x| / 127, at least 1e-12, q = round half
// to even of x / scale: the integers of secateur.quant.kernels.quantize_per_token), per-channel
// int8 weights. VPDPBUSD multiplies unsigned by signed bytes, so the activations are stored as
// q + 128 and 128 * sum_k w[n, k] (precomputed, `wsum`) is subtracted from each dot product.
//
// Layout of `w`: int8 [blocks, K / 4, 16, 4]: for block b and k-quad j, channel b*16 + c holds
// w[c][4j .. 4j+3] in bytes 4c .. 4c+3 of a 64-byte row; one broadcast of 4 activation bytes and
// one VPDPBUSD advance 16 channels by 4 inputs.
// ---------------------------------------------------------------------------------------------

void quantize_rows(const float* x, int64_t rows, int64_t k, uint8_t* q, float* scales) {
  for (int64_t m = 0; m < rows; ++m) scales[m] = quantize_row(x + m * k, k, 128, q + m * k);
}

// The many-token W8A8 path (oneDNN's int8 GEMM) in three calls: quantize_per_token, the GEMM, then
// w8a8_epilogue. These two replace six eager ops and their full passes over the activations; the
// integers, scales and output floats are the same as those eager ops give.
std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "quantize_per_token: x must be 2-D float32");
  const at::Tensor xc = x.contiguous();
  const int64_t rows = x.size(0), k = x.size(1);
  at::Tensor q = at::empty({rows, k}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({rows, 1}, x.options());
  const float* xp = xc.data_ptr<float>();
  uint8_t* qp = reinterpret_cast<uint8_t*>(q.data_ptr<int8_t>());
  float* sp = scale.data_ptr<float>();
  at::parallel_for(0, rows, row_grain(k), [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) sp[m] = quantize_row(xp + m * k, k, 0, qp + m * k);
  });
  return {q, scale};
}

// y[m, :] * xs[m] + bias, as one FMA per element (the floats of the GEMV's epilogue and of
// torch.addcmul(bias, y, xs)); y * xs without a bias. y is float32 with the weight scales applied,
// or the int32 products (torch._int_mm) with the weight scales ws still to apply: float(y) * ws
// first, the floats of torch.mul(y, ws), in the same pass.
at::Tensor w8a8_epilogue(const at::Tensor& y, const at::Tensor& xs, const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& ws) {
  const bool integer = y.scalar_type() == at::kInt;
  TORCH_CHECK(y.dim() == 2 && (y.scalar_type() == at::kFloat || integer), "w8a8_epilogue: y must be 2-D float32 or int32");
  const int64_t rows = y.size(0), n = y.size(1);
  TORCH_CHECK(xs.scalar_type() == at::kFloat && xs.numel() == rows, "w8a8_epilogue: xs must hold one float per row");
  const bool scaled = ws.has_value() && ws->defined();
  TORCH_CHECK(integer == scaled, "w8a8_epilogue: int32 products need their weight scales ws (and float32 ones none)");
  const at::Tensor b = float_bias(bias, n, "w8a8_epilogue");
  const at::Tensor w = scaled ? float_bias(ws, n, "w8a8_epilogue") : at::Tensor();
  const at::Tensor yc = y.contiguous(), sc = xs.contiguous();
  at::Tensor out = at::empty({rows, n}, y.options().dtype(at::kFloat));
  const float* yp = integer ? nullptr : yc.data_ptr<float>();
  const int32_t* yi = integer ? yc.data_ptr<int32_t>() : nullptr;
  const float* wp = scaled ? w.data_ptr<float>() : nullptr;
  const float* sp = sc.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    for (int64_t m = r0; m < r1; ++m) {
      const __m512 s = _mm512_set1_ps(sp[m]);
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 mask = tail_mask(n - j);
        const __m512 v = yi ? _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mask, yi + m * n + j)),
                                            _mm512_maskz_loadu_ps(mask, wp + j))
                            : _mm512_maskz_loadu_ps(mask, yp + m * n + j);
        const __m512 r = bp ? _mm512_fmadd_ps(v, s, _mm512_maskz_loadu_ps(mask, bp + j)) : _mm512_mul_ps(v, s);
        _mm512_mask_storeu_ps(op + m * n + j, mask, r);
      }
    }
  });
  return out;
}

at::Tensor w8a8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& wsum, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "w8a8_gemv: x must be 2-D float32");
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kChar && w.size(2) == kLanes && w.size(3) == 4,
              "w8a8_gemv: w must be int8 [blocks, K/4, 16, 4]");
  const int64_t rows = x.size(0), k = x.size(1), blocks = w.size(0);
  TORCH_CHECK(w.size(1) * 4 == k, "w8a8_gemv: x has ", k, " inputs, the weight ", w.size(1) * 4);
  TORCH_CHECK(n > (blocks - 1) * kLanes && n <= blocks * kLanes, "w8a8_gemv: n does not match the blocks");
  TORCH_CHECK(wsum.scalar_type() == at::kInt && wsum.numel() == blocks * kLanes, "w8a8_gemv: bad wsum");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == blocks * kLanes, "w8a8_gemv: bad scale");
  const at::Tensor b = float_bias(bias, n, "w8a8_gemv");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({rows, n}, x.options());
  if (rows == 0) return out;

  std::vector<uint8_t> xq(static_cast<size_t>(rows * k));
  std::vector<float> xs(static_cast<size_t>(rows));
  quantize_rows(xc.data_ptr<float>(), rows, k, xq.data(), xs.data());

  const int8_t* wp = w.data_ptr<int8_t>();
  const int32_t* wsp = wsum.data_ptr<int32_t>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t k4 = k / 4;

  at::parallel_for(0, blocks, grain(blocks, k * kLanes), [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int8_t* wb = wp + blk * k4 * 64;
      const int64_t n0 = blk * kLanes;
      const __mmask16 mask = tail_mask(n - n0);
      const __m512i correction = _mm512_slli_epi32(_mm512_loadu_si512(wsp + n0), 7);  // 128 * sum_k w
      const __m512 ws = _mm512_loadu_ps(sp + n0);
      const __m512 vb = bp ? _mm512_maskz_loadu_ps(mask, bp + n0) : _mm512_setzero_ps();
      for (int64_t m = 0; m < rows; ++m) {
        const uint8_t* xr = xq.data() + m * k;
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        int64_t j = 0;
        for (; j + 4 <= k4; j += 4) {
          const int8_t* p = wb + j * 64;
          prefetch(p);
          prefetch(p + 64);
          prefetch(p + 128);
          prefetch(p + 192);
          a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32(load32(xr + 4 * j)), _mm512_loadu_si512(p));
          a1 = _mm512_dpbusd_epi32(a1, _mm512_set1_epi32(load32(xr + 4 * j + 4)), _mm512_loadu_si512(p + 64));
          a2 = _mm512_dpbusd_epi32(a2, _mm512_set1_epi32(load32(xr + 4 * j + 8)), _mm512_loadu_si512(p + 128));
          a3 = _mm512_dpbusd_epi32(a3, _mm512_set1_epi32(load32(xr + 4 * j + 12)), _mm512_loadu_si512(p + 192));
        }
        for (; j < k4; ++j)
          a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32(load32(xr + 4 * j)), _mm512_loadu_si512(wb + j * 64));
        __m512i dot = _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3));
        dot = _mm512_sub_epi32(dot, correction);
        // float(dot) * w_scale, then * x_scale + bias in one FMA (x_scale alone without a bias):
        // the same floats as the oneDNN path of kernels.w8a8_linear (its addcmul fuses), so a
        // row's output does not depend on how many rows came with it. Built with
        // -ffp-contract=off so that the compiler fuses nothing else.
        const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), ws);
        const __m512 x_scale = _mm512_set1_ps(xs[m]);
        const __m512 y = bp ? _mm512_fmadd_ps(t, x_scale, vb) : _mm512_mul_ps(t, x_scale);
        _mm512_mask_storeu_ps(op + m * n + n0, mask, y);
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// W4A16: unsigned nibbles u = q + 8 (0..15) with per-group scale s and zero point zp, so
// w = (u - 8 - zp) * s. The bf16 with bits 0x4300 | u is exactly 128 + u, so a nibble becomes a
// bf16 weight with one AND-OR; then sum_k x_k w_k over a group is
//   s * (sum_k x_k (128 + u_k)  -  (136 + zp) * sum_k x_k)
// with x rounded to bf16 (as every bf16 kernel does) and all sums in fp32. `sc` holds, per block
// and group, the 16 scales then the 16 values s * (136 + zp).
//
// Layout of `w`: uint8 [blocks, K / 4, 32]: for block b and k-quad j, byte 2c + t holds
// u[c][4j + t] in its low nibble and u[c][4j + 2 + t] in its high nibble (c < 16, t < 2). Widened
// to 16-bit lanes, the low nibbles are the bf16 pairs (k, k+1) of the 16 channels and the high
// nibbles the pairs (k+2, k+3), each multiplied against one broadcast pair of activations.
// ---------------------------------------------------------------------------------------------

void to_bf16_rows(const at::Tensor& x, int64_t rows, int64_t k, uint16_t* xb) {
  if (x.scalar_type() == at::kBFloat16) {
    std::memcpy(xb, x.data_ptr<at::BFloat16>(), static_cast<size_t>(rows * k) * sizeof(uint16_t));
    return;
  }
  const float* xf = x.data_ptr<float>();
  for (int64_t i = 0; i < rows * k; i += 16) {
    const __mmask16 mask = tail_mask(rows * k - i);
    __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, xf + i));
    _mm256_mask_storeu_epi16(xb + i, mask, reinterpret_cast<__m256i&>(h));
  }
}

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

at::Tensor w4_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sc, int64_t group,
                   const c10::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "w4_gemv: x must be 2-D float32 or bfloat16");
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kByte && w.size(2) == 32,
              "w4_gemv: w must be uint8 [blocks, K/4, 32]");
  const int64_t rows = x.size(0), k = x.size(1), blocks = w.size(0);
  TORCH_CHECK(w.size(1) * 4 == k, "w4_gemv: x has ", k, " inputs, the weight ", w.size(1) * 4);
  TORCH_CHECK(group > 0 && group % 16 == 0 && k % group == 0, "w4_gemv: group must be a multiple of 16 dividing K");
  TORCH_CHECK(n > (blocks - 1) * kLanes && n <= blocks * kLanes, "w4_gemv: n does not match the blocks");
  const int64_t groups = k / group;
  TORCH_CHECK(sc.scalar_type() == at::kFloat && sc.numel() == blocks * groups * 2 * kLanes, "w4_gemv: bad scales");
  const at::Tensor b = float_bias(bias, n, "w4_gemv");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({rows, n}, x.options().dtype(at::kFloat));
  if (rows == 0) return out;

  std::vector<uint16_t> xb(static_cast<size_t>(rows * k));
  to_bf16_rows(xc, rows, k, xb.data());
  std::vector<float> xsum(static_cast<size_t>(rows * groups));  // sums of the bf16 activations per group
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.0f;
      for (int64_t i = 0; i < group; ++i) s += bf16_to_float(xb[m * k + g * group + i]);
      xsum[m * groups + g] = s;
    }

  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* scp = sc.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t k4 = k / 4;

  at::parallel_for(0, blocks, grain(blocks, k * kLanes / 2), [&](int64_t b0, int64_t b1) {
    const __m512i low = _mm512_set1_epi16(0x000F);
    const __m512i exponent = _mm512_set1_epi16(0x4300);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const uint8_t* wb = wp + blk * k4 * 32;
      const float* sb = scp + blk * groups * 2 * kLanes;
      const int64_t n0 = blk * kLanes;
      const __mmask16 mask = tail_mask(n - n0);
      const __m512 vb = bp ? _mm512_maskz_loadu_ps(mask, bp + n0) : _mm512_setzero_ps();
      for (int64_t m = 0; m < rows; ++m) {
        const uint16_t* xr = xb.data() + m * k;
        __m512 total = vb;
        for (int64_t g = 0; g < groups; ++g) {
          __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
          for (int64_t kk = g * group; kk < (g + 1) * group; kk += 8) {
            const uint8_t* p = wb + (kk / 4) * 32;
            prefetch(p);  // one 64-byte line per iteration
            const __m512i w0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
            const __m512i w1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
            const __m512i lo0 = _mm512_ternarylogic_epi32(w0, low, exponent, 0xEA);  // (w & 0xF) | 0x4300
            const __m512i hi0 = _mm512_or_si512(_mm512_srli_epi16(w0, 4), exponent);
            const __m512i lo1 = _mm512_ternarylogic_epi32(w1, low, exponent, 0xEA);
            const __m512i hi1 = _mm512_or_si512(_mm512_srli_epi16(w1, 4), exponent);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)lo0, (__m512bh)_mm512_set1_epi32(load32(xr + kk)));
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)hi0, (__m512bh)_mm512_set1_epi32(load32(xr + kk + 2)));
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)lo1, (__m512bh)_mm512_set1_epi32(load32(xr + kk + 4)));
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)hi1, (__m512bh)_mm512_set1_epi32(load32(xr + kk + 6)));
          }
          const __m512 acc = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
          const __m512 s = _mm512_loadu_ps(sb + g * 2 * kLanes);
          const __m512 c = _mm512_loadu_ps(sb + g * 2 * kLanes + kLanes);
          total = _mm512_fmadd_ps(s, acc, total);
          total = _mm512_fnmadd_ps(c, _mm512_set1_ps(xsum[m * groups + g]), total);
        }
        _mm512_mask_storeu_ps(op + m * n + n0, mask, total);
      }
    }
  });
  return out;
}

bool supported() { return cpu_supported(); }

}  // namespace

TORCH_LIBRARY(secateur, m) {
  m.def("supported() -> bool", &supported);
  m.def("w8a8_gemv(Tensor x, Tensor w, Tensor wsum, Tensor scale, Tensor? bias, int n) -> Tensor");
  m.def("w4_gemv(Tensor x, Tensor w, Tensor sc, int group, Tensor? bias, int n) -> Tensor");
  m.def("quantize_per_token(Tensor x) -> (Tensor, Tensor)");
  m.def("w8a8_epilogue(Tensor y, Tensor xs, Tensor? bias, Tensor? ws=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(secateur, CPU, m) {
  m.impl("w8a8_gemv", &w8a8_gemv);
  m.impl("w4_gemv", &w4_gemv);
  m.impl("quantize_per_token", &quantize_per_token);
  m.impl("w8a8_epilogue", &w8a8_epilogue);
}
