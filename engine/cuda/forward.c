/* forward.c — one ragged, mixed-adapter decoder step on the device (the semantics of
 * twn_lm_forward, engine/lm.h).
 *
 * A step: validate on the host (same rules and messages as lm.c), give every sequence pages for
 * its new rows, pack the per-row metadata (ids, adapters, 3-stream positions, cache slots,
 * attention tiles, block tables) into the pinned mirror and copy it over in one transfer, then
 * enqueue the layers: per layer RMSNorm -> fused q|k|v GEMM (+ segmented LoRA) -> q/k norm, RoPE
 * and the KV write -> paged attention -> o_proj GEMM accumulating into the residual (+ LoRA) ->
 * RMSNorm -> fused gate|up GEMM (+ LoRA) -> SwiGLU -> down GEMM into the residual (+ LoRA) ->
 * DeepStack; then the final norm, the logits of the rows that want them, argmax and pooling.
 * One synchronization per step, after the results are copied back.
 *
 * CUDA graphs: a step whose sequences all add one token (CoT decode) launches the same kernels
 * with the same shapes every time — only the metadata changes, and it lives at fixed device
 * addresses — so such steps are captured once per (rows, logits rows, pooled rows, adapters
 * present) and replayed, which removes the ~10 launches per layer of CPU overhead that dominate
 * small decode batches.  Any capture failure turns graphs off for the context and the step runs
 * eagerly. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/cuda/cuda_internal.h"

#define ALIGN 256

static size_t al(size_t x) {
    return (x + ALIGN - 1) & ~(size_t)(ALIGN - 1);
}
static int imax(int a, int b) {
    return a > b ? a : b;
}

void twn_cu_graphs_clear(twn_cuda_ctx *c) {
    for (int i = 0; i < TWN_CU_GRAPHS; i++)
        if (c->graph[i].valid) {
            cudaGraphExecDestroy(c->graph[i].exec);
            c->graph[i].valid = false;
        }
}

void twn_cu_arena_free(twn_cuda_ctx *c) {
    if (c->ar.dev) cudaFree(c->ar.dev);
    if (c->ar.host) cudaFreeHost(c->ar.host);
    memset(&c->ar, 0, sizeof c->ar);
    if (c->ds_rows) cudaFree(c->ds_rows);
    if (c->ds_feat) cudaFree(c->ds_feat);
    c->ds_rows = NULL, c->ds_feat = NULL, c->ds_cap = 0;
}

/* Makes the arena hold a step of T rows, S sequences, P block-table entries, E embedding rows. */
static int arena_fit(twn_cuda_ctx *c, int T, int S, int P, int E, twn_err *err) {
    cu_arena *a = &c->ar;
    if (a->dev && T <= a->cap_T && S <= a->cap_S && P <= a->cap_P && E <= a->cap_E) return 0;
    int cT = imax(imax(T, a->cap_T), 64), cS = imax(imax(S, a->cap_S), 16);
    int cP = imax(imax(P, a->cap_P), 256), cE = imax(imax(E, a->cap_E), 1);
    if (T > a->cap_T && a->cap_T) cT = imax(T, a->cap_T + a->cap_T / 2);
    if (P > a->cap_P && a->cap_P) cP = imax(P, 2 * a->cap_P);
    cudaStreamSynchronize(c->stream);
    twn_cu_graphs_clear(c); /* they point into the old arena */
    if (a->dev) cudaFree(a->dev);
    if (a->host) cudaFreeHost(a->host);
    a->dev = NULL, a->host = NULL;

    const size_t H = (size_t)c->H, ldqkv = (size_t)(c->qd + 2 * c->kd);
    const size_t maxw = (size_t)imax(c->H, imax(c->qd, c->I));
    size_t off = 0, o_x, o_qkv, o_gu, o_lt, o_fin, o_act, o_lr, o_lg, o_pl, o_am, o_emb, o_meta;
#define TAKE(o, bytes) (o = off, off = al(off + (bytes)))
    TAKE(o_x, (size_t)cT * H * 4);
    TAKE(o_qkv, (size_t)cT * ldqkv * 4);
    TAKE(o_gu, (size_t)cT * 2 * (size_t)c->I * 4);
    TAKE(o_lt, (size_t)cT * (size_t)c->rmax * 4);
    TAKE(o_fin, (size_t)cT * H * 4);
    TAKE(o_act, (size_t)cT * maxw * 2);
    TAKE(o_lr, (size_t)cS * H * 2);
    TAKE(o_lg, (size_t)cS * (size_t)c->V * 4);
    TAKE(o_pl, (size_t)cS * H * 4);
    TAKE(o_am, (size_t)cS * 4);
    TAKE(o_emb, (size_t)cE * H * 4);
    TAKE(o_meta, 0);
    size_t m = 0;
    size_t *mo[] = {&a->o_ids, &a->o_adapter, &a->o_pos, &a->o_slot, &a->o_embsrc, &a->o_tiles,
                    &a->o_bt,  &a->o_lrow,    &a->o_pr0, &a->o_pcnt, &a->o_am};
    const size_t mb[] = {(size_t)cT * 4, (size_t)cT * 4, 3 * (size_t)cT * 4,
                         (size_t)cT * 4, (size_t)cT * 4, (size_t)cT * sizeof(twn_cu_tile),
                         (size_t)cP * 4, (size_t)cS * 4, (size_t)cS * 4,
                         (size_t)cS * 4, (size_t)cS * 4};
    for (size_t i = 0; i < sizeof mb / sizeof *mb; i++) {
        *mo[i] = m;
        m = al(m + mb[i]);
    }
#undef TAKE
    cudaError_t rc = cudaMalloc(&a->dev, off + m);
    if (rc != cudaSuccess) {
        a->dev = NULL;
        return twn_cu_err(err,
                          "cannot allocate %.1f MiB of device memory for a step of %d rows: %s",
                          (double)(off + m) / (1 << 20), T, cudaGetErrorString(rc));
    }
    if (twn_cu_check(cudaMallocHost((void **)&a->host, m), err, "pinned step metadata")) {
        cudaFree(a->dev);
        a->dev = NULL;
        return -1;
    }
    char *b = a->dev;
    a->x = (float *)(b + o_x), a->qkv = (float *)(b + o_qkv), a->gu = (float *)(b + o_gu);
    a->ltmp = (float *)(b + o_lt), a->fin = (float *)(b + o_fin);
    a->act = (twn_bf16 *)(b + o_act), a->lrows = (twn_bf16 *)(b + o_lr);
    a->logits = (float *)(b + o_lg), a->pooled = (float *)(b + o_pl);
    a->argmax = (int32_t *)(b + o_am), a->embeds = (float *)(b + o_emb);
    a->meta = b + o_meta;
    a->meta_bytes = m;
    a->cap_T = cT, a->cap_S = cS, a->cap_P = cP, a->cap_E = cE;
    return 0;
}

