/* bench_index.c — how fast one index shard ingests vectors, and how much memory it holds.
 *
 * usage: bench_index [-w WORKDIR] [-D DIM] [-b BATCH] [-c COMMIT_MS] [-t FAISS_THREADS]
 *                    [-m MODES] [FACTORY:N ...]
 *   WORKDIR: where shard directories go (default ./bench-index-tmp, removed afterwards); put it on
 *     the disk the indexer would use, since commits fsync.
 *   DIM: vector dimension (default 1024).  BATCH: items per EmbeddingBatch (default 32 =
 *     gate.batch).  COMMIT_MS: group-commit interval (default 5 = indexer.commit_ms).
 *   FAISS_THREADS: OpenMP threads for FAISS calls (default 1, what `twn run` gives each indexer).
 *   MODES: which of group,inline,fsync to run beside faiss (default all).
 *   -Z: frames uncompressed, as gates send them over ipc:// and inproc:// (default: zstd from
 *     4 KiB, as over tcp://; twn_frame_opts_for).
 *   FACTORY:N: cases to run (default Flat:200000 IVF256,PQ64:200000 HNSW32:5000).
 *
 * Every case packs its EmbeddingBatch frames once in the parent (as a gate packs them for
 * tcp://, or with -Z for ipc://; the gate's work, not timed) and runs one child process per mode on
 * them and on the same deterministic random unit vectors (shared copy-on-write): faiss:  FAISS
 * alone through the C API: the same factory string (wrapped in IDMap exactly as the shard does,
 * twn_build_new), trained on the same first train_size vectors, then add_with_ids in batches of
 * BATCH. group:  what index/service.c does per EmbeddingBatch: twn_msg_unpack of the frame,
 *           twn_indexer_batch_items (items point into the message), twn_shard_add, and the
 *           group commits (WAL write + one fsync every COMMIT_MS) on the committer thread
 *           (index/committer.h) while this thread goes on adding.
 *   inline: the indexer before the committer thread: the vectors copied out of the message
 *           (twn_batch_get_vectors), the WAL writing full blocks during adds, and the commit in
 *           the add loop once COMMIT_MS have passed since the previous one started.
 *   fsync:  inline with a commit after every batch (the worst case: one fsync per batch).
 * The indexer is assumed saturated (a frame is always waiting), so the clock is the adding
 * thread's wall time, up to the end of the last commit (everything durable).  * Rates: "steady" =
 * vectors/s after the index is trained (the training batch excluded), the number to compare with
 * FAISS's add rate; "overall" includes training (and the shard's adding of its buffered training
 * sample) and is compared with FAISS's train + add.
 *
 * Memory: each child reads VmRSS before it starts (the shared inputs are already mapped, so they
 * are in it) and VmHWM after ingest and after the final snapshot; the difference is what FAISS
 * (faiss) or the whole shard (group, fsync) added at peak.  Printed beside autofaiss's estimates
 * (criteo/autofaiss, autofaiss/external/metadata.py, IndexMetadata.estimated_index_size_in_bytes
 * and compute_memory_necessary_for_training):
 *   Flat:     4·D·N
 *   HNSW{M}:  4·D·N + 8·M·N
 *   IVF{n},PQ{m}[x{b}]: N·(ceil(m·b/8) + 1 + floor((log2 n − 1)/8)) + 4·D·n
 *   training (IVF-PQ): 1.5·4·D·n_train + 4·D·n + ceil(m·b/8)
 * and what FAISS really keeps per vector beside that (8-byte ids in IDMap / inverted lists,
 * 256·4·D bytes of PQ codebooks), and the store's own minimum (float16 vector, id text and
 * offsets, FAISS id, metadata, two 8-byte-slot row indexes at load <= 3/4, WAL seq per row). */
#include <malloc.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/transport.h"
#include "index/build.h"
#include "index/committer.h"
#include "index/ingest.h"
#include "index/shard.h"
#include "util/clock.h"
#include "util/hash.h"
#include "util/mem.h"
#include "util/rng.h"

enum { MODE_FAISS, MODE_GROUP, MODE_INLINE, MODE_FSYNC, N_MODES };
static const char *const mode_name[N_MODES] = {"faiss", "group", "inline", "fsync"};

