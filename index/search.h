/* search.h — searching index output directories, and merging them into one.
 *
 * twn_index_open loads S shard output directories (outdir.h; or live shard directories, whose
 * current snapshot is used) and twn_index_search merges their top-k into one list.  Scores are
 * inner products, so results from different shards compare directly; ties are broken by shard
 * then row so results are deterministic.
 *
 * twn_index_merge combines shards into one output directory.  Shards trained independently have
 * different IVF/PQ codebooks, so their index files cannot simply be concatenated: the merged
 * index is rebuilt from the shards' float16 embeddings (trained on an even sample of the union
 * by build.h's rule) — the same procedure whatever the factory string. */
#ifndef TWN_INDEX_SEARCH_H
#define TWN_INDEX_SEARCH_H

#include <stdint.h>

#include "index/faiss_c_shim.h"
#include "index/store.h"
#include "util/err.h"

typedef struct {
    int64_t row; /* in the part's store; -1 for an empty slot */
    int64_t faiss_id;
    float score; /* inner product; -INFINITY for an empty slot */
} twn_part_hit;

/* Searches one part (store + index).  FAISS answers when the index is trained and holds the
 * store's items; otherwise the store is scanned exactly.  stale (may be NULL or empty) holds
 * FAISS ids whose index entries include superseded vectors: results are over-fetched,
 * de-duplicated by id and re-scored from the store. */
int twn_part_search(const twn_store *st, const FaissIndex *index, const twn_i64map *stale,
                    const float *q, int64_t nq, int k, twn_part_hit *hits, twn_err *err);

// ------------------------------------------------------------------------------------------------
// Many shards

typedef struct twn_index twn_index;

typedef struct {
    const char *id; /* valid until twn_index_close */
    size_t id_len;
    int64_t faiss_id;
    float score;
    int shard; /* position in the dirs passed to twn_index_open */
    int64_t row;
    uint8_t route;
    float p_think;
    uint32_t think_tokens;
} twn_index_hit;

/* params: FAISS search parameters for every shard ("nprobe=16"), may be NULL. */
int twn_index_open(const char *const *dirs, int n, const char *params, twn_index **out,
                   twn_err *err);
int twn_index_dim(const twn_index *ix);
int64_t twn_index_count(const twn_index *ix);
/* Top-k of one query over all shards; *nhits <= k (fewer when the shards hold fewer items).
 * One search at a time per twn_index (it reuses a result buffer); open one per thread. */
int twn_index_search(twn_index *ix, const float *q, int k, twn_index_hit *hits, int *nhits,
                     twn_err *err);
void twn_index_close(twn_index *ix);

typedef struct {
    const char *factory;            /* NULL: the shards' (they must agree) */
    int64_t train_size;             /* 0: build.h's rule */
    const char *model, *model_hash; /* NULL: the shards' (they must agree) */
    int64_t created_unix;           /* 0: now */
} twn_merge_opts;

typedef struct {
    int64_t items;      /* in the merged index */
    int64_t duplicates; /* item ids found in more than one shard (the last shard's copy kept) */
    int64_t refids;     /* items given a new FAISS id because another item held theirs */
    int trained;
} twn_merge_info;

/* Writes the merged output directory to outdir (via outdir.tmp.<pid>, renamed into place; an
 * existing outdir is replaced). */
int twn_index_merge(const char *const *dirs, int n, const char *outdir, const twn_merge_opts *opts,
                    twn_merge_info *info, twn_err *err);

#endif
