/* model.c — putting a loaded model on the device, and the paged KV pool.
 *
 * The host model (engine/lm.c) holds fp32 weights upcast from the checkpoint's bf16; rounding
 * them back to bf16 here is exact for a bf16 checkpoint, so the device holds the checkpoint's
 * own values at half the bytes.  q/k/v and gate/up weights are stored concatenated so each pair
 * (triple) is one GEMM over the same input.  LoRA weights stay fp32 (peft's autocast).
 *
 * KV pool: what is left of the budget after the weights, split into pages of page_rows rows for
 * every layer at once (a page id indexes all layers' K and V pools), handed out to sequences and
 * taken back when they close — no per-sequence cudaMalloc, no fragmentation. */
#include <stdlib.h>
#include <string.h>

#include "engine/cuda/cuda_internal.h"

#define STAGE_ELEMS (8u << 20) /* conversion staging: 8 Mi elements (16 MiB bf16) */

static void *dev_alloc(twn_cuda_ctx *c, size_t bytes, const char *what, twn_err *err) {
    void *p = NULL;
    cudaError_t rc = cudaMalloc(&p, bytes ? bytes : 1);
    if (rc != cudaSuccess) {
        twn_cu_err(err, "cannot allocate %.1f MiB of device memory for %s: %s",
                   (double)bytes / (1 << 20), what, cudaGetErrorString(rc));
        return NULL;
    }
    if (c->n_allocs == c->cap_allocs) {
        c->cap_allocs = c->cap_allocs ? 2 * c->cap_allocs : 64;
        c->allocs = realloc(c->allocs, sizeof(void *) * (size_t)c->cap_allocs);
        if (!c->allocs) abort();
    }
    c->allocs[c->n_allocs++] = p;
    return p;
}

/* Rounds n floats to bf16 through a pinned staging buffer into dst (device). */
static int put_bf16(twn_bf16 *dst, const float *src, size_t n, twn_bf16 *stage, twn_err *err) {
    for (size_t o = 0; o < n; o += STAGE_ELEMS) {
        size_t k = n - o < STAGE_ELEMS ? n - o : STAGE_ELEMS;
        for (size_t i = 0; i < k; i++) stage[i] = twn_cu_f2bf(src[o + i]);
        if (twn_cu_check(cudaMemcpy(dst + o, stage, k * sizeof(twn_bf16), cudaMemcpyHostToDevice),
                         err, "copying weights to the device"))
            return -1;
    }
    return 0;
}

static float *put_f32(twn_cuda_ctx *c, const float *src, size_t n, const char *what, twn_err *err) {
    float *d = dev_alloc(c, n * sizeof(float), what, err);
    if (!d) return NULL;
    if (twn_cu_check(cudaMemcpy(d, src, n * sizeof(float), cudaMemcpyHostToDevice), err, what))
        return NULL;
    c->weight_bytes += n * sizeof(float);
    return d;
}

/* dst gets the concatenation of parts (each n[i] floats), as bf16. */
static twn_bf16 *put_cat(twn_cuda_ctx *c, const float *const *parts, const size_t *n, int k,
                         twn_bf16 *stage, const char *what, twn_err *err) {
    size_t total = 0;
    for (int i = 0; i < k; i++) total += n[i];
    twn_bf16 *d = dev_alloc(c, total * sizeof(twn_bf16), what, err);
    if (!d) return NULL;
    size_t off = 0;
    for (int i = 0; i < k; i++) {
        if (put_bf16(d + off, parts[i], n[i], stage, err)) return NULL;
        off += n[i];
    }
    c->weight_bytes += total * sizeof(twn_bf16);
    return d;
}

static int put_lora(twn_cuda_ctx *c, twn_cu_lora_set *set, unsigned *mask, int a,
                    const twn_lora *lo, twn_err *err) {
    if (!lo) return 0;
    float *A = put_f32(c, lo->A, (size_t)lo->r * (size_t)lo->in_features, "LoRA A", err);
    float *B =
        A ? put_f32(c, lo->B, (size_t)lo->out_features * (size_t)lo->r, "LoRA B", err) : NULL;
    if (!B) return -1;
    set->A[a] = A;
    set->B[a] = B;
    set->rank[a] = lo->r;
    set->scale[a] = lo->scaling;
    if (mask) *mask |= 1u << a;
    if (lo->r > c->rmax) c->rmax = lo->r;
    return 0;
}

