/* swiglu.c — SiLU(gate) * up (Qwen3VLTextMLP). */
#include <math.h>

#include "engine/cpu/ops.h"

void twn_cpu_silu_mul(float *g, const float *u, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= 65536)
    for (int64_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}
