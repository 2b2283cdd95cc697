/* zolm zeroth-order kernels for half-precision weights (bfloat16, float16) and the two-coefficient update.
 *
 * s_j is the integer draw of zo_axpy.c (zo_hash.h); a, a1, a2, c are float32 coefficients of at most 14
 * significant bits, so a * s_j is exact in float32 and every expression below rounds the same way on every
 * backend (C here, torch in zolm/zo/halfprec.py), with or without FMA contraction.
 *
 *   zolm_axpy2_f32      p = (p + a1 s) + a2 s                 restore and step as two exact coefficients
 *   zolm_perturb_half   dst = half(src + a s)                 src: float32 master (exact mode) or the half
 *                                                              weights themselves (lean mode's virtual copy)
 *   zolm_master_step    m = m mult + c s; dst = half(m)        exact mode's update, the write-back fused in
 *   zolm_sr_step_half   w = SR_half(float(w) mult + c s)       lean mode's update, stochastically rounded:
 *                       lo <= x <= hi the neighbouring half values of x, round up iff u < (x - lo) / (hi - lo),
 *                       u = (24 bits of an independent hash stream) / 2^24, so E[w'] = x.
 * half = round to nearest even (torch's conversion, NaN -> canonical NaN). dtype 0: bfloat16, 1: float16.
 * mask (optional) is bit-packed like zo_axpy.c's; where its bit is clear nothing moves (dst = half(src)).
 */
#include <stdint.h>
#include <string.h>

#include "zo_hash.h"

static inline float draw_s(uint32_t j, uint32_t k1, uint32_t k2, int sampler) {
    uint32_t h = zo_hash(j, k1, k2);
    return (float)(sampler == 0 ? zo_ih4(h) : 1 - 2 * (int32_t)(h >> 31));
}

#define KEEP(mask, i) (!(mask) || (((mask)[(i) >> 3] >> ((i) & 7)) & 1u))
/* The loop over i = 0..n-1 twice: without a mask (keep = 1, so the loop vectorises) and with one. */
#define DENSE_OR_MASKED(BODY)                                                              \
    if (!mask) {                                                                           \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                  \
        for (int64_t i = 0; i < n; i++) { const int keep = 1; BODY }                       \
    } else {                                                                               \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                  \
        for (int64_t i = 0; i < n; i++) { const int keep = (int)KEEP(mask, i); BODY }      \
    }
/* ... and once per dtype, so that the conversions are constants inside each loop (dt: 0 bf16, 1 fp16). */
#define BY_DTYPE(BODY)                                                                     \
    if (dtype == 0) { const int dt = 0; DENSE_OR_MASKED(BODY) }                            \
    else { const int dt = 1; DENSE_OR_MASKED(BODY) }

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* float32 -> bfloat16 bits, round to nearest even (c10::round_to_nearest_even). */
static inline uint16_t f32_to_bf16(float f) {  /* branch-free, so loops over it vectorise */
    uint32_t u = f2u(f);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((f != f) ? 0x7FC0u : r);
}

/* float32 -> float16 bits, round to nearest even, subnormals and overflow to inf handled. */
static inline uint16_t f32_to_f16(float f) {
    uint32_t u = f2u(f), sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u);          /* NaN */
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);         /* >= 65520: rounds to inf */
    if (a < 0x38800000u) {                                           /* below 2^-14: subnormal or zero */
        if (a < 0x33000000u) return (uint16_t)sign;                  /* < 2^-25: rounds to +-0 */
        uint32_t e = a >> 23, m = (a & 0x7FFFFFu) | 0x800000u;
        uint32_t shift = 126 - e;                                    /* value = m * 2^(e-150); unit 2^-24 */
        uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1u))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t h = ((a >> 13) - (112u << 10)), rem = a & 0x1FFFu;      /* rebias 127 -> 15 */
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}

static inline float bf16_to_f32(uint16_t h) { return u2f((uint32_t)h << 16); }

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 1023u;
    if (e == 31) return u2f(sign | 0x7F800000u | (m << 13));
    if (e == 0) {
        float v = (float)m * (1.0f / 16777216.0f);                  /* m * 2^-24, exact */
        return sign ? -v : v;
    }
    return u2f(sign | ((e + 112u) << 23) | (m << 13));
}

static inline float half_to_f32(uint16_t h, int dtype) { return dtype == 0 ? bf16_to_f32(h) : f16_to_f32(h); }
static inline uint16_t f32_to_half(float f, int dtype) { return dtype == 0 ? f32_to_bf16(f) : f32_to_f16(f); }

/* The half value one step towards +inf (up != 0) or -inf from the finite half h (sign-magnitude bits). */
static inline uint16_t half_step(uint16_t h, int up) {
    int neg = (h & 0x8000u) != 0;
    uint16_t mag = h & 0x7FFFu;
    if (mag == 0) return up ? 0x0001u : 0x8001u;
    return (up != neg) ? (uint16_t)(h + 1) : (uint16_t)(h - 1);
}

