/* Dequantization of low-bit weights, one layer at a time: out[r, c] = value(code[r, c]) * scale[r, c / group].
 *
 * 8-bit codes (INT8 and both FP8 formats) go through a 256-entry table of their real values, built by the caller
 * from torch's own conversions; INT4 codes are packed two per byte (low nibble = even column). One float multiply
 * per element, so the result equals torch's codes.float() * scale bit for bit. Each row is unpacked into the
 * output, then scaled group by group (lowbit.h), so both loops vectorise.
 */
#include <stdint.h>

#include "lowbit.h"

void zolm_dequant_lut8(const uint8_t *codes, const float *lut, const float *scale, float *out, int64_t rows,
                       int64_t cols, int64_t group, int threads) {
    int64_t ngroups = cols / group;
    int int8 = lowbit_lut_is_int8(lut);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        lowbit_row_lut8(codes + r * cols, lut, int8, out + r * cols, cols);
        lowbit_scale_row(out + r * cols, scale + r * ngroups, cols, group);
    }
}

void zolm_dequant_int4(const uint8_t *packed, const float *scale, float *out, int64_t rows, int64_t cols,
                       int64_t group, int threads) {
    int64_t ngroups = cols / group;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        lowbit_row_int4(packed + r * (cols / 2), out + r * cols, cols);
        lowbit_scale_row(out + r * cols, scale + r * ngroups, cols, group);
    }
}
