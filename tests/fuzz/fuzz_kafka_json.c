/* fuzz_kafka_json.c — the simdjson path against jansson: for any bytes as a Kafka message value,
 * twn_kafka_parse with simdjson (common/json_fast.cpp, jansson when it gives up) and jansson
 * alone must give the same result, fault, message, id, text, instruction, images and key.  One
 * parser serves every input, as a reader's does from one message to the next.
 *
 * The first byte picks whether the message has a key (bit 0), derive_missing_id (bit 1) and a
 * small id limit (bit 2); the rest is the value.  Seeds: records with escapes, surrogate pairs,
 * nested objects and arrays, duplicate keys at every depth, numbers at the edges of long long
 * and double, control characters, invalid UTF-8, \u0000, keys with escapes and trailing bytes. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/kafka_internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int same_str(const char *a, const char *b) {
    return (!a && !b) || (a && b && !strcmp(a, b));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!size) return 0;
    const char *key = data[0] & 1 ? "key-1" : NULL;
    twn_src_opts o = twn_src_opts_default();
    o.max_item_bytes = 1 << 16;
    o.derive_missing_id = (data[0] & 2) != 0;
    o.max_id_bytes = data[0] & 4 ? 8 : 256;
    static twn_json_fast *fast;
    if (!fast) fast = twn_json_fast_new();
    twn_src_item a = {0}, b = {0};
    int ra = twn_kafka_parse_ex(data + 1, size - 1, key, key ? strlen(key) : 0, TWN_KAFKA_JSON,
                                "fz", 0, 3, &o, 64, fast, &a);
    int rb = twn_kafka_parse_ex(data + 1, size - 1, key, key ? strlen(key) : 0, TWN_KAFKA_JSON,
                                "fz", 0, 3, &o, 64, NULL, &b);
    if (ra != rb || a.fault != b.fault || strcmp(a.err.msg, b.err.msg)) abort();
    if (!same_str(a.id, b.id) || !same_str(a.text, b.text) ||
        !same_str(a.instruction, b.instruction) || !same_str(a.key, b.key))
        abort();
    if (a.n_images != b.n_images || a.index != b.index || a.length != b.length) abort();
    for (size_t i = 0; i < a.n_images; i++) {
        const twn_src_image *x = &a.images[i], *y = &b.images[i];
        if (!same_str(x->path, y->path) || x->size != y->size || !x->data != !y->data) abort();
        if (x->data && memcmp(x->data, y->data, x->size)) abort();
    }
    twn_src_item_clear(&a);
    twn_src_item_clear(&b);
    return 0;
}
