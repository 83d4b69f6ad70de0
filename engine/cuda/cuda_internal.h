/* cuda_internal.h — the CUDA backend's state, shared by the module's C files.
 *
 * Device layout of the model (bf16 = twn_bf16):
 *   embed [V, H] bf16, lm_head [V, H] bf16 (the same buffer when tied), final_norm [H] fp32;
 *   per layer: w_qkv [qd + 2kd, H] (q | k | v rows concatenated: one GEMM, one read of x),
 *   w_o [H, qd], w_gu [2I, H] (gate | up), w_down [H, I], all bf16; the four norm weights fp32;
 *   LoRA A/B fp32 per (layer, projection, adapter).
 * KV: one pool per layer for K and for V, [n_pages][page_rows][kd] bf16; a sequence holds a list
 * of page ids (its block table).
 * A step's activations live in an arena sized by the largest step seen (rows, sequences, pages);
 * its small per-row metadata (ids, positions, adapters, cache slots, tiles, block tables) is
 * packed on the host into one pinned buffer and copied with a single cudaMemcpyAsync. */
#ifndef TWN_ENGINE_CUDA_INTERNAL_H
#define TWN_ENGINE_CUDA_INTERNAL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "engine/cuda/cuda_abi.h"
#include "engine/cuda/kernels.h"

#define TWN_CUDA_EXPORT  __attribute__((visibility("default")))
#define TWN_CUDA_STR_(x) #x
#define TWN_CUDA_STR(x)  TWN_CUDA_STR_(x)

typedef struct {
    float *in_norm, *post_norm, *q_norm, *k_norm;
    twn_bf16 *w_qkv, *w_o, *w_gu, *w_down;
    twn_cu_lora_set lora[TWN_NPROJ];
    unsigned lora_mask[TWN_NPROJ]; /* bit a: adapter a has a LoRA on this projection */
} cu_layer;

struct twn_cuda_kv {
    int len;          /* rows cached */
    int32_t next_pos; /* as twn_kv.next_pos */
    int32_t *pages;   /* block table */
    int n_pages, cap_pages;
};

/* Device step arena, laid out for capacities (not a step's actual counts) so that addresses stay
 * put between steps and a captured graph can be replayed.  `meta` (device) and `host` (pinned)
 * hold the per-step metadata at the same offsets o_*. */
typedef struct {
    int cap_T, cap_S, cap_P, cap_E; /* rows, sequences, block-table entries, embedding rows */
    void *dev;                      /* one cudaMalloc for everything below */
    char *meta, *host;
    size_t meta_bytes;
    float *x, *qkv, *gu, *ltmp, *fin, *logits, *pooled, *embeds;
    twn_bf16 *act, *lrows;
    int32_t *argmax;
    size_t o_ids, o_adapter, o_pos, o_slot, o_embsrc, o_tiles, o_bt, o_lrow, o_pr0, o_pcnt, o_am;
} cu_arena;

typedef struct {
    bool valid;
    int T, n_log, n_pool;
    unsigned present;
    cudaGraphExec_t exec;
    uint64_t last_use;
} cu_graph;

#define TWN_CU_GRAPHS 16

struct twn_cuda_ctx {
    int device;
    char desc[640];
    cudaStream_t stream;
    cublasHandle_t blas;
    void *blas_ws;
    size_t blas_ws_bytes;
    int H, I, nh, nkv, D, V, L, qd, kd, rmax, n_adapters;
    float eps;
    twn_bf16 *embed, *lm_head;
    float *final_norm, *inv_freq;
    uint8_t *rope_stream;
    cu_layer *layers;
    twn_cu_lora_set embed_lora;
    size_t weight_bytes;
    /* device allocations of the model, freed together */
    void **allocs;
    int n_allocs, cap_allocs;
    /* KV pool */
    int page_rows, n_pages;
    twn_bf16 *k_pool, *v_pool; /* [L][n_pages][page_rows][kd] */
    int32_t *free_pages;
    int n_free;
    size_t kv_bytes;
    /* steps */
    cu_arena ar;
    int32_t *ds_rows; /* DeepStack rows and features of the current step (device) */
    float *ds_feat;
    size_t ds_cap;
    bool graphs;
    cu_graph graph[TWN_CU_GRAPHS];
    uint64_t steps;
    int tile_rows;
};

/* err helpers: fill twn_err without linking util (the module stands alone). */
int twn_cu_err(twn_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* "what: cudaErrorX (message)" and -1, when rc != cudaSuccess; 0 otherwise. */
int twn_cu_check(cudaError_t rc, twn_err *err, const char *what);
int twn_cu_blas_check(cublasStatus_t rc, twn_err *err, const char *what);

/* fp32 -> bf16 on the host, round to nearest even (NaN stays NaN). */
static inline twn_bf16 twn_cu_f2bf(float f) {
    union {
        float f;
        uint32_t u;
    } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (twn_bf16)((v.u >> 16) | 0x40u);
    v.u += 0x7fffu + ((v.u >> 16) & 1u);
    return (twn_bf16)(v.u >> 16);
}
static inline float twn_cu_bf2f(twn_bf16 b) {
    union {
        uint32_t u;
        float f;
    } v = {(uint32_t)b << 16};
    return v.f;
}

/* Y[M,N] (fp32, ldy) = X[M,K] (bf16, ldx) W[N,K]^T (bf16) + beta * Y, fp32 accumulate. */
int twn_cu_gemm(cublasHandle_t h, const twn_bf16 *X, int M, int K, int ldx, const twn_bf16 *W,
                int N, float *Y, int ldy, float beta, twn_err *err);
int twn_cu_blas_setup(twn_cuda_ctx *c, twn_err *err);

/* model.c */
int twn_cu_create(const twn_lm *lm, const twn_cuda_opts *o, twn_cuda_ctx **out, twn_err *err);
void twn_cu_destroy(twn_cuda_ctx *c);
int twn_cu_kv_open(twn_cuda_ctx *c, int reserve, twn_cuda_kv **out, twn_err *err);
void twn_cu_kv_close(twn_cuda_ctx *c, twn_cuda_kv *kv);
/* Grows kv's block table to hold `rows` rows, taking pages from the pool. */
int twn_cu_kv_grow(twn_cuda_ctx *c, twn_cuda_kv *kv, int rows, twn_err *err);

/* forward.c */
int twn_cu_forward(twn_cuda_ctx *c, twn_cuda_seq *seqs, int n_seqs, twn_err *err);
void twn_cu_arena_free(twn_cuda_ctx *c);
void twn_cu_graphs_clear(twn_cuda_ctx *c);

/* kernel_tests.c */
extern const twn_cuda_kernels twn_cu_kernel_tests;

#endif
