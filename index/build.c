/* build.c — making FAISS indexes for twn (see build.h). */
#include "index/build.h"

#include <stdio.h>
#include <string.h>

#include "util/mem.h"

/* Rows converted to float32 per add call.  Small on purpose: FAISS's IVF-PQ encoder allocates a
 * distance table of rows x m x 256 floats per call (4096 rows of PQ64 = 268 MB, measured by
 * bench_index), 256 rows keep it at 16 MB for PQ64. */
#define ADD_CHUNK 256

const char *twn_faiss_error(void) {
    const char *e = faiss_get_last_error();
    return e ? e : "unknown FAISS error";
}

int twn_build_new(int dim, const char *factory, FaissIndex **out, char desc[TWN_INDEX_DESC_MAX],
                  twn_err *err) {
    *out = NULL;
    FaissIndex *index = NULL;
    if (faiss_index_factory(&index, dim, factory, METRIC_INNER_PRODUCT) != 0)
        return twn_err_set(err, "FAISS index factory \"%s\" (dim %d): %s", factory, dim,
                           twn_faiss_error());
    twn_faiss_set_polysemous_training(index, 0); /* see faiss_c_shim.h: unused, and slow */
    twn_faiss_caps caps;
    twn_faiss_index_caps(index, &caps);
    snprintf(desc, TWN_INDEX_DESC_MAX, "%s", factory);
    if (!caps.native_ids) {
        FaissIndexIDMap *map = NULL;
        if (faiss_IndexIDMap_new(&map, index) != 0) {
            faiss_Index_free(index);
            return twn_err_set(err, "wrapping \"%s\" in an IDMap: %s", factory, twn_faiss_error());
        }
        faiss_IndexIDMap_set_own_fields(map, 1);
        index = (FaissIndex *)map;
        snprintf(desc, TWN_INDEX_DESC_MAX, "IDMap,%s", factory);
    }
    *out = index;
    return 0;
}

int twn_build_set_params(FaissIndex *index, const char *params, twn_err *err) {
    if (!params || !*params) return 0;
    FaissParameterSpace *ps = NULL;
    if (faiss_ParameterSpace_new(&ps) != 0)
        return twn_err_set(err, "FAISS parameter space: %s", twn_faiss_error());
    int rc = faiss_ParameterSpace_set_index_parameters(ps, index, params);
    faiss_ParameterSpace_free(ps);
    return rc ? twn_err_set(err, "FAISS search parameters \"%s\": %s", params, twn_faiss_error())
              : 0;
}

int64_t twn_build_train_size(const FaissIndex *index, int64_t configured) {
    if (faiss_Index_is_trained(index)) return 0;
    if (configured > 0) return configured;
    twn_faiss_caps caps;
    twn_faiss_index_caps(index, &caps);
    return caps.train_recommended > 0 ? caps.train_recommended : 1;
}

int twn_build_train(FaissIndex *index, const twn_store *st, int64_t sample_max, twn_err *err) {
    int64_t n = twn_store_count(st), m = n < sample_max || sample_max <= 0 ? n : sample_max;
    int dim = twn_store_dim(st);
    size_t bytes;
    if (twn_mul_size((size_t)m, (size_t)dim * sizeof(float), &bytes))
        return twn_err_set(err, "training sample of %lld x %d overflows", (long long)m, dim);
    float *x = twn_try_alloc(bytes ? bytes : 1);
    if (!x) return twn_err_set(err, "cannot allocate %zu bytes for the training sample", bytes);
    for (int64_t i = 0; i < m; i++)
        twn_store_get_f32(st, m == n ? i : i * n / m, 1, x + (size_t)i * (size_t)dim);
    int rc = faiss_Index_train(index, m, x);
    twn_free(x);
    return rc ? twn_err_set(err, "training the index on %lld vectors: %s", (long long)m,
                            twn_faiss_error())
              : 0;
}

int twn_build_add_rows(FaissIndex *index, const twn_store *st, const int64_t *rows, int64_t n,
                       twn_err *err) {
    int dim = twn_store_dim(st);
    float *x = twn_try_alloc((size_t)ADD_CHUNK * (size_t)dim * sizeof(float));
    idx_t *ids = twn_malloc(ADD_CHUNK * sizeof *ids);
    if (!x) {
        twn_free(ids);
        return twn_err_set(err, "cannot allocate the add buffer for dim %d", dim);
    }
    int rc = 0;
    for (int64_t at = 0; at < n && !rc; at += ADD_CHUNK) {
        int64_t m = n - at < ADD_CHUNK ? n - at : ADD_CHUNK;
        for (int64_t i = 0; i < m; i++) {
            int64_t r = rows ? rows[at + i] : at + i;
            twn_store_row row;
            twn_store_get(st, r, &row);
            ids[i] = row.faiss_id;
            twn_store_get_f32(st, r, 1, x + (size_t)i * (size_t)dim);
        }
        if (faiss_Index_add_with_ids(index, m, x, ids) != 0)
            rc = twn_err_set(err, "adding %lld vectors to the index: %s", (long long)m,
                             twn_faiss_error());
    }
    twn_free(x);
    twn_free(ids);
    return rc;
}
