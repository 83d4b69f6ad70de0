/* source_io.h — one way for the roles to plan and read items from any store: local files, S3
 * objects and Kafka partitions (DESIGN.md §4).
 *
 * Every unit and item ref is a twn_src_unit / twn_src_ref whose `path` names its store:
 *
 *   local file   "/data/shard-0001.tar"           format JSONL / TAR, byte ranges
 *   S3 object    "s3://bucket/key"                format JSONL / TAR, byte ranges (ranged GETs)
 *   Kafka        "kafka://topic/partition"        format KAFKA_JSON / KAFKA_PROTO, offset ranges
 *                                                 (first_index = start, count = end - start)
 *
 * so the coordinator's plan, its unit keys (twn_unit_key over path + range) and its dead letters
 * are the same for all three, and the wire form (twn.proto SourceRef: store, bucket, path = file
 * path / key / topic, partition) is produced and taken apart here in one place.
 *
 * A twn_srcio is one thread's access to the stores: it opens an S3 client and a Kafka consumer
 * handle lazily, the first time a unit needs one, so a job over local files needs neither
 * credentials nor brokers.  The readers are the ones of source.h (through an S3 blob for S3
 * objects: a unit costs a few large GETs, an item ref exactly its own bytes) and kafka.h.
 *
 * Images by reference are checked where the items are read (twn_srcio_fetch_images, or a batch
 * at once with twn_srcio_fetch_images_n): s3:// images are fetched into memory (the engine reads
 * bytes or local files only), local paths must exist.  A dangling reference makes the item a dead
 * letter (STAGE_READ) naming the image.  With a reader pool (cfg.pool, the job's s3.readers) a
 * batch's s3:// images are fetched concurrently, on the pool's kept-alive connections. */
#ifndef TWN_COMMON_SOURCE_IO_H
#define TWN_COMMON_SOURCE_IO_H

#include <stddef.h>
#include <stdint.h>

#include "common/kafka.h"
#include "common/s3.h"
#include "common/source.h"
#include "proto/twn.pb-c.h"
#include "util/err.h"

struct twn_prefetch;

typedef struct twn_srcio_cfg {
    twn_s3_config s3;       /* endpoint/region/credentials; NULL fields: the AWS_* variables */
    twn_kafka_config kafka; /* brokers (required for kafka:// inputs), group (coordinator only:
                               planning from and committing the group's offsets) */
    size_t max_image_bytes; /* an s3:// or local image larger than this is a bad item (64 MiB) */
    /* The process's S3 reader pool (common/prefetch.h; borrowed, NULL: none).  With one,
     * twn_srcio_fetch_images_n fetches a batch's s3:// images concurrently on its readers. */
    struct twn_prefetch *pool;
    char **owned; /* what twn_srcio_cfg_from_conf allocated (kafka.props) */
} twn_srcio_cfg;

/* twn_s3_config_default, twn_kafka_config_default, max_image_bytes 64 MiB. */
void twn_srcio_cfg_default(twn_srcio_cfg *c);

/* Overrides from the environment (the job config's TWN_* names): TWN_S3_ENDPOINT, TWN_S3_REGION,
 * TWN_S3_PATH_STYLE (0/1), TWN_KAFKA_BROKERS, TWN_KAFKA_GROUP, TWN_KAFKA_MAX_INLINE_IMAGE_BYTES.
 * Strings point into the environment.  Fails naming the variable and its value. */
int twn_srcio_cfg_from_env(twn_srcio_cfg *c, twn_err *err);

struct twn_conf;
/* From the job configuration (common/jobconf.h; its own layers include the TWN_* variables):
 * s3.endpoint/region/path_style (auto|true|false)/access_key_id/secret_access_key/session_token
 * ("" leaves the AWS_* variables in charge), kafka.brokers/group/properties/
 * max_inline_image_bytes, limits.max_item_bytes (largest s3:// image).  Strings are borrowed from
 * conf; kafka.properties are copied (twn_srcio_cfg_free). */
