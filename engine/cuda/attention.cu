/* attention.cu — causal GQA attention over a paged KV cache, for prefill tiles and decode rows.
 *
 * The cache is a pool of pages of `page_rows` rows ([page][row][nkv*D] bf16, one pool per layer
 * for K and one for V); a sequence owns a list of pages (its block table), so sequences of any
 * length share one pool without copies or fragmentation, and a finished CoT returns its pages at
 * once.  Work is split into tiles: a few rows of one sequence times the query heads of one KV
 * head (GQA: the rep = nh/nkv query heads that read the same K/V share every K/V tile loaded into
 * shared memory).  A block streams the sequence's keys in tiles of 32 through shared memory (fp32,
 * K rows padded by one float so the 32 lanes, one key each, hit 32 banks) and keeps, per query,
 * the online-softmax state (running max m, sum l, output accumulator) of flash attention: scores
 * and softmax in fp32 like eager_attention_forward, output rounded to bf16 for o_proj.
 *
 * The same kernel serves a 500-row prefill (many tiles per sequence) and a 1-row decode step
 * (one tile per sequence and KV head), so a step that mixes both is one launch.  Not yet here:
 * tensor-core (mma) score/PV products and split-K over long contexts for small decode batches —
 * the next step once it has been profiled on an H100. */
#include "engine/cuda/cu_common.cuh"

#define ATT_WARPS 4
#define ATT_QV    16 /* query vectors (row, head) per block: ATT_WARPS warps x 4 */
#define ATT_QPW   (ATT_QV / ATT_WARPS)
#define ATT_KT    32  /* keys per shared-memory tile: one per lane */
#define ATT_MAXD  256 /* head_dim limit: ATT_MAXD / 32 accumulators per lane */
#define ATT_DPL   (ATT_MAXD / 32)

/* Query heads per block: the largest divisor of rep not above ATT_QV. */
static int heads_per_block(int nh, int nkv) {
    int rep = nh / nkv, h = rep < ATT_QV ? rep : ATT_QV;
    while (rep % h) h--;
    return h;
}

static size_t att_smem(int D) {
    return sizeof(float) * ((size_t)ATT_QV * D + (size_t)ATT_KT * (D + 1) + (size_t)ATT_KT * D);
}

