/* test_shard.c — shards on real files with real FAISS: for Flat, HNSW32, IVF16,Flat and IVF16,PQ8
 * a child process adds 2000 random unit vectors (snapshot after 1000), replaces 100 of them and
 * is killed with SIGKILL without closing; the reopened shard must hold exactly the same items and
 * find every item from its own vector (recall@1 = 1 for the exact indexes, a stated bound for PQ).
 * Then: identical re-adds change nothing, finish writes the §4 outputs, and the error paths
 * (bad batch, second opener, factory mismatch, too few items to train) say what is wrong. */
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "index/outdir.h"
#include "index/search.h"
#include "index/shard.h"
#include "tests/testutil.h"
#include "tests/unit/corpus.h"
#include "util/hash.h"
#include "util/rng.h"

#define D     32
#define N     2000
#define NREP  100 /* items 0..99 get a second vector */
#define BATCH 250

static char self_exe[4096];

typedef struct {
    const char *name, *factory, *params;
    int64_t train_size;
    double min_recall1; /* self-query recall@1 bound */
} factory_case;

/* PQ8 on 32 dims (4 dims per sub-quantizer, 256 centroids, trained on 1000 vectors) is lossy,
 * but 2000 random unit vectors are far apart (nearest other item ~0.6 vs ~0.95 for the item
 * itself after quantization): measured recall@1 is 1.000; the bound leaves room for k-means. */
static const factory_case cases[] = {
    {"flat", "Flat", NULL, 0, 1.0},
    {"hnsw", "HNSW32", "efSearch=128", 0, 0.995},
    {"ivfflat", "IVF16,Flat", "nprobe=16", 1000, 1.0},
    {"ivfpq", "IVF16,PQ8", "nprobe=16", 1000, 0.9},
};

static char ids[N][16];

static twn_index_item item(int i, const float *vec) {
    return (twn_index_item){.id = ids[i],
                            .vec = vec,
                            .route = (uint8_t)(i % 2),
                            .p_think = i % 3 ? (float)i / N : NAN,
                            .think_tokens = (uint32_t)(i % 2 ? i : 0)};
}

static twn_shard_opts opts_for(const factory_case *c) {
    return (twn_shard_opts){.dim = D,
                            .factory = c->factory,
                            .search_params = c->params,
                            .train_size = c->train_size,
                            .model = "TWN-test",
                            .model_hash = "abc123",
                            .shard = 0,
                            .n_shards = 1};
}

/* The vector item i holds at the end: the replacement for i < NREP. */
static const float *final_vec(const float *X, const float *Y, int i) {
    return i < NREP ? Y + i * D : X + i * D;
}

// ------------------------------------------------------------------------------------------------
// The crash child: runs in a fresh process (exec of this binary), dies by SIGKILL.

static int crash_child(const char *dir, int ci) {
    const factory_case *c = &cases[ci];
    float *X = tc_unit_vectors(N, D, 11), *Y = tc_unit_vectors(NREP, D, 12);
    twn_shard *s;
    twn_err err = {{0}};
    twn_shard_opts o = opts_for(c);
    if (twn_shard_open(dir, &o, &s, NULL, &err)) goto fail;
    twn_index_item batch[BATCH];
    twn_shard_ack acks[BATCH];
    for (int b = 0; b < N / BATCH; b++) {
        for (int i = 0; i < BATCH; i++) batch[i] = item(b * BATCH + i, X + (b * BATCH + i) * D);
        uint64_t durable;
        if (twn_shard_add(s, batch, BATCH, acks, &err) || twn_shard_commit(s, &durable, &err))
            goto fail;
        for (int i = 0; i < BATCH; i++)
            if (acks[i].outcome != TWN_SHARD_ADDED || acks[i].seq > durable) {
                fprintf(stderr, "child: bad ack %d\n", i);
                return 1;
            }
        if (b == 3 && twn_shard_snapshot(s, &err)) goto fail;
    }
    for (int i = 0; i < NREP; i++) batch[i] = item(i, Y + i * D);
    if (twn_shard_add(s, batch, NREP, acks, &err) || twn_shard_commit(s, NULL, &err)) goto fail;
    for (int i = 0; i < NREP; i++)
        if (acks[i].outcome != TWN_SHARD_REPLACED) return 1;
    raise(SIGKILL); /* a crash: nothing closed, nothing flushed beyond the commit */
    return 1;
fail:
    fprintf(stderr, "child: %s\n", err.msg);
    return 1;
}

