/* Batch normalisation with batch statistics followed by ReLU, for channels-last arrays of
 * rows x c elements (rows = batch x height x width), float32 or bfloat16, with float32
 * statistics and parameters (vaelab.nets.common.BatchNormReLU2d). torch runs this as four
 * operations (batch_norm, relu and their backward passes) of one or two passes each.
 *
 * Forward:   mean, var = the per-channel mean and biased variance of x (two passes: the sum,
 *            then the sum of squared deviations), invstd = 1 / sqrt(var + eps),
 *            y = max(0, (x - mean) invstd gamma + beta)   (NaN passes through, as in torch).
 * Backward:  with xhat = (x - mean) invstd and g = gy where the pre-activation > 0 (else 0),
 *            dbeta = sum g, dgamma = sum g xhat,
 *            dx = gamma invstd (g - dbeta / rows - xhat dgamma / rows).
 *
 * Rows are shared by `threads` threads of the OpenMP pool (pool.h); each sums its rows in
 * float32 over blocks of 4 rows (a quarter of the dependent additions), then in double, and
 * the threads' sums are added in thread order: the numbers depend on the thread count only in
 * the last bits. c must be a multiple of 16 (vaelab.nets.common checks).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"
#include "vec.h"

#define MAX_THREADS 64

/* V elements at p as float32: p holds float32 or (bf16 != 0) bfloat16; stores round to nearest
 * even, NaN stays NaN (as bf16.h's narrow). */
static inline vec load(const char *p, int bf16) {
  if (!bf16) return *(const vec *)p;
  const uvec u = __builtin_convertvector(*(const hvec *)p, uvec) << 16;
  vec f;
  memcpy(&f, &u, sizeof f);
  return f;
}
static inline void store(char *p, vec f, int bf16) {
  if (!bf16) {
    *(vec *)p = f;
    return;
  }
  uvec u;
  memcpy(&u, &f, sizeof u);
  const uvec rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uvec nan = (uvec)((u & 0x7fffffffu) > 0x7f800000u);
  *(hvec *)p = __builtin_convertvector((rounded & ~nan) | (((u | 0x400000u) >> 16) & nan), hvec);
}

/* v where cond > 0 or is NaN, else 0 (a NaN must reach the loss; the test is on the bits, which
 * -ffast-math leaves alone) */
static inline vec where_positive(vec cond, vec v) {
  const ivec bits = (ivec)cond;
  return (vec)((ivec)v & ((bits > 0) | ((bits & 0x7fffffff) > 0x7f800000)));
}

struct bn_job {
  const char *x, *gy; /* gy NULL: forward */
  char *out;          /* y or dx */
  int64_t rows, c, threads;
  int bf16, pass;
  /* per channel (c floats each): xhat = x xa + xb (forward: y = relu(x xa + xb));
   * pre-activation = xhat ga + gb; dx = k (m - mg - xhat mgx) */
  const float *mean, *xa, *xb, *ga, *gb, *k, *mg, *mgx;
  double *sums; /* threads x 2c: each thread's two sums */
};


/* pass 0: sums of x; 1: sums of (x - mean)^2; 2 (backward): sums of m and m xhat */
static void sums_part(void *arg) {
  const struct bn_job *j = arg;
  const int64_t t = tid(j->threads), c = j->c, size = j->bf16 ? 2 : 4;
  int64_t from, to;
  share(j->rows, t, j->threads, &from, &to);
  double *s1 = j->sums + t * 2 * c, *s2 = s1 + c;
  memset(s1, 0, sizeof(double) * 2 * (size_t)c);
  for (int64_t ch = 0; ch < c; ch += V) {
    vec p1 = {0}, p2 = {0};
    for (int64_t r = from; r < to; r += 4) {
      vec q1 = {0}, q2 = {0};
      for (int64_t i = r; i < r + 4 && i < to; i++) {
        const int64_t at = (i * c + ch) * size;
        const vec v = load(j->x + at, j->bf16);
        if (j->pass == 0) {
          q1 += v;
        } else if (j->pass == 1) {
          const vec d = v - LOADV(j->mean + ch);
          q1 += d * d;
        } else {
          const vec xhat = v * LOADV(j->xa + ch) + LOADV(j->xb + ch);
          const vec m = where_positive(xhat * LOADV(j->ga + ch) + LOADV(j->gb + ch), load(j->gy + at, j->bf16));
          q1 += m;
          q2 += m * xhat;
        }
      }
      p1 += q1;
      p2 += q2;
      if (((r - from) & 255) == 252 || r + 4 >= to) { /* float32 over 256 rows, then double */
        for (int l = 0; l < V; l++) {
          s1[ch + l] += p1[l];
          s2[ch + l] += p2[l];
        }
        p1 = p2 = (vec){0};
      }
    }
  }
}

