// Small helpers of the native CPU kernel (mixed_loss_cpu.cpp): vectorised row
// primitives over ATen's Vectorized<float>, bfloat16 row conversions and a
// 16-wide compare-to-bitmask used by the top-k candidate scan.
//
// The whole extension is compiled for exactly one instruction set, chosen by the
// loader (fused_cosloss/native.py) from torch's own CPU capability: with
// -DCPU_CAPABILITY_AVX512 or -DCPU_CAPABILITY_AVX2 (and the matching -m flags)
// ATen's Vectorized<float> is the AVX-512 / AVX2 class and exp() is SLEEF's
// vectorised expf exported by libtorch_cpu; without them (DEFAULT) it is ATen's
// portable fallback. The loader never loads a build on a CPU without its ISA.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <limits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace fcl {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

inline float bf16_bits_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, NaN stays a (quiet) NaN: the rounding torch uses.
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (f != f) ? uint16_t{0x7fc0} : static_cast<uint16_t>(rounded);
}

// dst[0:n] = float(src[0:n]); auto-vectorised by the compiler (shift and widen).
inline void to_float_row(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t j = 0; j < n; ++j) {
    uint32_t u = static_cast<uint32_t>(s[j]) << 16;
    std::memcpy(dst + j, &u, sizeof u);
  }
}

// dst[0:n] = bfloat16(src[0:n]) with round-to-nearest-even.
inline void from_float_row(const float* src, c10::BFloat16* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t j = 0; j < n; ++j) d[j] = float_to_bf16_bits(src[j]);
}