static int check_shape(const twn_lm *lm, twn_err *err) {
    if (lm->H <= 0 || lm->I <= 0 || lm->nh <= 0 || lm->nkv <= 0 || lm->L <= 0 || lm->V <= 0)
        return twn_cu_err(err, "model has an empty dimension (H %d, I %d, heads %d/%d, L %d, V %d)",
                          lm->H, lm->I, lm->nh, lm->nkv, lm->L, lm->V);
    if (lm->D <= 0 || lm->D % 2 || lm->D > 256)
        return twn_cu_err(err, "head_dim %d: the CUDA kernels need an even head_dim <= 256", lm->D);
    if (lm->nh % lm->nkv)
        return twn_cu_err(err, "%d attention heads are not a multiple of %d KV heads", lm->nh,
                          lm->nkv);
    if (lm->n_adapters > TWN_MAX_ADAPTERS)
        return twn_cu_err(err, "%d adapters attached; at most %d", lm->n_adapters,
                          TWN_MAX_ADAPTERS);
    return 0;
}

static int setup_kv(twn_cuda_ctx *c, const twn_cuda_opts *o, twn_err *err) {
    c->page_rows = o->kv_page_rows > 0 ? o->kv_page_rows : 16;
    size_t page_bytes = 2u * (size_t)c->L * (size_t)c->page_rows * (size_t)c->kd * sizeof(twn_bf16);
    size_t budget = o->kv_budget_bytes;
    if (!budget) {
        size_t fr = 0, tot = 0;
        if (twn_cu_check(cudaMemGetInfo(&fr, &tot), err, "cudaMemGetInfo")) return -1;
        /* 80% of what the weights left, keeping 1 GiB for activations and cuBLAS */
        size_t keep = (size_t)1 << 30;
        budget = fr > keep ? (size_t)((double)(fr - keep) * 0.8) : 0;
    }
    int64_t n_pages = (int64_t)(budget / page_bytes);
    if (n_pages > INT32_MAX / 2) n_pages = INT32_MAX / 2;
    if (n_pages < 1)
        return twn_cu_err(err,
                          "KV budget of %.1f MiB holds no page of %d rows (%.2f MiB each over %d "
                          "layers); raise the KV budget",
                          (double)budget / (1 << 20), c->page_rows, (double)page_bytes / (1 << 20),
                          c->L);
    c->n_pages = (int)n_pages;
    size_t pool = (size_t)c->n_pages * page_bytes / 2;
    c->k_pool = dev_alloc(c, pool, "the KV cache (K)", err);
    c->v_pool = c->k_pool ? dev_alloc(c, pool, "the KV cache (V)", err) : NULL;
    if (!c->v_pool) return -1;
    c->kv_bytes = 2 * pool;
    /* Attention only reads rows a step has written, but a zeroed pool keeps a stray read finite
     * and the results reproducible (cudaMalloc memory may hold NaN patterns). */
    if (twn_cu_check(cudaMemset(c->k_pool, 0, pool), err, "clearing the KV cache (K)") ||
        twn_cu_check(cudaMemset(c->v_pool, 0, pool), err, "clearing the KV cache (V)"))
        return -1;
    c->free_pages = malloc(sizeof(int32_t) * (size_t)c->n_pages);
    if (!c->free_pages) return twn_cu_err(err, "cannot allocate the KV page list");
    for (int i = 0; i < c->n_pages; i++) c->free_pages[i] = c->n_pages - 1 - i;
    c->n_free = c->n_pages;
    return 0;
}

