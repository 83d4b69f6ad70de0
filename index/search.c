/* search.c — top-k over one part, over many shards, and merging shards (see search.h). */
#include "index/search.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "index/build.h"
#include "index/outdir.h"
#include "index/shard.h"
#include "util/mem.h"

// ------------------------------------------------------------------------------------------------
// One part

static int hit_cmp(const void *a, const void *b) {
    const twn_part_hit *x = a, *y = b;
    if (x->row < 0 || y->row < 0) return (x->row < 0) - (y->row < 0); /* empty slots last */
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return x->row < y->row ? -1 : x->row > y->row;
}

static float exact_score(const twn_store *st, int64_t row, const float *q, float *buf) {
    twn_store_get_f32(st, row, 1, buf);
    float dot = 0;
    for (int j = 0; j < twn_store_dim(st); j++) dot += q[j] * buf[j];
    return dot;
}

int twn_part_search(const twn_store *st, const FaissIndex *index, const twn_i64map *stale,
                    const float *q, int64_t nq, int k, twn_part_hit *hits, twn_err *err) {
    if (k < 1) return twn_err_set(err, "search: k %d, expected >= 1", k);
    int dim = twn_store_dim(st);
    int64_t count = twn_store_count(st);
    for (int64_t i = 0; i < nq * k; i++) hits[i] = (twn_part_hit){-1, -1, -INFINITY};
    if (count == 0) return 0;
    int use_faiss = index && faiss_Index_is_trained(index) && faiss_Index_ntotal(index) >= count;
    if (!use_faiss) {
        float *sc = twn_malloc((size_t)k * sizeof *sc);
        int64_t *rows = twn_malloc((size_t)k * sizeof *rows);
        for (int64_t qi = 0; qi < nq; qi++) {
            twn_store_topk(st, q + qi * dim, k, sc, rows);
            for (int j = 0; j < k && rows[j] >= 0; j++) {
                twn_store_row r;
                twn_store_get(st, rows[j], &r);
                hits[qi * k + j] = (twn_part_hit){rows[j], r.faiss_id, sc[j]};
            }
        }
        twn_free(sc);
        twn_free(rows);
        return 0;
    }
    int has_stale = stale && stale->n;
    int64_t kk = k + (has_stale ? (int64_t)(stale->n < (size_t)k ? stale->n : (size_t)k) : 0);
    float *D = twn_try_alloc((size_t)(nq * kk) * sizeof *D);
    idx_t *I = twn_try_alloc((size_t)(nq * kk) * sizeof *I);
    float *buf = twn_malloc((size_t)dim * sizeof *buf);
    twn_part_hit *tmp = twn_malloc((size_t)kk * sizeof *tmp);
    int rc = 0;
    if (!D || !I)
        rc = twn_err_set(err, "search: cannot allocate %lld x %lld results", (long long)nq,
                         (long long)kk);
    else if (faiss_Index_search(index, nq, q, kk, D, I) != 0)
        rc = twn_err_set(err, "FAISS search: %s", twn_faiss_error());
    for (int64_t qi = 0; qi < nq && !rc; qi++) {
        int m = 0;
        for (int64_t j = 0; j < kk; j++) {
            idx_t label = I[qi * kk + j];
            if (label == -1) continue;
            int64_t row = twn_store_find_fid(st, label);
            if (row < 0) {
                rc = twn_err_set(err,
                                 "search: the index returned FAISS id %lld, which no item has "
                                 "(index and store out of step)",
                                 (long long)label);
                break;
            }
            float score = D[qi * kk + j];
            if (has_stale && twn_i64map_get(stale, label) >= 0) {
                int dup = 0;
                for (int t = 0; t < m && !dup; t++) dup = tmp[t].row == row;
                if (dup) continue;
                score = exact_score(st, row, q + qi * dim, buf);
            }
            tmp[m++] = (twn_part_hit){row, label, score};
        }
        if (has_stale) qsort(tmp, (size_t)m, sizeof *tmp, hit_cmp);
        for (int j = 0; j < m && j < k; j++) hits[qi * k + j] = tmp[j];
    }
    twn_free(D);
    twn_free(I);
    twn_free(buf);
    twn_free(tmp);
    return rc;
}

// ------------------------------------------------------------------------------------------------
// Many shards

typedef struct {
    char *dir;
    twn_store *st;
    FaissIndex *index;
    twn_outdir_meta meta;
} part;

