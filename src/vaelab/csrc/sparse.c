/* The first Linear + ReLU layer of the fused bf16 MLP step (vaelab/fused_elbo.py) for inputs
 * that are mostly zeros (MNIST: 19% of the pixels are not 0).
 *
 * For a batch x (rows x k, float32, row-major) and a layer of h outputs with weight W (h x k):
 *
 *   vaelab_pairs_bf16:           wp (k/2 x h, uint32) = W^T rounded to bfloat16, two inputs
 *                                per element: wp[p][u] = W[u][2p] (low half) | W[u][2p+1]
 *   vaelab_sparse_linear_relu:   out (rows x h, bfloat16) = max(0, bias + x W^T)
 *   vaelab_sparse_weight_grad:   dw (h x k, float32) = dh^T x for dh (rows x h, bfloat16)
 *
 * x is rounded to bfloat16 like every operand of the bf16 products, and sums are float32
 * (vdpbf16ps: 16 lanes, each adding the products of one bf16 pair). A dense product does k
 * multiply-adds an output; these skip every pair of inputs that are both 0 (MNIST: 73% of the
 * pairs). The forward pass keeps a block of one row's outputs in registers while the row's
 * non-zero input pairs stream past (rows of wp). The gradient works on row pairs (2q, 2q+1) of
 * dh side by side and keeps two neighbouring pixels' gradients in registers while the row
 * pairs where either pixel is not 0 stream past, then transposes 16 x 16 blocks into dw's
 * layout. Every output is summed by one thread in a fixed order: the numbers do not depend on
 * the number of threads.
 *
 * h and k must be multiples of 16 (vaelab.native.SparseFirstLayer.fits). Work is shared by
 * `threads` threads of the process's OpenMP pool when vaelab_set_pool (pool.h) has been given
 * libgomp's GOMP_parallel and omp_get_thread_num (the runtime torch itself uses), else done in
 * the calling thread. Without AVX512-BF16 at compile time only vaelab_sparse_available (0) and
 * vaelab_set_pool exist.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "pool.h"

#define W 16
#define NB 8 /* vectors of outputs kept in registers at a time */

/* How many of x[0..n) are not 0 (a batch's density decides between these kernels and the dense
 * products). */
int64_t vaelab_count_nonzero(const float *restrict x, int64_t n) {
  int64_t total = 0;
  for (int64_t i = 0; i < n; i += 1 << 20) { /* 32-bit counts vectorise twice as wide */
    const int64_t end = i + (1 << 20) < n ? i + (1 << 20) : n;
    int32_t c = 0;
    for (int64_t e = i; e < end; ++e) c += x[e] != 0.0f;
    total += c;
  }
  return total;
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

int vaelab_sparse_available(void) { return 1; }

/* Two floats as a bf16 pair (a in the low half), the operand of vdpbf16ps. */
static inline uint32_t pair(float a, float b) { return narrow(a) | ((uint32_t)narrow(b) << 16); }
static inline __m512 dp(__m512 acc, const uint32_t *w, __m512i x) {
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w), (__m512bh)x);
}
static inline __m512 relu512(__m512 a) { /* keeps NaN */
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_LT_OQ), a,
                              _mm512_setzero_ps());
}

/* ---------------------------------------------------------------- W (h x k) -> pairs (k/2 x h) */
typedef struct {
  const float *w;
  int64_t h, k, threads;
  uint32_t *wp;
} tjob;

