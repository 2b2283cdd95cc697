/* Fake quantization of float32 weights onto a fixed integer grid, one layer at a time (the forward of a
 * fake-quant base: QuZO's float masters, the straight-through estimator):
 *     out[r, c] = clamp(rint(w[r, c] / s[r, c / group]), qmin, qmax) * s[r, c / group]
 * One IEEE division, rounding half to even (rintf in the default rounding mode, as torch.round), clamping and
 * one multiply per weight, so the result equals torch's expression bit for bit (built with -ffp-contract=off).
 * The clamp is written with comparisons so that a NaN stays NaN, as torch.clamp keeps it.
 */
#include <math.h>
#include <stdint.h>

void zolm_fake_quant_f32(const float *w, const float *scale, float *out, int64_t rows, int64_t cols,
                         int64_t group, float qmin, float qmax, int threads) {
    int64_t ngroups = cols / group;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t g = 0; g < ngroups; g++) {
            const float s = scale[r * ngroups + g];
            const float *src = w + r * cols + g * group;
            float *dst = out + r * cols + g * group;
            for (int64_t j = 0; j < group; j++) {
                float x = rintf(src[j] / s);
                x = x < qmin ? qmin : (x > qmax ? qmax : x);
                dst[j] = x * s;
            }
        }
    }
}
