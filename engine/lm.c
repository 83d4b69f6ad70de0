/* lm.c — loading the Qwen3-VL text decoder and running ragged, mixed-adapter forward steps.
 *
 * See lm.h for the batch model.  Loading upcasts bf16/f16 weights to fp32 once and then drops the
 * mmap, so resident memory is the fp32 weights plus KV caches and one step's activations. */
#include "engine/lm.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "engine/cpu/ops.h"
#include "engine/safetensors.h"
#include "engine/tensor.h"
#include "util/fileio.h"
#include "util/mem.h"

static const char *const proj_names[TWN_NPROJ] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};

/* Reads tensor `name` with the expected shape into a new fp32 buffer. */
static float *load_f32(const twn_st_set *st, const char *name, int ndim, int64_t d0, int64_t d1,
                       size_t *bytes, twn_err *err) {
    const twn_tensor *t = twn_st_set_find(st, name);
    if (!t) {
        twn_err_set(err, "tensor %s is missing from the checkpoint", name);
        return NULL;
    }
    int64_t shape[2] = {d0, d1};
    if (twn_tensor_expect(t, twn_st_set_file_of(st, name), ndim, shape, err)) return NULL;
    size_t n = (size_t)twn_tensor_numel(t);
    float *buf = twn_try_alloc(n * sizeof(float));
    if (!buf) {
        twn_err_set(err, "cannot allocate %zu bytes for %s", n * sizeof(float), name);
        return NULL;
    }
    if (twn_tensor_to_f32(t, buf, err)) {
        twn_free(buf);
        twn_err_wrap(err, "%s", twn_st_set_file_of(st, name));
        return NULL;
    }
    twn_st_set_release(st, name);
    *bytes += n * sizeof(float);
    return buf;
}

int twn_lm_load(const char *dir, twn_lm **out, twn_err *err) {
    twn_config cfg;
    char *cfg_path = twn_path_join(dir, "config.json");
    int rc = twn_config_load(cfg_path, &cfg, err);
    twn_free(cfg_path);
    if (rc) return -1;
    twn_st_set *st = NULL;
    if (twn_st_set_open_dir(dir, &st, err)) return -1;

    twn_lm *lm = twn_calloc(1, sizeof *lm);
    const twn_text_config *c = &cfg.text;
    lm->cfg = *c;
    lm->H = c->hidden_size;
    lm->I = c->intermediate_size;
    lm->nh = c->num_attention_heads;
    lm->nkv = c->num_key_value_heads;
    lm->D = c->head_dim;
    lm->V = c->vocab_size;
    lm->L = c->num_hidden_layers;
    int H = lm->H, I = lm->I, D = lm->D, qd = lm->nh * D, kd = lm->nkv * D;
    size_t bytes = 0;
    char name[256];
#define LOAD(dst, nm, nd, a, b)                                                                    \
    do {                                                                                           \
        if (!((dst) = load_f32(st, (nm), (nd), (a), (b), &bytes, err))) goto fail;                 \
    } while (0)
    LOAD(lm->embed, "model.language_model.embed_tokens.weight", 2, lm->V, H);
    LOAD(lm->final_norm, "model.language_model.norm.weight", 1, H, 0);
    if (twn_st_set_find(st, "lm_head.weight"))
        LOAD(lm->lm_head, "lm_head.weight", 2, lm->V, H);
    else if (cfg.tie_word_embeddings)
        lm->lm_head = lm->embed;
    else {
        twn_err_set(err, "%s: lm_head.weight is missing and tie_word_embeddings is false", dir);
        goto fail;
    }
    lm->layers = twn_calloc((size_t)lm->L, sizeof *lm->layers);
    const int64_t shapes[TWN_NPROJ][2] = {{qd, H}, {kd, H}, {kd, H}, {H, qd},
                                          {I, H},  {I, H},  {H, I}};
    for (int l = 0; l < lm->L; l++) {
        twn_lm_layer *ly = &lm->layers[l];
        const char *p = "model.language_model.layers";
        snprintf(name, sizeof name, "%s.%d.input_layernorm.weight", p, l);
        LOAD(ly->in_norm, name, 1, H, 0);
        snprintf(name, sizeof name, "%s.%d.post_attention_layernorm.weight", p, l);
        LOAD(ly->post_norm, name, 1, H, 0);
        snprintf(name, sizeof name, "%s.%d.self_attn.q_norm.weight", p, l);
        LOAD(ly->q_norm, name, 1, D, 0);
        snprintf(name, sizeof name, "%s.%d.self_attn.k_norm.weight", p, l);
        LOAD(ly->k_norm, name, 1, D, 0);
        for (int j = 0; j < TWN_NPROJ; j++) {
            snprintf(name, sizeof name, "%s.%d.%s.weight", p, l, proj_names[j]);
            LOAD(ly->w[j], name, 2, shapes[j][0], shapes[j][1]);
        }
    }
#undef LOAD
    twn_st_set_close(st);
    st = NULL;

    /* Qwen3VLTextRotaryEmbedding: inv_freq = 1 / theta^(arange(0, D, 2) / D) in fp32, and the
     * interleaved M-RoPE layout [THW THW ... TT]: frequency j belongs to H when j % 3 == 1 and
     * j < 3*section[1], to W when j % 3 == 2 and j < 3*section[2], else to T. */
    lm->inv_freq = twn_malloc(sizeof(float) * (size_t)(D / 2));
    lm->rope_stream = twn_malloc((size_t)(D / 2));
    for (int j = 0; j < D / 2; j++) {
        float e = (float)(2 * j) / (float)D;
        lm->inv_freq[j] = 1.0f / powf((float)c->rope_theta, e);
        int s = 0;
        if (j % 3 == 1 && j < 3 * c->mrope_section[1])
            s = 1;
        else if (j % 3 == 2 && j < 3 * c->mrope_section[2])
            s = 2;
        lm->rope_stream[j] = (uint8_t)s;
    }
    lm->weight_bytes = bytes;
    lm->n_params = (int64_t)(bytes / sizeof(float));
    *out = lm;
    return 0;
fail:
    twn_st_set_close(st);
    twn_err_wrap(err, "loading %s", dir);
    twn_lm_free(lm);
    return -1;
}

