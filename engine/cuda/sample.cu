/* sample.cu — greedy token choice on the device: argmax over a logits row.
 *
 * A CoT decode step needs one integer per sequence, not the 150k-float row; reducing on the
 * device saves that copy every step.  Ties go to the lowest index (the CPU scheduler's strict
 * `>` scan keeps the first maximum) and NaN never wins a comparison.  Temperature / top-k /
 * top-p sampling still runs on the host from the logits row. */
#include "engine/cuda/cu_common.cuh"

#define ARGMAX_THREADS 256

static __device__ __forceinline__ void better(float &bv, int &bi, float v, int i) {
    if (v > bv || (v == bv && i < bi)) {
        bv = v;
        bi = i;
    }
}

__global__ void twn_argmax_k(const float *x, int V, int32_t *out) {
    __shared__ float sv[ARGMAX_THREADS / 32];
    __shared__ int si[ARGMAX_THREADS / 32];
    const float *row = x + (size_t)blockIdx.x * V;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < V; i += blockDim.x) better(bv, bi, row[i], i);
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(TWN_FULL_MASK, bv, o);
        int oi = __shfl_xor_sync(TWN_FULL_MASK, bi, o);
        better(bv, bi, ov, oi);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) better(bv, bi, sv[w], si[w]);
        out[blockIdx.x] = bi == 0x7fffffff ? 0 : bi;
    }
}

extern "C" void twn_cu_argmax(cudaStream_t s, const float *x, int rows, int V, int32_t *out) {
    if (rows <= 0) return;
    twn_argmax_k<<<(unsigned)rows, ARGMAX_THREADS, 0, s>>>(x, V, out);
}