static void run_crash_child(const char *dir, int ci) {
    char arg[16];
    snprintf(arg, sizeof arg, "%d", ci);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) { /* a fresh process image: no state shared with this one (OpenMP included) */
        execl(self_exe, self_exe, "--crash-child", dir, arg, (char *)NULL);
        _exit(127);
    }
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    if (!(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL))
        fail_msg("crash child did not die by SIGKILL (status %d)", st);
}

// ------------------------------------------------------------------------------------------------

static double dot(const float *a, const float *b) {
    double s = 0;
    for (int j = 0; j < D; j++) s += (double)a[j] * b[j];
    return s;
}

/* Self-query recall@1 over all N items, and checks that every hit's score is the inner product
 * with the item's current vector (exact indexes). */
static double self_recall(twn_shard *s, const float *X, const float *Y, int exact) {
    float *Q = malloc((size_t)N * D * sizeof *Q);
    for (int i = 0; i < N; i++) memcpy(Q + i * D, final_vec(X, Y, i), D * sizeof *Q);
    const int k = 5;
    twn_part_hit *hits = malloc((size_t)N * k * sizeof *hits);
    twn_err err = {{0}};
    assert_int_equal(twn_shard_search(s, Q, N, k, hits, &err), 0);
    int ok = 0;
    for (int i = 0; i < N; i++) {
        twn_store_row r;
        assert_int_equal(twn_shard_get(s, hits[i * k].row, &r, &err), 0);
        ok += strcmp(r.id, ids[i]) == 0;
        for (int j = 0; exact && j < k; j++) {
            assert_int_equal(twn_shard_get(s, hits[i * k + j].row, &r, &err), 0);
            int other = atoi(r.id + 4);
            double want = dot(Q + i * D, final_vec(X, Y, other));
            if (fabs(hits[i * k + j].score - want) > 2e-3) /* float16 store re-scoring */
                fail_msg("query %d hit %d (%s): score %g, expected %g", i, j, r.id,
                         (double)hits[i * k + j].score, want);
        }
    }
    free(hits);
    free(Q);
    return (double)ok / N;
}

