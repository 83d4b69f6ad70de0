/* test_faiss.c — the FAISS C API shim (index/faiss_c_shim.cpp) and build.h on the real
 * libfaiss.a: every factory string twn supports, their capabilities and training needs, error
 * codes and messages for C++ exceptions, id mapping, search parameters, and file round trips. */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "index/build.h"
#include "index/faiss_c_shim.h"
#include "tests/testutil.h"
#include "util/rng.h"

#define D 16

static void expect_contains(const char *msg, const char *want) {
    if (!msg || !strstr(msg, want))
        fail_msg("message\n  %s\ndoes not contain\n  %s", msg ? msg : "(null)", want);
}

static float *unit_vectors(int n, int d, uint64_t seed) {
    twn_rng r;
    twn_rng_seed(&r, seed);
    float *x = malloc((size_t)n * (size_t)d * sizeof *x);
    for (int i = 0; i < n; i++) {
        double norm = 0;
        for (int j = 0; j < d; j++) {
            x[i * d + j] = (float)twn_rng_normal(&r);
            norm += (double)x[i * d + j] * x[i * d + j];
        }
        for (int j = 0; j < d; j++) x[i * d + j] /= (float)sqrt(norm);
    }
    return x;
}

typedef struct {
    const char *factory;
    int native_ids, can_remove, is_ivf;
    int64_t nlist, max_centroids;
} caps_case;