static void write_part(void *arg) {
  const struct bn_job *j = arg;
  const int64_t c = j->c, size = j->bf16 ? 2 : 4;
  int64_t from, to;
  share(j->rows, tid(j->threads), j->threads, &from, &to);
  for (int64_t r = from; r < to; r++)
    for (int64_t ch = 0; ch < c; ch += V) {
      const int64_t at = (r * c + ch) * size;
      const vec v = load(j->x + at, j->bf16) * LOADV(j->xa + ch) + LOADV(j->xb + ch);
      if (!j->gy) {
        store(j->out + at, where_positive(v, v), j->bf16);
      } else {
        const vec m = where_positive(v * LOADV(j->ga + ch) + LOADV(j->gb + ch), load(j->gy + at, j->bf16));
        store(j->out + at, LOADV(j->k + ch) * (m - LOADV(j->mg + ch) - v * LOADV(j->mgx + ch)), j->bf16);
      }
    }
}

/* The threads' sums, added in thread order, into t1 and t2 (c doubles each). */
static void total(const struct bn_job *j, int64_t threads, double *t1, double *t2) {
  const int64_t c = j->c;
  memset(t1, 0, sizeof(double) * (size_t)c);
  memset(t2, 0, sizeof(double) * (size_t)c);
  for (int64_t t = 0; t < threads; t++)
    for (int64_t i = 0; i < c; i++) {
      t1[i] += j->sums[t * 2 * c + i];
      t2[i] += j->sums[t * 2 * c + c + i];
    }
}

/* One block for a call: each thread's sums and their totals (2 c (threads + 1) doubles), then
 * `floats` x c floats; threads clamped to 1..MAX_THREADS. NULL when memory runs out. */
static double *scratch(int64_t c, int64_t *threads, int64_t floats) {
  if (*threads < 1) *threads = 1;
  if (*threads > MAX_THREADS) *threads = MAX_THREADS;
  return malloc(sizeof(double) * (size_t)(2 * c * (*threads + 1)) + sizeof(float) * (size_t)(floats * c));
}

/* bf16: 0 float32, 1 bfloat16. gamma, beta may be NULL (no affine parameters); so may dx,
 * dgamma, dbeta. Returns 0, or -1 when c is not a multiple of 16 or memory runs out. */
int vaelab_bn_relu_forward(int bf16, const void *x, int64_t rows, int64_t c, const float *gamma,
                           const float *beta, float eps, void *y, float *mean, float *var,
                           float *invstd, int64_t threads) {
  if (c % V || rows < 1) return -1;
  double *sums = scratch(c, &threads, 2);
  if (!sums) return -1;
  double *t1 = sums + 2 * c * threads, *t2 = t1 + c;
  float *aff = (float *)(t2 + c);
  struct bn_job j = {.x = x, .rows = rows, .c = c, .threads = threads, .bf16 = bf16,
                     .mean = mean, .sums = sums};
  for (j.pass = 0; j.pass < 2; j.pass++) {
    run(sums_part, &j, threads);
    total(&j, threads, t1, t2);
    for (int64_t i = 0; i < c; i++) {
      if (j.pass == 0) {
        mean[i] = (float)(t1[i] / (double)rows);
      } else {
        var[i] = (float)(t1[i] / (double)rows);
        invstd[i] = 1.0f / sqrtf(var[i] + eps);
      }
    }
  }
  for (int64_t i = 0; i < c; i++) { /* y = relu(x xa + xb) */
    aff[i] = invstd[i] * (gamma ? gamma[i] : 1.0f);
    aff[c + i] = (beta ? beta[i] : 0.0f) - mean[i] * aff[i];
  }
  j.xa = aff;
  j.xb = aff + c;
  j.out = y;
  run(write_part, &j, threads);
  free(sums);
  return 0;
}

int vaelab_bn_relu_backward(int bf16, const void *x, const void *gy, int64_t rows, int64_t c,
                            const float *gamma, const float *beta, const float *mean,
                            const float *invstd, void *dx, float *dgamma, float *dbeta,
                            int64_t threads) {
  if (c % V || rows < 1) return -1;
  double *sums = scratch(c, &threads, 7);
  if (!sums) return -1;
  double *t1 = sums + 2 * c * threads, *t2 = t1 + c;
  float *per = (float *)(t2 + c);
  float *xa = per, *xb = per + c, *ga = per + 2 * c, *gb = per + 3 * c, *k = per + 4 * c;
  float *mg = per + 5 * c, *mgx = per + 6 * c;
  for (int64_t i = 0; i < c; i++) {
    xa[i] = invstd[i];
    xb[i] = -mean[i] * invstd[i];
    ga[i] = gamma ? gamma[i] : 1.0f;
    gb[i] = beta ? beta[i] : 0.0f;
    k[i] = ga[i] * invstd[i];
  }
  struct bn_job j = {.x = x, .gy = gy, .rows = rows, .c = c, .threads = threads, .bf16 = bf16,
                     .pass = 2, .xa = xa, .xb = xb, .ga = ga, .gb = gb, .k = k, .mg = mg,
                     .mgx = mgx, .sums = sums};
  run(sums_part, &j, threads);
  total(&j, threads, t1, t2);
  for (int64_t i = 0; i < c; i++) {
    if (dbeta) dbeta[i] = (float)t1[i];
    if (dgamma) dgamma[i] = (float)t2[i];
    mg[i] = (float)(t1[i] / (double)rows);
    mgx[i] = (float)(t2[i] / (double)rows);
  }
  if (dx) {
    j.out = dx;
    run(write_part, &j, threads);
  }
  free(sums);
  return 0;
}
