/* test_search.c — searching S shard outputs and merging them: top-k over three Flat shards equals
 * brute force over all vectors (ids in order, scores to float precision); the merged index holds
 * exactly the union (every id once, same float16 vector and metadata) and answers like the
 * shards; duplicates across shards, FAISS id clashes, IVF rebuilds and mismatched factories. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "index/build.h"
#include "index/outdir.h"
#include "index/search.h"
#include "index/shard.h"
#include "tests/testutil.h"
#include "tests/unit/corpus.h"
#include "util/hash.h"
#include "util/rng.h"

#define D 24
#define N 3000
#define S 3
#define K 10

static char ids[N][16];

static int shard_of(int i) {
    return (int)(twn_hash64(ids[i], strlen(ids[i])) % S);
}

/* Builds S shards of factory from X (item i to shard hash(id) mod S), finished into
 * base/<tag>-out<s>; fills dirs. */
static void build_shards(const char *base, const char *tag, const char *factory, const float *X,
                         char dirs[S][1200]) {
    twn_err err = {{0}};
    for (int s = 0; s < S; s++) {
        char sdir[1300];
        snprintf(sdir, sizeof sdir, "%s/%s-shard%d", base, tag, s);
        snprintf(dirs[s], 1200, "%s/%s-out%d", base, tag, s);
        twn_shard_opts o = {.dim = D,
                            .factory = factory,
                            .search_params = NULL,
                            .model = "m",
                            .model_hash = "h",
                            .shard = s,
                            .n_shards = S};
        twn_shard *sh;
        assert_int_equal(twn_shard_open(sdir, &o, &sh, NULL, &err), 0);
        for (int i = 0; i < N; i++) {
            if (shard_of(i) != s) continue;
            twn_index_item it = {.id = ids[i],
                                 .vec = X + i * D,
                                 .route = (uint8_t)(i % 2),
                                 .p_think = (float)(i % 100) / 100,
                                 .think_tokens = (uint32_t)i};
            assert_int_equal(twn_shard_add(sh, &it, 1, NULL, &err), 0);
        }
        if (twn_shard_finish(sh, dirs[s], &err)) fail_msg("%s", err.msg);
        assert_int_equal(twn_shard_close(sh, &err), 0);
    }
}

/* Brute-force top-K over all N (values of vecs, float32 or float16-rounded). */
static void brute(const float *X, const float *q, int round16, int out[K]) {
    double best[K];
    for (int j = 0; j < K; j++) best[j] = -1e30, out[j] = -1;
    for (int i = 0; i < N; i++) {
        double d = 0;
        for (int j = 0; j < D; j++) {
            float x = round16 ? twn_half_to_float(twn_half_from_float(X[i * D + j])) : X[i * D + j];
            d += (double)q[j] * x;
        }
        if (d <= best[K - 1]) continue;
        int j = K - 1;
        while (j > 0 && d > best[j - 1]) {
            best[j] = best[j - 1];
            out[j] = out[j - 1];
            j--;
        }
        best[j] = d;
        out[j] = i;
    }
}

