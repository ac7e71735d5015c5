/* 16 float32 lanes as one value, for the kernels of this folder: GCC and clang's vector
 * extension (one AVX-512 register, or two or four narrower ones), loaded from any float
 * address. */
#ifndef VAELAB_VEC_H
#define VAELAB_VEC_H
#include <stdint.h>

#define V 16
typedef float vec __attribute__((vector_size(4 * V), aligned(4), may_alias));
typedef uint32_t uvec __attribute__((vector_size(4 * V)));
typedef int32_t ivec __attribute__((vector_size(4 * V)));
typedef uint16_t hvec __attribute__((vector_size(2 * V), aligned(2), may_alias));

/* the V floats at p */
#define LOADV(p) (*(const vec *)(p))

/* the sum of the lanes */
static inline float lanes_sum(vec v) {
  float s = 0.0f;
  for (int j = 0; j < V; j++) s += v[j];
  return s;
}
#endif
