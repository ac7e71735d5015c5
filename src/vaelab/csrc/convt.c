/* The forward pass of a float32 transposed convolution to few channels, channels-last: a decoder's
 * output layer (vaelab.nets.common.ConvTranspose2d uses it up to 4 channels). oneDNN runs these
 * slowly on the CPU (the dcgan network's 32 -> 1 layer: 3.3 ms for 33 MFLOP); here each output
 * pixel is a few dot products over the input channels, up to 4 channels sharing the loads of
 * each tap (1.2 ms on two threads; the output rows are shared by `threads` threads of the
 * OpenMP pool, pool.h).
 *
 * x (n, hi, wi, ci) and y (n, ho, wo, co) in memory order; the weight rearranged as
 * wt[(ky kw + kx) co + c][i] = weight[i, c, ky, kx] (torch's (ci, co, kh, kw) weight permuted to
 * (kh, kw, co, ci)); input pixel (iy, ix) reaches output pixel (iy sh + ky - ph, ix sw + kx - pw):
 *
 *     y[b, oy, ox, c] = bias[c] + sum over the taps reaching (oy, ox) of x[b, iy, ix, :] . wt[tap, c]
 *
 * bias may be NULL. ci must be a multiple of 16 (vaelab.nets.common checks); any co works.
 * Every sum runs in a fixed order: results do not depend on the number of threads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"
#include "vec.h" /* ci is a multiple of V: the loops run over vectors of V floats */

struct convt_job {
  const float *x, *wt, *bias;
  int64_t n, hi, wi, ci, co, kh, kw, sh, sw, ph, pw, ho, wo, threads;
  const int64_t *cols;
  float *y;
};

static void convt_part(void *arg) {
  const struct convt_job *j = arg;
  const int64_t hi = j->hi, wi = j->wi, ci = j->ci, co = j->co, kh = j->kh, kw = j->kw;
  const int64_t *cols = j->cols;
  int64_t from, to; /* this thread's output rows (b, oy) */
  share(j->n * j->ho, tid(j->threads), j->threads, &from, &to);
  for (int64_t r = from; r < to; r++) {
    const int64_t b = r / j->ho, oy = r % j->ho;
    const int64_t ky0 = (oy + j->ph) % j->sh, iy0 = (oy + j->ph - ky0) / j->sh;
    float *y = j->y + r * j->wo * co;
    for (int64_t ox = 0; ox < j->wo; ox++, y += co)
      for (int64_t c0 = 0; c0 < co; c0 += 4) { /* up to 4 channels share the taps' loads */
        const int64_t m = co - c0 < 4 ? co - c0 : 4;
        vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}; /* channel c0 + q: aq */
        vec b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0}; /* second sums in flight */
        for (int64_t ky = ky0, iy = iy0; ky < kh && iy >= 0; ky += j->sh, iy--) {
          if (iy >= hi) continue;
          for (int64_t kx = cols[2 * ox], ix = cols[2 * ox + 1]; kx < kw && ix >= 0;
               kx += j->sw, ix--) {
            if (ix >= wi) continue;
            const float *xp = j->x + ((b * hi + iy) * wi + ix) * ci;
            const float *wp = j->wt + ((ky * kw + kx) * co + c0) * ci;
            for (int64_t i = 0; i < ci; i += 2 * V) {
              const int two = i + V < ci;
              const vec x0 = LOADV(xp + i), x1 = two ? LOADV(xp + i + V) : (vec){0};
              a0 += x0 * LOADV(wp + i);
              if (two) b0 += x1 * LOADV(wp + i + V);
              if (m > 1) {
                a1 += x0 * LOADV(wp + ci + i);
                if (two) b1 += x1 * LOADV(wp + ci + i + V);
              }
              if (m > 2) {
                a2 += x0 * LOADV(wp + 2 * ci + i);
                if (two) b2 += x1 * LOADV(wp + 2 * ci + i + V);
              }
              if (m > 3) {
                a3 += x0 * LOADV(wp + 3 * ci + i);
                if (two) b3 += x1 * LOADV(wp + 3 * ci + i + V);
              }
            }
          }
        }
        const float *bias = j->bias ? j->bias + c0 : NULL;
        const vec sums[4] = {a0 + b0, a1 + b1, a2 + b2, a3 + b3};
        for (int64_t q = 0; q < m; q++) y[c0 + q] = (bias ? bias[q] : 0.0f) + lanes_sum(sums[q]);
      }
  }
}

void vaelab_convt_forward(const float *x, int64_t n, int64_t hi, int64_t wi, int64_t ci,
                          const float *wt, int64_t co, int64_t kh, int64_t kw, int64_t sh,
                          int64_t sw, int64_t ph, int64_t pw, int64_t ho, int64_t wo,
                          const float *bias, float *y, int64_t threads) {
  /* per output column: its first tap kx0 (same remainder as ox + pw mod sw) and that tap's ix */
  int64_t *cols = malloc(sizeof(int64_t) * 2 * (size_t)wo);
  if (!cols) return;
  for (int64_t ox = 0; ox < wo; ox++) {
    cols[2 * ox] = (ox + pw) % sw;
    cols[2 * ox + 1] = (ox + pw - cols[2 * ox]) / sw;
  }
  struct convt_job j = {x, wt, bias, n, hi, wi, ci, co, kh, kw, sh, sw, ph, pw, ho, wo, threads,
                        cols, y};
  run(convt_part, &j, threads);
  free(cols);
}
