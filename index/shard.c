/* shard.c — WAL + store + FAISS index, snapshots and recovery (see shard.h).
 *
 * Live adds and WAL replay go through the same apply_batch, so a replayed shard is built by
 * exactly the code that built the original.  A batch is applied in two phases: first every item
 * updates the store in order (deciding added / replaced / unchanged and, for live adds, writing
 * its WAL record), then the FAISS index gets one remove_ids for the replaced rows and one
 * add_with_ids for every row the batch touched (with the last vector each row received). */
#include "index/shard.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#include "index/build.h"
#include "index/outdir.h"
#include "util/fileio.h"
#include "util/mem.h"

#define REPLAY_BATCH 1024 /* WAL records applied per batch during recovery */
/* An index that cannot remove is rebuilt when superseded entries outnumber half the live ones
 * (amortised O(1) per replacement); snapshots always rebuild it. */
#define STALE_REBUILD_MIN 4096

struct twn_shard {
    char *dir;
    twn_shard_opts o;
    char *factory, *params, *model, *model_hash; /* owned copies of the opts strings */
    int lock_fd;
    pthread_mutex_t mu;
    char failed[TWN_ERR_MAX]; /* sticky: a failure that left memory and WAL out of step */

    twn_wal *wal;
    twn_store *st;
    FaissIndex *index;
    char desc[TWN_INDEX_DESC_MAX];
    twn_faiss_caps caps;
    int64_t train_size;
    twn_i64map stale; /* FAISS ids with superseded entries still in the index */
    int64_t n_stale;
    uint64_t *row_seq; /* seq of the WAL record behind each row's content */
    int64_t row_seq_cap;
    float *addbuf; /* float32 vectors of a batch's touched rows, reused across batches */
    size_t addbuf_cap;

    uint64_t snap_seq;
    unsigned snap_gen;
    char snap_name[64];
    uint64_t added, replaced, unchanged;

    /* replay batch */
    twn_index_item *rb_items;
    int64_t *rb_fids;
    uint64_t *rb_seqs;
    float *rb_vecs;
    char *rb_ids;
    size_t rb_n, rb_ids_n, rb_ids_cap;
};

// ------------------------------------------------------------------------------------------------
// Applying a batch

static int set_failed(twn_shard *s, twn_err *err) {
    if (!s->failed[0]) snprintf(s->failed, sizeof s->failed, "%s", err ? err->msg : "shard failed");
    return -1;
}

static int rebuild(twn_shard *s, twn_err *err) {
    if (faiss_Index_reset(s->index) != 0)
        return twn_err_set(err, "resetting the index to rebuild it: %s", twn_faiss_error());
    if (twn_build_add_rows(s->index, s->st, NULL, twn_store_count(s->st), err)) return -1;
    twn_i64map_clear(&s->stale);
    s->n_stale = 0;
    return 0;
}

/* Trains once train_size items are in (or force, with at least train_min), then indexes them. */
static int maybe_train(twn_shard *s, int force, twn_err *err) {
    if (faiss_Index_is_trained(s->index)) return 0;
    int64_t n = twn_store_count(s->st);
    if (n < s->train_size && !(force && n >= s->caps.train_min && n > 0)) return 0;
    if (twn_build_train(s->index, s->st, n, err)) return -1;
    return twn_build_add_rows(s->index, s->st, NULL, n, err);
}

static void grow_row_seq(twn_shard *s, int64_t need) {
    if (need <= s->row_seq_cap) return;
    int64_t cap = s->row_seq_cap ? s->row_seq_cap : 1024;
    while (cap < need) cap *= 2;
    s->row_seq = twn_realloc(s->row_seq, (size_t)cap * sizeof *s->row_seq);
    memset(s->row_seq + s->row_seq_cap, 0, (size_t)(cap - s->row_seq_cap) * sizeof *s->row_seq);
    s->row_seq_cap = cap;
}

