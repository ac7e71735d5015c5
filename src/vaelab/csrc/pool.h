/* Work shared by the threads of the process's OpenMP pool (the runtime torch itself uses), for
 * the kernels of this folder. vaelab.native hands each library libgomp's GOMP_parallel and
 * omp_get_thread_num through vaelab_set_pool when the process has them; without them (or with
 * one thread) run() calls the work in the calling thread. */
#ifndef VAELAB_POOL_H
#define VAELAB_POOL_H
#include <stdint.h>

typedef void (*region_fn)(void *);
typedef void (*gomp_parallel_fn)(region_fn, void *, unsigned, unsigned);
typedef int (*thread_num_fn)(void);
static gomp_parallel_fn gomp_parallel;
static thread_num_fn thread_num;

void vaelab_set_pool(void *parallel, void *num) {
  gomp_parallel = (gomp_parallel_fn)parallel;
  thread_num = (thread_num_fn)num;
}

/* fn(job) on `threads` threads; each finds its index with tid(). */
static inline void run(region_fn fn, void *job, int64_t threads) {
  if (threads > 1 && gomp_parallel && thread_num)
    gomp_parallel(fn, job, (unsigned)threads, 0);
  else
    fn(job);
}
static inline int tid(int64_t threads) {
  return (threads > 1 && gomp_parallel && thread_num) ? thread_num() : 0;
}

/* The share [*from, *to) of n items of thread t of nt. */
static inline void share(int64_t n, int64_t t, int64_t nt, int64_t *from, int64_t *to) {
  *from = n * t / nt;
  *to = n * (t + 1) / nt;
}
#endif
