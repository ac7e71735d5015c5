/* Float32 transposed convolutions to few channels, channels-last, forward and backward: a
 * decoder's output layer (vaelab.nets.common.ConvTranspose2d takes them up to 4 channels). oneDNN
 * runs these slowly on the CPU (the dcgan network's 32 -> 1 layer at batch 128: 3.3 ms forward,
 * 0.8 ms backward, for 33 MFLOP each).
 *
 * The weight, torch's (ci, co, kh, kw), is seen as a matrix over input channels i and "taps"
 * t = (ky kw + kx) co + c, L = kh kw co of them (L <= 128). Input pixel (iy, ix) reaches output
 * pixel (iy sh + ky - ph, ix sw + kx - pw) through tap (ky, kx, c). Per image:
 *
 *   forward   T[p, t] = sum_i x[p, i] w[i, t]               (x: the hi wi input pixels p)
 *             y[b, oy, ox, c] = bias[c] + sum of T[p, t] over the (p, t) reaching (oy, ox, c)
 *   backward  G[p, t] = gy[b, iy sh + ky - ph, ix sw + kx - pw, c]  (0 outside the output)
 *             gx[p, i] = sum_t G[p, t] w[i, t]
 *             gw[i, t] = sum over images and p of x[p, i] G[p, t]
 *
 * T and G have one row of nv = ceil(L / 16) vectors per input pixel (the rest of the last vector
 * is 0) and stay in the cache; every product is a broadcast scalar times a vector of 16 taps or
 * 16 channels, with no sums across lanes. Images are shared by `threads` threads of the OpenMP pool
 * (pool.h); the weight gradient is summed from per-image parts in image order, so no result
 * depends on the number of threads. ci must be a multiple of 16 (vaelab.nets.common checks).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"
#include "vec.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define NV_MAX 8 /* L <= 128 taps */
#define UNROLL _Pragma("GCC unroll 16")
#define STOREV(p, v) (*(vec *)(p) = (v))
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* CALL(k, block_k) for the vector count nv = k (1..8): the switch that makes each count a
 * compile-time constant of the always-inlined kernels (their sums then live in registers) */
#define BY_NV(nv, CALL, b1, b2, b3, b4, b5, b6, b7, b8) \
  switch (nv) {                                           \
    case 1: CALL(1, b1); break;                           \
    case 2: CALL(2, b2); break;                           \
    case 3: CALL(3, b3); break;                           \
    case 4: CALL(4, b4); break;                           \
    case 5: CALL(5, b5); break;                           \
    case 6: CALL(6, b6); break;                           \
    case 7: CALL(7, b7); break;                           \
    default: CALL(8, b8); break;                          \
  }

/* dst[k] = src[idx[k]], or 0 where idx[k] < 0, for k < m (a multiple of V): the gathers that
 * move the sums of taps to the output pixels and the output gradient to the taps, through index
 * tables made once per call (the same for every image). */
static void gather(const float *src, const int32_t *idx, int64_t m, float *dst) {
#ifdef __AVX512F__
  for (int64_t k = 0; k < m; k += V) {
    const __m512i i = _mm512_loadu_si512((const void *)(idx + k));
    const __mmask16 in = _mm512_cmpge_epi32_mask(i, _mm512_setzero_si512());
    _mm512_storeu_ps(dst + k, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, i, src, 4));
  }
#else
  for (int64_t k = 0; k < m; k++) dst[k] = idx[k] < 0 ? 0.0f : src[idx[k]];
#endif
}

struct convt_job {
  const float *x, *w, *gy, *base;
  const int32_t *idx; /* gather tables: see the entry points */
  int64_t n, hi, wi, ci, co, ho, wo, threads, nv, L, e, per, gy_image;
  float *y, *gx, *part;
  int failed;
};

/* ---------------------------------------------------------------------------- the forward pass */

