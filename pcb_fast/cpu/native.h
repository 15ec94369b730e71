/* Helpers shared by the C kernels of pcb_fast.cpu.native (compiled into one library). */
#ifndef PCB_FAST_NATIVE_H
#define PCB_FAST_NATIVE_H

#include <stdint.h>
#include <string.h>

/* The bit pattern of a float, and back (memcpy: no aliasing question, one move once compiled). */
static inline uint32_t bits_of(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float float_of(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* |x| as a bit pattern: non-negative floats order as their bit patterns, NaN (any payload) above
 * +inf, so an integer max of these is torch.amax of |x| (NaN wins) and it vectorizes. */
static inline uint32_t magnitude_bits(float x)
{
    return bits_of(x) & 0x7FFFFFFFu;
}

static inline uint32_t max_u32(uint32_t a, uint32_t b)
{
    return a > b ? a : b;
}

/* One round of DARE's counter hash (pcb_fast/core/rng.py, docs/design.md 5.4), products mod 2^32. */
static inline uint32_t mix32(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x21F0AAADu;
    x ^= x >> 15;
    x *= 0x735A2D97u;
    return x ^ (x >> 15);
}

#endif
