/* backend.c — choosing and driving the decoder backend: cpu (engine/lm.c) or the dlopen()ed
 * CUDA module (engine/cuda/).  See backend.h for the contract and the module search order. */
#include "engine/backend.h"

#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/cuda/cuda_abi.h"
#include "util/mem.h"

struct twn_bkv {
    twn_kv cpu;
    int64_t held; /* cpu with a KV budget: rows this cache holds of the budget */
    twn_cuda_kv *dev;
};

struct twn_backend {
    twn_backend_kind kind;
    const twn_lm *lm;
    const twn_cuda_module *mod;
    twn_cuda_ctx *ctx;
    /* cuda: one context (stream, step arena, KV page list) serves every thread of the process
     * (twn run's gate and worker threads share one model), so its calls are serialized.  The
     * cpu backend needs no lock: twn_lm_forward only reads the model. */
    pthread_mutex_t lock;
    /* cpu with a KV budget (opts.kv_budget_bytes): rows of fp32 K and V all layers may hold,
     * handed out like the cuda pool's pages (reserved at open, grown by a step, returned at
     * close), so that the scheduler's waiting for KV is the same on both; 0: unbounded */
    int64_t kv_rows_cap, kv_rows_used;
    char desc[TWN_ERR_MAX + 64];
};

void twn_backend_opts_default(twn_backend_opts *o) {
    memset(o, 0, sizeof *o);
    o->kind = TWN_BACKEND_AUTO;
    o->cuda_graphs = true;
}

int twn_backend_kind_parse(const char *s, twn_backend_kind *kind, twn_err *err) {
    if (s && !strcmp(s, "cpu"))
        *kind = TWN_BACKEND_CPU;
    else if (s && !strcmp(s, "cuda"))
        *kind = TWN_BACKEND_CUDA;
    else if (s && !strcmp(s, "auto"))
        *kind = TWN_BACKEND_AUTO;
    else
        return twn_err_set(err, "backend '%s': expected cpu, cuda or auto", s ? s : "(null)");
    return 0;
}

const char *twn_backend_kind_name(twn_backend_kind kind) {
    return kind == TWN_BACKEND_CPU ? "cpu" : kind == TWN_BACKEND_CUDA ? "cuda" : "auto";
}

/* ------------------------------------------------------------------------------------------ */
/* Loading the module */

typedef struct {
    char key[PATH_MAX]; /* the explicit path, or "" for the search */
    bool used;
    const twn_cuda_module *mod;
    char why[TWN_ERR_MAX];
} mod_slot;

static pthread_mutex_t mod_lock = PTHREAD_MUTEX_INITIALIZER;
static mod_slot mod_cache[4];

/* dlopen()s one file; on failure appends the reason to why (when it is the first reason). */
static const twn_cuda_module *load_one(const char *path, char *why, size_t n) {
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *e = dlerror();
        if (!why[0]) snprintf(why, n, "cannot load the CUDA module %s: %s", path, e ? e : "?");
        return NULL;
    }
    twn_cuda_module_get_fn get = (twn_cuda_module_get_fn)dlsym(h, TWN_CUDA_MODULE_SYMBOL);
    if (!get) {
        if (!why[0])
            snprintf(why, n, "%s is not a twn CUDA module (no symbol %s)", path,
                     TWN_CUDA_MODULE_SYMBOL);
        return NULL; /* never dlclose: see backend.h */
    }
    const twn_cuda_module *m = get(TWN_CUDA_ABI_VERSION);
    if (!m || m->abi_version != TWN_CUDA_ABI_VERSION || m->size < sizeof(twn_cuda_module)) {
        if (!why[0])
            snprintf(why, n,
                     "%s was built for another version of twn (module ABI %d expected); rebuild "
                     "it with this binary",
                     path, TWN_CUDA_ABI_VERSION);
        return NULL;
    }
    return m;
}