static void transpose_part(void *arg) {
  const tjob *j = arg;
  const int64_t t = tid(j->threads), nt = j->threads, k = j->k, h = j->h, kp = k / 2;
  const int64_t blocks = h / W, lo = blocks * t / nt * W, hi = blocks * (t + 1) / nt * W;
  /* 16 units at a time: W[u, 2p:2p+2] for the 16 units is one 64-bit gather of 8 and another */
  const __m512i lo8 = _mm512_mullo_epi64(_mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi64(k));
  for (int64_t u0 = lo; u0 < hi; u0 += W) {
    const float *base = j->w + u0 * k;
    for (int64_t p = 0; p < kp; ++p) {
      const __m512d a = _mm512_i64gather_pd(lo8, (const double *)(base + 2 * p), 4);
      const __m512d b = _mm512_i64gather_pd(lo8, (const double *)(base + 8 * k + 2 * p), 4);
      const __m256bh ca = _mm512_cvtneps_pbh(_mm512_castpd_ps(a));
      const __m256bh cb = _mm512_cvtneps_pbh(_mm512_castpd_ps(b));
      uint32_t *dst = j->wp + p * h + u0;
      _mm256_storeu_si256((__m256i *)dst, (__m256i)ca);
      _mm256_storeu_si256((__m256i *)(dst + 8), (__m256i)cb);
    }
  }
}

/* W (h x k float32, h a multiple of 16, k even) as bf16 pairs: wp[p * h + u] holds W[u, 2p]
 * in its low half and W[u, 2p + 1] in its high half. */
void vaelab_pairs_bf16(const float *w, int64_t h, int64_t k, uint32_t *wp, int64_t threads) {
  tjob j = {w, h, k, threads, wp};
  run(transpose_part, &j, threads);
}

/* A row of k floats (k even) as k/2 bf16 pairs: the indices and values of the pairs that are
 * not both zero; returns how many. */
static int64_t nonzero_pairs(const float *xr, int64_t k, int32_t *idx, uint32_t *val) {
  int64_t n = 0, p = 0;
  const int64_t kp = k / 2;
  __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (; p + W <= kp; p += W) {
    const __m256bh a = _mm512_cvtneps_pbh(_mm512_loadu_ps(xr + 2 * p));
    const __m256bh b = _mm512_cvtneps_pbh(_mm512_loadu_ps(xr + 2 * p + W));
    const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)a), (__m256i)b, 1);
    const __mmask16 m = _mm512_test_epi32_mask(v, _mm512_set1_epi32(0x7fff7fff));
    _mm512_storeu_si512(val + n, _mm512_maskz_compress_epi32(m, v));
    _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi32(m, _mm512_add_epi32(iota, _mm512_set1_epi32((int)p))));
    n += __builtin_popcount(m);
  }
  for (; p < kp; ++p) {
    idx[n] = (int32_t)p;
    val[n] = pair(xr[2 * p], xr[2 * p + 1]);
    n += (val[n] & 0x7fff7fffu) != 0;
  }
  return n;
}

/* ---------------------------------------------------------------- forward */
typedef struct {
  const float *x;
  int64_t rows, k;
  const uint32_t *wp;
  const float *bias;
  int64_t h;
  uint16_t *out;
  int64_t threads;
} fjob;

static void forward_part(void *arg) {
  const fjob *j = arg;
  const int64_t t = tid(j->threads), nt = j->threads, k = j->k, h = j->h;
  const int64_t lo = j->rows * t / nt, hi = j->rows * (t + 1) / nt;
  int32_t *idx = malloc(sizeof(int32_t) * (k / 2 + W));
  uint32_t *xv = malloc(sizeof(uint32_t) * (k / 2 + W));
  if (!idx || !xv) abort();
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t n = nonzero_pairs(j->x + r * k, k, idx, xv);
    uint16_t *orow = j->out + r * h;
    int64_t o = 0;
    for (; o + W * NB <= h; o += W * NB) {
      __m512 a[NB];
      for (int q = 0; q < NB; ++q) a[q] = _mm512_loadu_ps(j->bias + o + q * W);
      for (int64_t e = 0; e < n; ++e) {
        const __m512i x = _mm512_set1_epi32((int)xv[e]);
        const uint32_t *w = j->wp + (int64_t)idx[e] * h + o;
        for (int q = 0; q < NB; ++q) a[q] = dp(a[q], w + q * W, x);
      }
      for (int q = 0; q < NB; ++q)
        _mm256_storeu_si256((__m256i *)(orow + o + q * W), (__m256i)_mm512_cvtneps_pbh(relu512(a[q])));
    }
    for (; o < h; o += W) {
      __m512 a = _mm512_loadu_ps(j->bias + o);
      for (int64_t e = 0; e < n; ++e)
        a = dp(a, j->wp + (int64_t)idx[e] * h + o, _mm512_set1_epi32((int)xv[e]));
      _mm256_storeu_si256((__m256i *)(orow + o), (__m256i)_mm512_cvtneps_pbh(relu512(a)));
    }
  }
  free(idx);
  free(xv);
}