int twn_cu_create(const twn_lm *lm, const twn_cuda_opts *o, twn_cuda_ctx **out, twn_err *err) {
    *out = NULL;
    if (check_shape(lm, err)) return -1;
    twn_cuda_ctx *c = calloc(1, sizeof *c);
    if (!c) return twn_cu_err(err, "out of memory");
    twn_bf16 *stage = NULL;
    c->device = o->device;
    c->H = lm->H, c->I = lm->I, c->nh = lm->nh, c->nkv = lm->nkv, c->D = lm->D, c->V = lm->V;
    c->L = lm->L, c->qd = lm->nh * lm->D, c->kd = lm->nkv * lm->D, c->n_adapters = lm->n_adapters;
    c->eps = (float)lm->cfg.rms_norm_eps;
    c->rmax = 1;
    c->graphs = o->graphs;
    if (twn_cu_check(cudaSetDevice(o->device), err, "cudaSetDevice")) goto fail;
    if (twn_cu_check(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking), err,
                     "cudaStreamCreate"))
        goto fail;
    if (twn_cu_blas_setup(c, err)) goto fail;
    if (twn_cu_check(cudaMallocHost((void **)&stage, STAGE_ELEMS * sizeof(twn_bf16)), err,
                     "pinned staging buffer"))
        goto fail;

    const size_t H = (size_t)c->H, I = (size_t)c->I, qd = (size_t)c->qd, kd = (size_t)c->kd;
    const float *e[1] = {lm->embed};
    size_t ne[1] = {(size_t)c->V * H};
    if (!(c->embed = put_cat(c, e, ne, 1, stage, "embed_tokens", err))) goto fail;
    if (lm->lm_head == lm->embed)
        c->lm_head = c->embed;
    else {
        e[0] = lm->lm_head;
        if (!(c->lm_head = put_cat(c, e, ne, 1, stage, "lm_head", err))) goto fail;
    }
    if (!(c->final_norm = put_f32(c, lm->final_norm, H, "norm", err))) goto fail;
    c->layers = calloc((size_t)c->L, sizeof *c->layers);
    if (!c->layers) {
        twn_cu_err(err, "out of memory");
        goto fail;
    }
    for (int l = 0; l < c->L; l++) {
        const twn_lm_layer *ly = &lm->layers[l];
        cu_layer *d = &c->layers[l];
        const float *qkv[3] = {ly->w[TWN_Q], ly->w[TWN_K], ly->w[TWN_V]};
        size_t nqkv[3] = {qd * H, kd * H, kd * H};
        const float *gu[2] = {ly->w[TWN_GATE], ly->w[TWN_UP]};
        size_t ngu[2] = {I * H, I * H};
        const float *wo[1] = {ly->w[TWN_O]}, *wd[1] = {ly->w[TWN_DOWN]};
        size_t no[1] = {H * qd}, nd[1] = {H * I};
        if (!(d->w_qkv = put_cat(c, qkv, nqkv, 3, stage, "q/k/v_proj", err)) ||
            !(d->w_o = put_cat(c, wo, no, 1, stage, "o_proj", err)) ||
            !(d->w_gu = put_cat(c, gu, ngu, 2, stage, "gate/up_proj", err)) ||
            !(d->w_down = put_cat(c, wd, nd, 1, stage, "down_proj", err)) ||
            !(d->in_norm = put_f32(c, ly->in_norm, H, "input_layernorm", err)) ||
            !(d->post_norm = put_f32(c, ly->post_norm, H, "post_attention_layernorm", err)) ||
            !(d->q_norm = put_f32(c, ly->q_norm, (size_t)c->D, "q_norm", err)) ||
            !(d->k_norm = put_f32(c, ly->k_norm, (size_t)c->D, "k_norm", err)))
            goto fail;
        for (int a = 0; a < lm->n_adapters; a++)
            for (int j = 0; j < TWN_NPROJ; j++)
                if (put_lora(c, &d->lora[j], &d->lora_mask[j], a, ly->lora[a][j], err)) goto fail;
    }
    for (int a = 0; a < lm->n_adapters; a++)
        if (put_lora(c, &c->embed_lora, NULL, a, lm->embed_lora[a], err)) goto fail;
    if (!(c->inv_freq = put_f32(c, lm->inv_freq, (size_t)c->D / 2, "inv_freq", err))) goto fail;
    if (!(c->rope_stream = dev_alloc(c, (size_t)c->D / 2, "rope streams", err))) goto fail;
    if (twn_cu_check(
            cudaMemcpy(c->rope_stream, lm->rope_stream, (size_t)c->D / 2, cudaMemcpyHostToDevice),
            err, "rope streams"))
        goto fail;
    if (twn_cu_check((cudaError_t)twn_cu_attention_prepare(c->D), err,
                     "attention shared memory attribute"))
        goto fail;
    c->tile_rows = twn_cu_attention_tile_rows(c->nh, c->nkv);
    cudaFreeHost(stage);
    stage = NULL;
    if (setup_kv(c, o, err)) goto fail;

    struct cudaDeviceProp p;
    if (twn_cu_check(cudaGetDeviceProperties(&p, c->device), err, "cudaGetDeviceProperties"))
        goto fail;
    snprintf(c->desc, sizeof c->desc,
             "cuda: %.256s (sm_%d%d), bf16 weights %.2f GiB, KV pool %.2f GiB (%lld rows, %d per "
             "page), CUDA graphs %s",
             p.name, p.major, p.minor, (double)c->weight_bytes / (1u << 30),
             (double)c->kv_bytes / (1u << 30), (long long)c->n_pages * c->page_rows, c->page_rows,
             c->graphs ? "on" : "off");
    *out = c;
    return 0;
