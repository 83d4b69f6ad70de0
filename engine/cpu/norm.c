/* norm.c — RMSNorm and L2 normalization (see ops.h). */
#include <math.h>

#include "engine/cpu/ops.h"

void twn_cpu_rmsnorm(float *out, const float *x, const float *w, int rows, int dim, int stride,
                     float eps) {
#pragma omp parallel for schedule(static) if (rows >= 64)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (int64_t)r * stride;
        float *o = out + (int64_t)r * stride;
        float ss = 0.f;
        for (int i = 0; i < dim; i++) ss += xr[i] * xr[i];
        float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int i = 0; i < dim; i++) o[i] = w[i] * (xr[i] * inv);
    }
}

void twn_cpu_l2_normalize(float *x, int n, float eps) {
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float norm = (float)sqrt(ss);
    if (norm < eps) norm = eps;
    for (int i = 0; i < n; i++) x[i] /= norm;
}