struct twn_index {
    part *parts;
    int n;
    int dim;
    twn_part_hit *buf;
    int bufk;
};

static void parts_free(part *p, int n) {
    for (int i = 0; i < n; i++) {
        twn_free(p[i].dir);
        twn_store_free(p[i].st);
        if (p[i].index) faiss_Index_free(p[i].index);
    }
    twn_free(p);
}

/* Loads n directories; all must have the same dim. */
static int load_parts(const char *const *dirs, int n, const char *params, part **out,
                      twn_err *err) {
    *out = NULL;
    if (n < 1) return twn_err_set(err, "no index directories given");
    part *p = twn_calloc((size_t)n, sizeof *p);
    int rc = 0;
    for (int i = 0; i < n && !rc; i++) {
        rc = twn_shard_resolve_dir(dirs[i], &p[i].dir, err);
        if (!rc) rc = twn_outdir_read(p[i].dir, &p[i].st, &p[i].index, &p[i].meta, err);
        if (!rc && p[i].meta.dim != p[0].meta.dim)
            rc = twn_err_set(err, "%s: dim %d, but %s has dim %d", p[i].dir, p[i].meta.dim,
                             p[0].dir, p[0].meta.dim);
        if (!rc) rc = twn_build_set_params(p[i].index, params, err);
        if (rc) twn_err_wrap(err, "index %d of %d", i + 1, n);
    }
    if (rc) {
        parts_free(p, n);
        return -1;
    }
    *out = p;
    return 0;
}

int twn_index_open(const char *const *dirs, int n, const char *params, twn_index **out,
                   twn_err *err) {
    *out = NULL;
    part *p;
    if (load_parts(dirs, n, params, &p, err)) return -1;
    twn_index *ix = twn_calloc(1, sizeof *ix);
    ix->parts = p;
    ix->n = n;
    ix->dim = p[0].meta.dim;
    *out = ix;
    return 0;
}

int twn_index_dim(const twn_index *ix) {
    return ix->dim;
}

int64_t twn_index_count(const twn_index *ix) {
    int64_t c = 0;
    for (int i = 0; i < ix->n; i++) c += twn_store_count(ix->parts[i].st);
    return c;
}

typedef struct {
    float score;
    int shard;
    int64_t row, fid;
} merged_hit;

static int merged_cmp(const void *a, const void *b) {
    const merged_hit *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    if (x->shard != y->shard) return x->shard < y->shard ? -1 : 1;
    return x->row < y->row ? -1 : x->row > y->row;
}

int twn_index_search(twn_index *ix, const float *q, int k, twn_index_hit *hits, int *nhits,
                     twn_err *err) {
    *nhits = 0;
    if (k < 1) return twn_err_set(err, "search: k %d, expected >= 1", k);
    if (ix->bufk < k) {
        twn_free(ix->buf);
        ix->buf = twn_malloc((size_t)k * sizeof *ix->buf);
        ix->bufk = k;
    }
    merged_hit *all = twn_malloc((size_t)k * (size_t)ix->n * sizeof *all);
    size_t m = 0;
    for (int s = 0; s < ix->n; s++) {
        if (twn_part_search(ix->parts[s].st, ix->parts[s].index, NULL, q, 1, k, ix->buf, err)) {
            twn_free(all);
            return twn_err_wrap(err, "%s", ix->parts[s].dir);
        }
        for (int j = 0; j < k && ix->buf[j].row >= 0; j++)
            all[m++] = (merged_hit){ix->buf[j].score, s, ix->buf[j].row, ix->buf[j].faiss_id};
    }
    qsort(all, m, sizeof *all, merged_cmp);
    for (size_t j = 0; j < m && j < (size_t)k; j++) {
        twn_store_row r;
        twn_store_get(ix->parts[all[j].shard].st, all[j].row, &r);
        hits[j] = (twn_index_hit){.id = r.id,
                                  .id_len = r.id_len,
                                  .faiss_id = r.faiss_id,
                                  .score = all[j].score,
                                  .shard = all[j].shard,
                                  .row = all[j].row,
                                  .route = r.route,
                                  .p_think = r.p_think,
                                  .think_tokens = r.think_tokens};
        (*nhits)++;
    }
    twn_free(all);
    return 0;
}

