/* Per-pixel part of a Bernoulli log-likelihood on logits, in one pass over memory.
 *
 * For each row l (d logits) of a contiguous row-major float32 array (rows x d):
 *
 *     out[r] = -1/2 sum_i |l_i| - sum_i log(1 + exp(-|l_i|))
 *
 * so that log p(x|z) = (x - 1/2) . l + out[r]  (softplus(l) = (l + |l|)/2 + log(1 + exp(-|l|))).
 * The logs are taken of products of factors in [1, 2]: each of the 16 lanes multiplies at most
 * 64 of them per block of 1024 logits (at most 2^64, far inside float32), so there is one log
 * per 64 pixels. Compiled with -ffast-math (vectorised expf from glibc's libmvec) but linked
 * without it, so loading the library does not switch the process to flush-to-zero.
 * Called through ctypes by vaelab.native; see vaelab/metrics/fused.py.
 */
#include <math.h>
#include <stdint.h>

#define LANES 16
#define BLOCK 1024

void vaelab_bernoulli_rows(const float *restrict logits, int64_t rows, int64_t d,
                           float *restrict out) {
  float t[BLOCK];
  for (int64_t r = 0; r < rows; ++r) {
    const float *p = logits + r * d;
    float abs_sum = 0.f, log_sum = 0.f;
    for (int64_t start = 0; start < d; start += BLOCK) {
      const int64_t n = d - start < BLOCK ? d - start : BLOCK;
      const int64_t padded = (n + LANES - 1) / LANES * LANES;
      const float *q = p + start;
      for (int64_t i = 0; i < n; ++i) {
        const float a = fabsf(q[i]);
        abs_sum += a;
        t[i] = 1.f + expf(-a);
      }
      for (int64_t i = n; i < padded; ++i) t[i] = 1.f;
      float prod[LANES];
      for (int j = 0; j < LANES; ++j) prod[j] = 1.f;
      for (int64_t b = 0; b < padded; b += LANES)
        for (int j = 0; j < LANES; ++j) prod[j] *= t[b + j];
      for (int j = 0; j < LANES; ++j) log_sum += logf(prod[j]);
    }
    out[r] = -0.5f * abs_sum - log_sum;
  }
}
