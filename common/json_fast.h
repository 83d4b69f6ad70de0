/* json_fast.h — the fields of a Kafka JSON record through simdjson (Debian's libsimdjson, DOM
 * parser: full validation, UTF-8 checked) behind a C API (common/json_fast.cpp).
 *
 * twn_json_fast_fields reads a record only when jansson (json_loadb with JSON_REJECT_DUPLICATES,
 * what source_kafka.c falls back to) would accept it and read the same values; everything else
 * goes back to the caller, which hands it to jansson so every error message stays jansson's.
 * Where the two libraries differ, the shim gives up cheaply:
 *   - "\u0000" anywhere (jansson refuses NUL in strings and keys; simdjson decodes it);
 *   - duplicate keys in any object (simdjson keeps both; compared decoded, as jansson does);
 *   - integers above INT64_MAX (simdjson reads them as uint64; jansson: "too big integer");
 *   - any value simdjson refuses (malformed, or nesting deeper than its 1024 levels, which
 *     jansson reads up to 2048), and any top-level value that is not an object.
 * Numbers beyond the double range, lone surrogates, control characters, bad UTF-8 and trailing
 * bytes are refused by both.  fuzz_kafka_json runs both on every input. */
#ifndef TWN_COMMON_JSON_FAST_H
#define TWN_COMMON_JSON_FAST_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum twn_json_kind {
    TWN_JSON_ABSENT,
    TWN_JSON_NULL,
    TWN_JSON_STRING,
    TWN_JSON_INTEGER,
    TWN_JSON_REAL,
    TWN_JSON_BOOL,
    TWN_JSON_OBJECT,
    TWN_JSON_ARRAY
} twn_json_kind;

typedef struct twn_json_val {
    twn_json_kind kind;
    const char *s; /* TWN_JSON_STRING: the decoded bytes (no NUL among them), n of them */
    size_t n;
    long long i;         /* TWN_JSON_INTEGER */
    size_t first, count; /* TWN_JSON_ARRAY of "image"/"image_base64": elems[first, first+count) */
} twn_json_val;

/* The top-level fields a record's item is made of (TWN_JSON_ABSENT when missing).  The elements
 * of the "image" and "image_base64" arrays are in elems, one level only (an element that is an
 * array itself has only its kind). */
typedef struct twn_json_fields {
    twn_json_val id, text, instruction, image, image_base64;
    const twn_json_val *elems;
    size_t n_elems;
} twn_json_fields;

/* A reusable parser (one per thread at a time): its buffers grow to the largest record up to
 * 1 MiB and are kept; a larger record gets buffers of its own, freed at the next call. */
typedef struct twn_json_fast twn_json_fast;

twn_json_fast *twn_json_fast_new(void);
void twn_json_fast_free(twn_json_fast *f);

/* 1: p[0, n) is one JSON object that jansson reads the same way; its fields are in *out, the
 * strings valid until the next call on f.  0: leave it to jansson (invalid, or one of the cases
 * above).  Never prints, never throws. */
int twn_json_fast_fields(twn_json_fast *f, const char *p, size_t n, twn_json_fields *out);

#ifdef __cplusplus
}
#endif

#endif