static void test_multi_shard_and_merge(void **state) {
    (void)state;
    const char *base = tu_tmpdir("search_flat");
    float *X = tc_unit_vectors(N, D, 51), *Q = tc_unit_vectors(40, D, 52);
    char dirs[S][1200];
    build_shards(base, "flat", "Flat", X, dirs);
    const char *dp[S] = {dirs[0], dirs[1], dirs[2]};
    twn_index *ix;
    twn_err err = {{0}};
    assert_int_equal(twn_index_open(dp, S, NULL, &ix, &err), 0);
    assert_int_equal(twn_index_count(ix), N);
    assert_int_equal(twn_index_dim(ix), D);
    twn_index_hit h[K];
    int nh;
    for (int qi = 0; qi < 40; qi++) {
        int want[K];
        brute(X, Q + qi * D, 0, want);
        assert_int_equal(twn_index_search(ix, Q + qi * D, K, h, &nh, &err), 0);
        assert_int_equal(nh, K);
        for (int j = 0; j < K; j++) {
            char id[16];
            snprintf(id, sizeof id, "%.*s", (int)h[j].id_len, h[j].id);
            if (strcmp(id, ids[want[j]]) != 0)
                fail_msg("query %d rank %d: %s, expected %s", qi, j, id, ids[want[j]]);
            assert_int_equal(h[j].shard, shard_of(want[j]));
            assert_int_equal(h[j].think_tokens, want[j]);
            assert_int_equal(h[j].faiss_id, (int64_t)twn_hash64(id, strlen(id)));
            if (j) assert_true(h[j].score <= h[j - 1].score);
        }
    }
    /* Self queries land on their own shard. */
    for (int i = 0; i < N; i += 101) {
        assert_int_equal(twn_index_search(ix, X + i * D, 1, h, &nh, &err), 0);
        assert_int_equal(h[0].shard, shard_of(i));
        assert_int_equal(h[0].id_len, strlen(ids[i]));
        assert_memory_equal(h[0].id, ids[i], h[0].id_len);
        assert_true(fabsf(h[0].score - 1.0f) < 1e-5f);
    }
    twn_index_close(ix);

    /* Live shard directories resolve to their current snapshot. */
    char live[1300];
    snprintf(live, sizeof live, "%s/flat-shard1", base);
    const char *lp[1] = {live};
    assert_int_equal(twn_index_open(lp, 1, NULL, &ix, &err), 0);
    int64_t in1 = 0;
    for (int i = 0; i < N; i++) in1 += shard_of(i) == 1;
    assert_int_equal(twn_index_count(ix), in1);
    twn_index_close(ix);

    /* Merge: the union, rebuilt from the float16 embeddings. */
    char merged[1300];
    snprintf(merged, sizeof merged, "%s/merged", base);
    twn_merge_info mi;
    twn_merge_opts mo = {.created_unix = 1700000000};
    assert_int_equal(twn_index_merge(dp, S, merged, &mo, &mi, &err), 0);
    assert_int_equal(mi.items, N);
    assert_int_equal(mi.duplicates, 0);
    assert_int_equal(mi.refids, 0);
    assert_int_equal(mi.trained, 1);
    twn_store *ms;
    FaissIndex *mx;
    twn_outdir_meta mm;
    assert_int_equal(twn_outdir_read(merged, &ms, &mx, &mm, &err), 0);
    assert_int_equal(mm.count, N);
    assert_int_equal(mm.n_shards, 1);
    assert_string_equal(mm.factory, "Flat");
    assert_string_equal(mm.model, "m");
    /* Every item exactly once, identical to its shard's copy. */
    for (int s = 0; s < S; s++) {
        twn_store *ss;
        FaissIndex *sx;
        twn_outdir_meta sm;
        assert_int_equal(twn_outdir_read(dirs[s], &ss, &sx, &sm, &err), 0);
        for (int64_t r = 0; r < twn_store_count(ss); r++) {
            twn_store_row a, b;
            twn_store_get(ss, r, &a);
            int64_t mr = twn_store_find_id(ms, a.id, a.id_len);
            assert_true(mr >= 0);
            twn_store_get(ms, mr, &b);
            assert_int_equal(a.faiss_id, b.faiss_id);
            assert_int_equal(a.route, b.route);
            assert_int_equal(a.think_tokens, b.think_tokens);
            assert_true(a.p_think == b.p_think);
            assert_memory_equal(a.vec, b.vec, D * sizeof *a.vec);
        }
        twn_store_free(ss);
        faiss_Index_free(sx);
    }
    /* The merged index answers exactly over the float16 vectors. */
    twn_part_hit ph[K];
    for (int qi = 0; qi < 40; qi++) {
        int want[K];
        brute(X, Q + qi * D, 1, want);
        assert_int_equal(twn_part_search(ms, mx, NULL, Q + qi * D, 1, K, ph, &err), 0);
        for (int j = 0; j < K; j++) {
            twn_store_row r;
            twn_store_get(ms, ph[j].row, &r);
            assert_string_equal(r.id, ids[want[j]]);
        }
    }
    twn_store_free(ms);
    faiss_Index_free(mx);

    /* A fourth directory re-sending items 0..9 with other vectors: duplicates, last one wins. */
    const char *dup_dir = NULL;
    char dd[1300];
    snprintf(dd, sizeof dd, "%s/dups", base);
    {
        twn_store *u = twn_store_new(D);
        float *Y = tc_unit_vectors(10, D, 53);
        for (int i = 0; i < 10; i++) {
            twn_index_item it = {
                .id = ids[i], .vec = Y + i * D, .route = 1, .p_think = 0.5f, .think_tokens = 99};
            assert_int_equal(
                twn_store_append(u, &it, (int64_t)twn_hash64(ids[i], strlen(ids[i])), &err), i);
        }
        /* ... and one new item whose FAISS id clashes with item 20's. */
        twn_index_item clash = {.id = "clash", .vec = Y, .p_think = 0.5f};
        assert_int_equal(
            twn_store_append(u, &clash, (int64_t)twn_hash64(ids[20], strlen(ids[20])), &err), 10);
        FaissIndex *fx;
        char desc[TWN_INDEX_DESC_MAX];
        assert_int_equal(twn_build_new(D, "Flat", &fx, desc, &err), 0);
        assert_int_equal(twn_build_add_rows(fx, u, NULL, 11, &err), 0);
        twn_outdir_meta m = {.model = "m", .model_hash = "h", .factory = "Flat"};
        assert_int_equal(twn_outdir_write(dd, u, fx, &m, &err), 0);
        faiss_Index_free(fx);
        twn_store_free(u);
        free(Y);
        dup_dir = dd;
    }
    const char *dp4[S + 1] = {dirs[0], dirs[1], dirs[2], dup_dir};
    assert_int_equal(twn_index_merge(dp4, S + 1, merged, &mo, &mi, &err), 0);
    assert_int_equal(mi.items, N + 1);
    assert_int_equal(mi.duplicates, 10);
    assert_int_equal(mi.refids, 1);
    assert_int_equal(twn_outdir_read(merged, &ms, &mx, &mm, &err), 0);
    twn_store_row r;
    twn_store_get(ms, twn_store_find_id(ms, ids[3], strlen(ids[3])), &r);
    assert_int_equal(r.think_tokens, 99); /* the later directory's copy */
    twn_store_get(ms, twn_store_find_id(ms, "clash", 5), &r);
    assert_true(r.faiss_id != (int64_t)twn_hash64(ids[20], strlen(ids[20])));
    assert_int_equal(faiss_Index_ntotal(mx), N + 1);
    twn_store_free(ms);
    faiss_Index_free(mx);
    free(X);
    free(Q);
}

