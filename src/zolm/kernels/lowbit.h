/* Row helpers shared by dequant.c and quzo.c: the real values of one row of low-bit codes, as float32.
 *
 * Each writes value(code[c]) for c in [0, cols) into o; the caller then multiplies every group of ``group``
 * consecutive columns by its scale (one float multiply per element, as torch's codes.float() * scale). Splitting
 * the unpacking from the scaling keeps both loops free of per-element divisions, so they vectorise for any group.
 */
#ifndef ZOLM_LOWBIT_H
#define ZOLM_LOWBIT_H
#include <stdint.h>
#include <string.h>

/* 1 when lut is INT8's table, lut[b] == (float)(int8_t)b bit for bit: its rows convert without a lookup. */
static inline int lowbit_lut_is_int8(const float *lut) {
    const uint32_t *bits = (const uint32_t *)lut;
    for (int b = 0; b < 256; b++) {
        float v = (float)(int8_t)(uint8_t)b;
        uint32_t vb;
        memcpy(&vb, &v, sizeof vb);
        if (bits[b] != vb) return 0;
    }
    return 1;
}

/* 8-bit codes (INT8, both FP8 formats) through the 256-entry table of their real values; int8 != 0: lut is
 * INT8's (lowbit_lut_is_int8), converted directly (the same values, and a loop that vectorises). */
static inline void lowbit_row_lut8(const uint8_t *q, const float *lut, int int8, float *o, int64_t cols) {
    if (int8) {
        const int8_t *qs = (const int8_t *)q;
        for (int64_t c = 0; c < cols; c++) o[c] = (float)qs[c];
    } else {
        for (int64_t c = 0; c < cols; c++) o[c] = lut[q[c]];
    }
}

/* INT4 codes packed two per byte (low nibble = even column), sign-extended from 4 bits; cols is even. */
static inline void lowbit_row_int4(const uint8_t *q, float *o, int64_t cols) {
    for (int64_t b = 0; b < cols / 2; b++) {
        int32_t lo = (int32_t)(q[b] & 15u), hi = (int32_t)(q[b] >> 4);
        o[2 * b] = (float)((lo ^ 8) - 8);
        o[2 * b + 1] = (float)((hi ^ 8) - 8);
    }
}

/* o[g * group + k] *= s[g]: the per-group scales of one row. */
static inline void lowbit_scale_row(float *o, const float *s, int64_t cols, int64_t group) {
    for (int64_t g = 0; g < cols / group; g++) {
        float sc = s[g];
        float *og = o + g * group;
        for (int64_t k = 0; k < group; k++) og[k] = og[k] * sc;
    }
}

/* keep[i] = bit (p0 + i) of the bit-packed mask (bit (p & 7) of byte p >> 3), i in [0, n): the mask as bytes,
 * so that masked loops select with a byte load instead of a per-element shift of a gathered byte. */
static inline void lowbit_keep(uint8_t *keep, const uint8_t *mask, int64_t p0, int64_t n) {
    int64_t i = 0;
    for (; i < n && ((p0 + i) & 7); i++) keep[i] = (mask[(p0 + i) >> 3] >> ((p0 + i) & 7)) & 1u;
    for (; i + 8 <= n; i += 8) {  /* 8 bits -> 8 bytes of 0/1, byte k = bit k (little endian) */
        uint64_t v = ((uint64_t)mask[(p0 + i) >> 3] * 0x0101010101010101ULL) & 0x8040201008040201ULL;
        v = ((v + 0x7F7F7F7F7F7F7F7FULL) >> 7) & 0x0101010101010101ULL;
        memcpy(keep + i, &v, 8);
    }
    for (; i < n; i++) keep[i] = (mask[(p0 + i) >> 3] >> ((p0 + i) & 7)) & 1u;
}

#endif