// exp(x) for float vectors, inlined: x = n ln2 + r (Cody-Waite, |r| <= ln2 / 2), then
// 2^n times the degree-7 Taylor polynomial of e^r (truncation < 0.1 ulp; about 1 ulp in
// all). exp(-inf) = 0, NaN stays NaN, results below FLT_MIN (x < -87.33) are flushed to 0
// and x > 88.3 gives inf (the kernel only takes exp of values <= 0). The DEFAULT build
// uses ATen's exp.
// vexp_core: the same for x already in [-87.33, 88.3] (or NaN), without the clamps and fix-ups.
#if defined(CPU_CAPABILITY_AVX512)
inline Vec vexp_core(const Vec& xv) {
  const __m512 xc = xv;
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606820309417232e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

inline Vec vexp(const Vec& xv) {
  const __m512 x = xv;
  const __m512 lo = _mm512_set1_ps(-87.33f), hi = _mm512_set1_ps(88.3f);
  __m512 res = vexp_core(_mm512_min_ps(_mm512_max_ps(x, lo), hi));
  res = _mm512_mask_mov_ps(res, _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), _mm512_setzero_ps());
  res = _mm512_mask_mov_ps(res, _mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ), _mm512_set1_ps(kInf));
  res = _mm512_mask_mov_ps(res, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
  return res;
}
#elif defined(CPU_CAPABILITY_AVX2)
inline Vec vexp_core(const Vec& xv) {
  const __m256 xc = xv;
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606820309417232e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

inline Vec vexp(const Vec& xv) {
  const __m256 x = xv;
  const __m256 lo = _mm256_set1_ps(-87.33f), hi = _mm256_set1_ps(88.3f);
  __m256 res = vexp_core(_mm256_min_ps(_mm256_max_ps(x, lo), hi));
  res = _mm256_blendv_ps(res, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
  res = _mm256_blendv_ps(res, _mm256_set1_ps(kInf), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
  res = _mm256_blendv_ps(res, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  return res;
}
#else
inline Vec vexp(const Vec& x) { return x.exp(); }
inline Vec vexp_core(const Vec& x) { return x.exp(); }
#endif

// Bit l set iff lane l of v is below t (false for NaN).
inline uint32_t lanes_below(const Vec& v, float t) {
#if defined(CPU_CAPABILITY_AVX512)
  return static_cast<uint32_t>(_mm512_cmp_ps_mask(v, _mm512_set1_ps(t), _CMP_LT_OQ));
#elif defined(CPU_CAPABILITY_AVX2)
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(t), _CMP_LT_OQ)));
#else
  float lanes[kVec];
  v.store(lanes);
  uint32_t bits = 0;
  for (int64_t l = 0; l < kVec; ++l) bits |= static_cast<uint32_t>(lanes[l] < t) << l;
  return bits;
#endif
}
constexpr uint32_t kAllLanes = static_cast<uint32_t>((uint64_t{1} << kVec) - 1);

// 1 / d for float vectors: AVX-512's 14-bit reciprocal estimate and one Newton step (about
// 1 ulp, no division); a division elsewhere. Only for finite d >= 1 here.
#if defined(CPU_CAPABILITY_AVX512)
inline Vec vrecip(const Vec& dv) {
  const __m512 d = dv;
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
}
#else
inline Vec vrecip(const Vec& d) { return Vec(1.f) / d; }
#endif

// tanh(x) for float vectors, within about 2 ulp and without a division in the AVX-512 build
// (SLEEF's tanhf, which ATen's Vectorized::tanh calls, measured several times slower here):
// for |x| < 0.625 the odd polynomial x + x^3 P(x^2), P of degree 4 fitted to (tanh(x) - x) / x^3
// for the least largest relative error (0.8 ulp evaluated in float32); above,
// 1 - 2 / (exp(2|x|) + 1) with vexp_core and vrecip and the sign of x, 2|x| clamped at 20 (tanh
// is 1 in float32 from |x| = 9.1 on; the clamp keeps exp finite and passes NaN on). +-inf gives
// +-1. A vector whose lanes all fall on one side of 0.625 computes that side's formula alone:
// logits within about 0.6 c of 0, the usual case under a cap, take the polynomial only.
inline Vec vtanh(const Vec& x) {
  const Vec ax = x.abs();
  const uint32_t small_lanes = lanes_below(ax, 0.625f);
  auto small = [&] {
    const Vec x2 = x * x;
    Vec p(-0.005704984068870544f);
    p = at::vec::fmadd(p, x2, Vec(0.0206390842795372f));
    p = at::vec::fmadd(p, x2, Vec(-0.05373971536755562f));
    p = at::vec::fmadd(p, x2, Vec(0.13331441581249237f));
    p = at::vec::fmadd(p, x2, Vec(-0.3333328068256378f));
    return at::vec::fmadd(p * x2, x, x);
  };
  auto large = [&] {
    const Vec e = vexp_core(at::vec::clamp_max(ax + ax, Vec(20.f)));
    return at::vec::fmadd(Vec(-2.f), vrecip(e + Vec(1.f)), Vec(1.f)) | (x & Vec(-0.f));
  };
  if (small_lanes == kAllLanes) return small();
  if (small_lanes == 0) return large();
  return Vec::blendv(large(), small(), ax < Vec(0.625f));
}

// The logit transform of the loss options (docs/spec.md, "Loss options"): x = s z, then
// z' = c tanh(x / c) with a soft-cap, in float32 and in that order, x / c as x * (1 / c) (which
// moves z' by an ulp of tanh at most, as two tanh implementations may). Every element, the
// row's tail included, goes through the same vector code, so that the forward and the backward
// see the same z'.
struct LogitTransform {
  float scale = 1.f;  // s; 1: off
  float cap = 0.f;    // c; 0: off

  bool scaled() const { return scale != 1.f; }
  bool capped() const { return cap != 0.f; }
  bool active() const { return scaled() || capped(); }

  // dst[0:n] = z'(src[0:n]); dst may be src.
  void row(const float* src, float* dst, int64_t n) const {
    if (!active()) {
      if (dst != src) std::memcpy(dst, src, n * sizeof(float));
      return;
    }
    for_each<false>(src, n, [&](int64_t j, const Vec& zp, const Vec&, int count) { zp.store(dst + j, count); });
  }

  // f(j, z'[j : j + count], slope[j : j + count], count) for consecutive vectors of src[0:n]
  // (count = kVec but at the tail), slope = dz'/dz = s (1 - t^2) with t = tanh(x / c), formed from
  // t as autograd's tanh backward forms it, and s without the cap (with kSlope; else unset). Only
  // when active().
  template <bool kSlope, typename F>
  void for_each(const float* src, int64_t n, const F& f) const {
    if (capped()) {
      scaled() ? each<true, true, kSlope>(src, n, f) : each<false, true, kSlope>(src, n, f);
    } else {
      each<true, false, kSlope>(src, n, f);
    }
  }

 private:
  template <bool kScale, bool kCap, bool kSlope, typename F>
  void each(const float* src, int64_t n, const F& f) const {
    const Vec s(scale), c(cap), inv_c(kCap ? 1.f / cap : 1.f), one(1.f);
    auto transform = [&](const Vec& z, Vec& sl) {
      const Vec x = kScale ? z * s : z;
      if constexpr (!kCap) {
        return x;
      } else {
        const Vec t = vtanh(x * inv_c);
        if constexpr (kSlope) sl = kScale ? (one - t * t) * s : one - t * t;
        return c * t;
      }
    };
    Vec sl = s;  // the slope without the cap
    int64_t j = 0;
    for (; j + kVec <= n; j += kVec) {
      const Vec zp = transform(Vec::loadu(src + j), sl);
      f(j, zp, sl, static_cast<int>(kVec));
    }
    if (j < n) {  // the tail through the same vector code, on a partial load
      const int count = static_cast<int>(n - j);
      const Vec zp = transform(Vec::loadu(src + j, count), sl);
      f(j, zp, sl, count);
    }
  }
};

// Bit j (j < 16) set iff p[j] >= t; false for NaN.
inline uint32_t ge_mask16(const float* p, float t) {
#if defined(CPU_CAPABILITY_AVX512)
  return static_cast<uint32_t>(_mm512_cmp_ps_mask(_mm512_loadu_ps(p), _mm512_set1_ps(t), _CMP_GE_OQ));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 tv = _mm256_set1_ps(t);
  uint32_t lo = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p), tv, _CMP_GE_OQ)));
  uint32_t hi = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + 8), tv, _CMP_GE_OQ)));
  return lo | (hi << 8);
