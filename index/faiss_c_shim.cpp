// faiss_c_shim.cpp — the subset of the FAISS C API twn uses, over Debian's static libfaiss.a.
//
// Every entry point is a try block whose handler turns any C++ exception into the official error
// code (-2 FaissException, -4 std::exception, -1 anything else) and keeps the message for
// faiss_get_last_error(), per thread, exactly as libfaiss_c does.  Nothing here prints.
// Opaque C handles are the faiss C++ objects themselves (reinterpret_cast), as in libfaiss_c, so
// a handle from this file and one from the real library are interchangeable.
#include "index/faiss_c_shim.h"

#include <cstring>
#include <omp.h>
#include <exception>
#include <string>

#include <faiss/AutoTune.h>
#include <faiss/Index.h>
#include <faiss/IndexFlatCodes.h>
#include <faiss/IndexIDMap.h>
#include <faiss/IndexIVF.h>
#include <faiss/IndexIVFPQ.h>
#include <faiss/IndexPQ.h>
#include <faiss/IndexPreTransform.h>
#include <faiss/VectorTransform.h>
#include <faiss/impl/FaissException.h>
#include <faiss/impl/IDSelector.h>
#include <faiss/impl/io.h>
#include <faiss/index_factory.h>
#include <faiss/index_io.h>
#include <faiss/invlists/InvertedLists.h>

namespace {

thread_local std::string last_error;

int fail(int code, const char *what) {
    last_error = what ? what : "unknown error";
    return code;
}

// CATCH ends every entry point's try block.
#define CATCH                                                                                      \
    catch (const faiss::FaissException &e) {                                                       \
        return fail(-2, e.what());                                                                 \
    }                                                                                              \
    catch (const std::exception &e) {                                                              \
        return fail(-4, e.what());                                                                 \
    }                                                                                              \
    catch (...) {                                                                                  \
        return fail(-1, "unknown C++ exception");                                                  \
    }

faiss::Index *ix(FaissIndex *p) {
    return reinterpret_cast<faiss::Index *>(p);
}
const faiss::Index *ix(const FaissIndex *p) {
    return reinterpret_cast<const faiss::Index *>(p);
}

// Unwraps IDMap and pre-transform layers down to the storage index, noting what it meets.
void walk(const faiss::Index *index, twn_faiss_caps *c, int depth) {
    auto centroids = [c](int64_t k) {
        if (k > c->max_centroids) c->max_centroids = k;
    };
    if (auto *m = dynamic_cast<const faiss::IndexIDMap *>(index)) {
        if (depth == 0) c->has_idmap = 1;
        walk(m->index, c, depth + 1);
        return;
    }
    if (auto *m = dynamic_cast<const faiss::IndexIDMap2 *>(index)) {
        if (depth == 0) c->has_idmap = 1;
        walk(m->index, c, depth + 1);
        return;
    }
    if (auto *pt = dynamic_cast<const faiss::IndexPreTransform *>(index)) {
        for (const faiss::VectorTransform *vt : pt->chain)
            if (auto *opq = dynamic_cast<const faiss::OPQMatrix *>(vt))
                centroids(opq->pq ? (int64_t)opq->pq->ksub : 256); // OPQ trains an 8-bit PQ
        walk(pt->index, c, depth + 1);
        return;
    }
    if (auto *ivf = dynamic_cast<const faiss::IndexIVF *>(index)) {
        c->is_ivf = 1;
        c->native_ids = 1;
        c->nlist = (int64_t)ivf->nlist;
        centroids((int64_t)ivf->nlist);
        if (auto *ivfpq = dynamic_cast<const faiss::IndexIVFPQ *>(index))
            centroids((int64_t)ivfpq->pq.ksub);
        // Removal walks the lists inside an OpenMP loop; only ArrayInvertedLists implement it.
        c->can_remove = dynamic_cast<const faiss::ArrayInvertedLists *>(ivf->invlists) != nullptr;
        return;
    }
    if (auto *pq = dynamic_cast<const faiss::IndexPQ *>(index)) centroids((int64_t)pq->pq.ksub);
    // Flat, PQ, SQ, LSH ... store codes in one array and compact it on removal.
    c->can_remove = dynamic_cast<const faiss::IndexFlatCodes *>(index) != nullptr;
}

faiss::Index *unwrap_one(faiss::Index *index) {
    if (auto *m = dynamic_cast<faiss::IndexIDMap *>(index)) return m->index;
    if (auto *m = dynamic_cast<faiss::IndexIDMap2 *>(index)) return m->index;
    if (auto *pt = dynamic_cast<faiss::IndexPreTransform *>(index)) return pt->index;
    return nullptr;
}

} // namespace