static void test_caps(void **state) {
    (void)state;
    const caps_case cases[] = {
        {"Flat", 0, 1, 0, 0, 0},
        {"HNSW32", 0, 0, 0, 0, 0},
        {"IVF16,Flat", 1, 1, 1, 16, 16},
        {"IVF16,PQ8", 1, 1, 1, 16, 256},
        {"OPQ8,IVF16,PQ8", 1, 1, 1, 16, 256},
        {"IVF16,PQ8x4", 1, 1, 1, 16, 16},
        {"IVF16,PQ8x4fs", 1, 0, 1, 16, 16}, /* fast-scan lists cannot remove safely */
        {"PQ8", 0, 1, 0, 0, 256},
        {"IDMap,Flat", 1, 1, 0, 0, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const caps_case *c = &cases[i];
        FaissIndex *ix = NULL;
        assert_int_equal(faiss_index_factory(&ix, D, c->factory, METRIC_INNER_PRODUCT), 0);
        twn_faiss_caps caps;
        assert_int_equal(twn_faiss_index_caps(ix, &caps), 0);
        if (caps.native_ids != c->native_ids || caps.can_remove != c->can_remove ||
            caps.is_ivf != c->is_ivf || caps.nlist != c->nlist ||
            caps.max_centroids != c->max_centroids)
            fail_msg("%s: native_ids %d can_remove %d is_ivf %d nlist %lld max_centroids %lld",
                     c->factory, caps.native_ids, caps.can_remove, caps.is_ivf,
                     (long long)caps.nlist, (long long)caps.max_centroids);
        assert_int_equal(caps.train_min, c->max_centroids);
        assert_int_equal(caps.train_recommended, 39 * c->max_centroids);
        assert_int_equal(faiss_Index_d(ix), D);
        assert_int_equal(faiss_Index_metric_type(ix), METRIC_INNER_PRODUCT);
        assert_int_equal(faiss_Index_is_trained(ix), c->max_centroids == 0);
        assert_int_equal(twn_build_train_size(ix, 0), 39 * c->max_centroids);
        assert_int_equal(twn_build_train_size(ix, 500), c->max_centroids ? 500 : 0);
        faiss_Index_free(ix);
    }
    assert_int_equal(twn_faiss_index_caps(NULL, &(twn_faiss_caps){0}), -1);
}

static void test_errors_are_codes(void **state) {
    (void)state;
    FaissIndex *ix = (FaissIndex *)1;
    assert_int_equal(faiss_index_factory(&ix, D, "IVF16,Bogus", METRIC_INNER_PRODUCT), -2);
    assert_null(ix);
    expect_contains(faiss_get_last_error(),
                    "could not parse code description Bogus in IVF16,Bogus");

    twn_err err = {{0}};
    char desc[TWN_INDEX_DESC_MAX];
    assert_int_equal(twn_build_new(D, "HNSW32,Bogus", &ix, desc, &err), -1);
    expect_contains(err.msg, "FAISS index factory \"HNSW32,Bogus\" (dim 16): ");
    expect_contains(err.msg, "could not parse HNSW code description Bogus in HNSW32,Bogus");

    /* A C++ exception from an operation becomes -2 + message, never a crash. */
    assert_int_equal(faiss_index_factory(&ix, D, "Flat", METRIC_INNER_PRODUCT), 0);
    float *x = unit_vectors(4, D, 1);
    idx_t ids[4] = {10, 11, 12, 13};
    assert_int_equal(faiss_Index_add_with_ids(ix, 4, x, ids), -2);
    expect_contains(faiss_get_last_error(), "add_with_ids not implemented for this type of index");
    faiss_Index_free(ix);

    /* Untrained IVF refuses adds. */
    assert_int_equal(faiss_index_factory(&ix, D, "IVF16,Flat", METRIC_INNER_PRODUCT), 0);
    assert_int_equal(faiss_Index_add_with_ids(ix, 4, x, ids), -2);
    expect_contains(faiss_get_last_error(), "is_trained");
    /* Training with fewer points than centroids is an error, not an abort. */
    assert_int_equal(faiss_Index_train(ix, 4, x), -2);
    expect_contains(faiss_get_last_error(), "should be at least as large as number of clusters");
    faiss_Index_free(ix);

    /* HNSW cannot remove: refused before FAISS is asked. */
    assert_int_equal(twn_build_new(D, "HNSW32", &ix, desc, &err), 0);
    assert_string_equal(desc, "IDMap,HNSW32");
    assert_int_equal(faiss_Index_add_with_ids(ix, 4, x, ids), 0);
    FaissIDSelectorBatch *sel = NULL;
    assert_int_equal(faiss_IDSelectorBatch_new(&sel, 1, ids), 0);
    size_t removed = 99;
    assert_int_equal(faiss_Index_remove_ids(ix, (FaissIDSelector *)sel, &removed), -2);
    expect_contains(faiss_get_last_error(), "remove_ids is not supported by this index type");
    assert_int_equal(removed, 99);
    assert_int_equal(faiss_Index_ntotal(ix), 4);
    faiss_IDSelector_free((FaissIDSelector *)sel);
    faiss_Index_free(ix);

    /* Bad search parameters. */
    assert_int_equal(twn_build_new(D, "Flat", &ix, desc, &err), 0);
    assert_int_equal(twn_build_set_params(ix, "nprobe=4", &err), -1);
    expect_contains(err.msg, "FAISS search parameters \"nprobe=4\": ");
    faiss_Index_free(ix);
    free(x);
}

static void *other_thread(void *p) {
    (void)p;
    /* The last error is per thread (as in libfaiss_c). */
    return (void *)faiss_get_last_error();
}

static void test_last_error_is_per_thread(void **state) {
    (void)state;
    FaissIndex *ix;
    assert_int_equal(faiss_index_factory(&ix, D, "Nope", METRIC_INNER_PRODUCT), -2);
    assert_non_null(faiss_get_last_error());
    pthread_t t;
    void *ret = (void *)1;
    pthread_create(&t, NULL, other_thread, NULL);
    pthread_join(t, &ret);
    assert_null(ret);
}

/* Every supported factory: build (IDMap where needed), train, add with ids, self-search, remove,
 * write, read, search again — identical results. */
static void test_factories_round_trip(void **state) {
    (void)state;
    const char *factories[] = {"Flat", "HNSW32", "IVF16,Flat", "IVF16,PQ8", "OPQ8,IVF16,PQ8"};
    const char *descs[] = {"IDMap,Flat", "IDMap,HNSW32", "IVF16,Flat", "IVF16,PQ8",
                           "OPQ8,IVF16,PQ8"};
    const char *params[] = {NULL, "efSearch=64", "nprobe=16", "nprobe=16", "nprobe=16"};
    const int n = 1200;
    float *x = unit_vectors(n, D, 7);
    idx_t *ids = malloc(n * sizeof *ids);
    for (int i = 0; i < n; i++)
        ids[i] = (idx_t)(0x9e3779b97f4a7c15ull * (uint64_t)(i + 1)); /* negative too */
    const char *dir = tu_tmpdir("faiss_round_trip");
    for (size_t f = 0; f < sizeof factories / sizeof *factories; f++) {
        twn_err err = {{0}};
        FaissIndex *ix;
        char desc[TWN_INDEX_DESC_MAX];
        assert_int_equal(twn_build_new(D, factories[f], &ix, desc, &err), 0);
        assert_string_equal(desc, descs[f]);
        assert_int_equal(twn_build_set_params(ix, params[f], &err), 0);
        if (!faiss_Index_is_trained(ix)) assert_int_equal(faiss_Index_train(ix, n, x), 0);
        assert_int_equal(twn_faiss_set_polysemous_training(ix, 0), f >= 3); /* build_new did it */
        assert_int_equal(faiss_Index_add_with_ids(ix, n, x, ids), 0);
        assert_int_equal(faiss_Index_ntotal(ix), n);
        float *Dist = malloc(n * 2 * sizeof *Dist);
        idx_t *I = malloc(n * 2 * sizeof *I);
        assert_int_equal(faiss_Index_search(ix, n, x, 2, Dist, I), 0);
        int self = 0;
        for (int i = 0; i < n; i++) self += I[2 * i] == ids[i];
        if (f < 3)
            assert_int_equal(self, n); /* exact (HNSW at this size is, in practice) */
        else
            assert_true(self > n / 2);
        if (f == 0) assert_true(fabsf(Dist[0] - 1.0f) < 1e-5f);

        char path[1200];
        snprintf(path, sizeof path, "%s/%zu.faiss", dir, f);
        assert_int_equal(faiss_write_index_fname(ix, path), 0);
        size_t bytes = 0;
        assert_int_equal(twn_faiss_serialized_size(ix, &bytes), 0);
        struct stat st;
        assert_int_equal(stat(path, &st), 0);
        assert_int_equal((size_t)st.st_size, bytes);
        FaissIndex *back = NULL;
        assert_int_equal(faiss_read_index_fname(path, 0, &back), 0);
        assert_int_equal(twn_build_set_params(back, params[f], &err), 0);
        assert_int_equal(faiss_Index_ntotal(back), n);
        float *D2 = malloc(n * 2 * sizeof *D2);
        idx_t *I2 = malloc(n * 2 * sizeof *I2);
        assert_int_equal(faiss_Index_search(back, n, x, 2, D2, I2), 0);
        assert_memory_equal(I, I2, n * 2 * sizeof *I);
        assert_memory_equal(Dist, D2, n * 2 * sizeof *Dist);

        twn_faiss_caps caps;
        twn_faiss_index_caps(back, &caps);
        if (caps.can_remove) {
            FaissIDSelectorBatch *sel;
            size_t removed = 0;
            assert_int_equal(faiss_IDSelectorBatch_new(&sel, 3, ids), 0);
            assert_int_equal(faiss_Index_remove_ids(back, (FaissIDSelector *)sel, &removed), 0);
            assert_int_equal(removed, 3);
            assert_int_equal(faiss_Index_ntotal(back), n - 3);
            faiss_IDSelector_free((FaissIDSelector *)sel);
        }
        assert_int_equal(faiss_Index_reset(back), 0);
        assert_int_equal(faiss_Index_ntotal(back), 0);
        assert_int_equal(faiss_Index_is_trained(back), 1); /* reset keeps the training */
        free(D2);
        free(I2);
        free(Dist);
        free(I);
        faiss_Index_free(back);
        faiss_Index_free(ix);
    }
    free(ids);
    free(x);
}

static void test_idmap_api(void **state) {
    (void)state;
    FaissIndex *flat;
    assert_int_equal(faiss_index_factory(&flat, D, "Flat", METRIC_L2), 0);
    FaissIndexIDMap *map;
    assert_int_equal(faiss_IndexIDMap_new(&map, flat), 0);
    assert_int_equal(faiss_IndexIDMap_own_fields(map), 0);
    faiss_IndexIDMap_set_own_fields(map, 1);
    assert_int_equal(faiss_IndexIDMap_own_fields(map), 1);
    assert_ptr_equal(faiss_IndexIDMap_sub_index(map), flat);
    assert_ptr_equal(faiss_IndexIDMap_cast((FaissIndex *)map), map);
    assert_null(faiss_IndexIDMap_cast(flat));
    float *x = unit_vectors(3, D, 3);
    idx_t ids[3] = {-5, 7, 1LL << 62};
    assert_int_equal(faiss_Index_add_with_ids((FaissIndex *)map, 3, x, ids), 0);
    float d[3];
    idx_t l[3];
    assert_int_equal(faiss_Index_search((FaissIndex *)map, 1, x + 2 * D, 3, d, l), 0);
    assert_int_equal(l[0], 1LL << 62);
    assert_true(d[0] < 1e-6f); /* L2 to itself */
    float rec[D];
    assert_int_equal(faiss_Index_reconstruct(flat, 0, rec), 0);
    assert_memory_equal(rec, x, sizeof rec);
    free(x);
    faiss_Index_free((FaissIndex *)map); /* frees flat too */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_caps),
        cmocka_unit_test(test_errors_are_codes),
        cmocka_unit_test(test_last_error_is_per_thread),
        cmocka_unit_test(test_factories_round_trip),
        cmocka_unit_test(test_idmap_api),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