/* T[p] = sum_i x[p, i] w[i] for pb pixels at a time; w (ci, nv V), T (P, nv V). */
ALWAYS_INLINE void taps_of(const float *x, int64_t P, int64_t ci, const float *w, float *t,
                           const int nv, const int pb) {
  const int64_t lp = nv * V;
  int64_t p = 0;
  for (; p + pb <= P; p += pb) {
    vec a[4][NV_MAX];
    UNROLL for (int q = 0; q < pb; q++) UNROLL for (int v = 0; v < nv; v++) a[q][v] = (vec){0};
    const float *xp = x + p * ci;
    for (int64_t i = 0; i < ci; i++) {
      UNROLL for (int v = 0; v < nv; v++) {
        const vec wv = LOADV(w + i * lp + v * V);
        UNROLL for (int q = 0; q < pb; q++) a[q][v] += xp[q * ci + i] * wv;
      }
    }
    UNROLL for (int q = 0; q < pb; q++) UNROLL for (int v = 0; v < nv; v++)
      STOREV(t + (p + q) * lp + v * V, a[q][v]);
  }
  for (; p < P; p++) {
    vec a[NV_MAX];
    UNROLL for (int v = 0; v < nv; v++) a[v] = (vec){0};
    for (int64_t i = 0; i < ci; i++)
      UNROLL for (int v = 0; v < nv; v++) a[v] += x[p * ci + i] * LOADV(w + i * lp + v * V);
    UNROLL for (int v = 0; v < nv; v++) STOREV(t + p * lp + v * V, a[v]);
  }
}

static void taps(const float *x, int64_t P, int64_t ci, const float *w, float *t, int64_t nv) {
#define TAPS(k, pixels) taps_of(x, P, ci, w, t, k, pixels)
  BY_NV(nv, TAPS, 4, 4, 4, 4, 2, 2, 2, 2) /* 4 pixels share each weight load up to 4 vectors */
#undef TAPS
}

static void forward_part(void *arg) {
  struct convt_job *j = arg;
  const int64_t P = j->hi * j->wi, lp = j->nv * V, e = j->e, per = j->per;
  float *t = malloc(sizeof(float) * (size_t)(P * lp + 2 * e));
  if (!t) {
    j->failed = 1;
    return;
  }
  float *acc = t + P * lp, *part = acc + e;
  int64_t from, to;
  share(j->n, tid(j->threads), j->threads, &from, &to);
  for (int64_t b = from; b < to; b++) {
    taps(j->x + b * P * j->ci, P, j->ci, j->w, t, j->nv);
    /* output element q = (oy wo + ox) co + c: the bias plus its `per` taps, one gather each */
    memcpy(acc, j->base, sizeof(float) * (size_t)e);
    for (int64_t k = 0; k < per; k++) {
      gather(t, j->idx + k * e, e, part);
      for (int64_t q = 0; q < e; q += V) STOREV(acc + q, LOADV(acc + q) + LOADV(part + q));
    }
    memcpy(j->y + b * j->ho * j->wo * j->co, acc, sizeof(float) * (size_t)(j->ho * j->wo * j->co));
  }
  free(t);
}

/* y (n, ho, wo, co) = the transposed convolution of x (n, hi, wi, ci) with w (ci, nv * 16): torch's
 * weight permuted to (ci, kh, kw, co), flattened to L taps and padded with zeros to nv * 16;
 * bias may be NULL. co <= 4. Returns 0, or -1 (out of memory, or sizes it does not take). */
int vaelab_convt_forward(const float *x, int64_t n, int64_t hi, int64_t wi, int64_t ci,
                         const float *w, int64_t co, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                         int64_t ph, int64_t pw, int64_t ho, int64_t wo, const float *bias,
                         float *y, int64_t threads) {
  const int64_t nv = (kh * kw * co + V - 1) / V, lp = nv * V;
  const int64_t per = ((kh + sh - 1) / sh) * ((kw + sw - 1) / sw); /* taps per output pixel */
  const int64_t e = (ho * wo * co + V - 1) / V * V;
  if (co > 4 || nv > NV_MAX || ci % V || hi * wi * lp > INT32_MAX) return -1;
  /* idx[k e + q]: where in T the k-th tap of output element q = (oy wo + ox) co + c is */
  int32_t *idx = malloc(sizeof(int32_t) * (size_t)(per * e));
  float *base = malloc(sizeof(float) * (size_t)e);
  int failed = !idx || !base;
  if (!failed) {
    for (int64_t k = 0; k < per * e; k++) idx[k] = -1;
    for (int64_t q = 0; q < e; q++) base[q] = q < ho * wo * co && bias ? bias[q % co] : 0.0f;
    for (int64_t oy = 0; oy < ho; oy++)
      for (int64_t ox = 0; ox < wo; ox++) {
        int64_t k = 0;
        for (int64_t ky = (oy + ph) % sh, iy = (oy + ph) / sh; ky < kh && iy >= 0; ky += sh, iy--)
          for (int64_t kx = (ox + pw) % sw, ix = (ox + pw) / sw; kx < kw && ix >= 0;
               kx += sw, ix--) {
            if (iy >= hi || ix >= wi) continue;
            for (int64_t c = 0; c < co; c++)
              idx[k * e + (oy * wo + ox) * co + c] =
                  (int32_t)((iy * wi + ix) * lp + (ky * kw + kx) * co + c);
            k++;
          }
      }
    struct convt_job j = {.x = x, .w = w, .base = base, .idx = idx, .n = n, .hi = hi, .wi = wi,
                          .ci = ci, .co = co, .ho = ho, .wo = wo, .threads = threads, .nv = nv,
                          .e = e, .per = per, .y = y};
    run(forward_part, &j, threads);
    failed = j.failed;
  }
  free(idx);
  free(base);
  return failed ? -1 : 0;
}

