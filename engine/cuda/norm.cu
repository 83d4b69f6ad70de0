/* norm.cu — Qwen3VLTextRMSNorm for the decoder's input, post-attention and final norms.
 *
 * One block per row; the sum of squares is a block reduction in fp32 and the product keeps the
 * CPU reference's order, w * (x * inv) (engine/cpu/norm.c).  The bf16 variant writes straight
 * into the next GEMM's input, so a norm never costs a separate conversion pass. */
#include "engine/cuda/cu_common.cuh"

template <typename T> static __device__ __forceinline__ T twn_out(float v);
template <> __device__ __forceinline__ float twn_out<float>(float v) {
    return v;
}
template <> __device__ __forceinline__ twn_bf16 twn_out<twn_bf16>(float v) {
    return twn_f2bf(v);
}

template <typename T>
__global__ void twn_rmsnorm_k(T *out, int ldo, const float *x, int ldx, const float *w, int dim,
                              float eps) {
    const float *xr = x + (size_t)blockIdx.x * ldx;
    T *o = out + (size_t)blockIdx.x * ldo;
    float ss = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    ss = twn_block_sum(ss);
    float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = twn_out<T>(w[i] * (xr[i] * inv));
}

static int norm_threads(int dim) {
    return dim >= 1024 ? 256 : dim >= 256 ? 128 : 64;
}

extern "C" void twn_cu_rmsnorm_bf16(cudaStream_t s, twn_bf16 *out, int ldo, const float *x, int ldx,
                                    const float *w, int rows, int dim, float eps) {
    if (rows <= 0) return;
    twn_rmsnorm_k<twn_bf16><<<rows, norm_threads(dim), 0, s>>>(out, ldo, x, ldx, w, dim, eps);
}

extern "C" void twn_cu_rmsnorm_f32(cudaStream_t s, float *out, int ldo, const float *x, int ldx,
                                   const float *w, int rows, int dim, float eps) {
    if (rows <= 0) return;
    twn_rmsnorm_k<float><<<rows, norm_threads(dim), 0, s>>>(out, ldo, x, ldx, w, dim, eps);
}
