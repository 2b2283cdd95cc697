/* QuZO kernels (Zhou et al. 2025): quantized perturbations and stochastically rounded low-bit updates.
 *
 * s_j in [-510, 510] is the integer draw of zo_axpy.c (Irwin-Hall of four hash bytes, std sqrt(21845)).
 * A b_p-bit perturbation level is SR(s_j * L / 510), L = 2^(b_p-1) - 1, computed in integers:
 *     level = floor((s * L * 2^24 + r * 510) / (510 * 2^24)),   r = 24 hash bits of an independent stream
 * so E[level * 510 / L] = s exactly and every backend gets the same integers.
 * mask (optional, NULL: dense) is bit-packed like zo_axpy.c's: positions whose bit is clear are neither
 * perturbed nor updated (the zeros of a pruned layer stay zero).
 */
#include <math.h>
#include <stdint.h>

#include "zo_hash.h"

static inline int32_t ih4(uint32_t j, uint32_t k1, uint32_t k2) {
    return zo_ih4(zo_hash(j, k1, k2));
}

static inline int64_t noise24(uint32_t j, uint32_t k1, uint32_t k2) {
    return (int64_t)(zo_hash(j, k1, k2) >> 8);
}

#define MASKED_OUT(mask, j) ((mask) && !(((mask)[(j) >> 3] >> ((j) & 7)) & 1u))

/* L > 0: the SR-quantized level of s (stream kr), floor((s L 2^24 + r 510) / (510 2^24)) with r the 24-bit
 * rounding noise; L == 0: s itself. Computed without a 64-bit division: with s L = 510 q + m (0 <= m < 510, a
 * division by a constant), the floor is q + [m 2^24 + 510 r >= 510 2^24] -- the same integer. */
static inline int32_t level(uint32_t j, uint32_t k1, uint32_t k2, uint32_t kr1, uint32_t kr2, int32_t L) {
    int32_t s = ih4(j, k1, k2);
    if (L <= 0) return s;
    int32_t sl = s * L;                       /* |s L| <= 510 * 127 */
    int32_t q = (sl >= 0 ? sl : sl - 509) / 510; /* floor(sl / 510) */
    int32_t m = sl - 510 * q;
    int64_t r = noise24(j, kr1, kr2);
    return q + (((int64_t)m << 24) + 510 * r >= (510LL << 24));
}

/* W[j] += a * level_j over a flat float32 tensor (the dequantized weight inside a forward pass). */
void zolm_quzo_perturb_f32(float *w, int64_t n, uint32_t k1, uint32_t k2, uint32_t kr1, uint32_t kr2,
                           float a, int32_t L, const uint8_t *mask, int threads) {
    if (!mask) {
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t j = 0; j < n; j++)
            w[j] = w[j] + (float)level((uint32_t)j, k1, k2, kr1, kr2, L) * a;
        return;
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t j = 0; j < n; j++) {
        if (MASKED_OUT(mask, j)) continue;
        w[j] = w[j] + (float)level((uint32_t)j, k1, k2, kr1, kr2, L) * a;
    }
}

static inline int32_t step_codes(int64_t j, int64_t cols, int64_t group, int64_t ngroups, const float *scale,
                                 uint32_t k1, uint32_t k2, uint32_t kr1, uint32_t kr2, uint32_t ku1,
                                 uint32_t ku2, float c, int32_t L, int rtn) {
    int64_t row = j / cols, col = j % cols;
    float sc = scale[row * ngroups + col / group];
    float delta = (c * (float)level((uint32_t)j, k1, k2, kr1, kr2, L)) / sc;
    float d = rtn ? nearbyintf(delta) : floorf(delta + (float)noise24((uint32_t)j, ku1, ku2) * (1.0f / 16777216.0f));
    if (d > 256.0f) d = 256.0f;
    if (d < -256.0f) d = -256.0f;
    return (int32_t)d;
}

/* codes[j] = clamp(codes[j] - R(c * level_j / scale), qmin, qmax): R = SR (stream ku) or round-to-nearest. */
void zolm_quzo_update_int8(int8_t *q, int64_t rows, int64_t cols, int64_t group, const float *scale,
                           uint32_t k1, uint32_t k2, uint32_t kr1, uint32_t kr2, uint32_t ku1, uint32_t ku2,
                           float c, int32_t L, int rtn, const uint8_t *mask, int32_t qmin, int32_t qmax,
                           int threads) {
    int64_t ngroups = cols / group, n = rows * cols;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t j = 0; j < n; j++) {
        if (MASKED_OUT(mask, j)) continue;
        int32_t v = (int32_t)q[j] - step_codes(j, cols, group, ngroups, scale, k1, k2, kr1, kr2, ku1, ku2, c, L, rtn);
        q[j] = (int8_t)(v < qmin ? qmin : (v > qmax ? qmax : v));
    }
}

/* The same on INT4 codes packed two per byte (low nibble = even column), clamped to [-8, 7]. */
void zolm_quzo_update_int4(uint8_t *q, int64_t rows, int64_t cols, int64_t group, const float *scale,
                           uint32_t k1, uint32_t k2, uint32_t kr1, uint32_t kr2, uint32_t ku1, uint32_t ku2,
                           float c, int32_t L, int rtn, const uint8_t *mask, int threads) {
    int64_t ngroups = cols / group, nbytes = rows * cols / 2;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < nbytes; b++) {
        uint8_t byte = q[b];
        int32_t lo = (int32_t)(byte & 15u), hi = (int32_t)(byte >> 4);
        lo = (lo ^ 8) - 8;
        hi = (hi ^ 8) - 8;
        if (!MASKED_OUT(mask, 2 * b))
            lo -= step_codes(2 * b, cols, group, ngroups, scale, k1, k2, kr1, kr2, ku1, ku2, c, L, rtn);
        if (!MASKED_OUT(mask, 2 * b + 1))
            hi -= step_codes(2 * b + 1, cols, group, ngroups, scale, k1, k2, kr1, kr2, ku1, ku2, c, L, rtn);
        lo = lo < -8 ? -8 : (lo > 7 ? 7 : lo);
        hi = hi < -8 ? -8 : (hi > 7 ? 7 : hi);
        q[b] = (uint8_t)((lo & 15) | ((hi & 15) << 4));
    }
}
