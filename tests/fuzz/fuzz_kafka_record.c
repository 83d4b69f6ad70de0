/* fuzz_kafka_record.c — arbitrary bytes as a Kafka message value through twn_kafka_parse.
 *
 * The first byte picks the format (bit 0: JSON or packed twn.Item) and whether the message has a
 * key (bit 1); the rest is the value.  A record either becomes a well-formed item (an id of
 * 1..max_id_bytes bytes, UTF-8 id and text, every image a path or non-empty bytes within the inline
 * limit) or says why, naming the topic, partition and offset.  Seeds: good and bad JSON records
 * of test_kafka.c and packed Items. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/kafka.h"
#include "common/source_internal.h"

#define PREFIX "kafka fuzz[1]@7: "

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!size) return 0;
    twn_kafka_format fmt = data[0] & 1 ? TWN_KAFKA_PROTO : TWN_KAFKA_JSON;
    const char *key = data[0] & 2 ? "key-1" : NULL;
    twn_src_opts o = twn_src_opts_default();
    o.max_item_bytes = 4096;
    o.max_id_bytes = 64;
    twn_src_item it = {0};
    int rc = twn_kafka_parse(data + 1, size - 1, key, key ? strlen(key) : 0, fmt, "fuzz", 1, 7, &o,
                             512, &it);
    if (rc == 0) {
        if (it.fault || !it.id || !it.id[0] || strlen(it.id) > o.max_id_bytes) abort();
        /* every string is UTF-8 text */
        const char *texts[] = {it.id, it.text, it.instruction, it.key};
        for (size_t i = 0; i < 4; i++)
            if (texts[i] &&
                twn_src_utf8_invalid_at((const uint8_t *)texts[i], strlen(texts[i])) >= 0)
                abort();
        if (!it.n_images && (!it.text || !it.text[0])) abort();
        for (size_t i = 0; i < it.n_images; i++) {
            const twn_src_image *im = &it.images[i];
            if (!im->path == !im->data) abort();
            if (im->path && !im->path[0]) abort();
            if (im->data && (!im->size || (fmt == TWN_KAFKA_JSON && im->size > 512))) abort();
        }
        if (it.offset != 7 || it.length != size - 1) abort();
    } else if (rc != -1 || !it.fault || strncmp(it.err.msg, PREFIX, sizeof PREFIX - 1)) {
        abort();
    }
    twn_src_item_clear(&it);
    return 0;
}
