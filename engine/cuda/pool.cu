/* pool.cu — query_mean pooling and L2 normalization of the embedding rows.
 *
 * One block per pooled vector: each thread owns hidden columns and sums the rows in row order,
 * then divides by the count — the same fp32 operations in the same order as the scheduler's
 * pool() (engine/twn.c), so the mean is bit-identical to the CPU's given the same hidden rows.
 * The norm is accumulated in double like twn_cpu_l2_normalize. */
#include "engine/cuda/cu_common.cuh"

__global__ void twn_pool_k(const float *h, int H, const int32_t *r0, const int32_t *cnt,
                           int normalize, float *out) {
    __shared__ double part[32];
    __shared__ float norm;
    const int j = blockIdx.x, n = cnt[j];
    const float *base = h + (size_t)r0[j] * H;
    float *o = out + (size_t)j * H;
    double ss = 0;
    for (int c = threadIdx.x; c < H; c += blockDim.x) {
        float acc = 0.f;
        for (int r = 0; r < n; r++) acc += base[(size_t)r * H + c];
        acc /= (float)n;
        o[c] = acc;
        ss += (double)acc * acc;
    }
    if (!normalize) return;
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(TWN_FULL_MASK, ss, off);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++) t += part[w];
        float nr = (float)sqrt(t);
        norm = nr < 1e-12f ? 1e-12f : nr;
    }
    __syncthreads();
    for (int c = threadIdx.x; c < H; c += blockDim.x) o[c] /= norm;
}

extern "C" void twn_cu_pool(cudaStream_t s, const float *h, int H, const int32_t *r0,
                            const int32_t *cnt, int n, int normalize, float *out) {
    if (n <= 0) return;
    twn_pool_k<<<(unsigned)n, 128, 0, s>>>(h, H, r0, cnt, normalize, out);
}