/* What one step enqueues, beyond the arena's metadata. */
typedef struct {
    int T, n_tiles, n_log, n_pool;
    unsigned present; /* adapters used by some row */
    int ds_layers;
    int ds_start[256], ds_count[256]; /* per layer, into c->ds_rows / ds_feat */
} step;

#define META(c, o, type) ((type *)((c)->ar.meta + (c)->ar.o))
#define HOST(c, o, type) ((type *)((c)->ar.host + (c)->ar.o))

static void lora(twn_cuda_ctx *c, const cu_layer *ly, int slot, const step *st, const twn_bf16 *X,
                 int ldx, int K, float *Y, int ldy, int N) {
    if (!(st->present & ly->lora_mask[slot])) return;
    twn_cu_lora(c->stream, X, ldx, st->T, K, Y, ldy, N, META(c, o_adapter, int32_t), ly->lora[slot],
                c->ar.ltmp, c->rmax);
}

static int run_step(twn_cuda_ctx *c, const step *st, twn_err *err) {
    cu_arena *a = &c->ar;
    cudaStream_t s = c->stream;
    const int T = st->T, H = c->H, I = c->I, qd = c->qd, kd = c->kd, ldqkv = qd + 2 * kd;
    const float eps = c->eps, scale = 1.0f / sqrtf((float)c->D);
    const int32_t *adapter = META(c, o_adapter, int32_t);
    const size_t layer_kv = (size_t)c->n_pages * c->page_rows * kd;

    twn_cu_embed(s, a->x, T, H, META(c, o_ids, int32_t), META(c, o_embsrc, int32_t), a->embeds,
                 c->embed, c->V, adapter, c->embed_lora);
    for (int l = 0; l < c->L; l++) {
        const cu_layer *ly = &c->layers[l];
        twn_bf16 *kc = c->k_pool + (size_t)l * layer_kv, *vc = c->v_pool + (size_t)l * layer_kv;
        twn_cu_rmsnorm_bf16(s, a->act, H, a->x, H, ly->in_norm, T, H, eps);
        if (twn_cu_gemm(c->blas, a->act, T, H, H, ly->w_qkv, ldqkv, a->qkv, ldqkv, 0.f, err))
            return -1;
        lora(c, ly, TWN_Q, st, a->act, H, H, a->qkv, ldqkv, qd);
        lora(c, ly, TWN_K, st, a->act, H, H, a->qkv + qd, ldqkv, kd);
        lora(c, ly, TWN_V, st, a->act, H, H, a->qkv + qd + kd, ldqkv, kd);
        twn_cu_qk_norm_rope(s, a->qkv, ldqkv, T, c->nh, c->nkv, c->D, ly->q_norm, ly->k_norm, eps,
                            META(c, o_pos, int32_t), a->cap_T, c->inv_freq, c->rope_stream,
                            META(c, o_slot, int32_t), kc, vc);
        twn_cu_attention(s, a->qkv, ldqkv, a->act, qd, META(c, o_tiles, twn_cu_tile), st->n_tiles,
                         META(c, o_bt, int32_t), kc, vc, c->page_rows, c->nh, c->nkv, c->D, scale);
        if (twn_cu_gemm(c->blas, a->act, T, qd, qd, ly->w_o, H, a->x, H, 1.f, err)) return -1;
        lora(c, ly, TWN_O, st, a->act, qd, qd, a->x, H, H);
        twn_cu_rmsnorm_bf16(s, a->act, H, a->x, H, ly->post_norm, T, H, eps);
        if (twn_cu_gemm(c->blas, a->act, T, H, H, ly->w_gu, 2 * I, a->gu, 2 * I, 0.f, err))
            return -1;
        lora(c, ly, TWN_GATE, st, a->act, H, H, a->gu, 2 * I, I);
        lora(c, ly, TWN_UP, st, a->act, H, H, a->gu + I, 2 * I, I);
        twn_cu_silu_mul(s, a->act, I, a->gu, 2 * I, T, I);
        if (twn_cu_gemm(c->blas, a->act, T, I, I, ly->w_down, H, a->x, H, 1.f, err)) return -1;
        lora(c, ly, TWN_DOWN, st, a->act, I, I, a->x, H, H);
        if (l < st->ds_layers && st->ds_count[l])
            twn_cu_add_rows(s, a->x, H, c->ds_rows + st->ds_start[l],
                            c->ds_feat + (size_t)st->ds_start[l] * H, st->ds_count[l]);
    }
    twn_cu_rmsnorm_f32(s, a->fin, H, a->x, H, c->final_norm, T, H, eps);
    if (st->n_log) {
        twn_cu_gather_bf16(s, a->lrows, a->fin, H, META(c, o_lrow, int32_t), st->n_log);
        if (twn_cu_gemm(c->blas, a->lrows, st->n_log, H, H, c->lm_head, c->V, a->logits, c->V, 0.f,
                        err))
            return -1;
        twn_cu_argmax(s, a->logits, st->n_log, c->V, a->argmax);
    }
    if (st->n_pool)
        twn_cu_pool(s, a->fin, H, META(c, o_pr0, int32_t), META(c, o_pcnt, int32_t), st->n_pool, 0,
                    a->pooled);
    return twn_cu_check(cudaGetLastError(), err, "launching the step's kernels");
}