static void run_case(int ci) {
    const factory_case *c = &cases[ci];
    char tag[64];
    snprintf(tag, sizeof tag, "shard_%s", c->name);
    const char *dir = tu_tmpdir(tag);
    char sdir[1100], outdir[1100];
    snprintf(sdir, sizeof sdir, "%s/shard", dir);
    snprintf(outdir, sizeof outdir, "%s/out", dir);
    run_crash_child(sdir, ci);

    float *X = tc_unit_vectors(N, D, 11), *Y = tc_unit_vectors(NREP, D, 12);
    twn_shard_opts o = opts_for(c);
    twn_shard *s;
    twn_shard_open_info info;
    twn_err err = {{0}};
    if (twn_shard_open(sdir, &o, &s, &info, &err)) fail_msg("%s", err.msg);
    assert_int_equal(info.snapshot_seq, 1000);
    assert_int_equal(info.snapshot_items, 1000);
    assert_int_equal(info.wal.replayed, N - 1000 + NREP);
    assert_int_equal(info.wal.dropped_bytes, 0);
    twn_shard_stats st;
    twn_shard_get_stats(s, &st);
    assert_int_equal(st.items, N);
    assert_int_equal(st.added, N - 1000);
    assert_int_equal(st.replaced, NREP);
    assert_int_equal(st.trained, 1);
    int removes = strcmp(c->factory, "HNSW32") != 0;
    assert_int_equal(st.stale, removes ? 0 : NREP);
    assert_int_equal(st.index_ntotal, removes ? N : N + NREP);
    assert_int_equal(st.wal.last_seq, N + NREP);

    int exact = c->min_recall1 >= 1.0 || !removes;
    double r1 = self_recall(s, X, Y, exact);
    printf("  %s: self recall@1 = %.4f (bound %.3f)\n", c->factory, r1, c->min_recall1);
    assert_true(r1 >= c->min_recall1);

    /* Re-delivering everything unchanged: nothing logged, nothing counted twice. */
    twn_index_item *all = malloc(N * sizeof *all);
    twn_shard_ack *acks = malloc(N * sizeof *acks);
    for (int i = 0; i < N; i++) all[i] = item(i, final_vec(X, Y, i));
    assert_int_equal(twn_shard_add(s, all, N, acks, &err), 0);
    for (int i = 0; i < N; i++) {
        assert_int_equal(acks[i].outcome, TWN_SHARD_UNCHANGED);
        assert_int_equal(acks[i].faiss_id, (int64_t)twn_hash64(ids[i], strlen(ids[i])));
    }
    assert_int_equal(acks[500].seq, 0);     /* content from the snapshot: durable long ago */
    assert_int_equal(acks[1500].seq, 1501); /* replayed: seq 1501 wrote it */
    assert_int_equal(acks[7].seq, N + 8);   /* the replacement batch */
    twn_shard_get_stats(s, &st);
    assert_int_equal(st.items, N);
    assert_int_equal(st.unchanged, N);
    assert_int_equal(st.wal.last_seq, N + NREP);
    assert_int_equal(st.index_ntotal, removes ? N : N + NREP);

    /* finish: stale entries rebuilt away, §4 outputs written and readable. */
    assert_int_equal(twn_shard_finish(s, outdir, &err), 0);
    twn_shard_get_stats(s, &st);
    assert_int_equal(st.index_ntotal, N);
    assert_int_equal(st.stale, 0);
    assert_int_equal(st.snapshot_seq, N + NREP);
    if (!removes) assert_true(self_recall(s, X, Y, 1) >= c->min_recall1);
    twn_index *ix;
    const char *dirs[1] = {outdir};
    assert_int_equal(twn_index_open(dirs, 1, c->params, &ix, &err), 0);
    assert_int_equal(twn_index_count(ix), N);
    int ok = 0;
    for (int i = 0; i < N; i += 37) {
        twn_index_hit h[3];
        int nh;
        assert_int_equal(twn_index_search(ix, final_vec(X, Y, i), 3, h, &nh, &err), 0);
        assert_int_equal(nh, 3);
        ok += h[0].id_len == strlen(ids[i]) && !memcmp(h[0].id, ids[i], h[0].id_len);
        if (!memcmp(h[0].id, ids[i], h[0].id_len)) {
            assert_int_equal(h[0].route, i % 2);
            assert_int_equal(h[0].think_tokens, i % 2 ? i : 0);
        }
    }
    if (exact) assert_int_equal(ok, (N + 36) / 37);
    twn_index_close(ix);
    assert_int_equal(twn_shard_close(s, &err), 0);

    /* After finish the shard reopens from the snapshot alone. */
    assert_int_equal(twn_shard_open(sdir, &o, &s, &info, &err), 0);
    assert_int_equal(info.snapshot_seq, N + NREP);
    assert_int_equal(info.wal.replayed, 0);
    twn_shard_get_stats(s, &st);
    assert_int_equal(st.items, N);
    assert_int_equal(st.index_ntotal, N);
    assert_int_equal(st.wal.segments, 1); /* older segments trimmed; the newest is reused */
    twn_shard_close(s, &err);
    free(all);
    free(acks);
    free(X);
    free(Y);
}

static void test_flat(void **state) {
    (void)state;
    run_case(0);
}
static void test_hnsw(void **state) {
    (void)state;
    run_case(1);
}
static void test_ivf_flat(void **state) {
    (void)state;
    run_case(2);
}
static void test_ivf_pq(void **state) {
    (void)state;
    run_case(3);
}