fail:
    if (stage) cudaFreeHost(stage);
    twn_cu_destroy(c);
    return -1;
}

void twn_cu_destroy(twn_cuda_ctx *c) {
    if (!c) return;
    cudaSetDevice(c->device); /* this thread may not be the one that created c */
    if (c->stream) cudaStreamSynchronize(c->stream);
    twn_cu_graphs_clear(c);
    twn_cu_arena_free(c);
    for (int i = 0; i < c->n_allocs; i++) cudaFree(c->allocs[i]);
    free(c->allocs);
    free(c->layers);
    free(c->free_pages);
    if (c->blas) cublasDestroy(c->blas);
    if (c->blas_ws) cudaFree(c->blas_ws);
    if (c->stream) cudaStreamDestroy(c->stream);
    free(c);
}

/* ------------------------------------------------------------------------------------------ */
/* KV pages */

int twn_cu_kv_grow(twn_cuda_ctx *c, twn_cuda_kv *kv, int rows, twn_err *err) {
    int need = (rows + c->page_rows - 1) / c->page_rows;
    if (need <= kv->n_pages) return 0;
    if (need - kv->n_pages > c->n_free)
        return twn_cu_err(err,
                          "KV cache pool exhausted: a sequence needs %d more page(s) of %d rows "
                          "(%d rows in all), %d of %d pages are free; raise the KV budget or "
                          "lower max_active",
                          need - kv->n_pages, c->page_rows, rows, c->n_free, c->n_pages);
    if (need > kv->cap_pages) {
        int cap = kv->cap_pages ? kv->cap_pages : 8;
        while (cap < need) cap *= 2;
        int32_t *p = realloc(kv->pages, sizeof(int32_t) * (size_t)cap);
        if (!p) return twn_cu_err(err, "out of memory for a block table of %d pages", cap);
        kv->pages = p;
        kv->cap_pages = cap;
    }
    while (kv->n_pages < need) kv->pages[kv->n_pages++] = c->free_pages[--c->n_free];
    return 0;
}

int twn_cu_kv_open(twn_cuda_ctx *c, int reserve, twn_cuda_kv **out, twn_err *err) {
    twn_cuda_kv *kv = calloc(1, sizeof *kv);
    if (!kv) return twn_cu_err(err, "out of memory");
    if (reserve > 0 && twn_cu_kv_grow(c, kv, reserve, err)) {
        twn_cu_kv_close(c, kv);
        return -1;
    }
    *out = kv;
    return 0;
}

void twn_cu_kv_close(twn_cuda_ctx *c, twn_cuda_kv *kv) {
    if (!kv) return;
    for (int i = kv->n_pages - 1; i >= 0; i--) c->free_pages[c->n_free++] = kv->pages[i];
    free(kv->pages);
    free(kv);
}
