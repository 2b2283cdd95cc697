/* zolm zeroth-order perturbation kernel: p[i] += a * s(key, start + i) where mask bit i is set, in place.
 *
 * s(key, j) is an integer-valued draw that is a pure function of the 64-bit key (derived from the step
 * seed and the parameter's index) and the element's flat position j:
 *   h = mix32(mix32(j ^ k1) ^ k2)                         (two rounds of a 32-bit integer hash)
 *   IH4:        s = b0 + b1 + b2 + b3 - 510               (the four bytes of h; Irwin-Hall, var 21845)
 *   RADEMACHER: s = 1 - 2 * (h >> 31)                     (+1 or -1)
 * The caller rounds a to at most 14 significant bits, so a * s is exact in float32 (|s| < 2^9) and
 * p + a*s rounds once: the result is bit-identical to zolm's torch implementation (zolm/zo/rng.py),
 * with or without FMA contraction, on any thread count.
 * mask (optional) is bit-packed: bit (i & 7) of byte (i >> 3), little-endian bit order (numpy's
 * packbits(bitorder="little")), so a mask costs 1/32 of the float32 weights it covers.
 */
#include <stdint.h>

#include "zo_hash.h"

static inline int32_t draw(uint32_t j, uint32_t k1, uint32_t k2, int sampler) {
    uint32_t h = zo_hash(j, k1, k2);
    return sampler == 0 ? zo_ih4(h) : 1 - 2 * (int32_t)(h >> 31);
}

void zolm_axpy_f32(float *p, int64_t n, int64_t start, uint32_t k1, uint32_t k2, float a, int sampler,
                   const uint8_t *mask, int threads) {
    if (mask) {
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t i = 0; i < n; i++) {
            if ((mask[i >> 3] >> (i & 7)) & 1u) p[i] = p[i] + (float)draw((uint32_t)(start + i), k1, k2, sampler) * a;
        }
    } else {
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t i = 0; i < n; i++) {
            p[i] = p[i] + (float)draw((uint32_t)(start + i), k1, k2, sampler) * a;
        }
    }
}

/* The draws themselves, as float32 (for tests and for accumulating several queries into one buffer). */
void zolm_draw_f32(float *out, int64_t n, int64_t start, uint32_t k1, uint32_t k2, int sampler, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; i++) out[i] = (float)draw((uint32_t)(start + i), k1, k2, sampler);
}
