/* ingest.h — a received EmbeddingBatch as the shard's items, without copying the vectors. */
#ifndef TWN_INDEX_INGEST_H
#define TWN_INDEX_INGEST_H

#include "common/transport.h"
#include "index/item.h"
#include "util/err.h"

/* The batch's items for twn_shard_add (it: n_items entries).  They point into the message: the
 * ids, and the vectors bytes themselves when float-aligned (protobuf-c's own allocation always
 * is), so nothing is copied; otherwise the vectors are copied into *scratch (twn_free it). */
int twn_indexer_batch_items(const Twn__EmbeddingBatch *b, twn_index_item *it, float **scratch,
                            twn_err *err);

#endif
