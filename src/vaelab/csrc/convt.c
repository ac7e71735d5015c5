/* A transposed convolution to few channels (a decoder's output layer: 1 or 3 channels), float32,
 * channels-last (vaelab.nets.common.ConvTranspose2d). oneDNN runs these slowly on the CPU (the
 * dcgan network's 32 -> 1 layer: 3.4 ms forwards for 33 MFLOP); here each output pixel is a few
 * dot products over the input channels.
 *
 * x (n, hi, wi, ci) and y (n, ho, wo, co) in memory order; the weight rearranged as
 * wt[(ky kw + kx) co + c][i] = weight[i, c, ky, kx] (torch's (ci, co, kh, kw) weight permuted to
 * (kh, kw, co, ci)); input pixel (iy, ix) reaches output pixel (iy sh + ky - ph, ix sw + kx - pw):
 *
 *     y[b, oy, ox, c]  = bias[c] + sum over taps reaching (oy, ox) of x[b, iy, ix, :] . wt[tap, c]
 *     dx[b, iy, ix, :] = sum over the taps from (iy, ix) and c of gy[b, oy, ox, c] wt[tap, c]
 *     dwt[tap, c]      = sum over b and (iy, ix) of gy[b, oy, ox, c] x[b, iy, ix, :]
 *
 * The backward pass makes both gradients in one pass over the input pixels (dx or dwt may be
 * NULL). ci must be a multiple of 16 and co at most 4 (vaelab.nets.common checks). Every sum
 * runs in a fixed order: results do not depend on anything but the inputs.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define V 16 /* ci is a multiple of V: the loops run over vectors of V floats */

/* V floats as one value (one AVX-512 register, or two or four narrower ones): GCC and clang's
 * vector extension, loaded from and stored to any float address. */
typedef float vec __attribute__((vector_size(4 * V), aligned(4), may_alias));
#define AT(p) (*(vec *)(p))
#define AT_C(p) (*(const vec *)(p))

static inline float sum(vec v) {
  float s = 0.0f;
  for (int j = 0; j < V; j++) s += v[j];
  return s;
}

void vaelab_convt_forward(const float *restrict x, int64_t n, int64_t hi, int64_t wi, int64_t ci,
                          const float *restrict wt, int64_t co, int64_t kh, int64_t kw, int64_t sh,
                          int64_t sw, int64_t ph, int64_t pw, int64_t ho, int64_t wo,
                          const float *restrict bias, float *restrict y) {
  /* per output column: its first tap kx0 (same remainder as ox + pw mod sw) and that tap's ix */
  int64_t *cols = malloc(sizeof(int64_t) * 2 * (size_t)wo);
  if (!cols) return;
  for (int64_t ox = 0; ox < wo; ox++) {
    cols[2 * ox] = (ox + pw) % sw;
    cols[2 * ox + 1] = (ox + pw - cols[2 * ox]) / sw;
  }
  for (int64_t b = 0; b < n; b++)
    for (int64_t oy = 0; oy < ho; oy++) {
      const int64_t ky0 = (oy + ph) % sh, iy0 = (oy + ph - ky0) / sh;
      for (int64_t ox = 0; ox < wo; ox++, y += co)
        for (int64_t c = 0; c < co; c++) {
          vec a0 = {0}, a1 = {0}; /* two sums in flight */
          for (int64_t ky = ky0, iy = iy0; ky < kh && iy >= 0; ky += sh, iy--) {
            if (iy >= hi) continue;
            for (int64_t kx = cols[2 * ox], ix = cols[2 * ox + 1]; kx < kw && ix >= 0;
                 kx += sw, ix--) {
              if (ix >= wi) continue;
              const float *xp = x + ((b * hi + iy) * wi + ix) * ci;
              const float *wp = wt + ((ky * kw + kx) * co + c) * ci;
              int64_t i = 0;
              for (; i + 2 * V <= ci; i += 2 * V) {
                a0 += AT_C(xp + i) * AT_C(wp + i);
                a1 += AT_C(xp + i + V) * AT_C(wp + i + V);
              }
              if (i < ci) a0 += AT_C(xp + i) * AT_C(wp + i);
            }
          }
          y[c] = (bias ? bias[c] : 0.0f) + sum(a0 + a1);
        }
    }
  free(cols);
}
