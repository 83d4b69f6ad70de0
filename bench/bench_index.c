/* bench_index.c — how fast one index shard ingests vectors, and how much memory it holds.
 *
 * usage: bench_index [WORKDIR] [SCALE] [FACTORY]
 *   WORKDIR: where shard directories go (default ./bench-index-tmp, removed afterwards); put it on
 *   the disk the indexer would use, since every batch is fsynced.
 *   SCALE: multiplies the vector counts (default 1).
 *   FACTORY: run only the cases whose factory string is exactly this (e.g. Flat).
 *
 * For each (dim, factory) — D = 2048 (the Qwen3-VL-2B hidden size) and D = 256, Flat and IVF-PQ —
 * two child processes run on the same deterministic random unit vectors:
 *   baseline: bare FAISS through the C API (train if needed, then add_with_ids in batches);
 *   shard:    twn_shard_add + twn_shard_commit per batch (WAL with zstd + fsync, float16 store,
 *             exactly-once bookkeeping, training once the sample is in), then one snapshot.
 * Each child reports its rates; the parent reads the child's peak RSS from wait4()'s rusage.
 * The ratio shard/baseline is the cost of durability and bookkeeping over FAISS itself.
 *
 * Memory formulas printed next to the measurements (bytes; after autofaiss'
 * estimate_memory_required_for_index):
 *   Flat:    4·D·N
 *   IVF-PQ:  N·(m·nbits/8 + 8) + 4·D·nlist + 4·D·2^nbits   (codes + ids, coarse centroids, PQ
 *            codebooks; inverted-list overallocation ignored)
 *   store:   N·(2·D + 8 + id bytes + ~40)                   (float16 vectors, FAISS id, id text,
 *            metadata, hash-map slots) — twn's own addition beside the index
 * The inputs themselves (N·D·4 bytes of float32 vectors) are resident in both children and are
 * printed so they can be subtracted. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "index/build.h"
#include "index/shard.h"
#include "util/clock.h"
#include "util/mem.h"
#include "util/rng.h"

#define BATCH 256

typedef struct {
    int dim;
    const char *factory;
    int n;
    int m, nbits, nlist; /* PQ parameters for the formula (m = 0: Flat) */
} bench_case;

static float *unit_vectors(int n, int d, uint64_t seed) {
    twn_rng r;
    twn_rng_seed(&r, seed);
    float *x = twn_malloc((size_t)n * (size_t)d * sizeof *x);
    for (int i = 0; i < n; i++) {
        double norm = 0;
        float *v = x + (size_t)i * (size_t)d;
        for (int j = 0; j < d; j++) {
            v[j] = (float)twn_rng_normal(&r);
            norm += (double)v[j] * v[j];
        }
        for (int j = 0; j < d; j++) v[j] = (float)(v[j] / __builtin_sqrt(norm));
    }
    return x;
}

static double formula_index(const bench_case *c) {
    double N = c->n, D = c->dim;
    if (!c->m) return 4 * D * N;
    return N * (c->m * c->nbits / 8.0 + 8) + 4 * D * c->nlist + 4 * D * (1 << c->nbits);
}

static double formula_store(const bench_case *c) {
    return (double)c->n * (2.0 * c->dim + 8 + 12 + 40);
}

static int run_baseline(const bench_case *c, const float *x) {
    twn_err err = {{0}};
    FaissIndex *ix;
    char desc[TWN_INDEX_DESC_MAX];
    if (twn_build_new(c->dim, c->factory, &ix, desc, &err)) goto fail;
    double t0 = twn_now(), train = 0;
    int64_t ts = twn_build_train_size(ix, 0);
    if (ts) {
        if (faiss_Index_train(ix, ts < c->n ? ts : c->n, x) != 0) {
            fprintf(stderr, "train: %s\n", twn_faiss_error());
            return 1;
        }
        train = twn_now() - t0;
    }
    idx_t *ids = twn_malloc(BATCH * sizeof *ids);
    double t1 = twn_now();
    for (int at = 0; at < c->n; at += BATCH) {
        int m = c->n - at < BATCH ? c->n - at : BATCH;
        for (int i = 0; i < m; i++)
            ids[i] = (idx_t)(0x9e3779b97f4a7c15ull * (uint64_t)(at + i + 1));
        if (faiss_Index_add_with_ids(ix, m, x + (size_t)at * (size_t)c->dim, ids) != 0) {
            fprintf(stderr, "add: %s\n", twn_faiss_error());
            return 1;
        }
    }
    double add = twn_now() - t1;
    printf("    faiss baseline   : add %9.0f vec/s%s", c->n / add, ts ? "" : "\n");
    if (ts) printf("  (train %.2f s on %lld vectors)\n", train, (long long)(ts < c->n ? ts : c->n));
    printf("RESULT baseline %.1f\n", c->n / add);
    fflush(stdout);
    faiss_Index_free(ix);
    twn_free(ids);
    return 0;
fail:
    fprintf(stderr, "%s\n", err.msg);
    return 1;
}

