/* QuZO kernels (Zhou et al. 2025): quantized perturbations and stochastically rounded low-bit updates.
 *
 * s_j in [-510, 510] is the integer draw of zo_axpy.c (Irwin-Hall of four hash bytes, std sqrt(21845)).
 * A b_p-bit perturbation level is SR(s_j * L / 510), L = 2^(b_p-1) - 1, computed in integers:
 *     level = floor((s * L * 2^24 + r * 510) / (510 * 2^24)),   r = 24 hash bits of an independent stream
 * so E[level * 510 / L] = s exactly and every backend gets the same integers.
 * mask (optional, NULL: dense) is bit-packed like zo_axpy.c's: positions whose bit is clear are neither
 * perturbed nor updated (the zeros of a pruned layer stay zero).
 * Layers are walked row by row, in chunks of at most CHUNK columns: the scales are applied group by group (or
 * spread over the chunk's columns) and the hashing runs as one vector loop per chunk, with no per-element
 * division by the row length or the group size; the mask is expanded to bytes per chunk (lowbit.h).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "lowbit.h"
#include "zo_hash.h"

#define CHUNK 2048 /* columns per chunk (even: INT4 chunks start on a byte) */

static inline int32_t ih4(uint32_t j, uint32_t k1, uint32_t k2) {
    return zo_ih4(zo_hash(j, k1, k2));
}

static inline int32_t noise24(uint32_t j, uint32_t k1, uint32_t k2) {
    return (int32_t)(zo_hash(j, k1, k2) >> 8);
}

/* L > 0: the SR-quantized level of s (stream kr), floor((s L 2^24 + r 510) / (510 2^24)) with r the 24-bit
 * rounding noise; L == 0: s itself. Computed without 64-bit arithmetic: with s L = 510 q + m (0 <= m < 510),
 * the floor is q + [m 2^24 + 510 r >= 510 2^24] = q + [255 r >= (510 - m) 2^23] (both sides halved; each
 * below 2^32 unsigned) -- the same integer. */
static inline int32_t level(uint32_t j, uint32_t k1, uint32_t k2, uint32_t kr1, uint32_t kr2, int32_t L) {
    int32_t s = ih4(j, k1, k2);
    int32_t sl = s * L;                       /* |s L| <= 510 * 127 */
    /* q = floor(sl / 510) in float: v = (sl + 65280.5) / 510 in [0, 256] is >= 0.5 / 510 from any integer and
     * its float error is below 256 * 2^-23, so truncating it is exact (and vectorises better than / 510) */
    int32_t q = (int32_t)(((float)(sl + 65280) + 0.5f) * (1.0f / 510.0f)) - 128;
    int32_t m = sl - 510 * q;
    uint32_t r = (uint32_t)noise24(j, kr1, kr2);
    int32_t lv = q + (int32_t)(255u * r >= ((uint32_t)(510 - m) << 23));
    int32_t quantized = -(int32_t)(L > 0);   /* a select by bits, not a branch: the loops stay vectorisable */
    return (lv & quantized) | (s & ~quantized);
}

/* keep ? p : t by its bits (a ternary on floats is not if-converted under -ftrapping-math: no vector loop). */
static inline float pick(uint8_t keep, float p, float t) {
    uint32_t pb, tb, m = 0u - (uint32_t)keep;
    memcpy(&pb, &p, sizeof pb);
    memcpy(&tb, &t, sizeof tb);
    pb = (pb & m) | (tb & ~m);
    memcpy(&p, &pb, sizeof p);
    return p;
}

/* w[i] = w[i] + a * level_{j0 + i} for i in [0, n), where keep[i] (keep NULL: everywhere). */
static inline void perturb_seg(float *w, const uint8_t *keep, int64_t n, uint32_t j0, uint32_t k1, uint32_t k2,
                               uint32_t kr1, uint32_t kr2, float a, int32_t L) {
    if (!keep) {
        for (int64_t i = 0; i < n; i++) w[i] = w[i] + (float)level(j0 + (uint32_t)i, k1, k2, kr1, kr2, L) * a;
        return;
    }
    for (int64_t i = 0; i < n; i++)
        w[i] = pick(keep[i], w[i] + (float)level(j0 + (uint32_t)i, k1, k2, kr1, kr2, L) * a, w[i]);
}

