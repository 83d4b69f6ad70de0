/* build.h — making FAISS indexes for twn: factory strings, id mapping, training, bulk adds.
 *
 * Every twn index uses inner product (embeddings are L2-normalized, so it is cosine similarity)
 * and is labelled with the store's FAISS ids.  Index types that cannot take external ids (Flat,
 * HNSW, PQ, ...) are wrapped in an IndexIDMap.  IndexIDMap rather than IndexIDMap2: both support
 * remove_ids whenever the wrapped index does, and IDMap2's extra reverse hash map (~40 bytes per
 * vector) only serves reconstruct(), which twn never needs because the store holds the vectors.
 *
 * Training sample rule: an index with quantizers to train (IVF coarse quantizer: nlist centroids;
 * PQ / OPQ: 2^nbits per sub-quantizer) is trained once the shard holds
 *     train_size = 39 · max_centroids
 * items (FAISS' min_points_per_centroid, below which k-means warns), unless configured otherwise.
 * A larger sample helps little: FAISS itself subsamples k-means input to 256 points per centroid.
 * An index whose store ends with fewer than max_centroids items cannot be trained at all and is
 * left empty; searches then scan the store exactly (see search.h). */
#ifndef TWN_INDEX_BUILD_H
#define TWN_INDEX_BUILD_H

#include <stdint.h>

#include "index/faiss_c_shim.h"
#include "index/store.h"
#include "util/err.h"

#define TWN_INDEX_DESC_MAX 300

/* A new empty index for factory (wrapped in IDMap when needed); desc receives what was built
 * ("IDMap,HNSW32" for "HNSW32").  A factory FAISS rejects gives its message, naming the string. */
int twn_build_new(int dim, const char *factory, FaissIndex **out, char desc[TWN_INDEX_DESC_MAX],
                  twn_err *err);

/* Applies search-time parameters ("nprobe=16", "efSearch=128", comma-separated); NULL or ""
 * does nothing. */
int twn_build_set_params(FaissIndex *index, const char *params, twn_err *err);

/* The training sample size: configured when > 0, else 39 · max_centroids; 0 when the index needs
 * no training. */
int64_t twn_build_train_size(const FaissIndex *index, int64_t configured);

/* Trains on at most sample_max rows of st (all of them, or an even stride through them). */
int twn_build_train(FaissIndex *index, const twn_store *st, int64_t sample_max, twn_err *err);

/* Adds the given rows of st (all rows when rows == NULL, n = count), labelled with their FAISS
 * ids, converting float16 to float32 in chunks. */
int twn_build_add_rows(FaissIndex *index, const twn_store *st, const int64_t *rows, int64_t n,
                       twn_err *err);

/* faiss_get_last_error() or "unknown FAISS error". */
const char *twn_faiss_error(void);

#endif
