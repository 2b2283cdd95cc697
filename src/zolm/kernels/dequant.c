/* Dequantization of low-bit weights, one layer at a time: out[r, c] = value(code[r, c]) * scale[r, c / group].
 *
 * 8-bit codes (INT8 and both FP8 formats) go through a 256-entry table of their real values, built by the caller
 * from torch's own conversions; INT4 codes are packed two per byte (low nibble = even column). One float multiply
 * per element, so the result equals torch's codes.float() * scale bit for bit.
 */
#include <stdint.h>

void zolm_dequant_lut8(const uint8_t *codes, const float *lut, const float *scale, float *out, int64_t rows,
                       int64_t cols, int64_t group, int threads) {
    int64_t ngroups = cols / group;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *q = codes + r * cols;
        const float *s = scale + r * ngroups;
        float *o = out + r * cols;
        for (int64_t c = 0; c < cols; c++) o[c] = lut[q[c]] * s[c / group];
    }
}

void zolm_dequant_int4(const uint8_t *packed, const float *scale, float *out, int64_t rows, int64_t cols,
                       int64_t group, int threads) {
    int64_t ngroups = cols / group, half = cols / 2;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *q = packed + r * half;
        const float *s = scale + r * ngroups;
        float *o = out + r * cols;
        for (int64_t b = 0; b < half; b++) {
            int32_t lo = (int32_t)(q[b] & 15u), hi = (int32_t)(q[b] >> 4);
            o[2 * b] = (float)((lo ^ 8) - 8) * s[(2 * b) / group];
            o[2 * b + 1] = (float)((hi ^ 8) - 8) * s[(2 * b + 1) / group];
        }
    }
}
