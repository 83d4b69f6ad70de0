/* cu_common.cuh — device helpers shared by the kernels: bf16 storage conversions and warp/block
 * reductions.  Kernels store bf16 as twn_bf16 (uint16_t) so the C side never needs cuda_bf16.h. */
#ifndef TWN_ENGINE_CUDA_COMMON_CUH
#define TWN_ENGINE_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "engine/cuda/kernels.h"

#define TWN_FULL_MASK 0xffffffffu

static __device__ __forceinline__ float twn_bf2f(twn_bf16 v) {
    return __bfloat162float(__ushort_as_bfloat16(v));
}
static __device__ __forceinline__ twn_bf16 twn_f2bf(float f) {
    return __bfloat16_as_ushort(__float2bfloat16(f)); /* round to nearest even */
}

static __device__ __forceinline__ float twn_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(TWN_FULL_MASK, v, o);
    return v;
}
static __device__ __forceinline__ float twn_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(TWN_FULL_MASK, v, o));
    return v;
}

/* Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
 * Uses 33 floats of shared memory; callers may call it repeatedly. */
static __device__ __forceinline__ float twn_block_sum(float v) {
    __shared__ float part[33];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = twn_warp_sum(v);
    __syncthreads(); /* a previous call's readers are done with part[] */
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float t = lane < nw ? part[lane] : 0.f;
        t = twn_warp_sum(t);
        if (lane == 0) part[32] = t;
    }
    __syncthreads();
    return part[32];
}

static inline unsigned twn_blocks(int64_t n, int per) {
    return (unsigned)((n + per - 1) / per);
}

#endif