/* W[j] += a * level_j over a flat float32 tensor (the dequantized weight inside a forward pass). */
void zolm_quzo_perturb_f32(float *w, int64_t n, uint32_t k1, uint32_t k2, uint32_t kr1, uint32_t kr2,
                           float a, int32_t L, const uint8_t *mask, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
        int64_t m = n - c0 < CHUNK ? n - c0 : CHUNK;
        uint8_t keep[CHUNK];
        if (mask) lowbit_keep(keep, mask, c0, m);
        perturb_seg(w + c0, mask ? keep : NULL, m, (uint32_t)c0, k1, k2, kr1, kr2, a, L);
    }
}

/* Row r of the perturbed weight, already unpacked into o as code values: o[c] = o[c] * scale[c / group]
 * (rounded to float), then + a * level_{r cols + c} where the mask is set. The row stays in cache between the
 * two loops, and the perturbation runs over whole chunks, not group by group (a longer vector loop). */
static inline void perturb_row(float *o, const float *s, int64_t r, int64_t cols, int64_t group, uint32_t k1,
                               uint32_t k2, uint32_t kr1, uint32_t kr2, float a, int32_t L, const uint8_t *mask) {
    uint8_t keep[CHUNK];
    lowbit_scale_row(o, s, cols, group);
    for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {
        int64_t n = cols - c0 < CHUNK ? cols - c0 : CHUNK;
        if (mask) lowbit_keep(keep, mask, r * cols + c0, n);
        perturb_seg(o + c0, mask ? keep : NULL, n, (uint32_t)(r * cols + c0), k1, k2, kr1, kr2, a, L);
    }
}

/* out = value(code) * scale + a * level (masked positions: value(code) * scale), the perturbed dequantized
 * weight of a QuantLinear forward in one pass: the same floats as zolm_dequant_lut8 then zolm_quzo_perturb_f32. */
void zolm_quzo_dequant_perturb_lut8(const uint8_t *codes, const float *lut, const float *scale, float *out,
                                    int64_t rows, int64_t cols, int64_t group, uint32_t k1, uint32_t k2,
                                    uint32_t kr1, uint32_t kr2, float a, int32_t L, const uint8_t *mask,
                                    int threads) {
    int int8 = lowbit_lut_is_int8(lut);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        lowbit_row_lut8(codes + r * cols, lut, int8, out + r * cols, cols);
        perturb_row(out + r * cols, scale + r * (cols / group), r, cols, group, k1, k2, kr1, kr2, a, L, mask);
    }
}

/* The same from INT4 codes packed two per byte (zolm_dequant_int4 then zolm_quzo_perturb_f32). */
void zolm_quzo_dequant_perturb_int4(const uint8_t *packed, const float *scale, float *out, int64_t rows,
                                    int64_t cols, int64_t group, uint32_t k1, uint32_t k2, uint32_t kr1,
                                    uint32_t kr2, float a, int32_t L, const uint8_t *mask, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        lowbit_row_int4(packed + r * (cols / 2), out + r * cols, cols);
        perturb_row(out + r * cols, scale + r * (cols / group), r, cols, group, k1, k2, kr1, kr2, a, L, mask);
    }
}

/* R(c * level_j / sc) clamped to [-256, 256]: SR with stream ku (floor(x + u)) or round-to-nearest (rtn). */
static inline int32_t code_step(uint32_t j, float sc, uint32_t k1, uint32_t k2, uint32_t kr1, uint32_t kr2,
                                uint32_t ku1, uint32_t ku2, float c, int32_t L, int rtn) {
    float delta = (c * (float)level(j, k1, k2, kr1, kr2, L)) / sc;
    float x = delta + (float)noise24(j, ku1, ku2) * (1.0f / 16777216.0f);
    float t = nearbyintf(x);                  /* floorf(x) is t - [t > x]; written so that it vectorises */
    float d = rtn ? nearbyintf(delta) : (t > x ? t - 1.0f : t);
    if (d > 256.0f) d = 256.0f;
    if (d < -256.0f) d = -256.0f;
    return (int32_t)d;
}

/* d[c - c0] = code_step of column c of row r, c in [c0, c1): the scales are first spread over the columns
 * (sc[c - c0] = s[c / group], group by group), so the steps are one vector loop over the chunk. */