void twn_lm_free(twn_lm *lm) {
    if (!lm) return;
    if (lm->lm_head != lm->embed) twn_free(lm->lm_head);
    twn_free(lm->embed);
    twn_free(lm->final_norm);
    for (int l = 0; lm->layers && l < lm->L; l++) {
        twn_lm_layer *ly = &lm->layers[l];
        twn_free(ly->in_norm);
        twn_free(ly->post_norm);
        twn_free(ly->q_norm);
        twn_free(ly->k_norm);
        for (int j = 0; j < TWN_NPROJ; j++) twn_free(ly->w[j]);
    }
    twn_free(lm->layers);
    twn_free(lm->inv_freq);
    twn_free(lm->rope_stream);
    twn_free(lm);
}

int twn_lm_attach_adapter(twn_lm *lm, const twn_adapter *a, int *index, twn_err *err) {
    if (lm->n_adapters >= TWN_MAX_ADAPTERS)
        return twn_err_set(err, "adapter %s: at most %d adapters can be attached", a->name,
                           TWN_MAX_ADAPTERS);
    int idx = lm->n_adapters;
    const int in_f[TWN_NPROJ] = {lm->H, lm->H, lm->H, lm->nh * lm->D, lm->H, lm->H, lm->I};
    const int out_f[TWN_NPROJ] = {
        lm->nh * lm->D, lm->nkv * lm->D, lm->nkv * lm->D, lm->H, lm->I, lm->I, lm->H};
    for (int i = 0; i < a->n_loras; i++) {
        const twn_lora *lo = &a->loras[i];
        const char *m = lo->module;
        if (!strncmp(m, "model.visual.", 13)) continue; /* the vision tower's, not ours */
        if (!strcmp(m, "model.language_model.embed_tokens")) {
            if (!lo->embedding || lo->in_features != lm->V || lo->out_features != lm->H)
                return twn_err_set(err,
                                   "adapter %s (%s): embed_tokens LoRA has shape %dx%d, "
                                   "expected vocab %d x hidden %d",
                                   a->name, a->dir, lo->in_features, lo->out_features, lm->V,
                                   lm->H);
            lm->embed_lora[idx] = lo;
            continue;
        }
        int layer = -1, consumed = 0, slot = -1;
        if (sscanf(m, "model.language_model.layers.%d.%n", &layer, &consumed) == 1 && consumed) {
            for (int j = 0; j < TWN_NPROJ; j++)
                if (!strcmp(m + consumed, proj_names[j])) slot = j;
        }
        if (layer < 0 || layer >= lm->L || slot < 0)
            return twn_err_set(err,
                               "adapter %s (%s): LoRA on module %s, which this engine does "
                               "not apply (supported: the text decoder's q/k/v/o/gate/up/down "
                               "projections, embed_tokens, and vision modules)",
                               a->name, a->dir, m);
        if (lo->in_features != in_f[slot] || lo->out_features != out_f[slot])
            return twn_err_set(err,
                               "adapter %s (%s): %s has in=%d out=%d, the model has in=%d "
                               "out=%d",
                               a->name, a->dir, m, lo->in_features, lo->out_features, in_f[slot],
                               out_f[slot]);
        lm->layers[layer].lora[idx][slot] = lo;
    }
    lm->adapters[idx] = a;
    lm->n_adapters++;
    *index = idx;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* KV cache */

void twn_kv_init(twn_kv *kv, const twn_lm *lm) {
    memset(kv, 0, sizeof *kv);
    kv->n_layers = lm->L;
    kv->kvdim = lm->nkv * lm->D;
    kv->k = twn_calloc((size_t)lm->L, sizeof *kv->k);
    kv->v = twn_calloc((size_t)lm->L, sizeof *kv->v);
}

void twn_kv_free(twn_kv *kv) {
    for (int l = 0; kv->k && l < kv->n_layers; l++) {
        twn_free(kv->k[l]);
        twn_free(kv->v[l]);
    }
    twn_free(kv->k);
    twn_free(kv->v);
    memset(kv, 0, sizeof *kv);
}

void twn_kv_truncate(twn_kv *kv, int len) {
    if (len < kv->len) kv->len = len;
}

void twn_kv_reserve(twn_kv *kv, int need) {
    if (need <= kv->cap) return;
    int cap = kv->cap ? kv->cap : 64;
    while (cap < need) cap *= 2;
    for (int l = 0; l < kv->n_layers; l++) {
        kv->k[l] = twn_realloc(kv->k[l], (size_t)cap * kv->kvdim * sizeof(float));
        kv->v[l] = twn_realloc(kv->v[l], (size_t)cap * kv->kvdim * sizeof(float));
    }
    kv->cap = cap;
}

/* ------------------------------------------------------------------------------------------ */
/* Forward */

/* A run of consecutive rows that share one adapter. */
typedef struct {
    int row0, n, adapter;
} run;

/* Y[T,N] = X[T,K] W^T, then each run's LoRA delta added to its rows. */
static void project(const twn_lm_layer *ly, int slot, const float *X, int T, int K, float *Y, int N,
                    const run *runs, int n_runs, float *tmp) {
    twn_cpu_linear(X, T, K, K, ly->w[slot], N, Y, N, 1.f, 0.f);
    for (int r = 0; r < n_runs; r++) {
        if (runs[r].adapter < 0) continue;
        const twn_lora *lo = ly->lora[runs[r].adapter][slot];
        if (!lo) continue;
        const float *xr = X + (size_t)runs[r].row0 * K;
        twn_cpu_linear(xr, runs[r].n, K, K, lo->A, lo->r, tmp, lo->r, 1.f, 0.f);
        twn_cpu_linear(tmp, runs[r].n, lo->r, lo->r, lo->B, N, Y + (size_t)runs[r].row0 * N, N,
                       lo->scaling, 1.f);
    }
}

int twn_lm_forward(const twn_lm *lm, twn_lm_seq *seqs, int n_seqs, twn_lm_trace_fn trace,
                   void *trace_ctx, twn_err *err) {
    const int H = lm->H, I = lm->I, D = lm->D, nh = lm->nh, nkv = lm->nkv, half = D / 2;
    const int qd = nh * D, kd = nkv * D;
    int T = 0, rmax = 1;
    for (int s = 0; s < n_seqs; s++) {
        if (seqs[s].n < 0) return twn_err_set(err, "sequence %d: negative row count", s);
        if (seqs[s].adapter != TWN_NO_ADAPTER &&
            (seqs[s].adapter < 0 || seqs[s].adapter >= lm->n_adapters))
            return twn_err_set(err, "sequence %d: adapter index %d is not attached", s,
                               seqs[s].adapter);
        const twn_lm_deepstack *ds = seqs[s].deepstack;
        if (ds) {
            if (ds->n_layers < 0 || ds->n_layers > lm->L || ds->n_rows < 0 ||
                (ds->n_rows && (!ds->rows || !ds->feat)))
                return twn_err_set(err,
                                   "sequence %d: DeepStack has %d layer(s) of %d row(s); expected "
                                   "at most %d layers and rows with features",
                                   s, ds->n_layers, ds->n_rows, lm->L);
            for (int j = 0; j < ds->n_rows; j++)
                if (ds->rows[j] < 0 || ds->rows[j] >= seqs[s].n)
                    return twn_err_set(err,
                                       "sequence %d: DeepStack row %d is outside the step's %d "
                                       "row(s)",
                                       s, ds->rows[j], seqs[s].n);
        }
        T += seqs[s].n;
    }
    if (T == 0) return 0;
    for (int a = 0; a < lm->n_adapters; a++)
        for (int i = 0; i < lm->adapters[a]->n_loras; i++)
            if (lm->adapters[a]->loras[i].r > rmax) rmax = lm->adapters[a]->loras[i].r;

    int maxw = I > qd ? I : qd;
    float *x = twn_try_alloc((size_t)T * H * sizeof(float));
    float *xn = twn_try_alloc((size_t)T * H * sizeof(float));
    float *q = twn_try_alloc((size_t)T * qd * sizeof(float));
    float *k = twn_try_alloc((size_t)T * kd * sizeof(float));
    float *v = twn_try_alloc((size_t)T * kd * sizeof(float));
    float *att = twn_try_alloc((size_t)T * qd * sizeof(float));
    float *g = twn_try_alloc((size_t)T * maxw * sizeof(float));
    float *u = twn_try_alloc((size_t)T * I * sizeof(float));
    float *cs = twn_try_alloc((size_t)T * half * sizeof(float));
    float *sn = twn_try_alloc((size_t)T * half * sizeof(float));
    float *tmp = twn_try_alloc((size_t)T * rmax * sizeof(float));
    run *runs = twn_malloc(sizeof(run) * (size_t)n_seqs);
    int *row0 = twn_malloc(sizeof(int) * (size_t)n_seqs);
    int n_runs = 0, rc = -1;
    if (!x || !xn || !q || !k || !v || !att || !g || !u || !cs || !sn || !tmp) {
        twn_err_set(err, "cannot allocate activations for a step of %d rows", T);
        goto out;
    }

    /* Embeddings, positions, runs. */
    for (int s = 0, r = 0; s < n_seqs; s++) {
        twn_lm_seq *sq = &seqs[s];
        row0[s] = r;
        if (sq->n && n_runs && runs[n_runs - 1].adapter == sq->adapter &&
            runs[n_runs - 1].row0 + runs[n_runs - 1].n == r)
            runs[n_runs - 1].n += sq->n;
        else if (sq->n)
            runs[n_runs++] = (run){r, sq->n, sq->adapter};
        const twn_lora *el = sq->adapter >= 0 ? lm->embed_lora[sq->adapter] : NULL;
        for (int i = 0; i < sq->n; i++, r++) {
            float *xr = x + (size_t)r * H;
            int32_t id = sq->ids ? sq->ids[i] : TWN_TOKEN_EMBED;
            if (id == TWN_TOKEN_EMBED) {
                if (!sq->embeds) {
                    twn_err_set(err, "sequence %d row %d: embedding row requested but none given",
                                s, i);
                    goto out;
                }
                memcpy(xr, sq->embeds + (size_t)i * H, sizeof(float) * (size_t)H);
            } else if (id < 0 || id >= lm->V) {
                twn_err_set(err,
                            "sequence %d row %d: token id %d is outside the vocabulary "
                            "[0, %d)",
                            s, i, id, lm->V);
                goto out;
            } else {
                memcpy(xr, lm->embed + (size_t)id * H, sizeof(float) * (size_t)H);
                if (el) /* peft Embedding: + (A^T[id] @ B^T) * scaling */
                    for (int j = 0; j < el->r; j++) {
                        float a = el->A[(size_t)j * lm->V + id] * el->scaling;
                        for (int h = 0; h < H; h++) xr[h] += a * el->B[(size_t)h * el->r + j];
                    }
            }
            int32_t p3[3];
            for (int st = 0; st < 3; st++)
                p3[st] = sq->pos ? sq->pos[(size_t)st * sq->n + i] : sq->kv->next_pos + i;
            for (int j = 0; j < half; j++) {
                float ang = (float)p3[lm->rope_stream[j]] * lm->inv_freq[j];
                cs[(size_t)r * half + j] = cosf(ang);
                sn[(size_t)r * half + j] = sinf(ang);
            }
        }
        twn_kv_reserve(sq->kv, sq->kv->len + sq->n);
    }

    const float scale = 1.0f / sqrtf((float)D);
    const float eps = (float)lm->cfg.rms_norm_eps;
    for (int l = 0; l < lm->L; l++) {
        const twn_lm_layer *ly = &lm->layers[l];
        twn_cpu_rmsnorm(xn, x, ly->in_norm, T, H, H, eps);
        project(ly, TWN_Q, xn, T, H, q, qd, runs, n_runs, tmp);
        project(ly, TWN_K, xn, T, H, k, kd, runs, n_runs, tmp);
        project(ly, TWN_V, xn, T, H, v, kd, runs, n_runs, tmp);
        twn_cpu_rmsnorm(q, q, ly->q_norm, T * nh, D, D, eps);
        twn_cpu_rmsnorm(k, k, ly->k_norm, T * nkv, D, D, eps);
        twn_cpu_rope(q, T, nh, D, qd, cs, sn);
        twn_cpu_rope(k, T, nkv, D, kd, cs, sn);
        for (int s = 0; s < n_seqs; s++) {
            twn_lm_seq *sq = &seqs[s];
            if (!sq->n) continue;
            twn_kv *kv = sq->kv;
            memcpy(kv->k[l] + (size_t)kv->len * kd, k + (size_t)row0[s] * kd,
                   sizeof(float) * (size_t)sq->n * kd);
            memcpy(kv->v[l] + (size_t)kv->len * kd, v + (size_t)row0[s] * kd,
                   sizeof(float) * (size_t)sq->n * kd);
            twn_cpu_attention(q + (size_t)row0[s] * qd, kv->k[l], kv->v[l],
                              att + (size_t)row0[s] * qd, sq->n, kv->len + sq->n, nh, nkv, D,
                              scale);
        }
        project(ly, TWN_O, att, T, qd, xn, H, runs, n_runs, tmp);
        for (size_t i = 0; i < (size_t)T * H; i++) x[i] += xn[i];
        twn_cpu_rmsnorm(xn, x, ly->post_norm, T, H, H, eps);
        project(ly, TWN_GATE, xn, T, H, g, I, runs, n_runs, tmp);
        project(ly, TWN_UP, xn, T, H, u, I, runs, n_runs, tmp);
        twn_cpu_silu_mul(g, u, (int64_t)T * I);
        project(ly, TWN_DOWN, g, T, I, xn, H, runs, n_runs, tmp);
        for (size_t i = 0; i < (size_t)T * H; i++) x[i] += xn[i];
        if (trace)
            for (int s = 0; s < n_seqs; s++)
                if (seqs[s].n) trace(trace_ctx, s, l, x + (size_t)row0[s] * H, seqs[s].n, H);
        /* DeepStack: hidden_states[visual_pos_masks] += deepstack_visual_embeds[l] */
        for (int s = 0; s < n_seqs; s++) {
            const twn_lm_deepstack *ds = seqs[s].deepstack;
            if (!ds || l >= ds->n_layers) continue;
            for (int j = 0; j < ds->n_rows; j++) {
                float *xr = x + (size_t)(row0[s] + ds->rows[j]) * H;
                const float *f = ds->feat + ((size_t)l * ds->n_rows + j) * H;
                for (int h = 0; h < H; h++) xr[h] += f[h];
            }
        }
    }

    twn_cpu_rmsnorm(xn, x, lm->final_norm, T, H, H, eps);
    for (int s = 0; s < n_seqs; s++) {
        twn_lm_seq *sq = &seqs[s];
        if (!sq->n) continue;
        if (sq->hidden)
            memcpy(sq->hidden, xn + (size_t)row0[s] * H, sizeof(float) * (size_t)sq->n * H);
        if (sq->logits)
            twn_cpu_linear(xn + (size_t)(row0[s] + sq->n - 1) * H, 1, H, H, lm->lm_head, lm->V,
                           sq->logits, lm->V, 1.f, 0.f);
        /* get_rope_index: the next text position is max(all positions so far) + 1. */
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
    twn_free(x);
    twn_free(xn);
    twn_free(q);
    twn_free(k);
    twn_free(v);
    twn_free(att);
    twn_free(g);
    twn_free(u);
    twn_free(cs);
    twn_free(sn);
    twn_free(tmp);
    twn_free(runs);
    twn_free(row0);
    return rc;
}