static void test_merge_ivf_and_mismatch(void **state) {
    (void)state;
    const char *base = tu_tmpdir("search_ivf");
    float *X = tc_unit_vectors(N, D, 61);
    char ivf[S][1200], flat[S][1200];
    build_shards(base, "ivf", "IVF16,Flat", X, ivf); /* ~1000 items each >= 39*16: trained */
    twn_err err = {{0}};
    char merged[1300];
    snprintf(merged, sizeof merged, "%s/merged", base);
    const char *dp[S] = {ivf[0], ivf[1], ivf[2]};
    twn_merge_info mi;
    assert_int_equal(twn_index_merge(dp, S, merged, NULL, &mi, &err), 0);
    assert_int_equal(mi.items, N);
    assert_int_equal(mi.trained, 1);
    const char *mp[1] = {merged};
    twn_index *ix;
    assert_int_equal(twn_index_open(mp, 1, "nprobe=16", &ix, &err), 0);
    for (int i = 0; i < N; i += 97) {
        twn_index_hit h[1];
        int nh;
        assert_int_equal(twn_index_search(ix, X + i * D, 1, h, &nh, &err), 0);
        assert_memory_equal(h[0].id, ids[i], h[0].id_len);
    }
    twn_index_close(ix);

    /* Different factories refuse to merge unless one is named. */
    build_shards(base, "flat", "Flat", X, flat);
    const char *mix[2] = {flat[0], ivf[1]};
    assert_int_equal(twn_index_merge(mix, 2, merged, NULL, &mi, &err), -1);
    char want[3000];
    snprintf(want, sizeof want, "%s: factory \"IVF16,Flat\", but %s has \"Flat\"", ivf[1], flat[0]);
    tc_expect_contains(err.msg, want);
    twn_merge_opts mo = {.factory = "HNSW32"};
    assert_int_equal(twn_index_merge(mix, 2, merged, &mo, &mi, &err), 0);
    twn_store *ms;
    FaissIndex *mx;
    twn_outdir_meta mm;
    assert_int_equal(twn_outdir_read(merged, &ms, &mx, &mm, &err), 0);
    assert_string_equal(mm.factory, "HNSW32");
    assert_string_equal(mm.index_description, "IDMap,HNSW32");
    assert_int_equal(mm.count, mi.items);
    twn_store_free(ms);
    faiss_Index_free(mx);

    /* Search errors name the directory. */
    const char *bad[2] = {flat[0], base};
    assert_int_equal(twn_index_open(bad, 2, NULL, &ix, &err), -1);
    snprintf(want, sizeof want,
             "index 2 of 2: %s: neither an index output directory (no manifest.json) nor a shard "
             "directory with a snapshot (no CURRENT)",
             base);
    assert_string_equal(err.msg, want);
    free(X);
}

int main(void) {
    for (int i = 0; i < N; i++) snprintf(ids[i], sizeof ids[i], "img-%05d", i);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_multi_shard_and_merge),
        cmocka_unit_test(test_merge_ivf_and_mismatch),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