static inline uint16_t sr_half(float x, uint32_t r24, int dtype) {
    uint16_t near = f32_to_half(x, dtype);
    float nf = half_to_f32(near, dtype);
    if (nf == x || x != x || nf - nf != 0.0f) return near;         /* exact, NaN, or overflowed to inf */
    uint16_t other = half_step(near, x > nf);
    float of = half_to_f32(other, dtype);
    if (of - of != 0.0f) return near;                               /* the neighbour is inf: stay finite */
    float lo = nf < of ? nf : of, hi = nf < of ? of : nf;
    uint16_t blo = nf < of ? near : other, bhi = nf < of ? other : near;
    float p_up = (x - lo) / (hi - lo);
    return ((float)r24 * (1.0f / 16777216.0f) < p_up) ? bhi : blo;
}

/* Separate loops for dense and masked tensors: the dense one vectorises (the hot path of every fp32 step). */
void zolm_axpy2_f32(float *p, int64_t n, int64_t start, uint32_t k1, uint32_t k2, float a1, float a2,
                    int sampler, const uint8_t *mask, int threads) {
    if (!mask) {
        if (sampler == 0) {
            #pragma omp parallel for schedule(static) num_threads(threads)
            for (int64_t i = 0; i < n; i++) {
                float s = (float)zo_ih4(zo_hash((uint32_t)(start + i), k1, k2));
                float t = p[i] + s * a1;
                p[i] = t + s * a2;
            }
        } else {
            #pragma omp parallel for schedule(static) num_threads(threads)
            for (int64_t i = 0; i < n; i++) {
                float s = draw_s((uint32_t)(start + i), k1, k2, 1);
                float t = p[i] + s * a1;
                p[i] = t + s * a2;
            }
        }
        return;
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; i++) {
        if (!KEEP(mask, i)) continue;
        float s = draw_s((uint32_t)(start + i), k1, k2, sampler);
        float t = p[i] + s * a1;
        p[i] = t + s * a2;
    }
}

/* dst = half(src + a s); src_is_half: src holds half bits of the same dtype, else float32 values. */
void zolm_perturb_half(uint16_t *dst, const void *src, int src_is_half, int64_t n, int64_t start, uint32_t k1,
                       uint32_t k2, float a, int sampler, const uint8_t *mask, int dtype, int threads) {
    const uint16_t *sh = (const uint16_t *)src;
    const float *sf = (const float *)src;
    if (src_is_half) {
        BY_DTYPE({
            float x = half_to_f32(sh[i], dt);
            if (keep) x = x + draw_s((uint32_t)(start + i), k1, k2, sampler) * a;
            dst[i] = f32_to_half(x, dt);
        })
    } else {
        BY_DTYPE({
            float x = sf[i];
            if (keep) x = x + draw_s((uint32_t)(start + i), k1, k2, sampler) * a;
            dst[i] = f32_to_half(x, dt);
        })
    }
}

/* mult: decoupled weight decay (1 - lr wd) applied before the step, 1 for none (x * 1 is exact). The build
 * is ISO C99, so x * mult + c s is not contracted into an FMA: two roundings, as in torch. */
void zolm_master_step(float *m, uint16_t *dst, int64_t n, int64_t start, uint32_t k1, uint32_t k2, float c,
                      float mult, int sampler, const uint8_t *mask, int dtype, int threads) {
    if (dst) {
        BY_DTYPE({
            if (keep) {
                float x = m[i] * mult;
                m[i] = x + draw_s((uint32_t)(start + i), k1, k2, sampler) * c;
            }
            dst[i] = f32_to_half(m[i], dt);
        })
    } else {
        DENSE_OR_MASKED({
            if (keep) {
                float x = m[i] * mult;
                m[i] = x + draw_s((uint32_t)(start + i), k1, k2, sampler) * c;
            }
        })
    }
}

void zolm_sr_step_half(uint16_t *w, int64_t n, int64_t start, uint32_t k1, uint32_t k2, float c, float mult,
                       int sampler, uint32_t r1, uint32_t r2, const uint8_t *mask, int dtype, int threads) {
    DENSE_OR_MASKED({
        if (!keep) continue;
        uint32_t j = (uint32_t)(start + i);
        float x = half_to_f32(w[i], dtype) * mult;
        x = x + draw_s(j, k1, k2, sampler) * c;
        w[i] = sr_half(x, zo_hash(j, r1, r2) >> 8, dtype);
    })
}

/* In place on half weights: p = half((float(p) + a1 s) [+ a2 s]) (the torch fallback's expression; inplace mode). */
void zolm_axpy_half(uint16_t *p, int64_t n, int64_t start, uint32_t k1, uint32_t k2, float a1, float a2, int two,
                    int sampler, const uint8_t *mask, int dtype, int threads) {
    BY_DTYPE({
        if (!keep) continue;
        float s = draw_s((uint32_t)(start + i), k1, k2, sampler);
        float x = half_to_f32(p[i], dt) + s * a1;
        if (two) x = x + s * a2;
        p[i] = f32_to_half(x, dt);
    })
}
