/* One Adam step of a float32 parameter from a bfloat16 gradient, writing the parameter's
 * bfloat16 copy in the same pass (mixed-precision training, vaelab/fused_elbo.py).
 *
 * For i < n, with g = the float32 value of grad_bf16[i] (+ weight_decay * p: L2, as
 * torch.optim.Adam does it):
 *
 *     m = beta1 m + (1 - beta1) g,   v = beta2 v + (1 - beta2) g^2
 *     p -= step_size * m / (sqrt(v) / bias2_sqrt + eps)
 *     copy_bf16[i] = p rounded to the nearest bfloat16 (ties to even)
 *
 * with step_size = lr / (1 - beta1^t) and bias2_sqrt = sqrt(1 - beta2^t) computed by the
 * caller: torch.optim.Adam's update, in float32. A bfloat16 is the high half of a float32, so
 * widening is a shift and rounding adds 0x7fff plus the lowest kept bit before the shift (NaN
 * stays NaN: its quiet bit is set before rounding). One pass over memory: the parameter, both
 * moments, the 2-byte gradient and the 2-byte copy, instead of two conversions and an Adam
 * kernel each streaming the weights again. vaelab_adam_bf16_many does a list of tensors, the
 * elements split evenly over `threads` POSIX threads (the calling thread is one of them).
 * Called through ctypes by vaelab.native.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

static inline float widen(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint16_t narrow(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  const uint32_t quiet_nan = u | 0x400000u;
  return (uint16_t)((((u & 0x7fffffffu) > 0x7f800000u) ? quiet_nan : rounded) >> 16);
}

void vaelab_adam_bf16(float *restrict p, const uint16_t *restrict grad, float *restrict m,
                      float *restrict v, uint16_t *restrict copy, int64_t n, float step_size,
                      float beta1, float beta2, float eps, float weight_decay, float bias2_sqrt) {
  const float c1 = 1.f - beta1, c2 = 1.f - beta2, inv_b2 = 1.f / bias2_sqrt;
  for (int64_t i = 0; i < n; ++i) {
    float g = widen(grad[i]);
    float pi = p[i];
    if (weight_decay != 0.f) g += weight_decay * pi;
    const float mi = beta1 * m[i] + c1 * g;
    const float vi = beta2 * v[i] + c2 * g * g;
    pi -= step_size * mi / (sqrtf(vi) * inv_b2 + eps);
    m[i] = mi;
    v[i] = vi;
    p[i] = pi;
    copy[i] = narrow(pi);
  }
}

#define MAX_THREADS 16

typedef struct {
  int64_t count;
  float **p;
  const uint16_t **grad;
  float **m, **v;
  uint16_t **copy;
  const int64_t *n;
  float step_size, beta1, beta2, eps, weight_decay, bias2_sqrt;
  int64_t begin, end; /* this thread's share of the concatenated elements */
} job_t;

static void *run_job(void *arg) {
  const job_t *j = (const job_t *)arg;
  int64_t offset = 0;
  for (int64_t t = 0; t < j->count; offset += j->n[t], ++t) {
    const int64_t lo = j->begin > offset ? j->begin - offset : 0;
    const int64_t hi = j->end - offset < j->n[t] ? j->end - offset : j->n[t];
    if (hi <= lo) continue;
    vaelab_adam_bf16(j->p[t] + lo, j->grad[t] + lo, j->m[t] + lo, j->v[t] + lo, j->copy[t] + lo,
                     hi - lo, j->step_size, j->beta1, j->beta2, j->eps, j->weight_decay,
                     j->bias2_sqrt);
  }
  return 0;
}

/* vaelab_adam_bf16 over `count` tensors (pointer arrays, n[t] elements each). Returns 0, or -1
 * when a thread could not be started (its share then runs on the calling thread). */
int vaelab_adam_bf16_many(int64_t count, float **p, const uint16_t **grad, float **m, float **v,
                          uint16_t **copy, const int64_t *n, float step_size, float beta1,
                          float beta2, float eps, float weight_decay, float bias2_sqrt,
                          int64_t threads) {
  int64_t total = 0;
  for (int64_t t = 0; t < count; ++t) total += n[t];
  if (threads < 1) threads = 1;
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  if (total < 65536) threads = 1; /* not worth a thread */
  job_t jobs[MAX_THREADS];
  pthread_t ids[MAX_THREADS];
  int started[MAX_THREADS] = {0};
  int rc = 0;
  for (int64_t k = 0; k < threads; ++k) {
    jobs[k] = (job_t){count, p, grad, m, v, copy, n, step_size, beta1, beta2, eps, weight_decay,
                      bias2_sqrt, total * k / threads, total * (k + 1) / threads};
    if (k > 0) started[k] = pthread_create(&ids[k], 0, run_job, &jobs[k]) == 0;
  }
  run_job(&jobs[0]);
  for (int64_t k = 1; k < threads; ++k) {
    if (started[k]) {
      pthread_join(ids[k], 0);
    } else {
      run_job(&jobs[k]);
      rc = -1;
    }
  }
  return rc;
}