typedef struct {
    const char *factory;
    int n, dim;
    int nlist, m, nbits, hnsw; /* parsed from the factory, for the formulas */
} bench_case;

typedef struct {
    const char *work;
    int batch;
    double commit_ms;
    int threads;
    unsigned modes; /* bit per MODE_* to run */
    int raw_frames; /* -Z: frames not compressed (what gates send over ipc:// and inproc://) */
} bench_opts;

typedef struct { /* one child's results (written into a shared page) */
    double steady, overall, train, rss0, hwm_ingest, hwm_end, unpack_s, add_s, commit_s;
    double fsyncs, fsync_ms, snap_s, hwm_train, commits, wal_raw, wal_written;
    double committer_s; /* group: the committer thread's commit time (overlapped) */
} child_res;

typedef struct { /* the gate-side frames of a case, packed once in the parent */
    uint8_t **frame;
    size_t *len;
    int n;
    double pack_s, bytes;
} frames;

static float *unit_vectors(int n, int d, uint64_t seed) {
    twn_rng r;
    twn_rng_seed(&r, seed);
    float *x = twn_malloc((size_t)n * (size_t)d * sizeof *x);
    for (int i = 0; i < n; i++) {
        double norm = 0;
        float *v = x + (size_t)i * (size_t)d;
        for (int j = 0; j < d; j++) {
            v[j] = (float)(2.0 * twn_rng_uniform(&r) - 1.0);
            norm += (double)v[j] * v[j];
        }
        for (int j = 0; j < d; j++) v[j] = (float)(v[j] / sqrt(norm));
    }
    return x;
}

/* Values from /proc/self/status ("VmRSS:", "VmHWM:", in KiB), as MB (10^6 bytes). */
static double proc_mb(const char *key) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    double v = -1;
    size_t kl = strlen(key);
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, key, kl)) v = atof(line + kl) * 1024.0 / 1e6; /* kB (KiB) -> MB */
    if (f) fclose(f);
    return v;
}

static void item_id(char *buf, size_t cap, int i) {
    snprintf(buf, cap, "corpus/part-%04d/item-%09d", i / 10000, i);
}

static void parse_factory(bench_case *c) {
    const char *p;
    if ((p = strstr(c->factory, "HNSW"))) c->hnsw = atoi(p + 4);
    if ((p = strstr(c->factory, "IVF"))) c->nlist = atoi(p + 3);
    if ((p = strstr(c->factory, "PQ"))) {
        c->m = atoi(p + 2);
        const char *x = strchr(p, 'x');
        c->nbits = x && (!strchr(p, ',') || x < strchr(p, ',')) ? atoi(x + 1) : 8;
    }
}

/* autofaiss's estimate of the index alone, bytes (-1: a type it does not model). */
static double autofaiss_index(const bench_case *c) {
    double N = c->n, D = c->dim;
    if (!strcmp(c->factory, "Flat")) return 4 * D * N;
    if (c->hnsw && !c->nlist) return 4 * D * N + 8.0 * c->hnsw * N;
    if (c->nlist && c->m) {
        double code = ceil(c->m * c->nbits / 8.0);
        double cluster = 1 + floor((log2(c->nlist) - 1) / 8);
        return N * (code + cluster) + 4 * D * c->nlist;
    }
    return -1;
}

static double autofaiss_train(const bench_case *c, double n_train) {
    if (!(c->nlist && c->m)) return 0;
    return 1.5 * 4 * c->dim * n_train + 4.0 * c->dim * c->nlist + ceil(c->m * c->nbits / 8.0);
}

/* What FAISS itself keeps for this factory (IDMap ids or inverted-list ids, PQ codebooks). */
static double faiss_actual(const bench_case *c) {
    double N = c->n, D = c->dim;
    if (c->nlist && c->m)
        return N * (c->m * c->nbits / 8.0 + 8) + 4 * D * c->nlist + 4 * D * (1 << c->nbits);
    /* HNSW: vectors, 2M int32 links at level 0 plus ~M/(M-1) above, level and offset per vector */
    if (c->hnsw) return N * (4 * D + 8 + 4.0 * (2 * c->hnsw + 1) + 12);
    return N * (4 * D + 8);
}

