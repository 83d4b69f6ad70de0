/* cuda_abi.h — the contract between the engine (engine/backend.c) and libtwn_cuda.so.
 *
 * The module exports exactly one symbol, twn_cuda_module_get(abi), returning a table of plain C
 * function pointers; everything else in it is hidden.  The host never links CUDA: it dlopen()s
 * the module, checks the ABI version, and from then on talks through this table.  The module in
 * turn never calls back into the engine: it reads the host model (twn_lm, twn_lora) as plain
 * structs and copies what it needs to the device, so one build of each side is enough.
 *
 * Bump TWN_CUDA_ABI_VERSION whenever a struct here or one the module reads (twn_lm, twn_lora,
 * twn_lm_deepstack, twn_err) changes layout. */
#ifndef TWN_ENGINE_CUDA_ABI_H
#define TWN_ENGINE_CUDA_ABI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/lm.h"
#include "util/err.h"

#define TWN_CUDA_ABI_VERSION   1
#define TWN_CUDA_MODULE_SYMBOL "twn_cuda_module_get"
#define TWN_CUDA_MODULE_NAME   "libtwn_cuda.so"

typedef struct twn_cuda_ctx twn_cuda_ctx; /* one model resident on one device */
typedef struct twn_cuda_kv twn_cuda_kv;   /* one sequence's paged KV cache */

typedef struct {
    int device;             /* CUDA device ordinal */
    size_t kv_budget_bytes; /* paged KV pool; 0: 80% of the memory free after weights */
    int kv_page_rows;       /* rows per KV page; 0: 16 */
    bool graphs;            /* replay decode-only steps from captured CUDA graphs */
} twn_cuda_opts;

/* One sequence's part of a step: twn_lm_seq's fields and meaning (lm.h), with a device KV cache
 * and three optional device-side reductions of the results:
 *   argmax:  the index of the largest logit of the last row (lowest index on ties), without
 *            copying the vocabulary-sized row back (greedy decode);
 *   pooled:  the mean of the last pool_rows final-norm hidden rows ([H], query_mean pooling). */
typedef struct {
    twn_cuda_kv *kv;
    int n;
    const int32_t *ids;
    const float *embeds;
    const int32_t *pos;
    int adapter;
    float *hidden;
    float *logits;
    int32_t *argmax;
    int pool_rows;
    float *pooled;
    const twn_lm_deepstack *deepstack;
} twn_cuda_seq;

/* Kernel entry points for the correctness tests: each copies its host inputs to the device, runs
 * the one kernel the engine uses (on device 0, in a context of its own), and copies the result
 * back as float.  "bf16" below means the kernel reads or writes bfloat16: the test rounds the
 * same values for the CPU reference.  All return 0, or -1 with err filled. */
typedef struct {
    /* Y[M,N] = X[M,K] W[N,K]^T through cuBLAS (X and W rounded to bf16, fp32 accumulate/out). */
    int (*linear)(const float *X, int M, int K, const float *W, int N, float *Y, twn_err *err);
    /* twn_cpu_rmsnorm over rows of dim; out_bf16: the output is rounded to bf16 (GEMM input). */
    int (*rmsnorm)(const float *x, const float *w, int rows, int dim, float eps, bool out_bf16,
                   float *out, twn_err *err);
    /* Per row of qkv [T, (nh+2nkv)*D]: q/k RMSNorm per head, then M-RoPE from pos [3][T]
     * (inv_freq [D/2], stream [D/2]); k and v go through a bf16 KV cache and are read back. */
    int (*qk_norm_rope)(const float *qkv, int T, int nh, int nkv, int D, const float *q_w,
                        const float *k_w, float eps, const int32_t *pos, const float *inv_freq,
                        const uint8_t *stream, float *q, float *k, float *v, twn_err *err);
    /* out = silu(g) * u, rounded to bf16. */
    int (*silu_mul)(const float *g, const float *u, int64_t n, float *out, twn_err *err);
    /* Y[T,N] += scale[a] * (X A[a]^T) B[a]^T for each row whose adapter[row] = a >= 0, all
     * adapters in one launch pair; X rounded to bf16, A [rank[a], K], B [N, rank[a]] fp32. */
    int (*lora)(const float *X, int T, int K, int N, const int32_t *adapter, int n_adapters,
                const float *const *A, const float *const *B, const int *rank, const float *scale,
                float *Y, twn_err *err);
    /* Causal GQA attention of n_seqs sequences through the paged kernel: sequence s has
     * past[s] cached rows and n[s] new rows; q [sum n, nh*D] (fp32); k, v: per sequence
     * [past+n, nkv*D] (rounded to bf16 in the cache), scattered over pages of page_rows rows in a
     * shuffled order (seed).  out [sum n, nh*D] rounded to bf16. */
    int (*attention)(int n_seqs, const int *n, const int *past, const float *q,
                     const float *const *k, const float *const *v, int nh, int nkv, int D,
                     float scale, int page_rows, uint64_t seed, float *out, twn_err *err);
    /* argmax of each row of x [rows, V] (lowest index among equal maxima). */
    int (*argmax)(const float *x, int rows, int V, int32_t *out, twn_err *err);
    /* out[H] = mean of rows [r0, r0+n) of h [*, H]; then / max(||out||, 1e-12) if normalize. */
    int (*pool)(const float *h, int rows, int H, int r0, int n, bool normalize, float *out,
                twn_err *err);
} twn_cuda_kernels;

typedef struct twn_cuda_module {
    int abi_version;
    size_t size;            /* sizeof(twn_cuda_module) the module was built with */
    const char *build_info; /* "CUDA runtime 13000, sm_80 sm_90 compute_90" */
    /* 0 when `device` can run the module's kernels; otherwise -1 and why in msg: no driver, no
     * device, the device's compute capability.  On success msg names the device. */
    int (*probe)(int device, char *msg, size_t n);
    /* Uploads lm (and its attached adapters) as bf16 weights; allocates the KV pool. */
    int (*create)(const twn_lm *lm, const twn_cuda_opts *o, twn_cuda_ctx **out, twn_err *err);
    void (*destroy)(twn_cuda_ctx *c);
    const char *(*describe)(const twn_cuda_ctx *c);
    /* A KV cache with pages for `reserve` rows taken from the pool now (more are taken as the
     * sequence grows); fails when the pool cannot supply them. */
    int (*kv_open)(twn_cuda_ctx *c, int reserve, twn_cuda_kv **out, twn_err *err);
    void (*kv_close)(twn_cuda_ctx *c, twn_cuda_kv *kv);
    void (*kv_truncate)(twn_cuda_kv *kv, int len);
    int (*kv_len)(const twn_cuda_kv *kv);
    int64_t (*kv_rows_free)(const twn_cuda_ctx *c);
    int (*forward)(twn_cuda_ctx *c, twn_cuda_seq *seqs, int n_seqs, twn_err *err);
    const twn_cuda_kernels *kernels;
} twn_cuda_module;

typedef const twn_cuda_module *(*twn_cuda_module_get_fn)(int abi_version);

#endif