static int run_shard(const bench_case *c, const float *x, const char *dir) {
    twn_err err = {{0}};
    twn_shard *s;
    twn_shard_opts o = {.dim = c->dim, .factory = c->factory, .model = "bench", .model_hash = "-"};
    if (twn_shard_open(dir, &o, &s, NULL, &err)) goto fail;
    twn_index_item *items = twn_malloc(BATCH * sizeof *items);
    char(*ids)[16] = twn_malloc(BATCH * sizeof *ids);
    double t0 = twn_now(), pause = 0, steady_t = 0, add_t = 0, commit_t = 0;
    int steady_n = 0, was_trained = 0;
    twn_shard_stats st;
    twn_shard_get_stats(s, &st);
    was_trained = st.trained;
    for (int at = 0; at < c->n; at += BATCH) {
        int m = c->n - at < BATCH ? c->n - at : BATCH;
        for (int i = 0; i < m; i++) {
            snprintf(ids[i], sizeof ids[i], "item-%08d", at + i);
            items[i] = (twn_index_item){
                .id = ids[i], .vec = x + (size_t)(at + i) * (size_t)c->dim, .p_think = 0.5f};
        }
        double b0 = twn_now();
        uint64_t durable;
        if (twn_shard_add(s, items, (size_t)m, NULL, &err)) goto fail;
        double b1 = twn_now();
        if (twn_shard_commit(s, &durable, &err)) goto fail;
        double dt = twn_now() - b0;
        add_t += b1 - b0;
        commit_t += twn_now() - b1;
        twn_shard_get_stats(s, &st);
        if (st.trained && !was_trained)
            pause = dt; /* this batch trained the index */
        else if (st.trained) {
            steady_t += dt;
            steady_n += m;
        }
        was_trained = st.trained;
    }
    double total = twn_now() - t0;
    double s0 = twn_now();
    if (twn_shard_snapshot(s, &err)) goto fail;
    double snap = twn_now() - s0;
    twn_shard_get_stats(s, &st);
    if (steady_n)
        printf("    twn shard        : add %9.0f vec/s (add+commit per %d, after training)",
               steady_n / steady_t, BATCH);
    else
        printf("    twn shard        : never trained (N < train_size %lld): buffered only",
               (long long)st.train_size);
    if (pause > 0)
        printf(", training pause %.2f s at %lld vectors", pause, (long long)st.train_size);
    printf("\n      overall %.0f vec/s incl. training (add %.2f s, commit %.2f s); %llu fsyncs "
           "%.1f ms "
           "mean; WAL %.1f MB raw -> %.1f MB; snapshot %.2f s\n",
           c->n / total, add_t, commit_t, (unsigned long long)st.wal.fsyncs,
           st.wal.fsyncs ? 1e3 * st.wal.fsync_seconds / (double)st.wal.fsyncs : 0.0,
           st.wal.raw_bytes / 1e6, st.wal.written_bytes / 1e6, snap);
    printf("RESULT shard %.1f\n", steady_n ? steady_n / steady_t : 0.0);
    fflush(stdout);
    if (twn_shard_close(s, &err)) goto fail;
    twn_free(items);
    twn_free(ids);
    return 0;
fail:
    fprintf(stderr, "%s\n", err.msg);
    return 1;
}

/* Runs fn in a child; returns its peak RSS in MB (negative on failure) and its RESULT value. */
static double in_child(int which, const bench_case *c, const char *dir, double *result) {
    int fds[2];
    if (pipe(fds) != 0) return -1;
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        close(fds[0]);
        dup2(fds[1], 1);
        float *x = unit_vectors(c->n, c->dim, 1234);
        int rc = which == 0 ? run_baseline(c, x) : run_shard(c, x, dir);
        fflush(stdout);
        _exit(rc);
    }
    close(fds[1]);
    FILE *f = fdopen(fds[0], "r");
    char line[1024];
    *result = 0;
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, "RESULT ", 7))
            *result = atof(strchr(line + 7, ' ') + 1);
        else
            fputs(line, stdout);
    }
    fclose(f);
    int st;
    struct rusage ru;
    if (wait4(pid, &st, 0, &ru) != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0) return -1;
    return ru.ru_maxrss / 1024.0;
}

int main(int argc, char **argv) {
    const char *work = argc > 1 ? argv[1] : "bench-index-tmp";
    double scale = argc > 2 ? atof(argv[2]) : 1.0;
    if (scale <= 0) scale = 1;
    const bench_case cases[] = {
        {2048, "Flat", 20000, 0, 0, 0},
        {2048, "IVF256,PQ64", 20000, 64, 8, 256},
        {256, "Flat", 100000, 0, 0, 0},
        {256, "IVF1024,PQ32", 100000, 32, 8, 1024},
    };
    printf("bench_index: batches of %d, OMP_NUM_THREADS=%s, workdir %s\n", BATCH,
           getenv("OMP_NUM_THREADS") ? getenv("OMP_NUM_THREADS") : "(default)", work);
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        bench_case c = cases[i];
        if (argc > 3 && strcmp(argv[3], c.factory)) continue;
        c.n = (int)(c.n * scale);
        char dir[4096];
        snprintf(dir, sizeof dir, "%s/shard-%zu", work, i);
        char cmd[4200];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
        if (system(cmd) != 0) return 1;
        printf("\nD=%d %s N=%d (inputs %.0f MB float32)\n", c.dim, c.factory, c.n,
               4.0 * c.n * c.dim / 1e6);
        double base = 0, shard = 0;
        double rss_b = in_child(0, &c, dir, &base);
        double rss_s = in_child(1, &c, dir, &shard);
        if (rss_b < 0 || rss_s < 0) {
            fprintf(stderr, "bench_index: a child failed\n");
            return 1;
        }
        printf("    ratio shard/baseline add rate: %.2f\n", base > 0 ? shard / base : 0.0);
        printf("    peak RSS: baseline %.0f MB, shard %.0f MB; formula: index %.0f MB (%s), "
               "store %.0f MB, inputs %.0f MB\n",
               rss_b, rss_s, formula_index(&c) / 1e6, c.m ? "N(m+8)+4D·nlist+4D·256" : "4DN",
               formula_store(&c) / 1e6, 4.0 * c.n * c.dim / 1e6);
        if (system(cmd) != 0) return 1;
    }
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "rmdir '%s' 2>/dev/null", work);
    if (system(cmd)) { /* not empty or not ours: leave it */
    }
    return 0;
}