/* IVF: items are buffered (searched exactly) until train_size, then trained and indexed. */
static void test_training_buffer(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("shard_train");
    float *X = tc_unit_vectors(N, D, 21);
    twn_shard_opts o = opts_for(&cases[2]);
    o.train_size = 700;
    twn_shard *s;
    twn_err err = {{0}};
    assert_int_equal(twn_shard_open(dir, &o, &s, NULL, &err), 0);
    twn_index_item batch[BATCH];
    twn_shard_stats st;
    for (int b = 0; b < 4; b++) {
        for (int i = 0; i < BATCH; i++) batch[i] = item(b * BATCH + i, X + (b * BATCH + i) * D);
        assert_int_equal(twn_shard_add(s, batch, BATCH, NULL, &err), 0);
        twn_shard_get_stats(s, &st);
        assert_int_equal(st.items, (b + 1) * BATCH);
        assert_int_equal(st.train_size, 700);
        /* 250, 500: buffered; 750 >= 700: trained on all 750 and indexed. */
        assert_int_equal(st.trained, b >= 2);
        assert_int_equal(st.index_ntotal, b >= 2 ? (b + 1) * BATCH : 0);
        /* Either way the last batch finds itself. */
        twn_part_hit h[2];
        assert_int_equal(twn_shard_search(s, X + (b * BATCH + 17) * D, 1, 2, h, &err), 0);
        twn_store_row r;
        twn_shard_get(s, h[0].row, &r, &err);
        assert_string_equal(r.id, ids[b * BATCH + 17]);
        assert_true(fabsf(h[0].score - 1.0f) < 2e-3f);
    }
    twn_shard_close(s, &err);
    free(X);
}

static void test_replace_exactly_once(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("shard_replace");
    float *X = tc_unit_vectors(64, D, 31), *Y = tc_unit_vectors(64, D, 32);
    twn_shard_opts o = opts_for(&cases[0]);
    twn_shard *s;
    twn_err err = {{0}};
    assert_int_equal(twn_shard_open(dir, &o, &s, NULL, &err), 0);
    twn_index_item b[64];
    twn_shard_ack a[64];
    for (int i = 0; i < 64; i++) b[i] = item(i, X + i * D);
    assert_int_equal(twn_shard_add(s, b, 64, a, &err), 0);
    /* One batch that re-adds item 3 twice (last wins), item 4 unchanged, item 5 with new
       metadata only. */
    twn_index_item c[4] = {item(3, Y), item(3, Y + D), item(4, X + 4 * D), item(5, X + 5 * D)};
    c[3].think_tokens = 999;
    assert_int_equal(twn_shard_add(s, c, 4, a, &err), 0);
    assert_int_equal(a[0].outcome, TWN_SHARD_REPLACED);
    assert_int_equal(a[0].seq, 65);
    assert_int_equal(a[1].outcome, TWN_SHARD_REPLACED);
    assert_int_equal(a[1].seq, 66);
    assert_int_equal(a[2].outcome, TWN_SHARD_UNCHANGED);
    assert_int_equal(a[2].seq, 5);
    assert_int_equal(a[3].outcome, TWN_SHARD_REPLACED);
    assert_int_equal(a[3].seq, 67);
    twn_shard_stats st;
    twn_shard_get_stats(s, &st);
    assert_int_equal(st.items, 64);
    assert_int_equal(st.index_ntotal, 64);
    twn_part_hit h[1];
    assert_int_equal(twn_shard_search(s, Y + D, 1, 1, h, &err), 0);
    twn_store_row r;
    twn_shard_get(s, h[0].row, &r, &err);
    assert_string_equal(r.id, ids[3]);
    assert_int_equal(h[0].row, 3); /* replaced in place */
    assert_true(fabsf(h[0].score - 1.0f) < 1e-5f);
    twn_shard_get(s, 5, &r, &err);
    assert_int_equal(r.think_tokens, 999);
    /* The old vector of item 3 no longer scores 1 anywhere. */
    assert_int_equal(twn_shard_search(s, Y, 1, 1, h, &err), 0);
    assert_true(h[0].score < 0.999f || h[0].row != 3);
    twn_shard_close(s, &err);
    free(X);
    free(Y);
}

