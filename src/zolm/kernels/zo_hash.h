/* The counter-based hash behind every zolm draw (shared by zo_axpy.c and quzo.c; mirrored by zolm/zo/rng.py):
 *   h(j; k1, k2) = mix32(mix32(j ^ k1) ^ k2)   two rounds of a 32-bit integer hash of the flat position j
 *   ih4(h)       = b0 + b1 + b2 + b3 - 510     the four bytes of h: Irwin-Hall, integer in [-510, 510], var 21845
 */
#ifndef ZOLM_ZO_HASH_H
#define ZOLM_ZO_HASH_H
#include <stdint.h>

static inline uint32_t zo_mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x2C1B3C6Du;
    x ^= x >> 16;
    return x;
}

static inline uint32_t zo_hash(uint32_t j, uint32_t k1, uint32_t k2) {
    return zo_mix32(zo_mix32(j ^ k1) ^ k2);
}

static inline int32_t zo_ih4(uint32_t h) {
    return (int32_t)(h & 255u) + (int32_t)((h >> 8) & 255u) + (int32_t)((h >> 16) & 255u) + (int32_t)(h >> 24) - 510;
}

#endif
