/* rope.c — rotary embedding application (apply_rotary_pos_emb / rotate_half). */
#include "engine/cpu/ops.h"

void twn_cpu_rope(float *x, int rows, int heads, int D, int row_stride, const float *cos,
                  const float *sin) {
    int half = D / 2;
#pragma omp parallel for schedule(static) if (rows >= 64)
    for (int r = 0; r < rows; r++) {
        const float *c = cos + (int64_t)r * half, *s = sin + (int64_t)r * half;
        for (int h = 0; h < heads; h++) {
            float *v = x + (int64_t)r * row_stride + (int64_t)h * D;
            for (int j = 0; j < half; j++) {
                float a = v[j], b = v[j + half];
                v[j] = a * c[j] - b * s[j];
                v[j + half] = b * c[j] + a * s[j];
            }
        }
    }
}
