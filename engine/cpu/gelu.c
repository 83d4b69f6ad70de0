/* gelu.c — the two GELUs of the vision tower, in place.
 *
 * gelu_pytorch_tanh (Qwen3VLVisionMLP's hidden_act):  0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715
 * x^3))). Since 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)), it is computed as x / (1 + exp(-2u)) with
 * the vectorizable exp of vexp.h: the same function, one exp instead of a tanh call per element,
 * and no cancellation in 1 + tanh(u) for large negative x.
 * nn.GELU() (the patch mergers): the exact erf form 0.5 x (1 + erf(x / sqrt 2)); libm's erff
 * per element, which is cheap there (the mergers see a quarter of the rows). */
#include <math.h>

#include "engine/cpu/ops.h"
#include "engine/cpu/vexp.h"

#define GELU_CHUNK 4096

void twn_cpu_gelu_tanh(float *x, int64_t n) {
    const float k = 0.7978845608028654f; /* sqrt(2 / pi) */
    int64_t nchunks = (n + GELU_CHUNK - 1) / GELU_CHUNK;
#pragma omp parallel for schedule(static) if (n >= 65536)
    for (int64_t c = 0; c < nchunks; c++) {
        float *p = x + c * GELU_CHUNK;
        int m = (int)(n - c * GELU_CHUNK < GELU_CHUNK ? n - c * GELU_CHUNK : GELU_CHUNK);
#pragma omp simd
        for (int i = 0; i < m; i++) {
            float v = p[i];
            float u = k * (v + 0.044715f * v * v * v);
            p[i] = v / (1.0f + twn_vexpf(-2.0f * u));
        }
    }
}

void twn_cpu_gelu_erf(float *x, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= 65536)
    for (int64_t i = 0; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
}