#else
  uint32_t m = 0;
  for (int j = 0; j < 16; ++j) m |= static_cast<uint32_t>(p[j] >= t) << j;
  return m;
#endif
}

// Horizontal sum and max of the lanes (ATen's generic reduce_add/reduce_max do not
// compile in every torch version's DEFAULT build).
inline float hsum(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(v);
#else
  float t[kVec];
  v.store(t);
  float s = 0.f;
  for (int64_t l = 0; l < kVec; ++l) s += t[l];
  return s;
#endif
}

inline float hmax(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_max_ps(v);
#else
  float t[kVec];
  v.store(t);
  float m = t[0];
  for (int64_t l = 1; l < kVec; ++l) m = t[l] > m ? t[l] : m;
  return m;
#endif
}

// sum_j a[j] * b[j]
inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc0(0.f), acc1(0.f), acc2(0.f), acc3(0.f);
  int64_t j = 0;
  for (; j + 4 * kVec <= n; j += 4 * kVec) {
    acc0 = at::vec::fmadd(Vec::loadu(a + j), Vec::loadu(b + j), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + j + kVec), Vec::loadu(b + j + kVec), acc1);
    acc2 = at::vec::fmadd(Vec::loadu(a + j + 2 * kVec), Vec::loadu(b + j + 2 * kVec), acc2);
    acc3 = at::vec::fmadd(Vec::loadu(a + j + 3 * kVec), Vec::loadu(b + j + 3 * kVec), acc3);
  }
  for (; j + kVec <= n; j += kVec) acc0 = at::vec::fmadd(Vec::loadu(a + j), Vec::loadu(b + j), acc0);
  float s = hsum((acc0 + acc1) + (acc2 + acc3));
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// y[0:n] += alpha * x[0:n]
inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  const Vec a(alpha);
  int64_t j = 0;
  for (; j + 2 * kVec <= n; j += 2 * kVec) {
    at::vec::fmadd(a, Vec::loadu(x + j), Vec::loadu(y + j)).store(y + j);
    at::vec::fmadd(a, Vec::loadu(x + j + kVec), Vec::loadu(y + j + kVec)).store(y + j + kVec);
  }
  for (; j + kVec <= n; j += kVec) at::vec::fmadd(a, Vec::loadu(x + j), Vec::loadu(y + j)).store(y + j);
  for (; j < n; ++j) y[j] += alpha * x[j];
}

// y[0:n] = alpha * x[0:n]
inline void scale_to(float alpha, const float* x, float* y, int64_t n) {
  const Vec a(alpha);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) (a * Vec::loadu(x + j)).store(y + j);
  for (; j < n; ++j) y[j] = alpha * x[j];
}

// out[0:n] = a * x[0:n] + b * y[0:n]
inline void lincomb(float a, const float* x, float b, const float* y, float* out, int64_t n) {
  const Vec av(a), bv(b);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) {
    at::vec::fmadd(av, Vec::loadu(x + j), bv * Vec::loadu(y + j)).store(out + j);
  }
  for (; j < n; ++j) out[j] = a * x[j] + b * y[j];
}

// Copy bytes with non-temporal (streaming) stores where the destination is 64-byte
// aligned: a gradient row is written once and not read again here, so it should
// neither be read for ownership first nor evict the working set. Call
// stream_fence() before other threads read the destination.
inline void stream_bytes(void* dst, const void* src, int64_t nbytes) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  const int64_t head = std::min<int64_t>(nbytes, static_cast<int64_t>((64 - (reinterpret_cast<uintptr_t>(d) & 63)) & 63));
  std::memcpy(d, s, head);
  int64_t j = head;
  for (; j + 64 <= nbytes; j += 64) {
#if defined(CPU_CAPABILITY_AVX512)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + j), _mm512_loadu_si512(s + j));
#else
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + j), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + j)));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + j + 32),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + j + 32)));
#endif
  }
  std::memcpy(d + j, s + j, nbytes - j);
#else
  std::memcpy(dst, src, nbytes);
#endif
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Ask for [p, p + bytes) to be fetched into L2 (prefetcht1).
inline void prefetch_to_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 2);
}

}  // namespace fcl
