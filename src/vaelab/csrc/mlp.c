/* The first layer of an MLP decoder with a ReLU, for importance sampling (vaelab/metrics/fused.py).
 *
 * For rows latents z (row stride zs) and a layer with K inputs and H outputs given as the
 * transposed weight wt (K x H, row-major) and bias (H):
 *
 *     h[r, :H] = max(0, bias + z[r] wt),   h[r, H] = 1        (h has row stride H + 1)
 *
 * and, when v is not NULL, dot[r] = h[r] . v[r / per] (v: one (H + 1)-vector per group of
 * `per` consecutive rows), which folds the next layer's x . logits term into a pass that
 * already holds h[r] in registers. Computed 64 outputs at a time in four 16-float vectors,
 * then 16 at a time, then one by one (GCC vector extensions: AVX-512 where -march=native has it, narrower vectors otherwise),
 * so a row's accumulators stay in registers while the K inputs stream past.
 */
#include <stdint.h>

typedef float v16 __attribute__((vector_size(64)));
/* The same vector at any float address (loads and stores need no 64-byte alignment). */
typedef float v16u __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t i16 __attribute__((vector_size(64)));

/* max(a, 0) lane by lane: keep the bits where a > 0 (the comparison gives all-ones lanes). */
static inline v16 relu(v16 a) {
  const v16 zero = {0};
  return (v16)((i16)a & (a > zero));
}
#define W 16
#define NB 4

void vaelab_linear_relu(const float *restrict z, int64_t zs, int64_t rows, const float *restrict wt,
                        const float *restrict bias, int64_t k_in, int64_t h_out,
                        float *restrict h, const float *restrict v, int64_t per,
                        float *restrict dot) {
  const int64_t hs = h_out + 1;
  const int64_t full = h_out / (W * NB) * (W * NB);
  for (int64_t r = 0; r < rows; ++r) {
    const float *zr = z + r * zs;
    float *hr = h + r * hs;
    const float *vr = v ? v + (r / per) * hs : 0;
    v16 d = {0};
    int64_t j = 0;
    for (; j < full; j += W * NB) {
      v16 a0, a1, a2, a3;
      a0 = *(const v16u *)(bias + j);
      a1 = *(const v16u *)(bias + j + W);
      a2 = *(const v16u *)(bias + j + 2 * W);
      a3 = *(const v16u *)(bias + j + 3 * W);
      for (int64_t k = 0; k < k_in; ++k) {
        const float zk = zr[k];
        const float *w = wt + k * h_out + j;
        v16 w0, w1, w2, w3;
        w0 = *(const v16u *)(w);
        w1 = *(const v16u *)(w + W);
        w2 = *(const v16u *)(w + 2 * W);
        w3 = *(const v16u *)(w + 3 * W);
        a0 += zk * w0;
        a1 += zk * w1;
        a2 += zk * w2;
        a3 += zk * w3;
      }
      a0 = relu(a0);
      a1 = relu(a1);
      a2 = relu(a2);
      a3 = relu(a3);
      *(v16u *)(hr + j) = a0;
      *(v16u *)(hr + j + W) = a1;
      *(v16u *)(hr + j + 2 * W) = a2;
      *(v16u *)(hr + j + 3 * W) = a3;
      if (vr) {
        v16 u0, u1, u2, u3;
        u0 = *(const v16u *)(vr + j);
        u1 = *(const v16u *)(vr + j + W);
        u2 = *(const v16u *)(vr + j + 2 * W);
        u3 = *(const v16u *)(vr + j + 3 * W);
        d += a0 * u0 + a1 * u1 + a2 * u2 + a3 * u3;
      }
    }
    for (; j + W <= h_out; j += W) { /* the rest, a vector at a time */
      v16 a = *(const v16u *)(bias + j);
      for (int64_t k = 0; k < k_in; ++k) a += zr[k] * *(const v16u *)(wt + k * h_out + j);
      a = relu(a);
      *(v16u *)(hr + j) = a;
      if (vr) d += a * *(const v16u *)(vr + j);
    }
    float tail = 0.f;
    for (; j < h_out; ++j) {
      float a = bias[j];
      for (int64_t k = 0; k < k_in; ++k) a += zr[k] * wt[k * h_out + j];
      a = a > 0.f ? a : 0.f;
      hr[j] = a;
      if (vr) tail += a * vr[j];
    }
    hr[h_out] = 1.f;
    if (vr) {
      float s = tail + vr[h_out];
      for (int i = 0; i < W; ++i) s += d[i];
      dot[r] = s;
    }
  }
}
