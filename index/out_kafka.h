/* out_kafka.h — the output topic (kafka.output_topic): every vector an indexer has made durable,
 * produced to Kafka, key = the item id, value = a packed twn.EmbeddingRecord (proto/twn.proto:
 * id, float32 vector, dim, route, p_think, think tokens, model, model hash, shard, FAISS id,
 * WAL seq).
 *
 * It hangs under the shard's WAL (twn_shard_opts.on_durable = twn_out_kafka_on_durable, ctx =
 * the handle): a record is produced once the fsync that made it durable has returned, before the
 * indexer acks it, so the topic never holds an item the index could lose.  A reopened shard's
 * WAL replay produces the replayed records again, so delivery is at least once: after an indexer
 * crash, items may appear twice and consumers dedupe by key (the last record of a key wins, as
 * in the index).  Before a snapshot (which trims the WAL, so those records are never replayed
 * again) the indexer calls twn_out_kafka_flush.
 *
 * The producer is idempotent (enable.idempotence=true, acks=all: no duplicates or reordering
 * from its own retries) with a bounded queue (queue.buffering.max.kbytes = 65536 unless
 * kafka.properties set it): when the queue is full, the committing thread waits (serving delivery
 * reports) instead of dropping, which holds back the shard's acks and so its senders.  A record
 * librdkafka gives up on (message.timeout.ms, 300 s by default, of brokers unreachable) is
 * logged and counted in twn_index_output_errors_total{shard}; delivered ones in
 * twn_index_output_records_total{shard}. */
#ifndef TWN_INDEX_OUT_KAFKA_H
#define TWN_INDEX_OUT_KAFKA_H

#include <stdint.h>

#include "index/wal.h"
#include "util/err.h"

typedef struct twn_out_kafka twn_out_kafka;

typedef struct {
    const char *brokers;      /* kafka.brokers (required) */
    const char *topic;        /* kafka.output_topic (required) */
    const char *const *props; /* kafka.properties as "name=value", NULL-terminated; may be NULL */
    const char *model, *model_hash;
    int shard, dim;
    volatile int *stop; /* a full queue is waited out until this is set (may be NULL) */
} twn_out_kafka_cfg;

typedef struct {
    uint64_t produced;  /* records handed to librdkafka */
    uint64_t delivered; /* acknowledged by the brokers */
    uint64_t errors;    /* failed: not produced, or delivery failed */
    uint64_t waits;     /* times a full queue made the producer wait */
} twn_out_kafka_stats;

int twn_out_kafka_open(const twn_out_kafka_cfg *cfg, twn_out_kafka **out, twn_err *err);

/* twn_wal_durable_fn: produces one durable record (ctx = the twn_out_kafka). */
void twn_out_kafka_on_durable(void *ctx, const twn_wal_rec *rec);

/* Waits until every record produced so far has its delivery report (at most timeout_ms; < 0:
 * until the stop flag).  -1 when some are still queued then, or when any record failed since the
 * last flush (the message says how many and the first error). */
int twn_out_kafka_flush(twn_out_kafka *o, int timeout_ms, twn_err *err);

void twn_out_kafka_get_stats(twn_out_kafka *o, twn_out_kafka_stats *st);

/* Closes without flushing (what is still queued is dropped and counted).  NULL: no-op. */
void twn_out_kafka_close(twn_out_kafka *o);

#endif