/* fids/seqs given: replaying the WAL; NULL: a live add (assign FAISS ids, log to the WAL). */
static int apply_batch(twn_shard *s, const twn_index_item *items, const int64_t *fids,
                       const uint64_t *seqs, size_t n, twn_shard_ack *acks, twn_err *err) {
    int replay = fids != NULL;
    int trained = faiss_Index_is_trained(s->index);
    int64_t n_before = twn_store_count(s->st);
    int64_t *touched = twn_malloc((n ? n : 1) * sizeof *touched); /* rows, first-touch order */
    const twn_index_item **last =
        twn_malloc((n ? n : 1) * sizeof *last);                   /* latest item per touched */
    int64_t *removed = twn_malloc((n ? n : 1) * sizeof *removed); /* FAISS ids to remove */
    size_t nt = 0, nr = 0;
    twn_i64map pos = {0}; /* row -> index in touched */
    int rc = 0;
    char repr[96];
    for (size_t i = 0; i < n && !rc; i++) {
        const twn_index_item *it = &items[i];
        size_t len = it->id_len ? it->id_len : strlen(it->id);
        int64_t row = twn_store_find_id(s->st, it->id, len), fid;
        int outcome;
        if (row >= 0) {
            twn_store_row cur;
            twn_store_get(s->st, row, &cur);
            fid = cur.faiss_id;
            if (replay && fids[i] != fid) {
                rc = twn_err_set(err,
                                 "WAL seq %" PRIu64 ": item \"%s\" has FAISS id %lld, the shard "
                                 "already gave it %lld",
                                 seqs[i], twn_item_id_repr(it->id, len, repr, sizeof repr),
                                 (long long)fids[i], (long long)fid);
                break;
            }
            outcome = twn_store_same(s->st, row, it) ? TWN_SHARD_UNCHANGED : TWN_SHARD_REPLACED;
        } else {
            fid = replay ? fids[i] : twn_store_new_fid(s->st, it->id, len);
            outcome = TWN_SHARD_ADDED;
        }
        uint64_t seq = replay ? seqs[i] : 0;
        if (outcome == TWN_SHARD_UNCHANGED) {
            s->unchanged++;
            if (replay) s->row_seq[row] = seq;
            if (acks) acks[i] = (twn_shard_ack){s->row_seq[row], fid, outcome};
            continue;
        }
        if (!replay && twn_wal_append_valid(s->wal, fid, it, &seq, err)) {
            rc = -1;
            break;
        }
        if (outcome == TWN_SHARD_ADDED) {
            row = twn_store_append(s->st, it, fid, err);
            if (row < 0) {
                rc = -1;
                break;
            }
            grow_row_seq(s, row + 1);
            s->added++;
        } else {
            twn_store_update(s->st, row, it);
            s->replaced++;
        }
        s->row_seq[row] = seq;
        if (acks) acks[i] = (twn_shard_ack){seq, fid, outcome};
        int64_t k = twn_i64map_get(&pos, row);
        if (k < 0) {
            twn_i64map_put(&pos, row, (int64_t)nt);
            touched[nt] = row;
            last[nt++] = it;
            if (trained && row < n_before) removed[nr++] = fid; /* its old vector is indexed */
        } else {
            last[k] = it;
        }
    }
    twn_i64map_free(&pos);
    if (rc) {
        /* The store (and for live adds the WAL) already hold part of the batch; the index
           does not: refuse further work until the shard is reopened from disk. */
        set_failed(s, err);
        goto done;
    }
    if (!trained) {
        rc = maybe_train(s, 0, err);
        goto done;
    }
    if (nr) {
        if (s->caps.can_remove) {
            FaissIDSelectorBatch *sel = NULL;
            size_t got = 0;
            if (faiss_IDSelectorBatch_new(&sel, nr, removed) != 0 ||
                faiss_Index_remove_ids(s->index, (FaissIDSelector *)sel, &got) != 0)
                rc = twn_err_set(err, "removing %zu replaced vectors: %s", nr, twn_faiss_error());
            else if (got != nr)
                rc = twn_err_set(err, "removing %zu replaced vectors: the index removed %zu", nr,
                                 got);
            if (sel) faiss_IDSelector_free((FaissIDSelector *)sel);
        } else {
            for (size_t j = 0; j < nr; j++) {
                twn_i64map_put(&s->stale, removed[j], 1);
                s->n_stale++;
            }
        }
    }
    /* The usual batch (new ids, vectors contiguous in the caller's buffer) goes to FAISS as it
     * is; otherwise the touched rows' latest vectors are gathered into addbuf. */
    int contiguous = !rc && nt;
    for (size_t j = 1; j < nt && contiguous; j++)
        contiguous = last[j]->vec == last[0]->vec + j * (size_t)s->o.dim;
    if (contiguous) {
        idx_t *ids = twn_malloc(nt * sizeof *ids);
        for (size_t j = 0; j < nt; j++) {
            twn_store_row r;
            twn_store_get(s->st, touched[j], &r);
            ids[j] = r.faiss_id;
        }
        if (faiss_Index_add_with_ids(s->index, (idx_t)nt, last[0]->vec, ids) != 0)
            rc = twn_err_set(err, "adding %zu vectors to the index: %s", nt, twn_faiss_error());
        twn_free(ids);
    } else if (!rc && nt) {
        int dim = s->o.dim;
        if (s->addbuf_cap < nt * (size_t)dim) {
            twn_free(s->addbuf);
            s->addbuf = twn_try_alloc(nt * (size_t)dim * sizeof *s->addbuf);
            s->addbuf_cap = s->addbuf ? nt * (size_t)dim : 0;
        }
        float *x = s->addbuf;
        idx_t *ids = twn_malloc(nt * sizeof *ids);
        if (!x) rc = twn_err_set(err, "cannot allocate %zu vectors of dim %d", nt, dim);
        for (size_t j = 0; j < nt && x; j++) {
            twn_store_row r;
            twn_store_get(s->st, touched[j], &r);
            ids[j] = r.faiss_id;
            memcpy(x + j * (size_t)dim, last[j]->vec, (size_t)dim * sizeof *x);
        }
        if (!rc && faiss_Index_add_with_ids(s->index, (idx_t)nt, x, ids) != 0)
            rc = twn_err_set(err, "adding %zu vectors to the index: %s", nt, twn_faiss_error());
        twn_free(ids);
    }
    if (!rc && s->n_stale > STALE_REBUILD_MIN && s->n_stale > twn_store_count(s->st) / 2)
        rc = rebuild(s, err);
    if (rc) set_failed(s, err);
done:
    twn_free(touched);
    twn_free(last);
    twn_free(removed);
    return rc;
}