static void test_errors(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("shard_errors");
    float *X = tc_unit_vectors(10, D, 41);
    twn_shard_opts o = opts_for(&cases[2]); /* IVF16: needs 16 items to train at all */
    o.train_size = 0;
    twn_shard *s, *s2;
    twn_err err = {{0}};
    assert_int_equal(twn_shard_open(dir, &o, &s, NULL, &err), 0);
    twn_shard_stats st;
    twn_shard_get_stats(s, &st);
    assert_int_equal(st.train_size, 39 * 16);

    /* A second opener of the same directory is refused. */
    assert_int_equal(twn_shard_open(dir, &o, &s2, NULL, &err), -1);
    char want[2400];
    snprintf(want, sizeof want,
             "shard directory %s is already open (%s/LOCK is locked by another indexer or handle)",
             dir, dir);
    assert_string_equal(err.msg, want);

    /* A bad item anywhere in a batch: nothing from the batch is applied. */
    twn_index_item b[10];
    for (int i = 0; i < 10; i++) b[i] = item(i, X + i * D);
    float bad[D];
    memcpy(bad, X, sizeof bad);
    bad[9] = INFINITY;
    b[6].vec = bad;
    assert_int_equal(twn_shard_add(s, b, 10, NULL, &err), -1);
    assert_string_equal(err.msg, "batch item 6: item \"doc-00006\": vector component 9 is inf; "
                                 "expected a finite value");
    twn_shard_get_stats(s, &st);
    assert_int_equal(st.items, 0);
    assert_int_equal(st.wal.last_seq, 0);
    b[6].vec = X + 6 * D;
    assert_int_equal(twn_shard_add(s, b, 10, NULL, &err), 0);

    /* finish with 10 < 16 items: stays untrained; outputs say so; search stays exact. */
    char out[1100];
    snprintf(out, sizeof out, "%s.out", dir);
    assert_int_equal(twn_shard_finish(s, out, &err), 0);
    twn_shard_get_stats(s, &st);
    assert_int_equal(st.trained, 0);
    assert_int_equal(st.index_ntotal, 0);
    twn_store *rs;
    FaissIndex *ri;
    twn_outdir_meta m;
    assert_int_equal(twn_outdir_read(out, &rs, &ri, &m, &err), 0);
    assert_int_equal(m.trained, 0);
    assert_int_equal(m.count, 10);
    assert_int_equal(m.index_ntotal, 0);
    assert_string_equal(m.factory, "IVF16,Flat");
    assert_string_equal(m.model, "TWN-test");
    twn_part_hit h[3];
    assert_int_equal(twn_part_search(rs, ri, NULL, X + 8 * D, 1, 3, h, &err), 0);
    assert_int_equal(h[0].row, 8);
    twn_store_free(rs);
    faiss_Index_free(ri);
    twn_shard_close(s, &err);

    /* Reopening with another factory is refused, naming both. */
    o.factory = "Flat";
    assert_int_equal(twn_shard_open(dir, &o, &s, NULL, &err), -1);
    tc_expect_contains(err.msg, "snapshot was built with factory \"IVF16,Flat\", the shard is "
                                "configured with \"Flat\"");
    o.factory = "IVF16,Flat";
    o.dim = 16;
    assert_int_equal(twn_shard_open(dir, &o, &s, NULL, &err), -1);
    tc_expect_contains(err.msg, "snapshot has dim 32, the shard is configured with dim 16");
    free(X);
}

int main(int argc, char **argv) {
    ssize_t n = readlink("/proc/self/exe", self_exe, sizeof self_exe - 1);
    if (n <= 0) return 2;
    self_exe[n] = 0;
    for (int i = 0; i < N; i++) snprintf(ids[i], sizeof ids[i], "doc-%05d", i);
    if (argc == 4 && !strcmp(argv[1], "--crash-child")) return crash_child(argv[2], atoi(argv[3]));
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_flat),
        cmocka_unit_test(test_hnsw),
        cmocka_unit_test(test_ivf_flat),
        cmocka_unit_test(test_ivf_pq),
        cmocka_unit_test(test_training_buffer),
        cmocka_unit_test(test_replace_exactly_once),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