static inline void row_steps(int16_t *d, const float *s, int64_t r, int64_t cols, int64_t c0, int64_t c1,
                             int64_t group, uint32_t k1, uint32_t k2, uint32_t kr1, uint32_t kr2, uint32_t ku1,
                             uint32_t ku2, float c, int32_t L, int rtn) {
    float sc[CHUNK];
    for (int64_t x = c0; x < c1;) {
        int64_t e = (x / group + 1) * group;
        if (e > c1) e = c1;
        for (int64_t i = x; i < e; i++) sc[i - c0] = s[x / group];
        x = e;
    }
    uint32_t j0 = (uint32_t)(r * cols + c0);
    if (rtn) {
        for (int64_t i = 0; i < c1 - c0; i++)
            d[i] = (int16_t)code_step(j0 + (uint32_t)i, sc[i], k1, k2, kr1, kr2, ku1, ku2, c, L, 1);
    } else {
        for (int64_t i = 0; i < c1 - c0; i++)
            d[i] = (int16_t)code_step(j0 + (uint32_t)i, sc[i], k1, k2, kr1, kr2, ku1, ku2, c, L, 0);
    }
}

/* codes[j] = clamp(codes[j] - R(c * level_j / scale), qmin, qmax): R = SR (stream ku) or round-to-nearest. */
void zolm_quzo_update_int8(int8_t *q, int64_t rows, int64_t cols, int64_t group, const float *scale,
                           uint32_t k1, uint32_t k2, uint32_t kr1, uint32_t kr2, uint32_t ku1, uint32_t ku2,
                           float c, int32_t L, int rtn, const uint8_t *mask, int32_t qmin, int32_t qmax,
                           int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        int16_t d[CHUNK];
        uint8_t keep[CHUNK];
        for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {
            int64_t n = cols - c0 < CHUNK ? cols - c0 : CHUNK;
            int8_t *qr = q + r * cols + c0;
            row_steps(d, scale + r * (cols / group), r, cols, c0, c0 + n, group, k1, k2, kr1, kr2, ku1, ku2, c,
                      L, rtn);
            if (mask) lowbit_keep(keep, mask, r * cols + c0, n);
            for (int64_t i = 0; i < n; i++) {
                int32_t v = (int32_t)qr[i] - (int32_t)d[i];
                v = v < qmin ? qmin : (v > qmax ? qmax : v);
                qr[i] = (!mask || keep[i]) ? (int8_t)v : qr[i];
            }
        }
    }
}

/* The same on INT4 codes packed two per byte (low nibble = even column), clamped to [-8, 7]. */
void zolm_quzo_update_int4(uint8_t *q, int64_t rows, int64_t cols, int64_t group, const float *scale,
                           uint32_t k1, uint32_t k2, uint32_t kr1, uint32_t kr2, uint32_t ku1, uint32_t ku2,
                           float c, int32_t L, int rtn, const uint8_t *mask, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        int16_t d[CHUNK];
        uint8_t keep[CHUNK];
        for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {
            int64_t n = cols - c0 < CHUNK ? cols - c0 : CHUNK; /* even: cols and CHUNK are */
            uint8_t *qr = q + (r * cols + c0) / 2;
            row_steps(d, scale + r * (cols / group), r, cols, c0, c0 + n, group, k1, k2, kr1, kr2, ku1, ku2, c,
                      L, rtn);
            if (mask) {
                lowbit_keep(keep, mask, r * cols + c0, n);
                for (int64_t i = 0; i < n; i++) d[i] = keep[i] ? d[i] : 0; /* a zero step keeps the code */
            }
            for (int64_t b = 0; b < n / 2; b++) {
                int32_t lo = (int32_t)(qr[b] & 15u), hi = (int32_t)(qr[b] >> 4);
                lo = ((lo ^ 8) - 8) - d[2 * b];
                hi = ((hi ^ 8) - 8) - d[2 * b + 1];
                lo = lo < -8 ? -8 : (lo > 7 ? 7 : lo);
                hi = hi < -8 ? -8 : (hi > 7 ? 7 : hi);
                qr[b] = (uint8_t)((lo & 15) | ((hi & 15) << 4));
            }
        }
    }
}