/* The store's minimum per item (arrays exactly full): float16 vector, id text + NUL, id offset 8 +
 * length 4, FAISS id 8, route 1 + p_think 4 + think tokens 4, id->row and fid->row indexes (8-byte
 * slots at load <= 3/4), the shard's row -> WAL seq 8. */
static double store_per_item(const bench_case *c, double id_len) {
    return 2.0 * c->dim + id_len + 1 + 12 + 8 + 9 + 2 * 8 / 0.75 + 8;
}

static int run_faiss(const bench_case *c, const bench_opts *o, const float *x, child_res *r) {
    twn_err err = {{0}};
    FaissIndex *ix;
    char desc[TWN_INDEX_DESC_MAX];
    double rss0 = proc_mb("VmRSS:");
    if (twn_build_new(c->dim, c->factory, &ix, desc, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    double t0 = twn_now(), train = 0;
    int64_t ts = twn_build_train_size(ix, 0);
    if (ts > c->n) ts = c->n;
    if (ts && faiss_Index_train(ix, ts, x) != 0) {
        fprintf(stderr, "train: %s\n", twn_faiss_error());
        return 1;
    }
    train = twn_now() - t0;
    r->hwm_train = proc_mb("VmHWM:");
    idx_t *ids = twn_malloc((size_t)o->batch * sizeof *ids);
    char id[64];
    double t1 = twn_now();
    for (int at = 0; at < c->n; at += o->batch) {
        int m = c->n - at < o->batch ? c->n - at : o->batch;
        for (int i = 0; i < m; i++) {
            item_id(id, sizeof id, at + i);
            ids[i] = (idx_t)twn_hash64(id, strlen(id));
        }
        if (faiss_Index_add_with_ids(ix, m, x + (size_t)at * (size_t)c->dim, ids) != 0) {
            fprintf(stderr, "add: %s\n", twn_faiss_error());
            return 1;
        }
    }
    double add = twn_now() - t1;
    double hwm = proc_mb("VmHWM:");
    *r = (child_res){.steady = c->n / add,
                     .overall = c->n / (train + add),
                     .train = train,
                     .rss0 = rss0,
                     .hwm_ingest = hwm,
                     .hwm_end = hwm,
                     .add_s = add,
                     .hwm_train = r->hwm_train};
    faiss_Index_free(ix);
    twn_free(ids);
    return 0;
}

/* One gate-side EmbeddingBatch frame for items [at, at+m). */
static int pack_batch(const bench_case *c, const float *x, int at, int m, uint64_t batch_id,
                      const twn_frame_opts *fo, uint8_t **frame, size_t *len, twn_err *err) {
    Twn__EmbeddingItem *it = twn_calloc((size_t)m, sizeof *it);
    Twn__EmbeddingItem **ptrs = twn_malloc((size_t)m * sizeof *ptrs);
    char(*ids)[64] = twn_malloc((size_t)m * sizeof *ids);
    for (int i = 0; i < m; i++) {
        twn__embedding_item__init(&it[i]);
        item_id(ids[i], sizeof ids[i], at + i);
        it[i].id = ids[i];
        it[i].unit_id = (uint64_t)(at + i) / 1000;
        it[i].item_index = (uint32_t)((at + i) % 1000);
        it[i].route = (at + i) % 5 ? TWN__ROUTE__ROUTE_EASY : TWN__ROUTE__ROUTE_HARD;
        it[i].p_think = 0.25f;
        ptrs[i] = &it[i];
    }
    Twn__EmbeddingBatch b = TWN__EMBEDDING_BATCH__INIT;
    b.batch_id = batch_id;
    b.sender = "gate-0";
    b.dim = (uint32_t)c->dim;
    b.n_items = (size_t)m;
    b.items = ptrs;
    twn_batch_set_vectors(&b, x + (size_t)at * (size_t)c->dim);
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_EMBEDDING_BATCH;
    env.embedding_batch = &b;
    int rc = twn_msg_pack(&env, fo, frame, len, err);
    twn_free(it);
    twn_free(ptrs);
    twn_free(ids);
    return rc;
}

/* index/service.c's on_batch, minus the acks' bookkeeping: unpack, point the items at the
 * message (twn_indexer_batch_items; inline mode: copy the vectors out first, as before), add. */
static int on_frame(twn_shard *s, const uint8_t *frame, size_t len, const twn_frame_opts *fo,
                    int copy, double *unpack_s, twn_err *err) {
    double t0 = twn_now();
    Twn__Envelope *m = NULL;
    if (twn_msg_unpack(frame, len, fo, &m, err)) return -1;
    const Twn__EmbeddingBatch *b = m->embedding_batch;
    size_t n = b->n_items;
    float *v = NULL;
    twn_index_item *it = twn_calloc(n + 1, sizeof *it);
    twn_shard_ack *acks = twn_calloc(n + 1, sizeof *acks);
    int rc = twn_indexer_batch_items(b, it, &v, err);
    if (!rc && copy && !v) { /* the pre-committer path: twn_batch_get_vectors's copy */
        v = twn_malloc(n * b->dim * sizeof *v + 1);
        rc = twn_batch_get_vectors(b, v, err);
        for (size_t i = 0; i < n; i++) it[i].vec = v + i * b->dim;
    }
    *unpack_s += twn_now() - t0;
    if (!rc) rc = twn_shard_add(s, it, n, acks, err);
    twn_free(v);
    twn_free(it);
    twn_free(acks);
    twn_msg_free(m);
    return rc;
}

static int pack_all(const bench_case *c, const bench_opts *o, const float *x, frames *f) {
    twn_err err = {{0}};
    twn_frame_opts fo = twn_frame_opts_for(o->raw_frames ? "ipc://x" : "tcp://x", NULL);
    f->n = (c->n + o->batch - 1) / o->batch;
    f->frame = twn_calloc((size_t)f->n, sizeof *f->frame);
    f->len = twn_calloc((size_t)f->n, sizeof *f->len);
    double p0 = twn_now();
    for (int k = 0; k < f->n; k++) {
        int at = k * o->batch, m = c->n - at < o->batch ? c->n - at : o->batch;
        if (pack_batch(c, x, at, m, (uint64_t)k + 1, &fo, &f->frame[k], &f->len[k], &err)) {
            fprintf(stderr, "bench_index: packing: %s\n", err.msg);
            return -1;
        }
        f->bytes += (double)f->len[k];
    }
    f->pack_s = twn_now() - p0;
    return 0;
}

static void frames_free(frames *f) {
    for (int k = 0; k < f->n; k++) twn_free(f->frame[k]);
    twn_free(f->frame);
    twn_free(f->len);
    memset(f, 0, sizeof *f);
}

/* group: the committer thread commits while this thread adds (what service.c does now);
 * inline: the commit runs in this thread's loop once COMMIT_MS have passed since the previous one
 * started, and the vectors are copied out of the message (service.c before the committer);
 * fsync: inline, one commit per batch.  The clock is this thread's wall time: the indexer is
 * saturated (the frames are packed beforehand), so it is busy all the time. */
static int run_shard(const bench_case *c, const bench_opts *o, const frames *f, const char *dir,
                     int mode, child_res *r) {
    twn_err err = {{0}};
    twn_shard *s;
    twn_committer *cm = NULL;
    double rss0 = proc_mb("VmRSS:");
    twn_shard_opts so = {.dim = c->dim, .factory = c->factory, .model = "bench", .model_hash = "-"};
    so.wal_defer_writes = mode == MODE_GROUP;
    if (twn_shard_open(dir, &so, &s, NULL, &err)) goto fail;
    if (mode == MODE_GROUP && twn_committer_start(s, o->commit_ms, NULL, &cm, &err)) goto fail;
    twn_frame_opts fo = twn_frame_opts_default();
    double unpack_s = 0, add_s = 0, commit_s = 0, pause = 0, steady_t = 0;
    int steady_n = 0;
    twn_shard_stats st;
    twn_shard_get_stats(s, &st);
    int was_trained = st.trained;
    uint64_t durable;
    double t_start = twn_now(), last_commit = t_start;
    for (int k = 0; k < f->n; k++) {
        int m = c->n - k * o->batch < o->batch ? c->n - k * o->batch : o->batch;
        double b0 = twn_now(), u0 = unpack_s;
        if (on_frame(s, f->frame[k], f->len[k], &fo, mode != MODE_GROUP, &unpack_s, &err))
            goto fail;
        double b1 = twn_now();
        add_s += b1 - b0 - (unpack_s - u0);
        if (cm) {
            twn_committer_kick(cm);
            if (twn_committer_poll(cm, &durable, &err) < 0) goto fail; /* service.c's ack check */
        } else if (mode == MODE_FSYNC || (b1 - last_commit) * 1000.0 >= o->commit_ms) {
            last_commit = b1; /* service.c's rule: the interval restarts when a commit starts */
            if (twn_shard_commit(s, &durable, &err)) goto fail;
            commit_s += twn_now() - b1;
        }
        double dt = twn_now() - b0;
        /* (Once trained, always trained: no more stats calls, which wait for the WAL's I/O
         * lock, i.e. for a commit the committer thread has in progress.) */
        if (!was_trained) twn_shard_get_stats(s, &st);
        if (st.trained && !was_trained) {
            pause = dt; /* this batch trained the index and added the buffered sample */
            r->hwm_train = proc_mb("VmHWM:");
        } else if (st.trained) {
            steady_t += dt;
            steady_n += m;
        }
        was_trained = st.trained;
    }
    double b1 = twn_now();
    twn_committer_stats cst = {0};
    if (cm) twn_committer_get_stats(cm, &cst);
    if (twn_committer_stop(cm, &err)) {
        cm = NULL;
        goto fail;
    }
    cm = NULL;
    if (twn_shard_commit(s, &durable, &err)) goto fail; /* the last one, as service.c does */
    commit_s += twn_now() - b1;
    /* Everything is durable only now: a committer thread that fell behind the adds leaves a
     * backlog (up to TWN_WAL_DEFER_MAX) for this last commit, so it counts as ingest time. */
    if (steady_n) steady_t += twn_now() - b1;
    double busy = twn_now() - t_start;
    double hwm_ingest = proc_mb("VmHWM:");
    double s0 = twn_now();
    if (twn_shard_snapshot(s, &err)) goto fail;
    double snap = twn_now() - s0;
    double hwm_end = proc_mb("VmHWM:");
    twn_shard_get_stats(s, &st);
    *r = (child_res){.steady = steady_n ? steady_n / steady_t : 0.0,
                     .overall = c->n / busy,
                     .train = pause,
                     .rss0 = rss0,
                     .hwm_ingest = hwm_ingest,
                     .hwm_end = hwm_end,
                     .unpack_s = unpack_s,
                     .add_s = add_s,
                     .commit_s = commit_s,
                     .fsyncs = (double)st.wal.fsyncs,
                     .fsync_ms =
                         st.wal.fsyncs ? 1e3 * st.wal.fsync_seconds / (double)st.wal.fsyncs : 0.0,
                     .snap_s = snap,
                     .hwm_train = r->hwm_train,
                     .commits = (double)st.wal.commits,
                     .wal_raw = (double)st.wal.raw_bytes,
                     .wal_written = (double)st.wal.written_bytes,
                     .committer_s = cst.commit_seconds};
    if (twn_shard_close(s, &err)) goto fail;
    return 0;
fail:
    twn_committer_stop(cm, NULL);
    fprintf(stderr, "bench_index %s: %s\n", mode_name[mode], err.msg);
    return 1;
}

/* Runs one mode in a child (results come back through a shared page); 0 and *r filled, or -1. */
static int in_child(int mode, const bench_case *c, const bench_opts *o, const float *x,
                    const frames *f, const char *dir, child_res *r) {
    child_res *sh =
        mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED) return -1;
    memset(sh, 0, sizeof *sh);
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        malloc_trim(0); /* the parent's freed heap would otherwise be reused without showing */
        twn_faiss_thread_threads(o->threads);
        int rc = mode == MODE_FAISS ? run_faiss(c, o, x, sh) : run_shard(c, o, f, dir, mode, sh);
        fflush(stdout);
        _exit(rc);
    }
    int st;
    int ok = waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0;
    *r = *sh;
    munmap(sh, sizeof *sh);
    return ok ? 0 : -1;
}

