/* rope.cu — q/k RMSNorm per head, interleaved M-RoPE, and the KV cache write, in one pass.
 *
 * Qwen3-VL normalizes each q and k head over head_dim (q_norm / k_norm) before the rotary
 * embedding; both are per-head, per-row operations over the same D values, so one warp does a
 * head end to end: load, sum of squares, scale by the norm weight, rotate (rotate_half pairs j
 * and j + D/2 through shared memory), store.  q is rotated in place (fp32, the attention kernel
 * reads it); k and v are stored to their cache slot as bf16, which is the only copy of them the
 * step keeps.  Angles mirror engine/lm.c: angle_j = (float)pos[stream_j] * inv_freq_j, sin/cos
 * in full precision (positions reach 10^5, so fast intrinsics would lose the phase). */
#include "engine/cuda/cu_common.cuh"

#define ROPE_WARPS 4
#define ROPE_MAXD  256

__global__ void twn_qk_norm_rope_k(float *qkv, int ldqkv, int nh, int nkv, int D, const float *q_w,
                                   const float *k_w, float eps, const int32_t *pos, int ldpos,
                                   const float *inv_freq, const uint8_t *stream,
                                   const int32_t *slot, twn_bf16 *kc, twn_bf16 *vc) {
    __shared__ float buf[ROPE_WARPS][ROPE_MAXD];
    const int r = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int head = blockIdx.y * ROPE_WARPS + warp;
    if (head >= nh + 2 * nkv) return; /* whole warp leaves together */
    float *row = qkv + (size_t)r * ldqkv;
    const int kd = nkv * D, half = D / 2;
    const size_t cache = (size_t)slot[r] * kd;
    if (head >= nh + nkv) { /* v: no norm, no rotation */
        const int h = head - nh - nkv;
        for (int j = lane; j < D; j += 32)
            vc[cache + h * D + j] = twn_f2bf(row[nh * D + kd + h * D + j]);
        return;
    }
    const bool is_q = head < nh;
    float *x = is_q ? row + head * D : row + nh * D + (head - nh) * D;
    const float *w = is_q ? q_w : k_w;
    float *b = buf[warp];
    float ss = 0.f;
    for (int j = lane; j < D; j += 32) {
        float v = x[j];
        b[j] = v;
        ss += v * v;
    }
    ss = twn_warp_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)D + eps);
    __syncwarp();
    for (int j = lane; j < D; j += 32) b[j] = w[j] * (b[j] * inv);
    __syncwarp();
    for (int j = lane; j < half; j += 32) {
        const float ang = (float)pos[(size_t)stream[j] * ldpos + r] * inv_freq[j];
        float sn, cs;
        sincosf(ang, &sn, &cs);
        const float a = b[j], c = b[j + half];
        const float lo = a * cs - c * sn, hi = c * cs + a * sn;
        if (is_q) {
            x[j] = lo;
            x[j + half] = hi;
        } else {
            twn_bf16 *k = kc + cache + (size_t)(head - nh) * D;
            k[j] = twn_f2bf(lo);
            k[j + half] = twn_f2bf(hi);
        }
    }
}

extern "C" void twn_cu_qk_norm_rope(cudaStream_t s, float *qkv, int ldqkv, int T, int nh, int nkv,
                                    int D, const float *q_w, const float *k_w, float eps,
                                    const int32_t *pos, int ldpos, const float *inv_freq,
                                    const uint8_t *stream, const int32_t *slot, twn_bf16 *kc,
                                    twn_bf16 *vc) {
    if (T <= 0) return;
    dim3 grid((unsigned)T, twn_blocks(nh + 2 * nkv, ROPE_WARPS));
    twn_qk_norm_rope_k<<<grid, ROPE_WARPS * 32, 0, s>>>(qkv, ldqkv, nh, nkv, D, q_w, k_w, eps, pos,
                                                        ldpos, inv_freq, stream, slot, kc, vc);
}