/* out (rows x h, bf16) = max(0, bias + x W^T) with W given as vaelab_pairs_bf16's pairs. */
void vaelab_sparse_linear_relu(const float *x, int64_t rows, int64_t k, const uint32_t *wp,
                               const float *bias, int64_t h, uint16_t *out, int64_t threads) {
  fjob j = {x, rows, k, wp, bias, h, out, threads};
  run(forward_part, &j, threads);
}

/* ---------------------------------------------------------------- weight gradient */
typedef struct {
  const float *x;
  int64_t rows, k;
  const uint16_t *dh;
  int64_t h;
  float *dw;
  uint32_t *dhp;
  int64_t threads;
} gjob;

/* dhp (ceil(rows/2) x h) = rows 2q and 2q+1 of dh side by side, as bf16 pairs */
static void interleave_part(void *arg) {
  const gjob *j = arg;
  const int64_t t = tid(j->threads), nt = j->threads, h = j->h, rp = (j->rows + 1) / 2;
  for (int64_t q = rp * t / nt; q < rp * (t + 1) / nt; ++q) {
    const uint16_t *a = j->dh + 2 * q * h, *b = 2 * q + 1 < j->rows ? a + h : 0;
    int64_t u = 0;
    for (; u + W <= h; u += W) {
      const __m512i va = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(a + u)));
      const __m512i vb = b ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(b + u)))
                           : _mm512_setzero_si512();
      _mm512_storeu_si512(j->dhp + q * h + u, _mm512_or_si512(va, _mm512_slli_epi32(vb, 16)));
    }
    for (; u < h; ++u) j->dhp[q * h + u] = a[u] | (b ? (uint32_t)b[u] << 16 : 0u);
  }
}

/* r[0..15] (16 rows of 16 floats) := their transpose. */
static inline void transpose16(__m512 r[16]) {
  __m512 t[16], u0, u1, u2, u3;
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) { /* r[4g + c], 128-bit lane l: column 4l + c of rows 4g..4g+3 */
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
    r[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) { /* the 4 x 4 transpose of 128-bit lanes */
    u0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44);
    u1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);
    u2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
    u3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
    t[c] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    t[4 + c] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
    t[8 + c] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

#define NG 4 /* vectors of outputs per pixel in registers in the gradient (two pixels at once) */

