/* bfloat16 <-> float32 for the kernels of this folder (vaelab.native compiles each .c file with
 * this folder's headers beside it). A bfloat16 is the top 16 bits of a float32. */
#ifndef VAELAB_BF16_H
#define VAELAB_BF16_H
#include <stdint.h>
#include <string.h>

static inline float widen(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* float32 -> bfloat16, rounding to nearest even; NaN stays NaN (quiet). */
static inline uint16_t narrow(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)((((u & 0x7fffffffu) > 0x7f800000u) ? (u | 0x400000u) : rounded) >> 16);
}
#endif