__global__ void __launch_bounds__(ATT_WARPS * 32)
    twn_attention_k(const float *q, int ldq, twn_bf16 *out, int ldo, const twn_cu_tile *tiles,
                    const int32_t *bt, const twn_bf16 *kc, const twn_bf16 *vc, int page_rows,
                    int nh, int nkv, int D, int hpb, float scale) {
    extern __shared__ float sm[];
    float *sq = sm;                    /* [ATT_QV][D] */
    float *sk = sq + ATT_QV * D;       /* [ATT_KT][D+1] */
    float *sv = sk + ATT_KT * (D + 1); /* [ATT_KT][D] */
    const twn_cu_tile t = tiles[blockIdx.x];
    const int rep = nh / nkv, groups = rep / hpb;
    const int kvh = blockIdx.y / groups, h0 = kvh * rep + (blockIdx.y % groups) * hpb;
    const int nqv = t.n * hpb, kvd = nkv * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    for (int e = threadIdx.x; e < nqv * D; e += blockDim.x) {
        const int qv = e / D, d = e % D;
        sq[qv * D + d] = q[(size_t)(t.row0 + qv / hpb) * ldq + (size_t)(h0 + qv % hpb) * D + d];
    }
    float m[ATT_QPW], l[ATT_QPW], acc[ATT_QPW][ATT_DPL];
#pragma unroll
    for (int i = 0; i < ATT_QPW; i++) {
        m[i] = -INFINITY;
        l[i] = 0.f;
#pragma unroll
        for (int c = 0; c < ATT_DPL; c++) acc[i][c] = 0.f;
    }

    const int kv_end = t.pos0 + t.n; /* keys 0 .. kv_end-1 exist for this tile */
    for (int k0 = 0; k0 < kv_end; k0 += ATT_KT) {
        __syncthreads(); /* q is loaded; the previous tile is consumed */
        for (int e = threadIdx.x; e < ATT_KT * D; e += blockDim.x) {
            const int kk = e / D, d = e % D, key = k0 + kk;
            float kv = 0.f, vv = 0.f;
            if (key < kv_end) {
                const int page = bt[t.bt_off + key / page_rows];
                const size_t off =
                    ((size_t)page * page_rows + key % page_rows) * kvd + (size_t)kvh * D + d;
                kv = twn_bf2f(kc[off]);
                vv = twn_bf2f(vc[off]);
            }
            sk[kk * (D + 1) + d] = kv;
            sv[kk * D + d] = vv;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < ATT_QPW; i++) {
            const int qv = warp + i * ATT_WARPS;
            if (qv >= nqv) break;               /* warp-uniform */
            const int last = t.pos0 + qv / hpb; /* causal: the last key this row sees */
            if (last < k0) continue;
            const int key = k0 + lane;
            float s = -INFINITY;
            if (key <= last) {
                const float *qq = sq + qv * D, *kr = sk + lane * (D + 1);
                float dot = 0.f;
                for (int d = 0; d < D; d++) dot += qq[d] * kr[d];
                s = dot * scale;
            }
            const float mnew = fmaxf(m[i], twn_warp_max(s)); /* finite: key k0 <= last */
            const float corr = expf(m[i] - mnew);            /* 0 on the first tile */
            const float p = key <= last ? expf(s - mnew) : 0.f;
            l[i] = l[i] * corr + twn_warp_sum(p);
#pragma unroll
            for (int c = 0; c < ATT_DPL; c++) acc[i][c] *= corr;
            const int nk = min(ATT_KT, last - k0 + 1);
            for (int kk = 0; kk < nk; kk++) {
                const float pk = __shfl_sync(TWN_FULL_MASK, p, kk);
                const float *vr = sv + kk * D;
#pragma unroll
                for (int c = 0; c < ATT_DPL; c++) {
                    const int d = lane + 32 * c;
                    if (d < D) acc[i][c] += pk * vr[d];
                }
            }
            m[i] = mnew;
        }
    }
#pragma unroll
    for (int i = 0; i < ATT_QPW; i++) {
        const int qv = warp + i * ATT_WARPS;
        if (qv >= nqv) break;
        twn_bf16 *o = out + (size_t)(t.row0 + qv / hpb) * ldo + (size_t)(h0 + qv % hpb) * D;
        const float inv = 1.0f / l[i];
#pragma unroll
        for (int c = 0; c < ATT_DPL; c++) {
            const int d = lane + 32 * c;
            if (d < D) o[d] = twn_f2bf(acc[i][c] * inv);
        }
    }
}

extern "C" int twn_cu_attention_tile_rows(int nh, int nkv) {
    return ATT_QV / heads_per_block(nh, nkv);
}

/* Sets the kernel's dynamic shared memory limit for the largest head_dim (82 KiB at 256), once
 * for every context: the attribute is per kernel, not per launch, so a smaller D set later must
 * not lower it under a context that needs more. */
extern "C" int twn_cu_attention_prepare(int D) {
    (void)D;
    return (int)cudaFuncSetAttribute(twn_attention_k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     (int)att_smem(ATT_MAXD));
}

extern "C" void twn_cu_attention(cudaStream_t s, const float *q, int ldq, twn_bf16 *out, int ldo,
                                 const twn_cu_tile *tiles, int n_tiles, const int32_t *block_tables,
                                 const twn_bf16 *kc, const twn_bf16 *vc, int page_rows, int nh,
                                 int nkv, int D, float scale) {
    if (n_tiles <= 0) return;
    const int hpb = heads_per_block(nh, nkv);
    dim3 grid((unsigned)n_tiles, (unsigned)(nh / hpb));
    twn_attention_k<<<grid, ATT_WARPS * 32, att_smem(D), s>>>(
        q, ldq, out, ldo, tiles, block_tables, kc, vc, page_rows, nh, nkv, D, hpb, scale);
}