// ------------------------------------------------------------------------------------------------
// Replay

static int replay_flush(twn_shard *s, twn_err *err) {
    if (!s->rb_n) return 0;
    size_t off = 0;
    for (size_t i = 0; i < s->rb_n; i++) { /* the id arena may have moved while filling */
        s->rb_items[i].id = s->rb_ids + off;
        off += s->rb_items[i].id_len;
        s->rb_items[i].vec = s->rb_vecs + i * (size_t)s->o.dim;
    }
    int rc = apply_batch(s, s->rb_items, s->rb_fids, s->rb_seqs, s->rb_n, NULL, err);
    s->rb_n = 0;
    s->rb_ids_n = 0;
    return rc;
}

static int replay_one(void *ctx, const twn_wal_rec *r, twn_err *err) {
    twn_shard *s = ctx;
    if (!s->rb_items) {
        s->rb_items = twn_malloc(REPLAY_BATCH * sizeof *s->rb_items);
        s->rb_fids = twn_malloc(REPLAY_BATCH * sizeof *s->rb_fids);
        s->rb_seqs = twn_malloc(REPLAY_BATCH * sizeof *s->rb_seqs);
        s->rb_vecs = twn_malloc(REPLAY_BATCH * (size_t)s->o.dim * sizeof *s->rb_vecs);
    }
    size_t i = s->rb_n;
    if (s->rb_ids_n + r->item.id_len > s->rb_ids_cap) {
        s->rb_ids_cap = 2 * (s->rb_ids_n + r->item.id_len) + 4096;
        s->rb_ids = twn_realloc(s->rb_ids, s->rb_ids_cap);
    }
    memcpy(s->rb_ids + s->rb_ids_n, r->item.id, r->item.id_len);
    s->rb_ids_n += r->item.id_len;
    memcpy(s->rb_vecs + i * (size_t)s->o.dim, r->item.vec, (size_t)s->o.dim * sizeof(float));
    s->rb_items[i] = r->item;
    s->rb_fids[i] = r->faiss_id;
    s->rb_seqs[i] = r->seq;
    s->rb_n++;
    return s->rb_n == REPLAY_BATCH ? replay_flush(s, err) : 0;
}

// ------------------------------------------------------------------------------------------------
// Snapshots

static char *in_dir(const twn_shard *s, const char *name) {
    return twn_path_join(s->dir, name);
}

static int remove_old_snapshots(twn_shard *s, twn_err *err) {
    DIR *d = opendir(s->dir);
    if (!d) return twn_err_errno(err, "cannot open %s", s->dir);
    struct dirent *e;
    int rc = 0;
    while ((e = readdir(d)) && !rc) {
        if ((strncmp(e->d_name, "snap-", 5) != 0 || !strcmp(e->d_name, s->snap_name)) &&
            strcmp(e->d_name, "snap.tmp") != 0)
            continue;
        char *p = in_dir(s, e->d_name);
        rc = twn_outdir_remove(p, err);
        twn_free(p);
    }
    closedir(d);
    return rc;
}

