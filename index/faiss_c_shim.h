/* faiss_c_shim.h — the FAISS C API as twn uses it, plus two twn-specific extensions.
 *
 * Debian's libfaiss-dev ships the official C API headers (/usr/include/faiss/c_api) but not
 * libfaiss_c, so index/faiss_c_shim.cpp implements the subset we call, with the official signatures
 * and error convention (0 on success; a negative FaissErrorCode and faiss_get_last_error()
 * otherwise). Where a real libfaiss_c is installed it can be linked instead: build with
 * -DTWN_HAVE_FAISS_C and the shim then compiles only the twn_faiss_* extensions below.
 *
 * The subset implemented: faiss_get_last_error, faiss_index_factory, faiss_Index_{free,d,
 * is_trained,ntotal,metric_type,train,add,add_with_ids,search,reset,remove_ids,reconstruct},
 * faiss_IDSelectorBatch_new, faiss_IDSelector_free, faiss_IndexIDMap_{new,cast,sub_index,
 * own_fields,set_own_fields}, faiss_{read,write}_index_fname, faiss_ParameterSpace_{new,free,
 * set_index_parameters,set_index_parameter}.
 *
 * One deviation from a literal wrapper: faiss_Index_remove_ids refuses (with an error) indexes
 * whose removal would throw inside an OpenMP region, because an exception there calls
 * std::terminate and no catch can turn it into an error code (seen with IVF fast-scan's
 * BlockInvertedLists).  twn_faiss_index_caps tells callers in advance. */
#ifndef TWN_INDEX_FAISS_C_SHIM_H
#define TWN_INDEX_FAISS_C_SHIM_H

#include <stdint.h>

#include <faiss/c_api/AutoTune_c.h>
#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/MetaIndexes_c.h>
#include <faiss/c_api/error_c.h>
#include <faiss/c_api/impl/AuxIndexStructures_c.h>
#include <faiss/c_api/index_factory_c.h>
#include <faiss/c_api/index_io_c.h>

#ifdef __cplusplus
extern "C" {
#endif

/* What an index (after unwrapping IDMap / pre-transform layers) can do, and how much training
 * data it wants.  FAISS' k-means warns below 39 points per centroid (min_points_per_centroid)
 * and cannot run below 1 point per centroid; every quantizer in the index counts (the IVF coarse
 * quantizer: nlist centroids; PQ / OPQ: 2^nbits per sub-quantizer). */
typedef struct {
    int native_ids;            /* add_with_ids works without an IDMap wrapper (IVF family) */
    int has_idmap;             /* the outermost layer is an IndexIDMap / IndexIDMap2 */
    int can_remove;            /* remove_ids is implemented and safe */
    int is_ivf;                /* an IndexIVF is inside */
    int64_t nlist;             /* its number of lists, else 0 */
    int64_t max_centroids;     /* largest k of any quantizer to train, 0 when none */
    int64_t train_min;         /* = max_centroids: fewer points cannot be trained at all */
    int64_t train_recommended; /* = 39 * max_centroids: FAISS' warning threshold */
} twn_faiss_caps;

/* Fills *caps.  Returns 0, or -1 (no exception can escape; a NULL index is the only failure). */
int twn_faiss_index_caps(const FaissIndex *index, twn_faiss_caps *caps);

/* Turns FAISS' polysemous training of PQ codebooks on or off for every IndexPQ / IndexIVFPQ
 * inside the index (index_factory turns it on for "PQ<m>" unless the string says "PQ<m>np").
 * It reorders codes for Hamming-filtered "polysemous" search, which twn never enables
 * (polysemous_ht = 0), and costs most of the training time (~60 s for IVF16,PQ8 on 1200 points
 * here versus under 1 s without).  Returns the number of quantizers changed. */
int twn_faiss_set_polysemous_training(FaissIndex *index, int on);

/* Bytes FAISS would write for this index (serialises to memory): a measured size for the
 * benchmarks' memory tables.  Returns 0 or a negative FaissErrorCode. */
int twn_faiss_serialized_size(const FaissIndex *index, size_t *bytes);

/* OpenMP threads FAISS uses for calls made from the CALLING thread only (omp_set_num_threads
 * changes that thread's ICV).  The indexer sets 1: in `twn run` its shards share the cores with
 * the engine, and FAISS' parallel loops (k-means in IVF/PQ training, Flat search) would spin
 * OpenMP teams against it; a shard is one of several, so parallelism comes from shards. */
void twn_faiss_thread_threads(int n);

#ifdef __cplusplus
}
#endif

#endif
