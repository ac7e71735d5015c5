/* im2col for channels-last (NHWC) images: the columns whose product with a weight matrix is a
 * convolution, used for the weight gradients of vaelab.nets.common.Conv2d / ConvTranspose2d.
 *
 * For x (n, h, w, c) in memory order and a kernel (kh, kw), stride (sh, sw), padding (ph, pw) and
 * output size (ho, wo):
 *
 *     cols[((b ho + oy) wo + ox), (ky kw + kx) c + ch] = x[b, oy sh + ky - ph, ox sw + kx - pw, ch]
 *
 * and 0 where the position falls outside x. The element type does not matter: each (position,
 * tap) is one copy of c * elem bytes, so `c_bytes` = c * sizeof(element). One pass over cols,
 * which is written in memory order. torch's gather of the same strided view took 2.5-3.7x
 * longer (0.58-0.73 against 0.19-0.29 ms, one thread here, for the dcgan network's
 * 128 x 32 x 16 x 16 bfloat16 activations).
 * The output rows (b, oy) are shared by `threads` threads of the OpenMP pool (pool.h).
 */
#include <stdint.h>
#include <string.h>

#include "pool.h"

struct im2col_job {
  const char *x;
  int64_t n, h, w, c_bytes, kh, kw, sh, sw, ph, pw, ho, wo, threads;
  char *cols;
};

static void im2col_part(void *arg) {
  const struct im2col_job *j = arg;
  const int64_t c_bytes = j->c_bytes, kh = j->kh, kw = j->kw, w = j->w, h = j->h;
  const int64_t row = w * c_bytes, image = h * row, line = j->wo * kh * kw * c_bytes;
  int64_t from, to; /* this thread's output rows (b, oy) */
  share(j->n * j->ho, tid(j->threads), j->threads, &from, &to);
  for (int64_t r = from; r < to; r++) {
    const int64_t b = r / j->ho, oy = r % j->ho;
    const char *img = j->x + b * image;
    char *cols = j->cols + r * line;
    for (int64_t ox = 0; ox < j->wo; ox++) {
      const int64_t x0 = ox * j->sw - j->pw;
      for (int64_t ky = 0; ky < kh; ky++) {
        const int64_t iy = oy * j->sh + ky - j->ph;
        if (iy < 0 || iy >= h) {
          memset(cols, 0, (size_t)(kw * c_bytes));
          cols += kw * c_bytes;
          continue;
        }
        const char *src = img + iy * row;
        int64_t kx = 0;
        for (; kx < kw && x0 + kx < 0; kx++, cols += c_bytes) memset(cols, 0, (size_t)c_bytes);
        int64_t inside = kw - kx;
        if (x0 + kw > w) inside = w - (x0 + kx);
        if (inside > 0) { /* neighbouring taps are neighbouring pixels: one copy */
          memcpy(cols, src + (x0 + kx) * c_bytes, (size_t)(inside * c_bytes));
          cols += inside * c_bytes;
          kx += inside;
        }
        for (; kx < kw; kx++, cols += c_bytes) memset(cols, 0, (size_t)c_bytes);
      }
    }
  }
}

void vaelab_im2col_nhwc(const char *x, int64_t n, int64_t h, int64_t w, int64_t c_bytes,
                        int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                        int64_t ho, int64_t wo, char *cols, int64_t threads) {
  struct im2col_job j = {x, n, h, w, c_bytes, kh, kw, sh, sw, ph, pw, ho, wo, threads, cols};
  run(im2col_part, &j, threads);
}
