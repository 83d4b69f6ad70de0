/* kafka.h — Kafka topics as item sources (librdkafka): the planner over watermarks, a reader of
 * exactly one offset range, re-reading one item by offset, and committing the consumer group's
 * offsets no further than the pipeline has made durable (DESIGN.md §4).
 *
 * Units: (topic, partition, offsets [start, end)).  The planner takes each partition's low and
 * high watermarks once, at planning time (or starts at the group's committed offset), and cuts
 * [from, high) into units of items_per_unit offsets; later messages belong to a later plan.
 *
 * Items: one message = one item, and a unit yields exactly end - start items, one per offset, in
 * offset order — so a unit's item count is known before reading.  An offset that holds no
 * message (a transaction marker, an aborted or compacted-away record) yields an item with fault
 * TWN_SRC_EMPTY saying so; the caller dead-letters it like any bad record.  For an item,
 * index = offset = the message offset, length = the value's bytes, key = the message key (when it
 * is UTF-8 text), line = 0.
 *
 *   TWN_KAFKA_JSON   the value is a JSON object with the JSONL fields: "id" (string or integer;
 *                    the message key when absent; with twn_src_opts.derive_missing_id and no key,
 *                    "<topic>[<partition>]@<offset>"), "text", "instruction", and "image": a path,
 * an s3:// URI or a "data:<type>;base64,<data>" URI, or a list of them; also "image_base64": base64
 * image bytes or a list of them.  Inline images decode into images[i].data and may be at most
 * max_inline_image_bytes each.  Paths and URIs are kept as written (images[i].path).
 *   TWN_KAFKA_PROTO  the value is a packed twn.Item (proto/twn.proto); an empty id takes the key
 *                    (or is derived the same way).
 *
 * Bad records never stop a reader: the item comes back with fault != TWN_SRC_OK and a message
 * "kafka <topic>[<partition>]@<offset>: <what>; expected <what>; value: '<the value, shortened>'".
 * A reader fails (-1) only when the range cannot be read: offsets deleted by retention, the
 * partition now ending before the range does, or no progress for read_timeout_ms (brokers going
 * down and leaders moving are waited out by librdkafka within that time).
 *
 * One twn_kafka handle is one librdkafka consumer; use one per thread (a reader assigns the
 * handle to its partition, so a handle reads one unit at a time). */
#ifndef TWN_COMMON_KAFKA_H
#define TWN_COMMON_KAFKA_H

#include <stddef.h>
#include <stdint.h>

#include "common/source.h"
#include "proto/twn.pb-c.h"
#include "util/err.h"

/* Values match twn.Format. */
typedef enum twn_kafka_format {
    TWN_KAFKA_JSON = 3,
    TWN_KAFKA_PROTO = 4,
} twn_kafka_format;

typedef struct twn_kafka_config {
    const char *brokers;           /* bootstrap.servers (required) */
    const char *group;             /* group.id: commits and committed offsets; NULL: none */
    const char *const *props;      /* more librdkafka "name=value" settings (security, tuning),
                                      NULL-terminated; may be NULL */
    int op_timeout_ms;             /* metadata, watermarks, commits (default 10000) */
    int read_timeout_ms;           /* a reader fails after this long without progress (30000) */
    size_t max_inline_image_bytes; /* decoded size of one inline image (default 1 MiB) */
} twn_kafka_config;

twn_kafka_config twn_kafka_config_default(void);

typedef struct twn_kafka twn_kafka;

int twn_kafka_open(const twn_kafka_config *cfg, twn_kafka **out, twn_err *err);
void twn_kafka_close(twn_kafka *k);
/* The latest error librdkafka reported on this handle (a broker down, a leader moving: errors it
 * recovers from by itself), "" when none; for logs and metrics. */
const char *twn_kafka_last_error(const twn_kafka *k);
/* fn(user) is called about every 100 ms while a reader waits for a message (a broker down, a
 * leader moving), so a role can keep its heartbeats going through a long wait. */
void twn_kafka_set_wait_hook(twn_kafka *k, void (*fn)(void *user), void *user);

// ------------------------------------------------------------------------------------------------
// Units and the planner

typedef struct twn_kafka_unit {
    uint64_t id; /* sequential in planning order */
    twn_kafka_format format;
    char *topic; /* owned (collected units) */
    int32_t partition;
    int64_t start, end; /* message offsets [start, end) */
} twn_kafka_unit;

