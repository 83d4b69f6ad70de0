/* outdir.h — the index output directory of DESIGN §4, one per shard (or per merged index).
 *
 *   manifest.json   {"format": "twn-index", "format_version": 1, "model", "model_manifest_sha256",
 *                    "factory" (as configured), "index_description" (as built, e.g.
 * "IDMap,HNSW32"), "metric": "inner_product", "dim", "count", "index_ntotal", "trained", "wal_seq",
 * "shard", "n_shards", "created_unix", "created" (UTC ISO 8601), "embeddings_dtype": "float16",
 * "files": {...}} index.faiss     faiss::write_index of the index (labels are the FAISS ids below)
 *   embeddings.npy  float16 [count, dim], row i = item i
 *   faiss_ids.npy   int64 [count, 1], row i = FAISS id of item i (the id map, with items.jsonl)
 *   items.jsonl     line i = {"id", "faiss_id", "route", "p_think" (null when no gate ran),
 *                    "think_tokens"} of item i
 *
 * A directory is written completely into place and fsynced file by file and then as a directory;
 * callers that need all-or-nothing publication write into a temporary directory and rename it
 * (shard snapshots do; see shard.h).  An index that could not be trained (fewer items than its
 * quantizers have centroids) is written untrained and empty, with "trained": false; search.h
 * then answers from embeddings.npy exactly. */
#ifndef TWN_INDEX_OUTDIR_H
#define TWN_INDEX_OUTDIR_H

#include <stdint.h>

#include "index/faiss_c_shim.h"
#include "index/store.h"
#include "util/err.h"

#define TWN_OUTDIR_FORMAT "twn-index"

typedef struct {
    char model[256];
    char model_hash[128];
    char factory[256];           /* as configured */
    char index_description[300]; /* as built */
    int dim;
    int64_t count, index_ntotal;
    int trained;
    uint64_t wal_seq;
    int shard, n_shards;
    int64_t created_unix; /* 0 when writing: now */
} twn_outdir_meta;

/* Writes the five files into dir (created if missing; existing files are replaced). */
int twn_outdir_write(const char *dir, const twn_store *st, const FaissIndex *index,
                     const twn_outdir_meta *meta, twn_err *err);

/* All-or-nothing variant: writes "<dir>.tmp.<pid>", then renames it over dir (an existing dir is
 * moved aside first and removed after; its parent is fsynced). */
int twn_outdir_publish(const char *dir, const twn_store *st, const FaissIndex *index,
                       const twn_outdir_meta *meta, twn_err *err);

/* Reads a directory back: the store (ids, metadata, float16 vectors), the FAISS index, and the
 * manifest.  Every file is checked against the manifest (counts, dim, id map agreement) and the
 * message names the file and the values that disagree. */
int twn_outdir_read(const char *dir, twn_store **st, FaissIndex **index, twn_outdir_meta *meta,
                    twn_err *err);

/* Removes a directory and the plain files in it (not recursive beyond one level). */
int twn_outdir_remove(const char *dir, twn_err *err);

/* fsyncs a directory. */
int twn_fsync_dir(const char *dir, twn_err *err);

#endif