static void grad_part(void *arg) {
  const gjob *j = arg;
  const int64_t t = tid(j->threads), nt = j->threads, k = j->k, h = j->h, rows = j->rows;
  const int64_t rp = (rows + 1) / 2;
  const int64_t tiles = k / W, lo = tiles * t / nt * W, hi = tiles * (t + 1) / nt * W;
  const int64_t span = hi - lo, npp = span / 2;
  if (span <= 0) return;
  /* this thread's pixels in pairs (2c, 2c+1): for pair c, cnt[c] row pairs q where either pixel
   * is not 0 in row 2q or 2q+1, at c * rp: q and the two pixels' bf16 (row 2q, row 2q+1) pairs */
  int32_t *cnt = calloc((size_t)npp, sizeof(int32_t));
  int32_t *qs = malloc(sizeof(int32_t) * (size_t)(rp * npp));
  uint32_t *xv = malloc(2 * sizeof(uint32_t) * (size_t)(rp * npp));
  float *tile = malloc(sizeof(float) * W * (size_t)h);
  if (!cnt || !qs || !xv || !tile) abort();
  uint32_t pv[W];
  for (int64_t q = 0; q < rp; ++q) {
    const float *a = j->x + 2 * q * k + lo, *b = 2 * q + 1 < rows ? a + k : 0;
    for (int64_t c0 = 0; c0 < span; c0 += W) { /* 16 pixels: the pair (row 2q, row 2q+1) as bf16 */
      const __m512i va = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(a + c0)));
      const __m512i vb = b ? _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(b + c0)))
                           : _mm512_setzero_si512();
      const __m512i v = _mm512_or_si512(va, _mm512_slli_epi32(vb, 16));
      unsigned m = _mm512_test_epi32_mask(v, _mm512_set1_epi32(0x7fff7fff));
      m = (m | (m >> 1)) & 0x5555u;
      if (!m) continue;
      _mm512_storeu_si512(pv, v);
      while (m) {
        const int i = __builtin_ctz(m);
        const int64_t c = (c0 + i) / 2, at = c * rp + cnt[c]++;
        qs[at] = (int32_t)q;
        xv[2 * at] = pv[i];
        xv[2 * at + 1] = pv[i + 1];
        m &= m - 1;
      }
    }
  }
  for (int64_t c0 = 0; c0 < span; c0 += W) {
    for (int64_t cc = 0; cc < W; cc += 2) {
      const int64_t c = (c0 + cc) / 2, n = cnt[c];
      const int32_t *qc = qs + c * rp;
      const uint32_t *vc = xv + 2 * c * rp;
      float *t0 = tile + cc * h, *t1 = t0 + h;
      int64_t o = 0;
      for (; o + W * NG <= h; o += W * NG) {
        __m512 a0[NG], a1[NG];
        for (int g = 0; g < NG; ++g) a0[g] = a1[g] = _mm512_setzero_ps();
        for (int64_t e = 0; e < n; ++e) {
          const __m512i x0 = _mm512_set1_epi32((int)vc[2 * e]), x1 = _mm512_set1_epi32((int)vc[2 * e + 1]);
          const uint32_t *d = j->dhp + (int64_t)qc[e] * h + o;
          for (int g = 0; g < NG; ++g) {
            const __m512bh dv = (__m512bh)_mm512_loadu_si512(d + g * W);
            a0[g] = _mm512_dpbf16_ps(a0[g], dv, (__m512bh)x0);
            a1[g] = _mm512_dpbf16_ps(a1[g], dv, (__m512bh)x1);
          }
        }
        for (int g = 0; g < NG; ++g) {
          _mm512_storeu_ps(t0 + o + g * W, a0[g]);
          _mm512_storeu_ps(t1 + o + g * W, a1[g]);
        }
      }
      for (; o < h; o += W) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int64_t e = 0; e < n; ++e) {
          const uint32_t *d = j->dhp + (int64_t)qc[e] * h + o;
          a0 = dp(a0, d, _mm512_set1_epi32((int)vc[2 * e]));
          a1 = dp(a1, d, _mm512_set1_epi32((int)vc[2 * e + 1]));
        }
        _mm512_storeu_ps(t0 + o, a0);
        _mm512_storeu_ps(t1 + o, a1);
      }
    }
    /* tile[cc][u] is dw[u][lo + c0 + cc]: 16 x 16 blocks transposed in registers */
    float *dst = j->dw + lo + c0;
    for (int64_t u0 = 0; u0 < h; u0 += W) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(tile + i * h + u0);
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + (u0 + i) * k, r[i]);
    }
  }
  free(cnt);
  free(qs);
  free(xv);
  free(tile);
}

/* dw (h x k, float32; k a multiple of 16) = dh^T x over the inputs that are not 0, dh (rows x h)
 * bfloat16, x rounded to bfloat16; dhp is scratch of ceil(rows/2) * h uint32. */
void vaelab_sparse_weight_grad(const float *x, int64_t rows, int64_t k, const uint16_t *dh,
                               int64_t h, float *dw, uint32_t *dhp, int64_t threads) {
  gjob j = {x, rows, k, dh, h, dw, dhp, threads};
  run(interleave_part, &j, threads);
  run(grad_part, &j, threads);
}

#else
int vaelab_sparse_available(void) { return 0; } /* no AVX512-BF16 here: the dense products */
#endif
