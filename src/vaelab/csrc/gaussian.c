/* The diagonal Gaussian posterior of the fused bf16 MLP step (vaelab/fused_elbo.py), one sample
 * per image: what about twenty small tensor operations do, in one pass over B x Z numbers.
 *
 * Forward, from the encoder's head (B x 2Z bfloat16: mu, then log sigma^2) and noise eps
 * (B x Z float32):
 *
 *     mu, sigma = exp(logvar / 2)                       (float32, kept for the backward pass)
 *     z = mu + sigma eps                                (rounded to bfloat16 for the decoder)
 *     kl_dim = (mu^2 + sigma^2 - 1 - logvar) / 2,  kl = sum over Z of kl_dim
 *
 * Backward, from dz (B x Z bfloat16: d loss / d z out of the decoder's first product) and
 * sb = beta * (d loss / d loss_mean) / B:
 *
 *     d mu = dz + sb mu,   d logvar = dz eps sigma / 2 + sb (sigma^2 - 1) / 2
 *
 * written side by side as the head's gradient (B x 2Z bfloat16, rounded to nearest even).
 * The *_f32 variants do the same for the float32 step (head, z, dz and the head's gradient
 * float32). Compiled with -ffast-math (vectorised expf from glibc's libmvec), linked without it.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* Elements of bfloat16 (bf16 = 1) or float32 arrays; inlined with a constant flag, so each
 * exported function below is compiled for its own dtype. */
static inline __attribute__((always_inline)) float load(const void *p, int64_t i, int bf16) {
  return bf16 ? widen(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline __attribute__((always_inline)) void store(void *p, int64_t i, float v, int bf16) {
  if (bf16)
    ((uint16_t *)p)[i] = narrow(v);
  else
    ((float *)p)[i] = v;
}

static inline __attribute__((always_inline)) void sample(const void *head, const float *restrict eps,
                                                         int64_t b, int64_t z, float *restrict mu,
                                                         float *restrict sigma, float *restrict kl_dim,
                                                         float *restrict kl, void *zs, int bf16) {
  for (int64_t r = 0; r < b; ++r) {
    const int64_t at = r * z, hm = r * 2 * z, hv = hm + z;
    float sum = 0.f;
    for (int64_t i = 0; i < z; ++i) {
      const float m = load(head, hm + i, bf16), lv = load(head, hv + i, bf16);
      const float s = expf(0.5f * lv);
      const float k = 0.5f * (m * m + s * s - 1.f - lv);
      mu[at + i] = m;
      sigma[at + i] = s;
      kl_dim[at + i] = k;
      store(zs, at + i, m + s * eps[at + i], bf16);
      sum += k;
    }
    kl[r] = sum;
  }
}

static inline __attribute__((always_inline)) void sample_grad(const void *dz, const float *restrict eps,
                                                              const float *restrict mu,
                                                              const float *restrict sigma, int64_t b,
                                                              int64_t z, float sb, void *dhead, int bf16) {
  for (int64_t r = 0; r < b; ++r) {
    const int64_t at = r * z, dm = r * 2 * z, dv = dm + z;
    for (int64_t i = 0; i < z; ++i) {
      const float g = load(dz, at + i, bf16), s = sigma[at + i];
      store(dhead, dm + i, g + sb * mu[at + i], bf16);
      store(dhead, dv + i, 0.5f * g * eps[at + i] * s + 0.5f * sb * (s * s - 1.f), bf16);
    }
  }
}

void vaelab_gaussian_sample(const uint16_t *head, const float *eps, int64_t b, int64_t z, float *mu,
                            float *sigma, float *kl_dim, float *kl, uint16_t *zs) {
  sample(head, eps, b, z, mu, sigma, kl_dim, kl, zs, 1);
}

void vaelab_gaussian_sample_f32(const float *head, const float *eps, int64_t b, int64_t z, float *mu,
                                float *sigma, float *kl_dim, float *kl, float *zs) {
  sample(head, eps, b, z, mu, sigma, kl_dim, kl, zs, 0);
}

void vaelab_gaussian_sample_grad(const uint16_t *dz, const float *eps, const float *mu,
                                 const float *sigma, int64_t b, int64_t z, float sb, uint16_t *dhead) {
  sample_grad(dz, eps, mu, sigma, b, z, sb, dhead, 1);
}

void vaelab_gaussian_sample_grad_f32(const float *dz, const float *eps, const float *mu,
                                     const float *sigma, int64_t b, int64_t z, float sb, float *dhead) {
  sample_grad(dz, eps, mu, sigma, b, z, sb, dhead, 0);
}