/* Runs st from a graph captured for its shape, capturing it first if needed.  Returns 1 when
 * graphs cannot be used (the caller runs the step eagerly). */
static int run_graph(twn_cuda_ctx *c, const step *st, twn_err *err) {
    cu_graph *g = NULL, *lru = &c->graph[0];
    for (int i = 0; i < TWN_CU_GRAPHS; i++) {
        cu_graph *x = &c->graph[i];
        if (x->valid && x->T == st->T && x->n_log == st->n_log && x->n_pool == st->n_pool &&
            x->present == st->present)
            g = x;
        if (!x->valid || (lru->valid && x->last_use < lru->last_use)) lru = x;
    }
    if (!g) {
        cudaGraph_t graph = NULL;
        if (cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess)
            goto nograph;
        int rc = run_step(c, st, err);
        cudaError_t e2 = cudaStreamEndCapture(c->stream, &graph);
        cudaGraphExec_t exec = NULL;
        if (rc || e2 != cudaSuccess || !graph ||
            cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) {
            if (graph) cudaGraphDestroy(graph);
            goto nograph;
        }
        cudaGraphDestroy(graph);
        if (lru->valid) cudaGraphExecDestroy(lru->exec);
        g = lru;
        *g = (cu_graph){.valid = true,
                        .T = st->T,
                        .n_log = st->n_log,
                        .n_pool = st->n_pool,
                        .present = st->present,
                        .exec = exec};
    }
    g->last_use = ++c->steps;
    return twn_cu_check(cudaGraphLaunch(g->exec, c->stream), err, "cudaGraphLaunch");
nograph:
    (void)cudaGetLastError(); /* clear the capture's error state */
    c->graphs = false;
    snprintf(c->desc + strlen(c->desc), sizeof c->desc - strlen(c->desc),
             " (disabled: capture failed)");
    return 1;
}

