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
#include <string.h>

#include "bf16.h"

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

/* One block of n <= BLOCK logits q with targets xq: gradients into gq, factors into t; returns
 * the block's sum_i x_i l_i - max(l_i, 0). */
static inline float block_grad(const float *restrict q, const float *restrict xq,
                               float *restrict gq, float *restrict t, int64_t n) {
  float lin = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float l = q[i];
    const float e = expf(-fabsf(l));
    const float one_e = 1.f + e;
    lin += xq[i] * l - (l > 0.f ? l : 0.f);
    t[i] = one_e;
    gq[i] = (l >= 0.f ? 1.f : e) / one_e - xq[i];
  }
  return lin;
}

void vaelab_bernoulli_rows_grad(const float *restrict logits, const float *restrict x,
                                int64_t rows, int64_t d, float *restrict log_p,
                                float *restrict grad) {
  float t[BLOCK];
  for (int64_t r = 0; r < rows; ++r) {
    float lin = 0.f, log_sum = 0.f;
    for (int64_t start = 0; start < d; start += BLOCK) {
      const int64_t n = d - start < BLOCK ? d - start : BLOCK;
      const int64_t at = r * d + start;
      lin += block_grad(logits + at, x + at, grad + at, t, n);
      log_sum += sum_log(t, n);
    }
    log_p[r] = lin - log_sum;
  }
}

/* The same from bfloat16 logits (the high halves of float32s), for mixed-precision training:
 * log_p in float32, and grad written as bfloat16 of scale * (sigmoid(l) - x) (rounded to
 * nearest even), ready for the bf16 backward products (vaelab/fused_elbo.py). */
void vaelab_bernoulli_rows_grad_bf16(const uint16_t *restrict logits, const float *restrict x,
                                     int64_t rows, int64_t d, float *restrict log_p,
                                     uint16_t *restrict grad, float scale) {
  float t[BLOCK], q[BLOCK], g[BLOCK];
  for (int64_t r = 0; r < rows; ++r) {
    float lin = 0.f, log_sum = 0.f;
    for (int64_t start = 0; start < d; start += BLOCK) {
      const int64_t n = d - start < BLOCK ? d - start : BLOCK;
      const int64_t at = r * d + start;
      for (int64_t i = 0; i < n; ++i) q[i] = widen(logits[at + i]);
      lin += block_grad(q, x + at, g, t, n);
      log_sum += sum_log(t, n);
      for (int64_t i = 0; i < n; ++i) grad[at + i] = narrow(scale * g[i]);
    }
    log_p[r] = lin - log_sum;
  }
}