typedef struct twn_kafka_units {
    twn_kafka_unit *v;
    size_t n, cap;
} twn_kafka_units;

void twn_kafka_units_free(twn_kafka_units *l);

/* Called once per unit in order (partitions ascending, offsets ascending); the unit is only valid
 * during the call.  A non-zero return stops planning and is returned. */
typedef int (*twn_kafka_unit_fn)(const twn_kafka_unit *u, void *user, twn_err *err);

/* Plans every partition of `topic`: [from, high) in units of items_per_unit offsets, where high
 * is the high watermark now and from the low watermark, or, with from_committed, the group's
 * committed offset where it has one (never below the low watermark).  Unit ids start at
 * *next_id, which is advanced. */
int twn_kafka_plan(twn_kafka *k, const char *topic, twn_kafka_format fmt, uint64_t items_per_unit,
                   int from_committed, uint64_t *next_id, twn_kafka_unit_fn fn, void *user,
                   twn_err *err);
/* Same, appending copies of the units to *out. */
int twn_kafka_plan_units(twn_kafka *k, const char *topic, twn_kafka_format fmt,
                         uint64_t items_per_unit, int from_committed, twn_kafka_units *out,
                         twn_err *err);

// ------------------------------------------------------------------------------------------------
// Reading

typedef struct twn_kafka_reader twn_kafka_reader;

/* Reads unit u through k (which must outlive the reader; one reader per handle at a time). */
int twn_kafka_reader_open(twn_kafka *k, const twn_kafka_unit *u, const twn_src_opts *o,
                          twn_kafka_reader **out, twn_err *err);
/* 1: an item in *it (cleared first; check it->fault); 0: all end - start items were returned;
 * -1: the range cannot be read (err says why). */
int twn_kafka_reader_next(twn_kafka_reader *r, twn_src_item *it, twn_err *err);
void twn_kafka_reader_close(twn_kafka_reader *r);

/* Re-reads the item at one offset (a worker re-reading a hard item by its ref). */
int twn_kafka_read_ref(twn_kafka *k, const char *topic, int32_t partition, int64_t offset,
                       twn_kafka_format fmt, const twn_src_opts *o, twn_src_item *it, twn_err *err);

/* Turns one message into an item (what the readers do; exposed for tests and the fuzzer).  Set
 * nothing in `it` first.  Returns 0, or -1 with it->fault and it->err set. */
int twn_kafka_parse(const void *value, size_t len, const void *key, size_t key_len,
                    twn_kafka_format fmt, const char *topic, int32_t partition, int64_t offset,
                    const twn_src_opts *o, size_t max_inline_image_bytes, twn_src_item *it);

// ------------------------------------------------------------------------------------------------
// Offsets of the consumer group

/* The group's committed offset for a partition, or -1 when it has none. */
int twn_kafka_committed(twn_kafka *k, const char *topic, int32_t partition, int64_t *offset,
                        twn_err *err);

/* Commits `upto` (the next offset to consume: everything below it is durable) for the group, and
 * never more; never moves the group backwards either (an older `upto` is a no-op).  *committed
 * (may be NULL) receives the group's offset afterwards. */
int twn_kafka_commit(twn_kafka *k, const char *topic, int32_t partition, int64_t upto,
                     int64_t *committed, twn_err *err);

/* What may be committed for (topic, partition): starting at `from` (the offset the plan began
 * at), the end of the run of consecutive durable units, i.e. the start of the lowest unit not yet
 * durable.  durable[i] says whether units[i] is durable; other topics/partitions are ignored. */
int64_t twn_kafka_commit_point(const twn_kafka_unit *units, const unsigned char *durable, size_t n,
                               const char *topic, int32_t partition, int64_t from);

// ------------------------------------------------------------------------------------------------
// twn.proto: STORE_KAFKA source refs (path = topic, partition, start/end = offsets)

/* Fills `s`; s->path points into u->topic. */
void twn_kafka_unit_to_proto(const twn_kafka_unit *u, Twn__SourceRef *s);
/* A STORE_KAFKA SourceRef as a unit (free u->topic with twn_free). */
int twn_kafka_unit_from_proto(uint64_t unit_id, const Twn__SourceRef *s, twn_kafka_unit *u,
                              twn_err *err);
/* Fills `r` and `s` for an item of unit u (offset = the message offset). */
void twn_kafka_ref_to_proto(const twn_kafka_unit *u, const twn_src_item *it, Twn__ItemRef *r,
                            Twn__SourceRef *s);

#endif
