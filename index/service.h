/* service.h — the indexer role: one shard's PULL socket in, durable acks out (DESIGN.md §3).
 *
 * EmbeddingBatch -> twn_shard_add; every commit_ms a group commit (twn_shard_commit) and an Ack
 * of the items whose seq <= the durable seq, as ranges (unit, first_index, count, route, think
 * tokens).  A batch the shard refuses is rejected (STAGE_INDEX) item by item.  On Shutdown:
 * twn_shard_finish (train, snapshot) and return. */
#ifndef TWN_INDEX_SERVICE_H
#define TWN_INDEX_SERVICE_H

#include <stdint.h>

#include "util/err.h"

typedef struct twn_indexer_cfg {
    void *zctx;
    const char *control;  /* coordinator ROUTER endpoint */
    const char *id;       /* DEALER routing id */
    const char *endpoint; /* where this shard's PULL binds */
    const char *dir;      /* shard directory (twn_shard_open) */
    int shard, n_shards, dim;
    const char *factory; /* "Flat" */
    const char *model, *model_hash;
    double commit_ms; /* group-commit interval: 5 */
    volatile int *stop;
} twn_indexer_cfg;

void twn_indexer_cfg_default(twn_indexer_cfg *c);
int twn_indexer_run(const twn_indexer_cfg *cfg, twn_err *err);

#endif
