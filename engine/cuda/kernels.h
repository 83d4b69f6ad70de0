/* kernels.h — launchers of the CUDA backend's kernels, callable from C (the module's .c files).
 *
 * Conventions: row-major everywhere, leading dimensions in elements; `twn_bf16` is the storage
 * of a bfloat16 (uint16_t in C, __nv_bfloat16 in the .cu files); every launcher enqueues on the
 * given stream and returns without synchronizing (errors surface at the next cudaStream call).
 * Precision, against the CPU fp32 reference (engine/cpu/ops.h): the residual stream, GEMM
 * accumulation and outputs, norms, RoPE, softmax and LoRA run in fp32; what feeds a GEMM (normed
 * rows, attention output, SwiGLU output) and the KV cache are bf16, like the weights. */
#ifndef TWN_ENGINE_CUDA_KERNELS_H
#define TWN_ENGINE_CUDA_KERNELS_H

#include <stdint.h>

#include <cuda_runtime_api.h>

#include "engine/lm.h" /* TWN_MAX_ADAPTERS */

#ifdef __cplusplus
extern "C" {
#endif

typedef uint16_t twn_bf16;

/* One projection's LoRA weights for every attached adapter (NULL A: that adapter has none);
 * passed by value so one launch serves rows of all adapters. */
typedef struct {
    const float *A[TWN_MAX_ADAPTERS]; /* [rank, K] */
    const float *B[TWN_MAX_ADAPTERS]; /* [N, rank] */
    int rank[TWN_MAX_ADAPTERS];
    float scale[TWN_MAX_ADAPTERS];
} twn_cu_lora_set;

/* A tile of attention work: rows [row0, row0+n) of the step, all of one sequence, whose first
 * row sits at cache position pos0 (so row i sees cache rows 0 .. pos0+i); the sequence's pages
 * are block_tables[bt_off ...]. */
typedef struct {
    int32_t row0, n, pos0, bt_off;
} twn_cu_tile;

/* x[r] = table[ids[r]] (+ the row adapter's embedding LoRA), or embeds[emb_src[r]] where
 * ids[r] < 0.  embed LoRA: A [rank, V], B [H, rank] (peft Embedding). */
void twn_cu_embed(cudaStream_t s, float *x, int T, int H, const int32_t *ids,
                  const int32_t *emb_src, const float *embeds, const twn_bf16 *table, int V,
                  const int32_t *row_adapter, twn_cu_lora_set el);

/* Qwen3VLTextRMSNorm: out = w * (x * rsqrt(mean(x^2) + eps)) per row. */
void twn_cu_rmsnorm_bf16(cudaStream_t s, twn_bf16 *out, int ldo, const float *x, int ldx,
                         const float *w, int rows, int dim, float eps);
void twn_cu_rmsnorm_f32(cudaStream_t s, float *out, int ldo, const float *x, int ldx,
                        const float *w, int rows, int dim, float eps);

/* qkv [T, ldqkv] holds q | k | v (nh, nkv, nkv heads of D).  Per row: q and k heads RMSNormed
 * (q_w, k_w [D]) and rotated (M-RoPE: angle_j = pos[stream[j]][r] * inv_freq[j], pos is
 * [3][ldpos]); q is written back in place, k and v go to the KV cache rows slot[r]
 * (kc/vc + slot * nkv*D). */
void twn_cu_qk_norm_rope(cudaStream_t s, float *qkv, int ldqkv, int T, int nh, int nkv, int D,
                         const float *q_w, const float *k_w, float eps, const int32_t *pos,
                         int ldpos, const float *inv_freq, const uint8_t *stream,
                         const int32_t *slot, twn_bf16 *kc, twn_bf16 *vc);

/* out[r, i] = silu(gu[r, i]) * gu[r, I + i] for i < I. */
void twn_cu_silu_mul(cudaStream_t s, twn_bf16 *out, int ldo, const float *gu, int ldgu, int T,
                     int I);

/* Segmented LoRA: Y[r, :N] += scale[a] * (X[r] A[a]^T) B[a]^T where a = row_adapter[r] >= 0 and
 * set.A[a] != NULL.  tmp: [T, ldt] scratch, ldt >= max rank. */
void twn_cu_lora(cudaStream_t s, const twn_bf16 *X, int ldx, int T, int K, float *Y, int ldy, int N,
                 const int32_t *row_adapter, twn_cu_lora_set set, float *tmp, int ldt);

/* Rows of one attention tile (by GQA ratio): tiles hold this many rows of one sequence. */
int twn_cu_attention_tile_rows(int nh, int nkv);
/* Raises the attention kernel's dynamic shared memory limit to what head_dim 256 needs (D <= 256
 * all fit); call before the first launch.  Returns 0 or a cudaError_t. */
int twn_cu_attention_prepare(int D);
/* Causal GQA attention over paged KV (kc/vc: [pages][page_rows][nkv*D] bf16); q fp32 [T, ldq],
 * out bf16 [T, ldo]. */
void twn_cu_attention(cudaStream_t s, const float *q, int ldq, twn_bf16 *out, int ldo,
                      const twn_cu_tile *tiles, int n_tiles, const int32_t *block_tables,
                      const twn_bf16 *kc, const twn_bf16 *vc, int page_rows, int nh, int nkv, int D,
                      float scale);

/* x[rows[j]] += feat[j] for j < n (DeepStack), rows [H] each. */
void twn_cu_add_rows(cudaStream_t s, float *x, int H, const int32_t *rows, const float *feat,
                     int n);
/* out[j] = bf16(x[rows[j]]) for j < n. */
void twn_cu_gather_bf16(cudaStream_t s, twn_bf16 *out, const float *x, int H, const int32_t *rows,
                        int n);
/* out[r] = argmax of x[r, :V] (lowest index among equal maxima; NaN never wins). */
void twn_cu_argmax(cudaStream_t s, const float *x, int rows, int V, int32_t *out);
/* out[j] = mean of h rows [r0[j], r0[j]+cnt[j]); normalized to unit L2 norm (eps 1e-12) if
 * normalize. */
void twn_cu_pool(cudaStream_t s, const float *h, int H, const int32_t *r0, const int32_t *cnt,
                 int n, int normalize, float *out);
/* fp32 -> bf16 (round to nearest even). */
void twn_cu_to_bf16(cudaStream_t s, twn_bf16 *out, const float *x, int64_t n);

#ifdef __cplusplus
}
#endif

#endif