static void fill_meta(const twn_shard *s, twn_outdir_meta *m, uint64_t seq) {
    memset(m, 0, sizeof *m);
    snprintf(m->model, sizeof m->model, "%s", s->model);
    snprintf(m->model_hash, sizeof m->model_hash, "%s", s->model_hash);
    snprintf(m->factory, sizeof m->factory, "%s", s->factory);
    snprintf(m->index_description, sizeof m->index_description, "%s", s->desc);
    m->wal_seq = seq;
    m->shard = s->o.shard;
    m->n_shards = s->o.n_shards;
}

static int snapshot_locked(twn_shard *s, twn_err *err) {
    if (twn_wal_commit(s->wal, NULL, err)) return -1;
    uint64_t seq = twn_wal_last_seq(s->wal);
    if (s->n_stale && rebuild(s, err)) return set_failed(s, err);
    char *tmp = in_dir(s, "snap.tmp");
    twn_outdir_meta m;
    fill_meta(s, &m, seq);
    int rc = twn_outdir_remove(tmp, err);
    if (!rc) rc = twn_outdir_write(tmp, s->st, s->index, &m, err);
    char name[64];
    snprintf(name, sizeof name, "snap-%020" PRIu64 ".%u", seq, s->snap_gen + 1);
    char *final = in_dir(s, name), *cur = in_dir(s, "CURRENT");
    if (!rc && rename(tmp, final) != 0)
        rc = twn_err_errno(err, "cannot rename %s to %s", tmp, final);
    if (!rc) rc = twn_fsync_dir(s->dir, err);
    char line[80];
    snprintf(line, sizeof line, "%s\n", name);
    if (!rc) rc = twn_write_file_atomic(cur, line, strlen(line), err);
    twn_free(tmp);
    twn_free(final);
    twn_free(cur);
    if (rc) return -1;
    /* Published.  What follows is cleanup: a crash here leaves garbage that open removes. */
    snprintf(s->snap_name, sizeof s->snap_name, "%s", name);
    s->snap_gen++;
    s->snap_seq = seq;
    if (remove_old_snapshots(s, err)) return -1;
    if (twn_wal_rotate(s->wal, err) || twn_wal_trim(s->wal, seq, err)) return -1;
    return 0;
}

/* Reads DIR/CURRENT into name ("" when there is none). */
static int read_current(const char *dir, char name[64], twn_err *err) {
    name[0] = 0;
    char *p = twn_path_join(dir, "CURRENT");
    if (!twn_path_exists(p)) {
        twn_free(p);
        return 0;
    }
    char *data = NULL;
    size_t n = 0;
    int rc = twn_read_file(p, 4096, &data, &n, err);
    if (!rc) {
        while (n && (data[n - 1] == '\n' || data[n - 1] == ' ')) data[--n] = 0;
        if (n == 0 || n >= 64 || strncmp(data, "snap-", 5) != 0 || strchr(data, '/'))
            rc = twn_err_set(err, "%s: \"%s\" is not a snapshot name (snap-<seq>.<gen>)", p, data);
        else
            memcpy(name, data, n + 1);
    }
    twn_free(data);
    twn_free(p);
    return rc;
}