int twn_srcio_cfg_from_conf(twn_srcio_cfg *c, const struct twn_conf *conf, twn_err *err);
void twn_srcio_cfg_free(twn_srcio_cfg *c);

typedef struct twn_srcio twn_srcio;

/* cfg is copied (its strings are borrowed: they must outlive the handle). */
int twn_srcio_open(const twn_srcio_cfg *cfg, twn_srcio **out, twn_err *err);
void twn_srcio_close(twn_srcio *io);

/* fn(user) is called about every 100 ms while a Kafka read waits (a broker down, a leader
 * moving): roles keep their heartbeats going with it. */
void twn_srcio_set_wait_hook(twn_srcio *io, void (*fn)(void *user), void *user);

/* The S3 client / Kafka handle, opened on first use (-1 with err when that fails). */
int twn_srcio_s3(twn_srcio *io, twn_s3 **out, twn_err *err);
int twn_srcio_kafka(twn_srcio *io, twn_kafka **out, twn_err *err);

// ------------------------------------------------------------------------------------------------
// Paths

typedef enum { TWN_STORE_FILE = 1, TWN_STORE_S3 = 2, TWN_STORE_KAFKA = 3 } twn_store_kind;

/* By prefix: "s3://" -> S3, "kafka://" -> Kafka, else a local file. */
twn_store_kind twn_srcio_store_of(const char *path);

/* "kafka://topic/3" -> topic (copied into buf, cap >= 256) and partition.  A path without a
 * partition ("kafka://topic", an input) gives *partition = -1. */
int twn_srcio_kafka_path(const char *path, char *topic, size_t cap, int32_t *partition,
                         twn_err *err);

// ------------------------------------------------------------------------------------------------
// Planning

/* Plans the inputs in order, appending to *out (unit ids continue from the last unit there):
 *   local path   twn_src_plan_files (format by name);
 *   s3://b/p     every object under the prefix (twn_src_plan_s3, format by key);
 *   kafka://t    every partition of topic t from its low watermark, or from the group's committed
 *                offset when cfg.kafka.group is set, to the high watermark now, in units of
 *                unit_items offsets; partitions are interleaved (unit k of every partition, then
 *                k + 1) so the plan's low-water mark advances on all partitions together.
 *                Format KAFKA_JSON, or KAFKA_PROTO for "kafka://t?format=proto".
 * *n_kafka (may be NULL) receives the number of Kafka units planned. */
int twn_srcio_plan(twn_srcio *io, const char *const *inputs, size_t n, uint64_t unit_items,
                   twn_src_units *out, size_t *n_kafka, twn_err *err);

/* Streaming (kafka.streaming): appends to `plan` units for what the kafka:// inputs hold beyond
 * it.  For each partition of each kafka:// topic the new range is [end of the plan's last unit of
 * that partition, high watermark now); a partition the plan has no unit of starts where
 * twn_srcio_plan would (the group's committed offset, or the low watermark).  Same unit size and
 * interleaving as twn_srcio_plan; unit ids continue.  Other inputs are ignored (planned once).
 * *n_new receives the number of units appended. */
int twn_srcio_plan_more(twn_srcio *io, const char *const *inputs, size_t n, uint64_t unit_items,
                        twn_src_units *plan, size_t *n_new, twn_err *err);
/* The same, appending at most max_new units: each partition's new units are cut to a prefix
 * (interleaved by rank, so partitions advance together), and *truncated (may be NULL) says
 * whether anything was left for a later call.  A stream bounds its plan-ahead with it. */
int twn_srcio_plan_more_max(twn_srcio *io, const char *const *inputs, size_t n, uint64_t unit_items,
                            size_t max_new, twn_src_units *plan, size_t *n_new, int *truncated,
                            twn_err *err);

// ------------------------------------------------------------------------------------------------
// Reading

typedef struct twn_srcio_reader twn_srcio_reader;

/* Reads the items of unit u from its store (u is copied).  For a file or an S3 object that
 * cannot be opened, -1 (the caller rejects the whole unit with err). */
