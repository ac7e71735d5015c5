/* Dropout for CPU tensors (vaelab.nets.common.Dropout): the keep/drop draw, the scaling and the
 * mask in one pass; forwards and backwards 10-14x faster than torch's CPU dropout, whose
 * Bernoulli draw costs ~9 ns an element on the machine of docs/benchmarks.md.
 *
 * Element i of a call with 64-bit seed s is kept when hash(i, s) < thr, thr = round((1 - p) 2^32):
 *
 *     h = mix(lo32(i) ^ lo32(s)),   h = mix(h ^ hi32(s) ^ hi32(i) * 0x9e3779b9),   keep = h < thr
 *
 * where mix is a 32-bit integer hash with good avalanche (xor-shift-multiply, constants
 * 0x7feb352d and 0x846ca68b). A counter-based draw: each element's fate depends only on the
 * seed and its index, so the work splits into blocks freely and the vector and scalar code give
 * the same bits. Kept elements are scaled by `scale` = 1 / (1 - p):
 *
 *     out[i] = x[i] * (keep ? scale : 0)        (x * 0 keeps NaN as NaN, as torch's dropout)
 *
 * and the mask is written one bit an element, 16 elements per uint16 (bit j of mask[i / 16] is
 * element 16 (i / 16) + j). The backward pass applies the same mask and scale to the gradient.
 * bfloat16 arrays are widened to float32, multiplied and rounded to nearest even (NaN stays
 * NaN). x, out and grad are flat arrays in memory order (any dense layout).
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

static inline uint32_t mix(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7feb352du;
  h ^= h >> 15;
  h *= 0x846ca68bu;
  h ^= h >> 16;
  return h;
}

static inline uint32_t draw_one(uint64_t i, uint64_t seed) {
  const uint32_t h = mix((uint32_t)i ^ (uint32_t)seed);
  return mix(h ^ (uint32_t)(seed >> 32) ^ ((uint32_t)(i >> 32) * 0x9e3779b9u));
}

/* The mask alone, one element at a time: the reference the vector code is tested against. */
void vaelab_dropout_mask_scalar(int64_t n, uint64_t seed, uint32_t thr, uint16_t *mask) {
  for (int64_t b = 0; b < (n + 15) / 16; ++b) {
    uint16_t bits = 0;
    for (int j = 0; j < 16 && 16 * b + j < n; ++j)
      bits |= (uint16_t)((draw_one((uint64_t)(16 * b + j), seed) < thr) << j);
    mask[b] = bits;
  }
}

/* The four exported functions share one body each way (vector, portable), inlined with constant
 * flags: `draw` (forward: draw the mask and write it; backward: read it) and `bf16` (the
 * arrays' dtype). */
#define INLINE static inline __attribute__((always_inline))

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

INLINE __m512i mixv(__m512i h) {
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32((int)0x7feb352du));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32((int)0x846ca68bu));
  return _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
}

/* Keep bits of elements i .. i + 15 (i a multiple of 16, so hi32 is the same for all). */
INLINE __mmask16 keep16(uint64_t i, uint64_t seed, __m512i thr) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i h = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)i), lanes);
  h = mixv(_mm512_xor_si512(h, _mm512_set1_epi32((int)(uint32_t)seed)));
  const uint32_t k1 = (uint32_t)(seed >> 32) ^ ((uint32_t)(i >> 32) * 0x9e3779b9u);
  h = mixv(_mm512_xor_si512(h, _mm512_set1_epi32((int)k1)));
  return _mm512_cmplt_epu32_mask(h, thr);
}

/* 16 elements (those of `live`) as float32, and back (bfloat16: rounding to nearest even, NaN
 * stays NaN). */
INLINE __m512 load16(const void *p, int64_t i, __mmask16 live, int bf16) {
  if (!bf16) return _mm512_maskz_loadu_ps(live, (const float *)p + i);
  const __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, (const uint16_t *)p + i));
  return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}
INLINE void store16(void *p, int64_t i, __mmask16 live, __m512 f, int bf16) {
  if (!bf16) {
    _mm512_mask_storeu_ps((float *)p + i, live, f);
    return;
  }
  const __m512i u = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
  _mm256_mask_storeu_epi16((uint16_t *)p + i, live, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}

INLINE void body(const void *x, int64_t n, uint64_t seed, uint32_t thr, float scale, void *out,
                 uint16_t *mask, int draw, int bf16) {
  const __m512i t = _mm512_set1_epi32((int)thr);
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
    __mmask16 keep;
    if (draw)
      mask[i / 16] = keep = keep16((uint64_t)i, seed, t) & live;
    else
      keep = mask[i / 16];
    store16(out, i, live, _mm512_mul_ps(load16(x, i, live, bf16), _mm512_maskz_mov_ps(keep, s)), bf16);
  }
}

#else /* portable C in blocks of 16 with fixed inner loops, which compilers vectorise */

INLINE void body(const void *x, int64_t n, uint64_t seed, uint32_t thr, float scale, void *out,
                 uint16_t *mask, int draw, int bf16) {
  for (int64_t i = 0; i < n; i += 16) {
    const int m = n - i >= 16 ? 16 : (int)(n - i);
    uint16_t bits = 0;
    if (draw) {
      uint32_t h[16];
      for (int j = 0; j < 16; ++j) h[j] = draw_one((uint64_t)(i + j), seed);
      for (int j = 0; j < 16; ++j) bits |= (uint16_t)((h[j] < thr) << j);
      mask[i / 16] = bits &= (uint16_t)((1u << m) - 1u);
    } else {
      bits = mask[i / 16];
    }
    float f[16];
    for (int j = 0; j < 16; ++j) f[j] = ((bits >> j) & 1) ? scale : 0.0f;
    if (bf16) {
      const uint16_t *xb = (const uint16_t *)x + i;
      uint16_t *ob = (uint16_t *)out + i;
      for (int j = 0; j < m; ++j) ob[j] = narrow(widen(xb[j]) * f[j]);
    } else {
      const float *xf = (const float *)x + i;
      float *of = (float *)out + i;
      for (int j = 0; j < m; ++j) of[j] = xf[j] * f[j];
    }
  }
}
#endif

void vaelab_dropout_f32(const float *x, int64_t n, uint64_t seed, uint32_t thr, float scale,
                        float *out, uint16_t *mask) {
  body(x, n, seed, thr, scale, out, mask, 1, 0);
}
void vaelab_dropout_bf16(const uint16_t *x, int64_t n, uint64_t seed, uint32_t thr, float scale,
                         uint16_t *out, uint16_t *mask) {
  body(x, n, seed, thr, scale, out, mask, 1, 1);
}
void vaelab_dropout_apply_f32(const float *g, int64_t n, const uint16_t *mask, float scale,
                              float *out) {
  body(g, n, 0, 0, scale, out, (uint16_t *)mask, 0, 0);
}
void vaelab_dropout_apply_bf16(const uint16_t *g, int64_t n, const uint16_t *mask, float scale,
                               uint16_t *out) {
  body(g, n, 0, 0, scale, out, (uint16_t *)mask, 0, 1);
}
