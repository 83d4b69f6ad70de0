/* gemm.c — the projections through cuBLAS: bf16 weights and inputs, fp32 accumulate and output.
 *
 * Row-major Y[M,N] = X[M,K] W[N,K]^T is, in cuBLAS's column-major terms, Y^T (N x M, ld ldy) =
 * W^T-as-stored (op T on the K x N column-major view of W, ld K) times X^T (K x M, ld ldx): one
 * "TN" GemmEx.  The fp32 output lets o_proj and down_proj accumulate straight into the fp32
 * residual stream with beta = 1 (the residual add costs nothing), and lets q/k/v reach the
 * norm + RoPE kernel without a bf16 rounding the reference does not have in its fp32 engine.
 * The handle gets a fixed workspace so that GEMMs can be captured into CUDA graphs. */
#include "engine/cuda/cuda_internal.h"

#define TWN_CU_BLAS_WORKSPACE (32u << 20)

int twn_cu_gemm(cublasHandle_t h, const twn_bf16 *X, int M, int K, int ldx, const twn_bf16 *W,
                int N, float *Y, int ldy, float beta, twn_err *err) {
    if (M <= 0 || N <= 0) return 0;
    const float one = 1.0f;
    cublasStatus_t rc =
        cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, W, CUDA_R_16BF, K, X, CUDA_R_16BF,
                     ldx, &beta, Y, CUDA_R_32F, ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (rc != CUBLAS_STATUS_SUCCESS)
        return twn_cu_err(err, "cublasGemmEx (M=%d N=%d K=%d): status %d (%s)", M, N, K, (int)rc,
                          cublasGetStatusString(rc));
    return 0;
}

int twn_cu_blas_setup(twn_cuda_ctx *c, twn_err *err) {
    if (twn_cu_blas_check(cublasCreate(&c->blas), err, "cublasCreate")) return -1;
    if (twn_cu_blas_check(cublasSetStream(c->blas, c->stream), err, "cublasSetStream")) return -1;
    c->blas_ws_bytes = TWN_CU_BLAS_WORKSPACE;
    if (twn_cu_check(cudaMalloc(&c->blas_ws, c->blas_ws_bytes), err, "cuBLAS workspace")) return -1;
    return twn_cu_blas_check(cublasSetWorkspace(c->blas, c->blas_ws, c->blas_ws_bytes), err,
                             "cublasSetWorkspace");
}