/* --------------------------------------------------------------------------- the backward pass */

/* gx[p] = sum_t G[p, t] wg[t] for 2 pixels at a time, cv vectors of channels at a time;
 * wg (L, ci), G (P, lp), gx (P, ci). */
ALWAYS_INLINE void input_grad_of(const float *g, int64_t P, int64_t lp, int64_t L, const float *wg,
                                 int64_t ci, int64_t i0, float *gx, const int cv) {
  int64_t p = 0;
  for (; p + 2 <= P; p += 2) {
    vec a[2][4];
    UNROLL for (int v = 0; v < cv; v++) a[0][v] = a[1][v] = (vec){0};
    const float *g0 = g + p * lp, *g1 = g0 + lp;
    for (int64_t t = 0; t < L; t++) {
      const float s0 = g0[t], s1 = g1[t];
      UNROLL for (int v = 0; v < cv; v++) {
        const vec wv = LOADV(wg + t * ci + i0 + v * V);
        a[0][v] += s0 * wv;
        a[1][v] += s1 * wv;
      }
    }
    UNROLL for (int v = 0; v < cv; v++) {
      STOREV(gx + p * ci + i0 + v * V, a[0][v]);
      STOREV(gx + (p + 1) * ci + i0 + v * V, a[1][v]);
    }
  }
  for (; p < P; p++) {
    vec a[4];
    UNROLL for (int v = 0; v < cv; v++) a[v] = (vec){0};
    for (int64_t t = 0; t < L; t++)
      UNROLL for (int v = 0; v < cv; v++) a[v] += g[p * lp + t] * LOADV(wg + t * ci + i0 + v * V);
    UNROLL for (int v = 0; v < cv; v++) STOREV(gx + p * ci + i0 + v * V, a[v]);
  }
}

static void input_grad(const float *g, int64_t P, int64_t lp, int64_t L, const float *wg,
                       int64_t ci, float *gx) {
  for (int64_t i0 = 0; i0 < ci; i0 += 4 * V) { /* 4 vectors (64 channels) at a time */
    switch ((ci - i0) / V) {
      case 1: input_grad_of(g, P, lp, L, wg, ci, i0, gx, 1); break;
      case 2: input_grad_of(g, P, lp, L, wg, ci, i0, gx, 2); break;
      case 3: input_grad_of(g, P, lp, L, wg, ci, i0, gx, 3); break;
      default: input_grad_of(g, P, lp, L, wg, ci, i0, gx, 4); break;
    }
  }
}

/* part[i] = sum_p x[p, i] G[p] for cb channels at a time; part (ci, lp). */
ALWAYS_INLINE void weight_part_of(const float *x, const float *g, int64_t P, int64_t ci,
                                  float *part, const int nv, const int cb) {
  const int64_t lp = nv * V;
  for (int64_t i0 = 0; i0 < ci; i0 += cb) {
    vec a[8][NV_MAX];
    UNROLL for (int k = 0; k < cb; k++) UNROLL for (int v = 0; v < nv; v++) a[k][v] = (vec){0};
    for (int64_t p = 0; p < P; p++) {
      const float *xp = x + p * ci + i0;
      UNROLL for (int v = 0; v < nv; v++) {
        const vec gv = LOADV(g + p * lp + v * V);
        UNROLL for (int k = 0; k < cb; k++) a[k][v] += xp[k] * gv;
      }
    }
    UNROLL for (int k = 0; k < cb; k++) UNROLL for (int v = 0; v < nv; v++)
      STOREV(part + (i0 + k) * lp + v * V, a[k][v]);
  }
}