void twn_index_close(twn_index *ix) {
    if (!ix) return;
    parts_free(ix->parts, ix->n);
    twn_free(ix->buf);
    twn_free(ix);
}

// ------------------------------------------------------------------------------------------------
// Merging

/* The value every part agrees on for a manifest string (or the override). */
static int agree(part *p, int n, size_t off, const char *override, const char *what, char *dst,
                 size_t cap, twn_err *err) {
    if (override) {
        snprintf(dst, cap, "%s", override);
        return 0;
    }
    const char *first = (const char *)&p[0].meta + off;
    for (int i = 1; i < n; i++) {
        const char *v = (const char *)&p[i].meta + off;
        if (strcmp(v, first) != 0)
            return twn_err_set(err,
                               "%s: %s \"%s\", but %s has \"%s\" (pass one explicitly to merge "
                               "anyway)",
                               p[i].dir, what, v, p[0].dir, first);
    }
    snprintf(dst, cap, "%s", first);
    return 0;
}

int twn_index_merge(const char *const *dirs, int n, const char *outdir, const twn_merge_opts *o,
                    twn_merge_info *info, twn_err *err) {
    twn_merge_opts defaults = {0};
    if (!o) o = &defaults;
    twn_merge_info local;
    if (!info) info = &local;
    memset(info, 0, sizeof *info);
    part *p;
    if (load_parts(dirs, n, NULL, &p, err)) return -1;
    twn_outdir_meta m;
    memset(&m, 0, sizeof m);
    int rc = agree(p, n, offsetof(twn_outdir_meta, factory), o->factory, "factory", m.factory,
                   sizeof m.factory, err);
    if (!rc)
        rc = agree(p, n, offsetof(twn_outdir_meta, model), o->model, "model", m.model,
                   sizeof m.model, err);
    if (!rc)
        rc = agree(p, n, offsetof(twn_outdir_meta, model_hash), o->model_hash,
                   "model_manifest_sha256", m.model_hash, sizeof m.model_hash, err);
    int dim = p[0].meta.dim;
    twn_store *u = twn_store_new(dim);
    float *v = twn_malloc((size_t)dim * sizeof *v);
    for (int s = 0; s < n && !rc; s++) {
        int64_t cnt = twn_store_count(p[s].st);
        for (int64_t i = 0; i < cnt && !rc; i++) {
            twn_store_row r;
            twn_store_get(p[s].st, i, &r);
            int64_t row = twn_store_find_id(u, r.id, r.id_len);
            if (row >= 0) { /* the later shard's copy wins, in the first copy's row */
                twn_store_get_f32(p[s].st, i, 1, v);
                twn_index_item it = {.id = r.id,
                                     .id_len = r.id_len,
                                     .vec = v,
                                     .route = r.route,
                                     .p_think = r.p_think,
                                     .think_tokens = r.think_tokens};
                twn_store_update(u, row, &it);
                info->duplicates++;
                continue;
            }
            int64_t fid = r.faiss_id;
            if (twn_store_find_fid(u, fid) >= 0) {
                fid = twn_store_new_fid(u, r.id, r.id_len);
                info->refids++;
            }
            if (twn_store_append_f16(u, r.id, r.id_len, fid, r.route, r.p_think, r.think_tokens,
                                     r.vec, err) < 0)
                rc = -1;
        }
    }
    twn_free(v);
    FaissIndex *index = NULL;
    if (!rc) rc = twn_build_new(dim, m.factory, &index, m.index_description, err);
    if (!rc && !faiss_Index_is_trained(index)) {
        twn_faiss_caps caps;
        twn_faiss_index_caps(index, &caps);
        int64_t cnt = twn_store_count(u);
        if (cnt >= caps.train_min && cnt > 0)
            rc = twn_build_train(index, u, twn_build_train_size(index, o->train_size), err);
    }
    if (!rc && faiss_Index_is_trained(index))
        rc = twn_build_add_rows(index, u, NULL, twn_store_count(u), err);
    if (!rc) {
        m.created_unix = o->created_unix;
        m.n_shards = 1;
        info->items = twn_store_count(u);
        info->trained = faiss_Index_is_trained(index);
        rc = twn_outdir_publish(outdir, u, index, &m, err);
    }
    if (index) faiss_Index_free(index);
    twn_store_free(u);
    parts_free(p, n);
    return rc ? twn_err_wrap(err, "merging into %s", outdir) : 0;
}
