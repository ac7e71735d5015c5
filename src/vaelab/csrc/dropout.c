/* Dropout for CPU tensors (vaelab.nets.common.Dropout): the keep/drop draw, the scaling and the
 * mask in one pass, 20-30x faster than torch's CPU dropout (whose Bernoulli draw costs ~9 ns an
 * element on the machine of docs/benchmarks.md).
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

static inline uint32_t mix(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7feb352du;
  h ^= h >> 15;
  h *= 0x846ca68bu;
  h ^= h >> 16;
  return h;
}

static inline uint32_t draw(uint64_t i, uint64_t seed) {
  const uint32_t h = mix((uint32_t)i ^ (uint32_t)seed);
  return mix(h ^ (uint32_t)(seed >> 32) ^ ((uint32_t)(i >> 32) * 0x9e3779b9u));
}

/* The mask alone, one element at a time: the reference the vector code is tested against. */
void vaelab_dropout_mask_scalar(int64_t n, uint64_t seed, uint32_t thr, uint16_t *mask) {
  for (int64_t b = 0; b < (n + 15) / 16; ++b) {
    uint16_t bits = 0;
    for (int j = 0; j < 16 && 16 * b + j < n; ++j)
      bits |= (uint16_t)((draw((uint64_t)(16 * b + j), seed) < thr) << j);
    mask[b] = bits;
  }
}

static inline float widen(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint16_t narrow(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)((((u & 0x7fffffffu) > 0x7f800000u) ? (u | 0x400000u) : rounded) >> 16);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

static inline __m512i mixv(__m512i h) {
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32((int)0x7feb352du));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32((int)0x846ca68bu));
  return _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
}

/* Keep bits of elements i .. i + 15 (i a multiple of 16, so hi32 is the same for all). */
static inline __mmask16 keep16(uint64_t i, uint64_t seed, __m512i thr) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i h = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)i), lanes);
  h = mixv(_mm512_xor_si512(h, _mm512_set1_epi32((int)(uint32_t)seed)));
  const uint32_t k1 = (uint32_t)(seed >> 32) ^ ((uint32_t)(i >> 32) * 0x9e3779b9u);
  h = mixv(_mm512_xor_si512(h, _mm512_set1_epi32((int)k1)));
  return _mm512_cmplt_epu32_mask(h, thr);
}

static inline __mmask16 tail(int64_t n, int64_t i) {
  return n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
}

/* 16 bfloat16 -> float32 and back (rounding to nearest even, NaN stays NaN). */
static inline __m512 widen16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline __m256i narrow16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

void vaelab_dropout_f32(const float *x, int64_t n, uint64_t seed, uint32_t thr, float scale,
                        float *out, uint16_t *mask) {
  const __m512i t = _mm512_set1_epi32((int)thr);
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = tail(n, i), keep = keep16((uint64_t)i, seed, t) & live;
    mask[i / 16] = keep;
    const __m512 v = _mm512_maskz_loadu_ps(live, x + i);
    _mm512_mask_storeu_ps(out + i, live, _mm512_mul_ps(v, _mm512_maskz_mov_ps(keep, s)));
  }
}

void vaelab_dropout_bf16(const uint16_t *x, int64_t n, uint64_t seed, uint32_t thr, float scale,
                         uint16_t *out, uint16_t *mask) {
  const __m512i t = _mm512_set1_epi32((int)thr);
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = tail(n, i), keep = keep16((uint64_t)i, seed, t) & live;
    mask[i / 16] = keep;
    const __m512 v = widen16(_mm256_maskz_loadu_epi16(live, x + i));
    _mm256_mask_storeu_epi16(out + i, live, narrow16(_mm512_mul_ps(v, _mm512_maskz_mov_ps(keep, s))));
  }
}

void vaelab_dropout_apply_f32(const float *g, int64_t n, const uint16_t *mask, float scale,
                              float *out) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = tail(n, i);
    const __m512 v = _mm512_maskz_loadu_ps(live, g + i);
    _mm512_mask_storeu_ps(out + i, live, _mm512_mul_ps(v, _mm512_maskz_mov_ps(mask[i / 16], s)));
  }
}

void vaelab_dropout_apply_bf16(const uint16_t *g, int64_t n, const uint16_t *mask, float scale,
                               uint16_t *out) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = tail(n, i);
    const __m512 v = widen16(_mm256_maskz_loadu_epi16(live, g + i));
    _mm256_mask_storeu_epi16(out + i, live, narrow16(_mm512_mul_ps(v, _mm512_maskz_mov_ps(mask[i / 16], s))));
  }
}

#else /* portable C in blocks of 16 with fixed inner loops, which compilers vectorise */

static inline void apply16(const float *g, int m, uint16_t bits, float scale, float *out) {
  float f[16];
  for (int j = 0; j < 16; ++j) f[j] = ((bits >> j) & 1) ? scale : 0.0f;
  for (int j = 0; j < m; ++j) out[j] = g[j] * f[j];
}

static inline void apply16_bf16(const uint16_t *g, int m, uint16_t bits, float scale, uint16_t *out) {
  float f[16];
  for (int j = 0; j < 16; ++j) f[j] = ((bits >> j) & 1) ? scale : 0.0f;
  for (int j = 0; j < m; ++j) out[j] = narrow(widen(g[j]) * f[j]);
}

static inline uint16_t keep16(int64_t i, uint64_t seed, uint32_t thr) {
  uint32_t h[16];
  uint16_t bits = 0;
  for (int j = 0; j < 16; ++j) h[j] = draw((uint64_t)(i + j), seed);
  for (int j = 0; j < 16; ++j) bits |= (uint16_t)((h[j] < thr) << j);
  return bits;
}

static inline int left(int64_t n, int64_t i) { return n - i >= 16 ? 16 : (int)(n - i); }

void vaelab_dropout_apply_f32(const float *g, int64_t n, const uint16_t *mask, float scale,
                              float *out) {
  for (int64_t i = 0; i < n; i += 16) apply16(g + i, left(n, i), mask[i / 16], scale, out + i);
}

void vaelab_dropout_apply_bf16(const uint16_t *g, int64_t n, const uint16_t *mask, float scale,
                               uint16_t *out) {
  for (int64_t i = 0; i < n; i += 16) apply16_bf16(g + i, left(n, i), mask[i / 16], scale, out + i);
}

void vaelab_dropout_f32(const float *x, int64_t n, uint64_t seed, uint32_t thr, float scale,
                        float *out, uint16_t *mask) {
  for (int64_t i = 0; i < n; i += 16) {
    const int m = left(n, i);
    mask[i / 16] = keep16(i, seed, thr) & (uint16_t)((1u << m) - 1u);
    apply16(x + i, m, mask[i / 16], scale, out + i);
  }
}

void vaelab_dropout_bf16(const uint16_t *x, int64_t n, uint64_t seed, uint32_t thr, float scale,
                         uint16_t *out, uint16_t *mask) {
  for (int64_t i = 0; i < n; i += 16) {
    const int m = left(n, i);
    mask[i / 16] = keep16(i, seed, thr) & (uint16_t)((1u << m) - 1u);
    apply16_bf16(x + i, m, mask[i / 16], scale, out + i);
  }
}
#endif