extern "C" {

void twn_faiss_thread_threads(int n) {
    omp_set_num_threads(n > 0 ? n : 1);
}

int twn_faiss_set_polysemous_training(FaissIndex *index, int on) {
    int changed = 0;
    for (faiss::Index *p = ix(index); p; p = unwrap_one(p)) {
        if (auto *q = dynamic_cast<faiss::IndexIVFPQ *>(p)) {
            q->do_polysemous_training = on != 0;
            changed++;
        } else if (auto *q = dynamic_cast<faiss::IndexPQ *>(p)) {
            q->do_polysemous_training = on != 0;
            changed++;
        }
    }
    return changed;
}

int twn_faiss_index_caps(const FaissIndex *index, twn_faiss_caps *caps) {
    std::memset(caps, 0, sizeof *caps);
    if (!index) return -1;
    try {
        walk(ix(index), caps, 0);
        if (caps->has_idmap) caps->native_ids = 1;
        caps->train_min = caps->max_centroids;
        caps->train_recommended = 39 * caps->max_centroids;
        return 0;
    }
    CATCH
}

int twn_faiss_serialized_size(const FaissIndex *index, size_t *bytes) {
    try {
        faiss::VectorIOWriter w;
        faiss::write_index(ix(index), &w);
        *bytes = w.data.size();
        return 0;
    }
    CATCH
}

#ifndef TWN_HAVE_FAISS_C

const char *faiss_get_last_error() {
    return last_error.empty() ? nullptr : last_error.c_str();
}

int faiss_index_factory(FaissIndex **p_index, int d, const char *description,
                        FaissMetricType metric) {
    try {
        *p_index = nullptr;
        faiss::Index *index =
            faiss::index_factory(d, description, static_cast<faiss::MetricType>(metric));
        *p_index = reinterpret_cast<FaissIndex *>(index);
        return 0;
    }
    CATCH
}

void faiss_Index_free(FaissIndex *obj) {
    delete ix(obj);
}
int faiss_Index_d(const FaissIndex *obj) {
    return (int)ix(obj)->d;
}
int faiss_Index_is_trained(const FaissIndex *obj) {
    return ix(obj)->is_trained ? 1 : 0;
}
idx_t faiss_Index_ntotal(const FaissIndex *obj) {
    return (idx_t)ix(obj)->ntotal;
}
FaissMetricType faiss_Index_metric_type(const FaissIndex *obj) {
    return static_cast<FaissMetricType>(ix(obj)->metric_type);
}

int faiss_Index_train(FaissIndex *index, idx_t n, const float *x) {
    try {
        ix(index)->train(n, x);
        return 0;
    }
    CATCH
}

int faiss_Index_add(FaissIndex *index, idx_t n, const float *x) {
    try {
        ix(index)->add(n, x);
        return 0;
    }
    CATCH
}

int faiss_Index_add_with_ids(FaissIndex *index, idx_t n, const float *x, const idx_t *xids) {
    try {
        ix(index)->add_with_ids(n, x, xids);
        return 0;
    }
    CATCH
}

int faiss_Index_search(const FaissIndex *index, idx_t n, const float *x, idx_t k, float *distances,
                       idx_t *labels) {
    try {
        ix(index)->search(n, x, k, distances, labels);
        return 0;
    }
    CATCH
}

int faiss_Index_reset(FaissIndex *index) {
    try {
        ix(index)->reset();
        return 0;
    }
    CATCH
}

int faiss_Index_remove_ids(FaissIndex *index, const FaissIDSelector *sel, size_t *n_removed) {
    try {
        twn_faiss_caps caps;
        std::memset(&caps, 0, sizeof caps);
        walk(ix(index), &caps, 0);
        if (!caps.can_remove)
            return fail(-2, "remove_ids is not supported by this index type (twn shim refuses "
                            "it: faiss would fail inside an OpenMP region or not implement it)");
        size_t r = ix(index)->remove_ids(*reinterpret_cast<const faiss::IDSelector *>(sel));
        if (n_removed) *n_removed = r;
        return 0;
    }
    CATCH
}

int faiss_Index_reconstruct(const FaissIndex *index, idx_t key, float *recons) {
    try {
        ix(index)->reconstruct(key, recons);
        return 0;
    }
    CATCH
}

int faiss_IDSelectorBatch_new(FaissIDSelectorBatch **p_sel, size_t n, const idx_t *indices) {
    try {
        *p_sel = reinterpret_cast<FaissIDSelectorBatch *>(
            new faiss::IDSelectorBatch(n, reinterpret_cast<const faiss::Index::idx_t *>(indices)));
        return 0;
    }
    CATCH
}

void faiss_IDSelector_free(FaissIDSelector *obj) {
    delete reinterpret_cast<faiss::IDSelector *>(obj);
}

int faiss_IndexIDMap_new(FaissIndexIDMap **p_index, FaissIndex *index) {
    try {
        *p_index = reinterpret_cast<FaissIndexIDMap *>(new faiss::IndexIDMap(ix(index)));
        return 0;
    }
    CATCH
}

FaissIndexIDMap *faiss_IndexIDMap_cast(FaissIndex *index) {
    return reinterpret_cast<FaissIndexIDMap *>(dynamic_cast<faiss::IndexIDMap *>(ix(index)));
}

FaissIndex *faiss_IndexIDMap_sub_index(FaissIndexIDMap *index) {
    return reinterpret_cast<FaissIndex *>(reinterpret_cast<faiss::IndexIDMap *>(index)->index);
}

int faiss_IndexIDMap_own_fields(const FaissIndexIDMap *obj) {
    return reinterpret_cast<const faiss::IndexIDMap *>(obj)->own_fields ? 1 : 0;
}

void faiss_IndexIDMap_set_own_fields(FaissIndexIDMap *obj, int own) {
    reinterpret_cast<faiss::IndexIDMap *>(obj)->own_fields = own != 0;
}

int faiss_write_index_fname(const FaissIndex *idx, const char *fname) {
    try {
        faiss::write_index(ix(idx), fname);
        return 0;
    }
    CATCH
}

int faiss_read_index_fname(const char *fname, int io_flags, FaissIndex **p_out) {
    try {
        *p_out = nullptr;
        *p_out = reinterpret_cast<FaissIndex *>(faiss::read_index(fname, io_flags));
        return 0;
    }
    CATCH
}

int faiss_ParameterSpace_new(FaissParameterSpace **space) {
    try {
        *space = reinterpret_cast<FaissParameterSpace *>(new faiss::ParameterSpace());
        return 0;
    }
    CATCH
}

void faiss_ParameterSpace_free(FaissParameterSpace *obj) {
    delete reinterpret_cast<faiss::ParameterSpace *>(obj);
}

int faiss_ParameterSpace_set_index_parameters(const FaissParameterSpace *space, FaissIndex *index,
                                              const char *params) {
    try {
        reinterpret_cast<const faiss::ParameterSpace *>(space)->set_index_parameters(ix(index),
                                                                                     params);
        return 0;
    }
    CATCH
}

int faiss_ParameterSpace_set_index_parameter(const FaissParameterSpace *space, FaissIndex *index,
                                             const char *name, double value) {
    try {
        reinterpret_cast<const faiss::ParameterSpace *>(space)->set_index_parameter(ix(index), name,
                                                                                    value);
        return 0;
    }
    CATCH
}

#endif // TWN_HAVE_FAISS_C

} // extern "C"
