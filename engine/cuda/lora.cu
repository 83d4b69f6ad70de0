/* lora.cu — segmented LoRA: every row of a ragged batch uses its own sequence's adapter.
 *
 * Unmerged LoRA (peft tuners/lora/layer.py) adds scale * (x A^T) B^T to a projection's output.
 * The step's rows belong to sequences with different adapters (gate passes with the embedding
 * adapter beside CoT decodes with the reasoning one), so both kernels look the adapter up per row
 * and one launch pair covers all of them, whatever the order of the rows.  Ranks are small (4 to
 * 64), so the shrink is a dot product per (row, rank) — a warp per pair, reading the bf16
 * activation row the GEMM also read — and the expand is a rank-long dot per output element,
 * accumulated into the fp32 GEMM output.  The LoRA weights stay fp32, as peft's autocast keeps
 * them (qwen3vl-spec §4.4). */
#include "engine/cuda/cu_common.cuh"

#define LORA_WARPS 4

__global__ void twn_lora_shrink_k(const twn_bf16 *X, int ldx, int K, const int32_t *row_adapter,
                                  twn_cu_lora_set set, float *tmp, int ldt) {
    const int r = blockIdx.x, a = row_adapter[r];
    if (a < 0 || a >= TWN_MAX_ADAPTERS || !set.A[a]) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, rank = set.rank[a];
    const twn_bf16 *x = X + (size_t)r * ldx;
    for (int j = warp; j < rank; j += LORA_WARPS) {
        const float *A = set.A[a] + (size_t)j * K;
        float acc = 0.f;
        for (int k = lane; k < K; k += 32) acc += twn_bf2f(x[k]) * A[k];
        acc = twn_warp_sum(acc);
        if (lane == 0) tmp[(size_t)r * ldt + j] = acc;
    }
}

__global__ void twn_lora_expand_k(float *Y, int ldy, int N, const int32_t *row_adapter,
                                  twn_cu_lora_set set, const float *tmp, int ldt) {
    const int r = blockIdx.x, a = row_adapter[r];
    if (a < 0 || a >= TWN_MAX_ADAPTERS || !set.A[a]) return;
    const int n = blockIdx.y * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const int rank = set.rank[a];
    const float *B = set.B[a] + (size_t)n * rank, *t = tmp + (size_t)r * ldt;
    float acc = 0.f;
    for (int j = 0; j < rank; j++) acc += t[j] * B[j];
    Y[(size_t)r * ldy + n] += set.scale[a] * acc;
}

extern "C" void twn_cu_lora(cudaStream_t s, const twn_bf16 *X, int ldx, int T, int K, float *Y,
                            int ldy, int N, const int32_t *row_adapter, twn_cu_lora_set set,
                            float *tmp, int ldt) {
    if (T <= 0 || N <= 0) return;
    twn_lora_shrink_k<<<(unsigned)T, LORA_WARPS * 32, 0, s>>>(X, ldx, K, row_adapter, set, tmp,
                                                              ldt);
    dim3 grid((unsigned)T, twn_blocks(N, 128)); /* rows on x: up to 2^31 - 1 of them */
    twn_lora_expand_k<<<grid, 128, 0, s>>>(Y, ldy, N, row_adapter, set, tmp, ldt);
}
