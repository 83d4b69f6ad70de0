/* rows.cu — the row-wise moves around the decoder: embedding lookup (with the embedding LoRA and
 * rows supplied as vectors: query tokens, image features), DeepStack additions, gathering the
 * rows that need logits, and fp32 -> bf16 conversion. */
#include "engine/cuda/cu_common.cuh"

/* peft Embedding LoRA adds (A^T[id] @ B^T) * scale; the terms are added in rank order like
 * engine/lm.c so the fp32 sums agree. */
__global__ void twn_embed_k(float *x, int H, const int32_t *ids, const int32_t *emb_src,
                            const float *embeds, const twn_bf16 *table, int V,
                            const int32_t *row_adapter, twn_cu_lora_set el) {
    const int r = blockIdx.x, id = ids[r];
    float *xr = x + (size_t)r * H;
    if (id < 0) {
        const float *e = embeds + (size_t)emb_src[r] * H;
        for (int h = threadIdx.x; h < H; h += blockDim.x) xr[h] = e[h];
        return;
    }
    const int a = row_adapter[r];
    const bool lora = a >= 0 && a < TWN_MAX_ADAPTERS && el.A[a];
    for (int h = threadIdx.x; h < H; h += blockDim.x) {
        float v = twn_bf2f(table[(size_t)id * H + h]);
        if (lora)
            for (int j = 0; j < el.rank[a]; j++)
                v += (el.A[a][(size_t)j * V + id] * el.scale[a]) *
                     el.B[a][(size_t)h * el.rank[a] + j];
        xr[h] = v;
    }
}

extern "C" void twn_cu_embed(cudaStream_t s, float *x, int T, int H, const int32_t *ids,
                             const int32_t *emb_src, const float *embeds, const twn_bf16 *table,
                             int V, const int32_t *row_adapter, twn_cu_lora_set el) {
    if (T <= 0) return;
    twn_embed_k<<<(unsigned)T, 128, 0, s>>>(x, H, ids, emb_src, embeds, table, V, row_adapter, el);
}

__global__ void twn_add_rows_k(float *x, int H, const int32_t *rows, const float *feat) {
    float *xr = x + (size_t)rows[blockIdx.x] * H;
    const float *f = feat + (size_t)blockIdx.x * H;
    for (int h = threadIdx.x; h < H; h += blockDim.x) xr[h] += f[h];
}

extern "C" void twn_cu_add_rows(cudaStream_t s, float *x, int H, const int32_t *rows,
                                const float *feat, int n) {
    if (n <= 0) return;
    twn_add_rows_k<<<(unsigned)n, 128, 0, s>>>(x, H, rows, feat);
}

__global__ void twn_gather_bf16_k(twn_bf16 *out, const float *x, int H, const int32_t *rows) {
    const float *xr = x + (size_t)rows[blockIdx.x] * H;
    twn_bf16 *o = out + (size_t)blockIdx.x * H;
    for (int h = threadIdx.x; h < H; h += blockDim.x) o[h] = twn_f2bf(xr[h]);
}

extern "C" void twn_cu_gather_bf16(cudaStream_t s, twn_bf16 *out, const float *x, int H,
                                   const int32_t *rows, int n) {
    if (n <= 0) return;
    twn_gather_bf16_k<<<(unsigned)n, 128, 0, s>>>(out, x, H, rows);
}

__global__ void twn_to_bf16_k(twn_bf16 *out, const float *x, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        out[i] = twn_f2bf(x[i]);
}

extern "C" void twn_cu_to_bf16(cudaStream_t s, twn_bf16 *out, const float *x, int64_t n) {
    if (n <= 0) return;
    unsigned blocks = twn_blocks(n, 256);
    if (blocks > 65535u * 8) blocks = 65535u * 8;
    twn_to_bf16_k<<<blocks, 256, 0, s>>>(out, x, n);
}