/* DeepStack features of the step: per layer, the image rows (global) and their features, laid
 * out layer by layer in c->ds_rows / c->ds_feat. */
static int upload_deepstack(twn_cuda_ctx *c, const twn_cuda_seq *seqs, int n_seqs, const int *row0,
                            step *st, twn_err *err) {
    size_t total = 0;
    st->ds_layers = 0;
    for (int s = 0; s < n_seqs; s++) {
        const twn_lm_deepstack *ds = seqs[s].deepstack;
        if (!ds || !seqs[s].n || !ds->n_rows) continue;
        st->ds_layers = imax(st->ds_layers, ds->n_layers);
        total += (size_t)ds->n_layers * (size_t)ds->n_rows;
    }
    if (!total) {
        st->ds_layers = 0;
        return 0;
    }
    if (st->ds_layers > (int)(sizeof st->ds_start / sizeof *st->ds_start))
        return twn_cu_err(err, "DeepStack over %d layers; at most %d", st->ds_layers,
                          (int)(sizeof st->ds_start / sizeof *st->ds_start));
    if (total > c->ds_cap) {
        if (c->ds_rows) cudaFree(c->ds_rows);
        if (c->ds_feat) cudaFree(c->ds_feat);
        c->ds_rows = NULL, c->ds_feat = NULL, c->ds_cap = 0;
        if (twn_cu_check(cudaMalloc((void **)&c->ds_rows, total * 4), err, "DeepStack rows") ||
            twn_cu_check(cudaMalloc((void **)&c->ds_feat, total * (size_t)c->H * 4), err,
                         "DeepStack features"))
            return -1;
        c->ds_cap = total;
    }
    int32_t *rows = malloc(total * sizeof(int32_t));
    if (!rows) return twn_cu_err(err, "out of memory for DeepStack rows");
    size_t k = 0;
    for (int l = 0; l < st->ds_layers; l++) {
        st->ds_start[l] = (int)k;
        for (int s = 0; s < n_seqs; s++) {
            const twn_lm_deepstack *ds = seqs[s].deepstack;
            if (!ds || !seqs[s].n || !ds->n_rows || l >= ds->n_layers) continue;
            for (int j = 0; j < ds->n_rows; j++) rows[k + (size_t)j] = row0[s] + ds->rows[j];
            if (twn_cu_check(cudaMemcpyAsync(c->ds_feat + k * (size_t)c->H,
                                             ds->feat + (size_t)l * ds->n_rows * c->H,
                                             sizeof(float) * (size_t)ds->n_rows * c->H,
                                             cudaMemcpyHostToDevice, c->stream),
                             err, "copying DeepStack features")) {
                free(rows);
                return -1;
            }
            k += (size_t)ds->n_rows;
        }
        st->ds_count[l] = (int)k - st->ds_start[l];
    }
    int rc = twn_cu_check(cudaMemcpyAsync(c->ds_rows, rows, total * sizeof(int32_t),
                                          cudaMemcpyHostToDevice, c->stream),
                          err, "copying DeepStack rows");
    cudaStreamSynchronize(c->stream); /* `rows` is pageable and freed now */
    free(rows);
    return rc;
}