int twn_shard_resolve_dir(const char *path, char **outdir, twn_err *err) {
    *outdir = NULL;
    char *m = twn_path_join(path, "manifest.json");
    int has = twn_path_exists(m);
    twn_free(m);
    if (has) {
        *outdir = twn_strdup(path);
        return 0;
    }
    char name[64];
    if (read_current(path, name, err)) return -1;
    if (!name[0])
        return twn_err_set(err,
                           "%s: neither an index output directory (no manifest.json) nor a "
                           "shard directory with a snapshot (no CURRENT)",
                           path);
    *outdir = twn_path_join(path, name);
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Public API

static void shard_free(twn_shard *s) {
    if (!s) return;
    if (s->index) faiss_Index_free(s->index);
    twn_store_free(s->st);
    twn_i64map_free(&s->stale);
    if (s->lock_fd >= 0) close(s->lock_fd);
    pthread_mutex_destroy(&s->mu);
    twn_free(s->row_seq);
    twn_free(s->addbuf);
    twn_free(s->rb_items);
    twn_free(s->rb_fids);
    twn_free(s->rb_seqs);
    twn_free(s->rb_vecs);
    twn_free(s->rb_ids);
    twn_free(s->factory);
    twn_free(s->params);
    twn_free(s->model);
    twn_free(s->model_hash);
    twn_free(s->dir);
    twn_free(s);
}

static int open_lock(twn_shard *s, twn_err *err) {
    char *p = in_dir(s, "LOCK");
    s->lock_fd = open(p, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    int rc = 0;
    if (s->lock_fd < 0)
        rc = twn_err_errno(err, "cannot open %s", p);
    else if (flock(s->lock_fd, LOCK_EX | LOCK_NB) != 0)
        rc = errno == EWOULDBLOCK
                 ? twn_err_set(err,
                               "shard directory %s is already open (%s is locked by another "
                               "indexer or handle)",
                               s->dir, p)
                 : twn_err_errno(err, "cannot lock %s", p);
    twn_free(p);
    return rc;
}

static int load_snapshot(twn_shard *s, twn_shard_open_info *info, twn_err *err) {
    if (read_current(s->dir, s->snap_name, err)) return -1;
    if (!s->snap_name[0]) return 0;
    char *p = in_dir(s, s->snap_name);
    twn_outdir_meta m;
    int rc = twn_outdir_read(p, &s->st, &s->index, &m, err);
    if (!rc && m.dim != s->o.dim)
        rc = twn_err_set(err, "%s: snapshot has dim %d, the shard is configured with dim %d", p,
                         m.dim, s->o.dim);
    if (!rc && strcmp(m.factory, s->factory) != 0)
        rc = twn_err_set(err,
                         "%s: snapshot was built with factory \"%s\", the shard is configured "
                         "with \"%s\" (finish or move the old shard first)",
                         p, m.factory, s->factory);
    twn_free(p);
    if (rc) return -1;
    snprintf(s->desc, sizeof s->desc, "%s", m.index_description);
    s->snap_seq = m.wal_seq;
    const char *dot = strrchr(s->snap_name, '.');
    s->snap_gen = dot ? (unsigned)strtoul(dot + 1, NULL, 10) : 0;
    info->snapshot_seq = m.wal_seq;
    info->snapshot_items = m.count;
    grow_row_seq(s, twn_store_count(s->st) + 1);
    return 0;
}

int twn_shard_open(const char *dir, const twn_shard_opts *o, twn_shard **out,
                   twn_shard_open_info *info, twn_err *err) {
    *out = NULL;
    twn_shard_open_info local;
    if (!info) info = &local;
    memset(info, 0, sizeof *info);
    if (o->dim < 1 || o->dim > TWN_WAL_MAX_DIM)
        return twn_err_set(err, "shard %s: dim %d, expected 1..%d", dir, o->dim, TWN_WAL_MAX_DIM);
    if (!o->factory || !*o->factory) return twn_err_set(err, "shard %s: no factory string", dir);
    if (twn_mkdirs(dir, err)) return -1;
    twn_shard *s = twn_calloc(1, sizeof *s);
    pthread_mutex_init(&s->mu, NULL);
    s->lock_fd = -1;
    s->dir = twn_strdup(dir);
    s->o = *o;
    s->factory = twn_strdup(o->factory);
    s->params = o->search_params ? twn_strdup(o->search_params) : NULL;
    s->model = twn_strdup(o->model ? o->model : "");
    s->model_hash = twn_strdup(o->model_hash ? o->model_hash : "");
    char *wdir = NULL;
    int rc = open_lock(s, err);
    if (!rc) rc = load_snapshot(s, info, err);
    if (!rc && !s->st) {
        s->st = twn_store_new(o->dim);
        rc = twn_build_new(o->dim, o->factory, &s->index, s->desc, err);
    }
    if (!rc) {
        twn_faiss_index_caps(s->index, &s->caps);
        s->train_size = twn_build_train_size(s->index, o->train_size);
        rc = twn_build_set_params(s->index, s->params, err);
    }
    if (!rc) rc = remove_old_snapshots(s, err);
    if (!rc) {
        wdir = in_dir(s, "wal");
        twn_wal_opts wo = {.dim = (uint32_t)o->dim,
                           .segment_bytes = o->wal_segment_bytes,
                           .block_bytes = o->wal_block_bytes,
                           .zstd_level = o->wal_zstd_level,
                           .after_seq = s->snap_seq,
                           .repair = o->wal_repair,
                           .defer_writes = o->wal_defer_writes,
                           .on_durable = o->on_durable,
                           .on_durable_ctx = o->on_durable_ctx};
        rc = twn_wal_open(wdir, &wo, replay_one, s, &s->wal, &info->wal, err);
        if (!rc) rc = replay_flush(s, err);
        if (rc) twn_err_wrap(err, "shard %s", dir);
    }
    if (!rc && s->failed[0]) rc = twn_err_set(err, "shard %s: %s", dir, s->failed);
    if (!rc) rc = twn_wal_trim(s->wal, s->snap_seq, err);
    twn_free(wdir);
    if (rc) {
        if (s->wal) twn_wal_close(s->wal, NULL);
        shard_free(s);
        return -1;
    }
    *out = s;
    return 0;
}

int twn_shard_add(twn_shard *s, const twn_index_item *items, size_t n, twn_shard_ack *acks,
                  twn_err *err) {
    for (size_t i = 0; i < n; i++)
        if (twn_item_check(&items[i], s->o.dim, err)) return twn_err_wrap(err, "batch item %zu", i);
    pthread_mutex_lock(&s->mu);
    int rc = s->failed[0] ? twn_err_set(err,
                                        "shard %s is unusable after an earlier error (reopen "
                                        "it): %s",
                                        s->dir, s->failed)
                          : apply_batch(s, items, NULL, NULL, n, acks, err);
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int twn_shard_commit(twn_shard *s, uint64_t *durable, twn_err *err) {
    return twn_wal_commit(s->wal, durable, err); /* the WAL locks for itself */
}

int twn_shard_search(twn_shard *s, const float *q, int64_t nq, int k, twn_part_hit *hits,
                     twn_err *err) {
    pthread_mutex_lock(&s->mu);
    int rc = twn_part_search(s->st, s->index, s->n_stale ? &s->stale : NULL, q, nq, k, hits, err);
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int twn_shard_get(twn_shard *s, int64_t row, twn_store_row *out, twn_err *err) {
    pthread_mutex_lock(&s->mu);
    int rc = 0;
    if (row < 0 || row >= twn_store_count(s->st))
        rc = twn_err_set(err, "shard %s: row %lld out of range (0..%lld)", s->dir, (long long)row,
                         (long long)twn_store_count(s->st) - 1);
    else
        twn_store_get(s->st, row, out);
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int twn_shard_snapshot(twn_shard *s, twn_err *err) {
    pthread_mutex_lock(&s->mu);
    int rc = s->failed[0] ? twn_err_set(err, "shard %s: %s", s->dir, s->failed)
                          : snapshot_locked(s, err);
    pthread_mutex_unlock(&s->mu);
    return rc ? twn_err_wrap(err, "snapshot of shard %s", s->dir) : 0;
}

int twn_shard_finish(twn_shard *s, const char *outdir, twn_err *err) {
    pthread_mutex_lock(&s->mu);
    int rc = 0;
    if (s->failed[0]) rc = twn_err_set(err, "shard %s: %s", s->dir, s->failed);
    if (!rc && maybe_train(s, 1, err)) rc = set_failed(s, err);
    if (!rc) rc = snapshot_locked(s, err);
    if (!rc && outdir) {
        twn_outdir_meta m;
        fill_meta(s, &m, s->snap_seq);
        rc = twn_outdir_publish(outdir, s->st, s->index, &m, err);
    }
    pthread_mutex_unlock(&s->mu);
    return rc ? twn_err_wrap(err, "finishing shard %s", s->dir) : 0;
}

void twn_shard_get_stats(twn_shard *s, twn_shard_stats *st) {
    pthread_mutex_lock(&s->mu);
    memset(st, 0, sizeof *st);
    st->items = twn_store_count(s->st);
    st->index_ntotal = faiss_Index_ntotal(s->index);
    st->stale = s->n_stale;
    st->train_size = s->train_size;
    st->trained = faiss_Index_is_trained(s->index);
    st->added = s->added;
    st->replaced = s->replaced;
    st->unchanged = s->unchanged;
    st->snapshot_seq = s->snap_seq;
    pthread_mutex_unlock(&s->mu);
    twn_wal_get_stats(s->wal, &st->wal);
}

int twn_shard_close(twn_shard *s, twn_err *err) {
    if (!s) return 0;
    int rc = twn_wal_close(s->wal, err);
    shard_free(s);
    return rc;
}
