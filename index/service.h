/* service.h — the indexer role: one shard's PULL socket in, durable acks out (DESIGN.md §3).
 *
 * EmbeddingBatch -> twn_shard_add; every commit_ms a group commit (twn_shard_commit, on the
 * committer thread of committer.h, so receiving and adding go on during the fsync) and an Ack of
 * the items whose seq <= the durable seq, as ranges (unit, first_index, count, route, think
 * tokens).  A batch the shard refuses is rejected (STAGE_INDEX) item by item.  On Shutdown: the
 * committer stops, a last commit and its acks, twn_shard_finish (train, snapshot) and return. */
#ifndef TWN_INDEX_SERVICE_H
#define TWN_INDEX_SERVICE_H

#include <stdint.h>

#include "common/curve.h"
#include "util/err.h"

typedef struct twn_indexer_cfg {
    void *zctx;
    const char *control;  /* coordinator ROUTER endpoint */
    const char *id;       /* DEALER routing id */
    const char *endpoint; /* this shard's PULL endpoint, as gates and workers reach it */
    const char *bind;     /* where the PULL binds when that differs (NULL: endpoint) */
    const char *dir;      /* shard directory (twn_shard_open) */
    int shard, n_shards, dim;
    const char *factory; /* "Flat" */
    const char *model, *model_hash;
    double commit_ms; /* group-commit interval: 5 */
    /* EmbeddingBatches queued per connected sender (ZMQ_RCVHWM of the PULL): 4.  With the
     * senders' shard_credits (gate.h) this bounds what a slow shard can have in flight:
     * senders x (shard_credits + credits) batches (+ kernel socket buffers over tcp://). */
    int credits;
    int faiss_threads; /* OpenMP threads for this indexer's FAISS calls; 0 = OpenMP's default
                          (`twn run`: 1, see twn_faiss_thread_threads) */
    double test_batch_delay_ms; /* tests: sleep this long per received batch (a slow shard) */
    double test_stall_ms;       /* tests: stop reading this long at the first batch */
    volatile int *stop;
    double connect_timeout_s; /* no Welcome within this long: fail; 0 = wait forever */
    /* CURVE for tcp:// (NULL: plain): server of the PULL, client of the coordinator
     * (common/curve.h) */
    const twn_curve_cfg *curve;
    /* frame / ZeroMQ message limit (limits.max_message_bytes); 0 = 64 MiB (transport.h) */
    size_t max_message_bytes;
    const char *compress; /* limits.compress: auto|always|never; NULL = auto */
    /* The output topic (index/out_kafka.h): every vector made durable is produced to
     * out_topic (NULL or "": off) on out_brokers, with out_props ("name=value", NULL-terminated,
     * may be NULL: kafka.properties).  Flushed before the snapshot at Shutdown. */
    const char *out_topic, *out_brokers;
    const char *const *out_props;
} twn_indexer_cfg;

void twn_indexer_cfg_default(twn_indexer_cfg *c);
int twn_indexer_run(const twn_indexer_cfg *cfg, twn_err *err);

#endif