/* Appends s to the list in buf (", "-separated), truncating quietly. */
static void append(char *buf, size_t cap, const char *s) {
    size_t k = strlen(buf);
    if (k && k + 2 < cap) memcpy(buf + k, ", ", 3), k += 2;
    size_t m = strlen(s);
    if (m > cap - 1 - k) m = cap - 1 - k;
    memcpy(buf + k, s, m);
    buf[k + m] = 0;
}

/* Tries one candidate path: loads it if the file exists, else notes it in `tried`. */
static const twn_cuda_module *try_path(const char *p, char *tried, size_t cap, char *why,
                                       size_t n) {
    if (access(p, F_OK) == 0) return load_one(p, why, n);
    append(tried, cap, p);
    return NULL;
}

static const twn_cuda_module *search(char *why, size_t n) {
    char tried[2048] = "", cand[PATH_MAX + 32], exe[PATH_MAX];
    const twn_cuda_module *m = NULL;
    why[0] = 0;
#define TRY_PATH(p)                                                                                \
    do {                                                                                           \
        if ((m = try_path((p), tried, sizeof tried, why, n))) return m;                            \
    } while (0)
    const char *env = getenv("TWN_CUDA_MODULE");
    if (env && *env) TRY_PATH(env);
    ssize_t k = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (k > 0) {
        exe[k] = 0;
        char *slash = strrchr(exe, '/');
        if (slash) *slash = 0;
        snprintf(cand, sizeof cand, "%s/%s", exe, TWN_CUDA_MODULE_NAME);
        TRY_PATH(cand);
        snprintf(cand, sizeof cand, "%s/../lib/%s", exe, TWN_CUDA_MODULE_NAME);
        TRY_PATH(cand);
    }
#ifdef TWN_CUDA_MODULE_BUILD_PATH
    TRY_PATH(TWN_CUDA_MODULE_BUILD_PATH);
#endif
#undef TRY_PATH
    if (why[0]) return NULL; /* a module exists but did not load: that is the reason */
    void *h = dlopen(TWN_CUDA_MODULE_NAME, RTLD_NOW | RTLD_LOCAL);
    if (h) return load_one(TWN_CUDA_MODULE_NAME, why, n);
#ifdef TWN_CUDA_MODULE_BUILD_PATH
    const char *hint = "";
#else
    const char *hint =
        "; this build has no CUDA backend (TWN_CUDA=OFF or no nvcc at configure time)";
#endif
    snprintf(why, n, "CUDA module %s not found (looked at %s, and the loader's path)%s",
             TWN_CUDA_MODULE_NAME, tried[0] ? tried : "no path", hint);
    return NULL;
}

const struct twn_cuda_module *twn_backend_cuda_module(const char *path, char *why, size_t n) {
    const char *key = path ? path : "";
    pthread_mutex_lock(&mod_lock);
    mod_slot *s = NULL;
    for (size_t i = 0; i < sizeof mod_cache / sizeof *mod_cache && !s; i++)
        if (mod_cache[i].used && !strcmp(mod_cache[i].key, key)) s = &mod_cache[i];
    if (!s) {
        for (size_t i = 0; i < sizeof mod_cache / sizeof *mod_cache && !s; i++)
            if (!mod_cache[i].used) s = &mod_cache[i];
        if (!s) s = &mod_cache[sizeof mod_cache / sizeof *mod_cache - 1]; /* recycle */
        memset(s, 0, sizeof *s);
        snprintf(s->key, sizeof s->key, "%s", key);
        s->used = true;
        s->why[0] = 0;
        if (path) {
            s->mod = load_one(path, s->why, sizeof s->why);
            if (!s->mod && !s->why[0]) snprintf(s->why, sizeof s->why, "%s: not loadable", path);
        } else
            s->mod = search(s->why, sizeof s->why);
    }
    const twn_cuda_module *m = s->mod;
    if (!m && why) snprintf(why, n, "%s", s->why);
    pthread_mutex_unlock(&mod_lock);
    return m;
}

