/* swiglu.cu — Qwen3VLTextMLP's act_fn(gate) * up, reading the fused gate|up GEMM output.
 *
 * gate and up are one GEMM against the concatenated [2I, H] weight, so a row holds g then u;
 * the product is rounded to bf16 here because its only reader is the down projection. */
#include "engine/cuda/cu_common.cuh"

__global__ void twn_silu_mul_k(twn_bf16 *out, int ldo, const float *gu, int ldgu, int T, int I) {
    const int64_t n = (int64_t)T * I;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = e / I, i = e % I;
        const float g = gu[r * ldgu + i], u = gu[r * ldgu + I + i];
        out[r * ldo + i] = twn_f2bf(g / (1.0f + expf(-g)) * u);
    }
}

extern "C" void twn_cu_silu_mul(cudaStream_t s, twn_bf16 *out, int ldo, const float *gu, int ldgu,
                                int T, int I) {
    const int64_t n = (int64_t)T * I;
    if (n <= 0) return;
    unsigned blocks = twn_blocks(n, 256);
    if (blocks > 65535u * 8) blocks = 65535u * 8;
    twn_silu_mul_k<<<blocks, 256, 0, s>>>(out, ldo, gu, ldgu, T, I);
}
