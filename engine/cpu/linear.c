/* linear.c — the projection GEMM (see ops.h for why small M takes the gemv path). */
#include <cblas.h>

#include "engine/cpu/ops.h"

/* Below this many rows, one sgemv per row beats sgemm NT's packing cost. */
#define TWN_GEMV_MAX_ROWS 6

void twn_cpu_linear(const float *X, int M, int K, int ldx, const float *W, int N, float *Y, int ldy,
                    float alpha, float beta) {
    if (M <= 0) return;
    if (M <= TWN_GEMV_MAX_ROWS) {
        for (int i = 0; i < M; i++)
            cblas_sgemv(CblasRowMajor, CblasNoTrans, N, K, alpha, W, K, X + (size_t)i * ldx, 1,
                        beta, Y + (size_t)i * ldy, 1);
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, alpha, X, ldx, W, K, beta, Y,
                ldy);
}
