/* shard.h — one index shard: WAL + item store + FAISS index, with atomic snapshots.
 *
 * The indexer thread's whole job in four calls: twn_shard_add for each received batch,
 * twn_shard_commit (one fsync), ack every item whose seq <= the durable seq returned, and now
 * and then twn_shard_snapshot.  Any process may be killed at any moment: reopening loads the
 * newest snapshot and replays the WAL after it.
 *
 * Exactly once per id.  An item id already in the shard is replaced: its store row and FAISS
 * entry are updated in place (same FAISS id).  A re-delivery with identical content (the usual
 * case after a lease expiry) changes nothing and writes nothing; its ack seq is the seq of the
 * record that made the current content.  Index types that cannot remove (HNSW) keep the
 * superseded entry until the next snapshot rebuilds them; meanwhile searches de-duplicate those
 * ids and re-score them from the store, so results never show an old vector's score.
 *
 * Training.  An index that needs training (IVF, PQ) starts empty: items go to the WAL and the
 * store only, searches scan the store exactly, and once train_size items are in (build.h's rule)
 * the index is trained on them and they are added.  twn_shard_finish trains on whatever is there.
 *
 * Directory layout:
 *   DIR/LOCK                  flock()ed while open (a second opener fails with a clear message)
 *   DIR/wal/                  WAL segments (wal.h)
 *   DIR/CURRENT               name of the current snapshot, replaced atomically
 *   DIR/snap-<seq>.<gen>/     a complete DESIGN §4 output directory (outdir.h) with wal_seq = seq
 * A snapshot is written into DIR/snap.tmp, fsynced, renamed into place, and only then named in
 * CURRENT (write to a temp file, fsync, rename, fsync DIR); older snapshots and WAL segments it
 * covers are deleted afterwards.  A crash at any point leaves either the old or the new
 * snapshot current, plus a WAL that covers everything after it.
 *
 * Thread safety: all calls may come from different threads; one mutex serialises them, except
 * that twn_shard_commit's fsync runs outside it so adds continue during the disk wait. */
#ifndef TWN_INDEX_SHARD_H
#define TWN_INDEX_SHARD_H

#include <stddef.h>
#include <stdint.h>

#include "index/item.h"
#include "index/search.h"
#include "index/wal.h"
#include "util/err.h"

typedef struct twn_shard twn_shard;

typedef struct {
    int dim;
    const char *factory; /* FAISS index_factory string: "Flat", "HNSW32", "IVF1024,PQ64" ... */
    const char *search_params; /* e.g. "nprobe=32" or "efSearch=128"; NULL = FAISS defaults */
    int64_t train_size;        /* 0 = 39 · max_centroids (build.h) */
    /* For manifest.json. */
    const char *model, *model_hash;
    int shard, n_shards;
    /* WAL tuning (dim and after_seq are set by the shard). */
    uint64_t wal_segment_bytes;
    uint32_t wal_block_bytes;
    int wal_zstd_level;
    int wal_repair;
    int wal_defer_writes; /* appends do no I/O, commits write (wal.h; for index/committer.h) */
    /* Told of every record once durable, replayed ones included (twn_wal_opts.on_durable, e.g.
     * index/out_kafka.h).  Whatever it hands on must be flushed before a snapshot, which trims
     * the WAL: the records before it are never replayed again. */
    twn_wal_durable_fn on_durable;
    void *on_durable_ctx;
} twn_shard_opts;

typedef struct {
    uint64_t snapshot_seq; /* WAL position the loaded snapshot covered (0 = none loaded) */
    int64_t snapshot_items;
    twn_wal_replay_info wal; /* what replay found (records, dropped bytes and why) */
} twn_shard_open_info;

enum { TWN_SHARD_ADDED = 0, TWN_SHARD_REPLACED, TWN_SHARD_UNCHANGED };

typedef struct {
    uint64_t seq; /* ack once twn_shard_commit's durable seq >= this */
    int64_t faiss_id;
    int outcome; /* TWN_SHARD_ADDED / REPLACED / UNCHANGED */
} twn_shard_ack;

typedef struct {
    int64_t items, index_ntotal, stale, train_size;
    int trained;
    uint64_t added, replaced, unchanged; /* since open, replay included */
    uint64_t snapshot_seq;
    twn_wal_stats wal;
} twn_shard_stats;

int twn_shard_open(const char *dir, const twn_shard_opts *opts, twn_shard **out,
                   twn_shard_open_info *info, twn_err *err);

/* Validates the whole batch first (a bad item fails the call with its id in the message and
 * nothing applied), then logs and applies it.  acks (may be NULL) has n entries. */
int twn_shard_add(twn_shard *s, const twn_index_item *items, size_t n, twn_shard_ack *acks,
                  twn_err *err);

/* Group commit: one fsync for everything added so far.  *durable: the highest durable seq. */
int twn_shard_commit(twn_shard *s, uint64_t *durable, twn_err *err);

/* Top-k by inner product for nq queries; hits has nq*k entries (empty slots: row -1). */
int twn_shard_search(twn_shard *s, const float *q, int64_t nq, int k, twn_part_hit *hits,
                     twn_err *err);

/* A row's item (pointers valid until the next add). */
int twn_shard_get(twn_shard *s, int64_t row, twn_store_row *out, twn_err *err);

/* Commits, rebuilds a stale index, writes and publishes a snapshot, trims the WAL. */
int twn_shard_snapshot(twn_shard *s, twn_err *err);

/* End of job: trains the index on what is there if it is still untrained (left untrained, and
 * searched exactly, when there are fewer items than centroids), snapshots, and if outdir is not
 * NULL also writes the §4 output directory there. */
int twn_shard_finish(twn_shard *s, const char *outdir, twn_err *err);

void twn_shard_get_stats(twn_shard *s, twn_shard_stats *st);

/* Commits and closes (no snapshot).  Frees s even on error. */
int twn_shard_close(twn_shard *s, twn_err *err);

/* The output directory a path stands for: the path itself when it holds manifest.json, else the
 * snapshot named by its CURRENT.  New string (twn_free). */
int twn_shard_resolve_dir(const char *path, char **outdir, twn_err *err);

#endif