int twn_backend_cuda_available(const twn_backend_opts *o, char *why, size_t n) {
    const twn_cuda_module *m = twn_backend_cuda_module(o ? o->cuda_module : NULL, why, n);
    if (!m) return 0;
    char msg[512];
    if (m->probe(o ? o->device : 0, msg, sizeof msg)) {
        snprintf(why, n, "%s", msg);
        return 0;
    }
    return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* Opening */

int twn_backend_open(const twn_lm *lm, const twn_backend_opts *o, twn_backend **out, twn_err *err) {
    twn_backend_opts def;
    if (!o) {
        twn_backend_opts_default(&def);
        o = &def;
    }
    twn_backend *b = twn_calloc(1, sizeof *b);
    b->lm = lm;
    pthread_mutex_init(&b->lock, NULL);
    *out = NULL;
    if (o->kind != TWN_BACKEND_CPU) {
        char why[TWN_ERR_MAX];
        if (twn_backend_cuda_available(o, why, sizeof why)) {
            b->mod = twn_backend_cuda_module(o->cuda_module, NULL, 0);
            twn_cuda_opts co = {o->device, o->kv_budget_bytes, o->kv_page_rows, o->cuda_graphs};
            twn_err e;
            e.msg[0] = 0;
            if (b->mod->create(lm, &co, &b->ctx, &e) == 0) {
                b->kind = TWN_BACKEND_CUDA;
                snprintf(b->desc, sizeof b->desc, "%s", b->mod->describe(b->ctx));
                *out = b;
                return 0;
            }
            snprintf(why, sizeof why, "loading the model on CUDA device %d failed: %s", o->device,
                     e.msg);
            b->mod = NULL;
        }
        if (o->kind == TWN_BACKEND_CUDA) {
            pthread_mutex_destroy(&b->lock);
            twn_free(b);
            return twn_err_set(err, "backend cuda: %s", why);
        }
        snprintf(b->desc, sizeof b->desc, "cpu (OpenBLAS, fp32; CUDA unavailable: %s)", why);
    } else
        snprintf(b->desc, sizeof b->desc, "cpu (OpenBLAS, fp32)");
    b->kind = TWN_BACKEND_CPU;
    if (o->kv_budget_bytes) {
        const size_t row = 2 * sizeof(float) * (size_t)lm->L * (size_t)lm->nkv * (size_t)lm->D;
        b->kv_rows_cap = (int64_t)(o->kv_budget_bytes / row);
        if (b->kv_rows_cap < 1) {
            pthread_mutex_destroy(&b->lock);
            twn_free(b);
            return twn_err_set(err,
                               "KV budget of %zu bytes holds no row (%zu bytes of fp32 K and V "
                               "per row over %d layers)",
                               o->kv_budget_bytes, row, lm->L);
        }
        size_t k = strlen(b->desc) - 1; /* before the closing parenthesis */
        snprintf(b->desc + k, sizeof b->desc - k, "; KV budget %lld rows)",
                 (long long)b->kv_rows_cap);
    }
    *out = b;
    return 0;
}

/* cpu KV budget: takes `rows` more for kv, or fails like the cuda pool does. */
static int cpu_kv_take(twn_backend *b, twn_bkv *kv, int64_t rows, int64_t total, twn_err *err) {
    if (!b->kv_rows_cap || rows <= 0) return 0;
    pthread_mutex_lock(&b->lock);
    int64_t left = b->kv_rows_cap - b->kv_rows_used;
    if (rows > left) {
        pthread_mutex_unlock(&b->lock);
        return twn_err_set(err,
                           "KV budget exhausted: a sequence needs %lld more row(s) (%lld in all), "
                           "%lld of %lld rows are free; raise the KV budget or lower max_active",
                           (long long)rows, (long long)total, (long long)left,
                           (long long)b->kv_rows_cap);
    }
    b->kv_rows_used += rows;
    kv->held += rows;
    pthread_mutex_unlock(&b->lock);
    return 0;
}

void twn_backend_close(twn_backend *b) {
    if (!b) return;
    if (b->ctx) b->mod->destroy(b->ctx);
    pthread_mutex_destroy(&b->lock);
    twn_free(b);
}

twn_backend_kind twn_backend_which(const twn_backend *b) {
    return b->kind;
}

const char *twn_backend_describe(const twn_backend *b) {
    return b->desc;
}

/* ------------------------------------------------------------------------------------------ */
/* KV caches */

int twn_backend_kv_open(twn_backend *b, int reserve, twn_bkv **out, twn_err *err) {
    twn_bkv *kv = twn_calloc(1, sizeof *kv);
    if (b->kind == TWN_BACKEND_CUDA) {
        pthread_mutex_lock(&b->lock);
        int rc = b->mod->kv_open(b->ctx, reserve, &kv->dev, err);
        pthread_mutex_unlock(&b->lock);
        if (rc) {
            twn_free(kv);
            return -1;
        }
    } else {
        if (cpu_kv_take(b, kv, reserve, reserve, err)) {
            twn_free(kv);
            return -1;
        }
        twn_kv_init(&kv->cpu, b->lm);
        if (reserve > 0) twn_kv_reserve(&kv->cpu, reserve);
    }
    *out = kv;
    return 0;
}

void twn_backend_kv_close(twn_backend *b, twn_bkv *kv) {
    if (!kv) return;
    if (b->kind == TWN_BACKEND_CUDA) {
        pthread_mutex_lock(&b->lock);
        b->mod->kv_close(b->ctx, kv->dev);
        pthread_mutex_unlock(&b->lock);
    } else {
        if (kv->held) {
            pthread_mutex_lock(&b->lock);
            b->kv_rows_used -= kv->held;
            pthread_mutex_unlock(&b->lock);
        }
        twn_kv_free(&kv->cpu);
    }
    twn_free(kv);
}

void twn_backend_kv_truncate(twn_backend *b, twn_bkv *kv, int len) {
    if (b->kind == TWN_BACKEND_CUDA)
        b->mod->kv_truncate(kv->dev, len);
    else
        twn_kv_truncate(&kv->cpu, len);
}

int twn_backend_kv_len(const twn_backend *b, const twn_bkv *kv) {
    return b->kind == TWN_BACKEND_CUDA ? b->mod->kv_len(kv->dev) : kv->cpu.len;
}

int64_t twn_backend_kv_rows_free(const twn_backend *b) {
    if (b->kind != TWN_BACKEND_CUDA && !b->kv_rows_cap) return INT64_MAX;
    pthread_mutex_t *lk = (pthread_mutex_t *)&b->lock; /* the count, not the backend, changes */
    pthread_mutex_lock(lk);
    int64_t n = b->kind == TWN_BACKEND_CUDA ? b->mod->kv_rows_free(b->ctx)
                                            : b->kv_rows_cap - b->kv_rows_used;
    pthread_mutex_unlock(lk);
    return n;
}

/* ------------------------------------------------------------------------------------------ */
/* Forward */

static int forward_cuda(twn_backend *b, twn_bseq *seqs, int n, twn_err *err) {
    twn_cuda_seq *cs = twn_calloc((size_t)(n ? n : 1), sizeof *cs);
    for (int s = 0; s < n; s++) {
        const twn_bseq *q = &seqs[s];
        cs[s] = (twn_cuda_seq){.kv = q->kv ? q->kv->dev : NULL,
                               .n = q->n,
                               .ids = q->ids,
                               .embeds = q->embeds,
                               .pos = q->pos,
                               .adapter = q->adapter,
                               .hidden = q->hidden,
                               .logits = q->logits,
                               .argmax = q->argmax,
                               .pool_rows = q->pool_rows,
                               .pooled = q->pooled,
                               .deepstack = q->deepstack};
    }
    pthread_mutex_lock(&b->lock);
    int rc = b->mod->forward(b->ctx, cs, n, err);
    pthread_mutex_unlock(&b->lock);
    twn_free(cs);
    return rc;
}

/* The cpu path: twn_lm_forward, with temporary rows where only argmax or pooled was asked. */
static int forward_cpu(twn_backend *b, twn_bseq *seqs, int n, twn_err *err) {
    const int H = b->lm->H, V = b->lm->V;
    twn_lm_seq *ls = twn_calloc((size_t)(n ? n : 1), sizeof *ls);
    float **tmp = twn_calloc((size_t)(n ? n : 1) * 2, sizeof *tmp);
    int rc = -1;
    for (int s = 0; s < n; s++) {
        twn_bseq *q = &seqs[s];
        if (q->n && !q->kv) {
            twn_err_set(err, "sequence %d: no KV cache", s);
            goto out;
        }
        if (q->pooled && q->n && (q->pool_rows < 1 || q->pool_rows > q->n)) {
            twn_err_set(err, "sequence %d: pooling %d row(s) of a step of %d", s, q->pool_rows,
                        q->n);
            goto out;
        }
        if (q->n && b->kv_rows_cap) { /* a step may grow a cache past its reservation */
            const int64_t total = (int64_t)q->kv->cpu.len + q->n;
            if (cpu_kv_take(b, q->kv, total - q->kv->held, total, err)) goto out;
        }
        ls[s] = (twn_lm_seq){.kv = q->kv ? &q->kv->cpu : NULL,
                             .n = q->n,
                             .ids = q->ids,
                             .embeds = q->embeds,
                             .pos = q->pos,
                             .adapter = q->adapter,
                             .hidden = q->hidden,
                             .logits = q->logits,
                             .deepstack = q->deepstack};
        if (q->n && q->pooled && !q->hidden)
            ls[s].hidden = tmp[2 * s] = twn_malloc(sizeof(float) * (size_t)q->n * H);
        if (q->n && q->argmax && !q->logits)
            ls[s].logits = tmp[2 * s + 1] = twn_malloc(sizeof(float) * (size_t)V);
    }
    if (twn_lm_forward(b->lm, ls, n, NULL, NULL, err)) goto out;
    for (int s = 0; s < n; s++) {
        twn_bseq *q = &seqs[s];
        if (!q->n) continue;
        if (q->argmax) {
            const float *lg = ls[s].logits;
            int best = 0;
            for (int i = 1; i < V; i++)
                if (lg[i] > lg[best]) best = i;
            *q->argmax = best;
        }
        if (q->pooled && q->pool_rows == 1) /* last_token: the row itself (keeps -0.0f) */
            memcpy(q->pooled, ls[s].hidden + (size_t)(q->n - 1) * H, sizeof(float) * (size_t)H);
        else if (q->pooled) { /* query_mean: rows summed in order from 0, then / n */
            const float *h = ls[s].hidden + (size_t)(q->n - q->pool_rows) * H;
            memset(q->pooled, 0, sizeof(float) * (size_t)H);
            for (int r = 0; r < q->pool_rows; r++)
                for (int i = 0; i < H; i++) q->pooled[i] += h[(size_t)r * H + i];
            for (int i = 0; i < H; i++) q->pooled[i] /= (float)q->pool_rows;
        }
    }
    rc = 0;
out:
    for (int i = 0; i < 2 * n; i++) twn_free(tmp[i]);
    twn_free(tmp);
    twn_free(ls);
    return rc;
}

int twn_backend_forward(twn_backend *b, twn_bseq *seqs, int n_seqs, twn_err *err) {
    return b->kind == TWN_BACKEND_CUDA ? forward_cuda(b, seqs, n_seqs, err)
                                       : forward_cpu(b, seqs, n_seqs, err);
}