static int validate(const twn_cuda_ctx *c, const twn_cuda_seq *seqs, int n_seqs, twn_err *err) {
    for (int s = 0; s < n_seqs; s++) {
        const twn_cuda_seq *sq = &seqs[s];
        if (sq->n < 0) return twn_cu_err(err, "sequence %d: negative row count", s);
        if (sq->adapter != TWN_NO_ADAPTER && (sq->adapter < 0 || sq->adapter >= c->n_adapters))
            return twn_cu_err(err, "sequence %d: adapter index %d is not attached", s, sq->adapter);
        if (sq->n && !sq->kv) return twn_cu_err(err, "sequence %d: no KV cache", s);
        const twn_lm_deepstack *ds = sq->deepstack;
        if (ds) {
            if (ds->n_layers < 0 || ds->n_layers > c->L || ds->n_rows < 0 ||
                (ds->n_rows && (!ds->rows || !ds->feat)))
                return twn_cu_err(err,
                                  "sequence %d: DeepStack has %d layer(s) of %d row(s); expected "
                                  "at most %d layers and rows with features",
                                  s, ds->n_layers, ds->n_rows, c->L);
            for (int j = 0; j < ds->n_rows; j++)
                if (ds->rows[j] < 0 || ds->rows[j] >= sq->n)
                    return twn_cu_err(err,
                                      "sequence %d: DeepStack row %d is outside the step's %d "
                                      "row(s)",
                                      s, ds->rows[j], sq->n);
        }
        for (int i = 0; i < sq->n; i++) {
            int32_t id = sq->ids ? sq->ids[i] : TWN_TOKEN_EMBED;
            if (id == TWN_TOKEN_EMBED && !sq->embeds)
                return twn_cu_err(err, "sequence %d row %d: embedding row requested but none given",
                                  s, i);
            if (id != TWN_TOKEN_EMBED && (id < 0 || id >= c->V))
                return twn_cu_err(err,
                                  "sequence %d row %d: token id %d is outside the vocabulary "
                                  "[0, %d)",
                                  s, i, id, c->V);
        }
        if (sq->pooled && sq->n && (sq->pool_rows < 1 || sq->pool_rows > sq->n))
            return twn_cu_err(err, "sequence %d: pooling %d row(s) of a step of %d", s,
                              sq->pool_rows, sq->n);
    }
    return 0;
}

