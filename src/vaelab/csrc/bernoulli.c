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

/* sum_i log t[i] for n <= BLOCK factors in [1, 2], as LANES logs of products of at most 64
 * factors each (at most 2^64, far inside float32). t must hold a whole number of lanes: the
 * padding is filled with ones here. */
static inline float sum_log(float *restrict t, int64_t n) {
  const int64_t padded = (n + LANES - 1) / LANES * LANES;
  for (int64_t i = n; i < padded; ++i) t[i] = 1.f;
  float prod[LANES];
  for (int j = 0; j < LANES; ++j) prod[j] = 1.f;
  for (int64_t b = 0; b < padded; b += LANES)
    for (int j = 0; j < LANES; ++j) prod[j] *= t[b + j];
  float out = 0.f;
  for (int j = 0; j < LANES; ++j) out += logf(prod[j]);
  return out;
}

void vaelab_bernoulli_rows(const float *restrict logits, int64_t rows, int64_t d,
                           float *restrict out) {
  float t[BLOCK];
  for (int64_t r = 0; r < rows; ++r) {
    const float *p = logits + r * d;
    float abs_sum = 0.f, log_sum = 0.f;
    for (int64_t start = 0; start < d; start += BLOCK) {
      const int64_t n = d - start < BLOCK ? d - start : BLOCK;
      const float *q = p + start;
      for (int64_t i = 0; i < n; ++i) {
        const float a = fabsf(q[i]);
        abs_sum += a;
        t[i] = 1.f + expf(-a);
      }
      log_sum += sum_log(t, n);
    }
    out[r] = -0.5f * abs_sum - log_sum;
  }
}

/* For training: per row, the log-likelihood and its gradient with respect to the logits,
 *
 *     log_p[r] = sum_i x_i l_i - softplus(l_i),     grad[r, i] = sigmoid(l_i) - x_i
 *
 * (grad is d(-log p)/dl), in one pass. With e = exp(-|l|): softplus(l) = max(l, 0) + log(1 + e)
 * and sigmoid(l) = (l >= 0 ? 1 : e) / (1 + e); the logs of (1 + e) are again taken of products
 * of at most 64 factors per lane. x has d values per row (grey levels in [0, 1] allowed).
 */
void vaelab_bernoulli_rows_grad(const float *restrict logits, const float *restrict x,
                                int64_t rows, int64_t d, float *restrict log_p,
                                float *restrict grad) {
  float t[BLOCK];
  for (int64_t r = 0; r < rows; ++r) {
    const float *p = logits + r * d;
    const float *xr = x + r * d;
    float *gr = grad + r * d;
    float lin = 0.f, log_sum = 0.f;
    for (int64_t start = 0; start < d; start += BLOCK) {
      const int64_t n = d - start < BLOCK ? d - start : BLOCK;
      const float *q = p + start, *xq = xr + start;
      float *gq = gr + start;
      for (int64_t i = 0; i < n; ++i) {
        const float l = q[i];
        const float e = expf(-fabsf(l));
        const float one_e = 1.f + e;
        lin += xq[i] * l - (l > 0.f ? l : 0.f);
        t[i] = one_e;
        gq[i] = (l >= 0.f ? 1.f : e) / one_e - xq[i];
      }
      log_sum += sum_log(t, n);
    }
    log_p[r] = lin - log_sum;
  }
}