static void weight_part(const float *x, const float *g, int64_t P, int64_t ci, float *part,
                        int64_t nv) {
#define PART(k, channels) weight_part_of(x, g, P, ci, part, k, channels)
  BY_NV(nv, PART, 8, 8, 8, 4, 4, 4, 2, 2) /* channels x nv vectors of sums: <= 24 registers */
#undef PART
}

static void backward_part(void *arg) {
  struct convt_job *j = arg;
  const int64_t ci = j->ci, lp = j->nv * V, P = j->hi * j->wi;
  float *g = malloc(sizeof(float) * (size_t)(P * lp));
  if (!g) {
    j->failed = 1;
    return;
  }
  int64_t from, to;
  share(j->n, tid(j->threads), j->threads, &from, &to);
  for (int64_t b = from; b < to; b++) {
    gather(j->gy + b * j->gy_image, j->idx, P * lp, g);
    const float *x = j->x + b * P * ci;
    if (j->gx) input_grad(g, P, lp, j->L, j->w, ci, j->gx + b * P * ci);
    if (j->part) weight_part(x, g, P, ci, j->part + b * ci * lp, j->nv);
  }
  free(g);
}

struct sum_job {
  const float *part;
  int64_t n, m, threads;
  float *out;
};

static void sum_part(void *arg) { /* out[k] = sum over images b in order of part[b, k] */
  const struct sum_job *j = arg;
  int64_t from, to; /* in vectors: m is a multiple of V */
  share(j->m / V, tid(j->threads), j->threads, &from, &to);
  for (int64_t k = from * V; k < to * V; k += V) {
    vec s = {0};
    for (int64_t b = 0; b < j->n; b++) s += LOADV(j->part + b * j->m + k);
    STOREV(j->out + k, s);
  }
}

/* Gradients of vaelab_convt_forward: gx (n, hi, wi, ci) and gw (ci, nv * 16) (taps as the
 * forward's w; lanes past L are 0), either NULL when not wanted, from x (n, hi, wi, ci),
 * gy (its element strides over (n, c, h, w) in gs) and wg (L, ci): torch's weight permuted to
 * (kh, kw, co, ci). Returns 0, or -1 (out of memory, or sizes it does not take). */
int vaelab_convt_backward(const float *x, const float *gy, const int64_t *gs, int64_t n,
                          int64_t hi, int64_t wi, int64_t ci, const float *wg, int64_t co,
                          int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                          int64_t ho, int64_t wo, float *gx, float *gw, int64_t threads) {
  const int64_t nv = (kh * kw * co + V - 1) / V, lp = nv * V, m = ci * lp, P = hi * wi;
  if (co > 4 || nv > NV_MAX || ci % V) return -1;
  if ((ho - 1) * gs[2] + (wo - 1) * gs[3] + (co - 1) * gs[1] > INT32_MAX) return -1;
  /* idx[p lp + t]: where in an image of gy tap t of input pixel p lands (-1: outside) */
  int32_t *idx = malloc(sizeof(int32_t) * (size_t)(P * lp));
  float *part = gw ? malloc(sizeof(float) * (size_t)(n * m)) : NULL;
  int failed = !idx || (gw && !part);
  if (!failed) {
    for (int64_t iy = 0; iy < hi; iy++)
      for (int64_t ix = 0; ix < wi; ix++)
        for (int64_t t = 0; t < lp; t++) {
          const int64_t ky = t / (kw * co), kx = t / co % kw, c = t % co;
          const int64_t oy = iy * sh + ky - ph, ox = ix * sw + kx - pw;
          const int inside = t < kh * kw * co && oy >= 0 && oy < ho && ox >= 0 && ox < wo;
          idx[(iy * wi + ix) * lp + t] = inside ? (int32_t)(oy * gs[2] + ox * gs[3] + c * gs[1]) : -1;
        }
    struct convt_job j = {.x = x, .w = wg, .gy = gy, .idx = idx, .n = n, .hi = hi, .wi = wi,
                          .ci = ci, .co = co, .ho = ho, .wo = wo, .threads = threads, .nv = nv,
                          .L = kh * kw * co, .gy_image = gs[0], .gx = gx, .part = part};
    run(backward_part, &j, threads);
    failed = j.failed;
  }
  if (gw && !failed) {
    struct sum_job s = {part, n, m, threads, gw};
    run(sum_part, &s, threads);
  }
  free(idx);
  free(part);
  return failed ? -1 : 0;
}