int twn_cu_forward(twn_cuda_ctx *c, twn_cuda_seq *seqs, int n_seqs, twn_err *err) {
    if (validate(c, seqs, n_seqs, err)) return -1;
    /* the current device is per host thread, and steps come from whichever thread runs the
     * scheduler (twn run: several gate and worker threads, serialized by engine/backend.c) */
    if (twn_cu_check(cudaSetDevice(c->device), err, "cudaSetDevice")) return -1;
    (void)cudaGetLastError(); /* run_step's launch check must see this step's errors only */
    step st;
    memset(&st, 0, sizeof st);
    int E = 0, P = 0;
    bool eligible = c->graphs;
    for (int s = 0; s < n_seqs; s++) {
        twn_cuda_seq *sq = &seqs[s];
        if (!sq->n) continue;
        st.T += sq->n;
        if (sq->adapter >= 0) st.present |= 1u << sq->adapter;
        for (int i = 0; i < sq->n; i++) E += !sq->ids || sq->ids[i] == TWN_TOKEN_EMBED;
        st.n_log += sq->logits || sq->argmax;
        st.n_pool += sq->pooled != NULL;
        st.n_tiles += (sq->n + c->tile_rows - 1) / c->tile_rows;
        if (sq->n != 1 || (sq->deepstack && sq->deepstack->n_rows)) eligible = false;
        if (twn_cu_kv_grow(c, sq->kv, sq->kv->len + sq->n, err)) return -1;
        P += sq->kv->n_pages;
    }
    if (!st.T) return 0;
    if (E) eligible = false;
    if (arena_fit(c, st.T, n_seqs, P, E, err)) return -1;
    cu_arena *a = &c->ar;
    const int pr = c->page_rows, H = c->H;

    int *row0 = malloc(sizeof(int) * (size_t)(n_seqs ? n_seqs : 1));
    if (!row0) return twn_cu_err(err, "out of memory");
    int32_t *ids = HOST(c, o_ids, int32_t), *ad = HOST(c, o_adapter, int32_t);
    int32_t *pos = HOST(c, o_pos, int32_t), *slot = HOST(c, o_slot, int32_t);
    int32_t *esrc = HOST(c, o_embsrc, int32_t), *bt = HOST(c, o_bt, int32_t);
    int32_t *lrow = HOST(c, o_lrow, int32_t), *pr0 = HOST(c, o_pr0, int32_t);
    int32_t *pcnt = HOST(c, o_pcnt, int32_t);
    twn_cu_tile *tiles = HOST(c, o_tiles, twn_cu_tile);
    int r = 0, e = 0, nt = 0, nb = 0, nl = 0, np = 0, rc = -1;
    for (int s = 0; s < n_seqs; s++) {
        twn_cuda_seq *sq = &seqs[s];
        twn_cuda_kv *kv = sq->kv;
        row0[s] = r;
        if (!sq->n) continue;
        for (int i = 0; i < sq->n; i += c->tile_rows) {
            int n = sq->n - i < c->tile_rows ? sq->n - i : c->tile_rows;
            tiles[nt++] = (twn_cu_tile){r + i, n, kv->len + i, nb};
        }
        memcpy(bt + nb, kv->pages, sizeof(int32_t) * (size_t)kv->n_pages);
        nb += kv->n_pages;
        if (sq->logits || sq->argmax) lrow[nl++] = r + sq->n - 1;
        if (sq->pooled) {
            pr0[np] = r + sq->n - sq->pool_rows;
            pcnt[np++] = sq->pool_rows;
        }
        int run0 = -1; /* first row of the current run of embedding rows */
        for (int i = 0; i <= sq->n; i++) {
            bool emb = i < sq->n && (!sq->ids || sq->ids[i] == TWN_TOKEN_EMBED);
            if (run0 >= 0 && !emb) { /* copy rows run0 .. i-1 */
                if (twn_cu_check(cudaMemcpyAsync(a->embeds + (size_t)(e - (i - run0)) * H,
                                                 sq->embeds + (size_t)run0 * H,
                                                 sizeof(float) * (size_t)(i - run0) * H,
                                                 cudaMemcpyHostToDevice, c->stream),
                                 err, "copying embedding rows"))
                    goto out;
                run0 = -1;
            }
            if (i == sq->n) break;
            if (emb && run0 < 0) run0 = i;
            ids[r] = emb ? -1 : sq->ids[i];
            esrc[r] = emb ? e++ : 0;
            ad[r] = sq->adapter;
            for (int k = 0; k < 3; k++)
                pos[(size_t)k * a->cap_T + r] =
                    sq->pos ? sq->pos[(size_t)k * sq->n + i] : kv->next_pos + i;
            int p = kv->len + i;
            slot[r] = kv->pages[p / pr] * pr + p % pr;
            r++;
        }
    }
    if (upload_deepstack(c, seqs, n_seqs, row0, &st, err)) goto out;
    if (twn_cu_check(
            cudaMemcpyAsync(a->meta, a->host, a->meta_bytes, cudaMemcpyHostToDevice, c->stream),
            err, "copying step metadata"))
        goto out;

    int g = eligible ? run_graph(c, &st, err) : 1;
    if (g < 0 || (g == 1 && run_step(c, &st, err))) goto out;

    /* results */
    int32_t *am = HOST(c, o_am, int32_t);
    if (st.n_log && twn_cu_check(cudaMemcpyAsync(am, a->argmax, sizeof(int32_t) * (size_t)st.n_log,
                                                 cudaMemcpyDeviceToHost, c->stream),
                                 err, "copying argmax"))
        goto out;
    nl = np = 0;
    for (int s = 0; s < n_seqs; s++) {
        twn_cuda_seq *sq = &seqs[s];
        if (!sq->n) continue;
        cudaError_t x = cudaSuccess;
        if (sq->hidden)
            x = cudaMemcpyAsync(sq->hidden, a->fin + (size_t)row0[s] * H,
                                sizeof(float) * (size_t)sq->n * H, cudaMemcpyDeviceToHost,
                                c->stream);
        if (x == cudaSuccess && sq->logits)
            x = cudaMemcpyAsync(sq->logits, a->logits + (size_t)nl * c->V,
                                sizeof(float) * (size_t)c->V, cudaMemcpyDeviceToHost, c->stream);
        nl += sq->logits || sq->argmax;
        if (x == cudaSuccess && sq->pooled)
            x = cudaMemcpyAsync(sq->pooled, a->pooled + (size_t)np++ * H, sizeof(float) * (size_t)H,
                                cudaMemcpyDeviceToHost, c->stream);
        if (twn_cu_check(x, err, "copying results")) goto out;
    }
    if (twn_cu_check(cudaStreamSynchronize(c->stream), err, "running the step")) goto out;
    nl = 0;
    for (int s = 0; s < n_seqs; s++) {
        twn_cuda_seq *sq = &seqs[s];
        if (!sq->n) continue;
        if (sq->logits || sq->argmax) {
            if (sq->argmax) *sq->argmax = am[nl];
            nl++;
        }
        /* get_rope_index: the next text position is max(all positions so far) + 1 (lm.c) */
        int32_t mx = sq->kv->next_pos + sq->n - 1;
        if (sq->pos) {
            mx = sq->kv->next_pos - 1;
            for (int i = 0; i < 3 * sq->n; i++) mx = sq->pos[i] > mx ? sq->pos[i] : mx;
        }
        sq->kv->next_pos = mx + 1;
        sq->kv->len += sq->n;
    }
    rc = 0;
out:
    if (rc) cudaStreamSynchronize(c->stream); /* nothing of this step may still read host data */
    free(row0);
    return rc;
}
