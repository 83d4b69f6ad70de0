/* kafka_internal.h — what the Kafka source exposes only to its tests and fuzzers. */
#ifndef TWN_COMMON_KAFKA_INTERNAL_H
#define TWN_COMMON_KAFKA_INTERNAL_H

#include "common/json_fast.h"
#include "common/kafka.h"

/* twn_kafka_parse, choosing how a JSON record is read: with fast, what the readers do (simdjson
 * through common/json_fast.h, jansson when the shim gives up); with NULL, jansson alone.  Both
 * must give the same item and the same message for every value (fuzz_kafka_json). */
int twn_kafka_parse_ex(const void *value, size_t len, const void *key, size_t key_len,
                       twn_kafka_format fmt, const char *topic, int32_t partition, int64_t offset,
                       const twn_src_opts *o, size_t max_inline_image_bytes, twn_json_fast *fast,
                       twn_src_item *it);

/* 1 when the simdjson path reads this JSON value by itself (a valid object it takes on), 0 when
 * it leaves it to jansson (invalid, or one of the rare valid records it does not handle). */
int twn_kafka_json_fast(const void *value, size_t len);

#endif