static int rm_rf(const char *dir) {
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    return system(cmd) == 0 ? 0 : -1;
}

static double loadavg(void) {
    double l = -1;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f && fscanf(f, "%lf", &l) != 1) l = -1;
    if (f) fclose(f);
    return l;
}

static int run_case(bench_case *c, const bench_opts *o, int idx) {
    parse_factory(c);
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/shard-%d", o->work, idx);
    printf("\n## D=%d %s N=%d, EmbeddingBatch of %d, group commit every %.0f ms, %d FAISS "
           "thread(s); inputs %.0f MB float32 (load average %.2f)\n",
           c->dim, c->factory, c->n, o->batch, o->commit_ms, o->threads, 4.0 * c->n * c->dim / 1e6,
           loadavg());
    double t0 = twn_now();
    float *x = unit_vectors(c->n, c->dim, 1234);
    printf("   (vectors made in %.1f s)\n", twn_now() - t0);
    frames f = {0};
    if (pack_all(c, o, x, &f)) return -1;
    malloc_trim(0); /* packing's freed scratch: a child inherits its RSS as its starting peak */
    child_res r[N_MODES];
    memset(r, 0, sizeof r);
    for (int mode = 0; mode < N_MODES; mode++) {
        if (!(o->modes & 1u << mode)) continue;
        if (rm_rf(dir)) return -1;
        printf("   %s: load average %.2f\n", mode_name[mode], loadavg());
        fflush(stdout);
        if (in_child(mode, c, o, x, &f, dir, &r[mode])) {
            fprintf(stderr, "bench_index: %s %s child failed\n", c->factory, mode_name[mode]);
            return -1;
        }
        if (rm_rf(dir)) return -1;
    }
    twn_free(x);
    double pack_s = f.pack_s, frame_bytes = f.bytes;
    frames_free(&f);
    malloc_trim(0);
    char id[64];
    item_id(id, sizeof id, c->n - 1);
    double id_len = (double)strlen(id);
    printf("| row | steady vec/s | ratio | overall vec/s (train incl.) | ratio | train / pause s "
           "| unpack s | add s | commit s (this thread) | committer thread s | commits / fsyncs | "
           "mean fsync ms | snapshot s | peak MB at training / ingest / end |\n");
    printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (int mode = 0; mode < N_MODES; mode++) {
        const child_res *q = &r[mode];
        if (!(o->modes & 1u << mode)) continue;
        printf("| %s | %.0f | %.2f | %.0f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.0f / %.0f "
               "| %.2f | %.2f | %.1f / %.1f / %.1f |\n",
               mode_name[mode], q->steady, r[0].steady > 0 ? q->steady / r[0].steady : 0,
               q->overall, r[0].overall > 0 ? q->overall / r[0].overall : 0, q->train, q->unpack_s,
               q->add_s, q->commit_s, q->committer_s, q->commits, q->fsyncs, q->fsync_ms, q->snap_s,
               q->hwm_train > 0 ? q->hwm_train - q->rss0 : 0, q->hwm_ingest - q->rss0,
               q->hwm_end - q->rss0);
    }
    if (r[MODE_INLINE].steady > 0 && r[MODE_GROUP].steady > 0)
        printf("group / inline (committer thread vs the commit in the add loop): steady %.2f, "
               "overall %.2f\n",
               r[MODE_GROUP].steady / r[MODE_INLINE].steady,
               r[MODE_GROUP].overall / r[MODE_INLINE].overall);
    int max_centroids = c->nlist > (1 << c->nbits) ? c->nlist : 1 << c->nbits;
    double af = autofaiss_index(c), ft = autofaiss_train(c, c->nlist ? 39.0 * max_centroids : 0);
    double fa = faiss_actual(c), N = c->n;
    double d_faiss = r[0].hwm_end - r[0].rss0, d_group = r[1].hwm_end - r[1].rss0;
    double d_group_ingest = r[1].hwm_ingest - r[1].rss0;
    printf("memory (MB; peak VmHWM minus VmRSS at the child's start, inputs excluded):\n");
    printf("  FAISS alone: %.1f MB = %.0f B/vector | autofaiss index estimate %.1f MB (%.0f "
           "B/vector)%s | FAISS's own structures %.1f MB (%.0f B/vector) | autofaiss training "
           "estimate %.1f MB\n",
           d_faiss, 1e6 * d_faiss / N, af / 1e6, af / N, af < 0 ? " (type not modelled)" : "",
           fa / 1e6, fa / N, ft / 1e6);
    printf("  twn shard (group): %.1f MB = %.0f B/vector during ingest, %.1f MB = %.0f B/vector "
           "with the snapshot | store minimum %.0f B/vector (%.1f MB) | shard - FAISS = %.0f "
           "B/vector\n",
           d_group_ingest, 1e6 * d_group_ingest / N, d_group, 1e6 * d_group / N,
           store_per_item(c, id_len), store_per_item(c, id_len) * N / 1e6,
           1e6 * (d_group - d_faiss) / N);
    printf("  twn shard (fsync): %.1f MB peak; WAL %.1f MB raw -> %.1f MB written; gate frames "
           "%.1f MB for %.1f MB of vectors, packed in %.2f s (gate side, not timed above)\n",
           r[MODE_FSYNC].hwm_end - r[MODE_FSYNC].rss0, r[1].wal_raw / 1e6, r[1].wal_written / 1e6,
           frame_bytes / 1e6, 4.0 * c->n * c->dim / 1e6, pack_s);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    bench_opts o = {.work = "bench-index-tmp",
                    .batch = 32,
                    .commit_ms = 5,
                    .threads = 1,
                    .modes = (1u << N_MODES) - 1};
    int dim = 1024, opt;
    while ((opt = getopt(argc, argv, "w:D:b:c:t:m:Z")) != -1) {
        switch (opt) {
        case 'w':
            o.work = optarg;
            break;
        case 'D':
            dim = atoi(optarg);
            break;
        case 'b':
            o.batch = atoi(optarg);
            break;
        case 'c':
            o.commit_ms = atof(optarg);
            break;
        case 't':
            o.threads = atoi(optarg);
            break;
        case 'Z':
            o.raw_frames = 1;
            break;
        case 'm': { /* comma-separated mode names; faiss always runs (the baseline) */
            o.modes = 1u << MODE_FAISS;
            char buf[256];
            snprintf(buf, sizeof buf, "%s", optarg);
            for (char *t = strtok(buf, ","); t; t = strtok(NULL, ",")) {
                int k = 0;
                while (k < N_MODES && strcmp(t, mode_name[k])) k++;
                if (k == N_MODES) {
                    fprintf(stderr, "bench_index: -m %s: expected faiss,group,inline,fsync\n", t);
                    return 2;
                }
                o.modes |= 1u << k;
            }
            break;
        }
        default:
            fprintf(stderr, "usage: bench_index [-w WORKDIR] [-D DIM] [-b BATCH] [-c COMMIT_MS] "
                            "[-t FAISS_THREADS] [-m MODES] [-Z] [FACTORY:N ...]\n");
            return 2;
        }
    }
    if (dim <= 0 || o.batch <= 0 || o.commit_ms < 0 || o.threads <= 0) {
        fprintf(stderr, "bench_index: -D, -b and -t must be positive, -c >= 0\n");
        return 2;
    }
    const char *defaults[] = {"Flat:200000", "IVF256,PQ64:200000", "HNSW32:5000"};
    int nc = argc - optind;
    const char *const *spec = nc ? (const char *const *)argv + optind : defaults;
    if (!nc) nc = 3;
    printf("bench_index: D=%d, workdir %s, frames %s, load average %.2f\n", dim, o.work,
           o.raw_frames ? "uncompressed (ipc://, inproc://)" : "zstd (tcp://)", loadavg());
    for (int i = 0; i < nc; i++) {
        char fac[256];
        snprintf(fac, sizeof fac, "%s", spec[i]);
        char *colon = strrchr(fac, ':');
        bench_case c = {.factory = fac, .dim = dim, .n = colon ? atoi(colon + 1) : 100000};
        if (colon) *colon = 0;
        if (c.n <= 0) {
            fprintf(stderr, "bench_index: \"%s\": expected FACTORY:N with N > 0\n", spec[i]);
            return 2;
        }
        if (run_case(&c, &o, i)) return 1;
    }
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "rmdir '%s' 2>/dev/null", o.work);
    if (system(cmd)) { /* not empty or not ours: leave it */
    }
    return 0;
}