int twn_srcio_reader_open(twn_srcio *io, const twn_src_unit *u, const twn_src_opts *o,
                          twn_srcio_reader **out, twn_err *err);
/* The same over a blob the caller opened for u's file or object (a prefetched window,
 * common/prefetch.h).  The reader owns b: it is closed with the reader, or here on failure. */
int twn_srcio_reader_open_blob(twn_blob *b, const twn_src_unit *u, const twn_src_opts *o,
                               twn_srcio_reader **out, twn_err *err);
/* As twn_src_reader_next: 1 item (check it->fault), 0 done, -1 the rest cannot be read. */
int twn_srcio_reader_next(twn_srcio_reader *r, twn_src_item *it, twn_err *err);
void twn_srcio_reader_close(twn_srcio_reader *r);

/* Reads the item a received ItemRef names: a ranged read of exactly its bytes (file, S3), or the
 * message at its offset (Kafka).  A ref of length 0 (known only by unit and index) is found by
 * reading its unit.  0: *it holds it (check it->fault); -1: it could not be read (err). */
int twn_srcio_read_ref(twn_srcio *io, const Twn__ItemRef *r, const twn_src_opts *o,
                       twn_src_item *it, twn_err *err);

/* Makes the item's images readable by the engine: s3:// images are fetched into images[i].data
 * (the path stays as the name); local paths must be readable files.  0, or -1 with err naming
 * the item and the image. */
int twn_srcio_fetch_images(twn_srcio *io, twn_src_item *it, twn_err *err);

/* twn_srcio_fetch_images for items[0..n) at once.  With cfg.pool every s3:// image of the batch is
 * queued on the pool at once (its readers fetch them concurrently, a bounded number of
 * connections, each GET at most max_image_bytes and the bytes being received counted against the
 * pool's byte bound); without one they are fetched one after the other, as by
 * twn_srcio_fetch_images.  Items with a fault are left alone.  errs[i] (n of them) receives, for
 * each item whose images cannot be read, exactly the message twn_srcio_fetch_images gives (its
 * first bad image in order: a dangling s3:// key naming the bucket, key, HTTP status and request
 * id; a missing or oversized local file); it is "" for every other item.  Retries are s3.h's.
 * Returns the number of items with a message. */
size_t twn_srcio_fetch_images_n(twn_srcio *io, twn_src_item *items, size_t n, twn_err *errs);

/* The same in two halves, so a caller can work while the GETs run: _begin checks local images and
 * queues the s3:// GETs of items[0..n) (which must stay where they are, untouched, until _end);
 * _end waits for them, fills the images and errs as above and frees f.  Every begun fetch must
 * be ended.  Without a pool, _begin only records the batch and _end fetches it. */
typedef struct twn_srcio_fetch twn_srcio_fetch;
twn_srcio_fetch *twn_srcio_fetch_begin(twn_srcio *io, twn_src_item *items, size_t n);
size_t twn_srcio_fetch_end(twn_srcio_fetch *f, twn_err *errs);

// ------------------------------------------------------------------------------------------------
// twn.proto

/* What a SourceRef points to besides the unit's own strings (bucket, topic): keep it alive as
 * long as the SourceRef. */
typedef struct twn_srcio_buf {
    char bucket[64];
    char topic[256];
} twn_srcio_buf;

/* A unit of any store as a SourceRef (strings point into u and buf). */
int twn_srcio_unit_to_proto(const twn_src_unit *u, Twn__SourceRef *s, twn_srcio_buf *buf,
                            twn_err *err);
/* A received SourceRef of any store as a unit (u->path owned: twn_free). */
int twn_srcio_unit_from_proto(uint64_t unit_id, const Twn__SourceRef *s, twn_src_unit *u,
                              twn_err *err);
/* The ItemRef of an item read from unit u (strings point into u, it and buf). */
int twn_srcio_ref_to_proto(const twn_src_unit *u, const twn_src_item *it, Twn__ItemRef *r,
                           Twn__SourceRef *s, twn_srcio_buf *buf, twn_err *err);

#endif
