/* layernorm.c — nn.LayerNorm over the last dim, with weight and bias (the vision tower's norms).
 *
 * torch's CPU kernel reduces in fp32 with a cascade sum; here mean and variance are summed in
 * double, which is at least as accurate and keeps the result independent of the vector width.
 * The variance is the biased one (divide by dim), as nn.LayerNorm uses. */
#include <math.h>

#include "engine/cpu/ops.h"

void twn_cpu_layernorm(float *out, const float *x, const float *w, const float *b, int rows,
                       int dim, int stride, float eps) {
#pragma omp parallel for schedule(static) if (rows >= 64)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (int64_t)r * stride;
        float *o = out + (int64_t)r * stride;
        double s = 0;
#pragma omp simd reduction(+ : s)
        for (int i = 0; i < dim; i++) s += xr[i];
        const double mean = s / dim;
        double ss = 0;
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < dim; i++) {
            double d = xr[i] - mean;
            ss += d * d;
        }
        const float m = (float)mean, inv = (float)(1.0 / sqrt(ss / dim + (double)eps));
#pragma omp simd
        for (int i = 0; i < dim; i++) o[i] = (xr[i] - m) * inv * w[i] + b[i];
    }
}
