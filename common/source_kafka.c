/* source_kafka.c — one Kafka message -> one item: the JSON record (the JSONL fields, plus inline
 * base64 images) or a packed twn.Item, with per-item errors that name the topic, partition and
 * offset, what was wrong, what was expected and the value itself. */
#include <jansson.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <openssl/evp.h>

#include "common/json_fast.h"
#include "common/kafka.h"
#include "common/kafka_internal.h"
#include "common/source_internal.h"
#include "util/mem.h"

typedef struct msg_ctx {
    const char *topic;
    int32_t partition;
    int64_t offset;
    const void *value;
    size_t len;
    const twn_src_opts *o;
    size_t max_inline;
} msg_ctx;

static int bad(const msg_ctx *c, twn_src_item *it, twn_src_fault fault, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int bad(const msg_ctx *c, twn_src_item *it, twn_src_fault fault, const char *fmt, ...) {
    char msg[600], q[200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    twn_src_quote(c->value, c->len < 400 ? c->len : 400, q, 120);
    it->fault = fault;
    twn_err_set(&it->err, "kafka %s[%d]@%lld: %s; value: '%s'", c->topic, c->partition,
                (long long)c->offset, msg, q);
    return -1;
}

/* A string of n bytes that is UTF-8 without NUL; else the item is bad. */
static int check_text(const msg_ctx *c, twn_src_item *it, const char *what, const char *s,
                      size_t n) {
    if (memchr(s, 0, n))
        return bad(c, it, TWN_SRC_BAD_UTF8, "%s contains a NUL character; expected text", what);
    long at = twn_src_utf8_invalid_at((const uint8_t *)s, n);
    if (at >= 0)
        return bad(c, it, TWN_SRC_BAD_UTF8,
                   "%s has invalid UTF-8 at byte %ld (0x%02x); expected "
                   "UTF-8 text",
                   what, at, (uint8_t)s[at]);
    return 0;
}

/* text: s is known to be UTF-8 without NUL (a JSON string: simdjson and jansson check both),
 * so the check is skipped. */
static int set_id_checked(const msg_ctx *c, twn_src_item *it, const char *what, const char *s,
                          size_t n, int text) {
    char q[96];
    if (!n)
        return bad(c, it, TWN_SRC_BAD_ID, "%s is empty; expected 1..%zu bytes", what,
                   c->o->max_id_bytes);
    if (n > c->o->max_id_bytes) {
        twn_src_quote(s, n, q, 40);
        return bad(c, it, TWN_SRC_BAD_ID, "%s \"%s\" is %zu bytes; the limit is %zu", what, q, n,
                   c->o->max_id_bytes);
    }
    if (!text && check_text(c, it, what, s, n)) {
        it->fault = TWN_SRC_BAD_ID;
        return -1;
    }
    it->id = twn_strndup(s, n);
    return 0;
}

static int set_id(const msg_ctx *c, twn_src_item *it, const char *what, const char *s, size_t n) {
    return set_id_checked(c, it, what, s, n, 0);
}

/* The id when the record has none: the message key, else (derive_missing_id) the record's
 * place, "<topic>[<partition>]@<offset>", stable as long as the topic is. */
static int id_from_key(const msg_ctx *c, twn_src_item *it, const char *none) {
    if (it->key) return set_id(c, it, "the message key", it->key, strlen(it->key));
    if (!c->o->derive_missing_id) return bad(c, it, TWN_SRC_BAD_ID, "%s", none);
    char d[64];
    int n = snprintf(d, sizeof d, "[%d]@%lld", c->partition, (long long)c->offset);
    size_t tl = strlen(c->topic);
    it->id = twn_malloc(tl + (size_t)n + 1);
    memcpy(it->id, c->topic, tl);
    memcpy(it->id + tl, d, (size_t)n + 1);
    return 0;
}

static twn_src_image *new_image(twn_src_item *it) {
    it->images = twn_realloc(it->images, (it->n_images + 1) * sizeof *it->images);
    twn_src_image *im = &it->images[it->n_images++];
    memset(im, 0, sizeof *im);
    return im;
}

/* Where a message names its values: "image", "image"[3], ... (built only for messages). */
static const char *label_of(char *buf, size_t cap, const char *field, long idx) {
    if (idx < 0)
        snprintf(buf, cap, "\"%s\"", field);
    else
        snprintf(buf, cap, "\"%s\"[%ld]", field, idx);
    return buf;
}

/* Standard base64 with padding (whitespace not allowed) into a new image. */
static int add_base64(const msg_ctx *c, twn_src_item *it, const char *field, long idx,
                      const char *s, size_t n) {
    char label[64];
    if (!n || n % 4)
        return bad(c, it, TWN_SRC_BAD_FIELD,
                   "%s is %zu characters of base64; expected standard base64 with padding (a "
                   "multiple of 4, not empty)",
                   label_of(label, sizeof label, field, idx), n);
    size_t pad = (s[n - 1] == '=') + (n > 1 && s[n - 2] == '=');
    size_t size = n / 4 * 3 - pad;
    if (size > c->max_inline)
        return bad(c, it, TWN_SRC_TOO_BIG, "%s is a %zu-byte inline image; the limit is %zu",
                   label_of(label, sizeof label, field, idx), size, c->max_inline);
    if (n > INT32_MAX)
        return bad(c, it, TWN_SRC_TOO_BIG, "%s is too long",
                   label_of(label, sizeof label, field, idx));
    uint8_t *out = twn_try_alloc(n / 4 * 3 + 1);
    if (!out)
        return bad(c, it, TWN_SRC_TOO_BIG, "cannot allocate %zu bytes for %s", size,
                   label_of(label, sizeof label, field, idx));
    int k = EVP_DecodeBlock(out, (const unsigned char *)s, (int)n);
    if (k < 0 || (size_t)k != n / 4 * 3) {
        twn_free(out);
        return bad(c, it, TWN_SRC_BAD_FIELD,
                   "%s is not valid base64; expected standard base64 "
                   "(A-Z a-z 0-9 + /, '=' padding)",
                   label_of(label, sizeof label, field, idx));
    }
    twn_src_image *im = new_image(it);
    im->data = out;
    im->size = size;
    return 0;
}

// ------------------------------------------------------------------------------------------------
// The JSON record
//
// A record is read into a twn_json_fields (common/json_fast.h): the five top-level fields the item
// is made of.  Two ways fill it, and one function (json_item) turns it into the item, so both give
// the same item and the same messages:
//   - simdjson (twn_json_fast_fields, common/json_fast.cpp): its DOM parser validates the whole
//     value; the shim also refuses what jansson refuses and simdjson takes ("\u0000", duplicate
//     keys, integers above INT64_MAX) and keeps the fields;
//   - jansson (json_loadb), whenever the shim gives up: on every malformed record (so the
//     messages are jansson's, as before) and on the rare valid ones the shim leaves to it
//     (nesting deeper than simdjson's 1024 levels; see json_fast.h).
// The fast path accepts nothing jansson rejects, and reads the same values (fuzz_kafka_json
// checks both against each other).

/* Names as twn_src_json_kind gives them (the JSONL reader's messages). */
static const char *jkind_name(const twn_json_val *v) {
    switch (v->kind) {
    case TWN_JSON_OBJECT:
        return "a JSON object";
    case TWN_JSON_ARRAY:
        return "a JSON array";
    case TWN_JSON_STRING:
        return "a JSON string";
    case TWN_JSON_INTEGER:
        return "a JSON integer";
    case TWN_JSON_REAL:
        return "a JSON number";
    case TWN_JSON_BOOL:
        return "a JSON boolean";
    case TWN_JSON_NULL:
        return "null";
    case TWN_JSON_ABSENT:
        break;
    }
    return "a JSON value";
}

int twn_kafka_json_fast(const void *value, size_t len) {
    twn_json_fast *f = twn_json_fast_new();
    twn_json_fields r;
    int ok = twn_json_fast_fields(f, value ? value : "", value ? len : 0, &r);
    twn_json_fast_free(f);
    return ok;
}

// ------------------------------------------------------------------------------------------------
// jansson: the same fields from a parsed object

typedef struct jelems {
    twn_json_val *v;
    size_t n, cap;
} jelems;

static twn_json_val *jelems_add(jelems *e) {
    if (e->n == e->cap) {
        e->cap = e->cap ? 2 * e->cap : 8;
        e->v = twn_realloc(e->v, e->cap * sizeof *e->v);
    }
    twn_json_val *v = &e->v[e->n++];
    memset(v, 0, sizeof *v);
    return v;
}

static void jval_of(jelems *els, json_t *v, twn_json_val *out, int elements) {
    memset(out, 0, sizeof *out);
    if (!v) return;
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        out->kind = TWN_JSON_OBJECT;
        break;
    case JSON_ARRAY:
        out->kind = TWN_JSON_ARRAY;
        if (elements) {
            out->first = els->n;
            out->count = json_array_size(v);
            for (size_t i = 0; i < out->count; i++)
                jval_of(els, json_array_get(v, i), jelems_add(els), 0);
        }
        break;
    case JSON_STRING:
        out->kind = TWN_JSON_STRING;
        out->s = json_string_value(v);
        out->n = json_string_length(v);
        break;
    case JSON_INTEGER:
        out->kind = TWN_JSON_INTEGER;
        out->i = (long long)json_integer_value(v);
        break;
    case JSON_REAL:
        out->kind = TWN_JSON_REAL;
        break;
    case JSON_TRUE:
    case JSON_FALSE:
        out->kind = TWN_JSON_BOOL;
        break;
    case JSON_NULL:
        out->kind = TWN_JSON_NULL;
        break;
    }
}

// ------------------------------------------------------------------------------------------------
// The record as an item

/* A path, an s3:// URI or a data:...;base64, URI. */
static int add_image_ref(const msg_ctx *c, twn_src_item *it, const char *field, long idx,
                         const twn_json_val *v) {
    char label[64];
    if (v->kind != TWN_JSON_STRING)
        return bad(c, it, TWN_SRC_BAD_FIELD,
                   "%s is %s; expected a path, an s3:// URI or a data: "
                   "URI",
                   label_of(label, sizeof label, field, idx), jkind_name(v));
    const char *s = v->s;
    size_t n = v->n;
    if (!n)
        return bad(c, it, TWN_SRC_BAD_FIELD, "%s is an empty string; expected a path",
                   label_of(label, sizeof label, field, idx));
    if (memchr(s, 0, n))
        return bad(c, it, TWN_SRC_BAD_FIELD, "%s contains a NUL character",
                   label_of(label, sizeof label, field, idx));
    if (n >= 5 && !memcmp(s, "data:", 5)) {
        const char *comma = memchr(s, ',', n);
        if (!comma || comma - s < 12 || memcmp(comma - 7, ";base64", 7))
            return bad(c, it, TWN_SRC_BAD_FIELD,
                       "%s is a data: URI without ';base64,'; expected "
                       "data:<type>;base64,<data>",
                       label_of(label, sizeof label, field, idx));
        return add_base64(c, it, field, idx, comma + 1, n - (size_t)(comma + 1 - s));
    }
    new_image(it)->path = twn_strndup(s, n);
    return 0;
}

/* "image" / "image_base64": one value or a list of them. */
static int add_images(const msg_ctx *c, twn_src_item *it, const twn_json_fields *r,
                      const twn_json_val *v, const char *field, int base64) {
    char label[64];
    if (v->kind == TWN_JSON_ABSENT || v->kind == TWN_JSON_NULL) return 0;
    if (v->kind == TWN_JSON_ARRAY) {
        for (size_t i = 0; i < v->count; i++) {
            const twn_json_val *e = &r->elems[v->first + i];
            if (base64) {
                if (e->kind != TWN_JSON_STRING)
                    return bad(c, it, TWN_SRC_BAD_FIELD, "%s is %s; expected a base64 string",
                               label_of(label, sizeof label, field, (long)i), jkind_name(e));
                if (add_base64(c, it, field, (long)i, e->s, e->n)) return -1;
            } else if (add_image_ref(c, it, field, (long)i, e)) {
                return -1;
            }
        }
        return 0;
    }
    if (!base64) return add_image_ref(c, it, field, -1, v);
    if (v->kind != TWN_JSON_STRING)
        return bad(c, it, TWN_SRC_BAD_FIELD, "%s is %s; expected a base64 string or a list of them",
                   label_of(label, sizeof label, field, -1), jkind_name(v));
    return add_base64(c, it, field, -1, v->s, v->n);
}

static int opt_text(const msg_ctx *c, twn_src_item *it, const twn_json_val *v, const char *label,
                    char **out) {
    if (v->kind == TWN_JSON_ABSENT || v->kind == TWN_JSON_NULL) return 0;
    if (v->kind != TWN_JSON_STRING)
        return bad(c, it, TWN_SRC_BAD_FIELD, "%s is %s; expected a string or null", label,
                   jkind_name(v));
    /* a JSON string is UTF-8 without NUL already (simdjson and jansson refuse anything
     * else; fuzz_kafka_record checks every item) */
    *out = twn_strndup(v->s, v->n);
    return 0;
}

static int json_item(const msg_ctx *c, twn_src_item *it, const twn_json_fields *r) {
    const twn_json_val *id = &r->id;
    if (id->kind != TWN_JSON_ABSENT && id->kind != TWN_JSON_NULL) {
        char num[32];
        if (id->kind == TWN_JSON_STRING) {
            if (set_id_checked(c, it, "\"id\"", id->s, id->n, 1)) return -1;
        } else if (id->kind == TWN_JSON_INTEGER) {
            int nn = snprintf(num, sizeof num, "%lld", id->i);
            if (set_id_checked(c, it, "\"id\"", num, (size_t)nn, 1)) return -1;
        } else {
            return bad(c, it, TWN_SRC_BAD_ID, "\"id\" is %s; expected a string or an integer",
                       jkind_name(id));
        }
    } else if (id_from_key(c, it,
                           "no \"id\" and no message key; expected a string or an integer "
                           "id")) {
        return -1;
    }
    if (opt_text(c, it, &r->text, "\"text\"", &it->text)) return -1;
    if (opt_text(c, it, &r->instruction, "\"instruction\"", &it->instruction)) return -1;
    const twn_json_val *img = &r->image;
    if (img->kind != TWN_JSON_ABSENT && img->kind != TWN_JSON_NULL &&
        img->kind != TWN_JSON_STRING && img->kind != TWN_JSON_ARRAY)
        return bad(c, it, TWN_SRC_BAD_FIELD,
                   "\"image\" is %s; expected a path/URI or a list of them", jkind_name(img));
    if (add_images(c, it, r, img, "image", 0)) return -1;
    if (add_images(c, it, r, &r->image_base64, "image_base64", 1)) return -1;
    if ((!it->text || !it->text[0]) && !it->n_images)
        return bad(c, it, TWN_SRC_EMPTY,
                   "the item has neither \"text\" nor an image; expected at least one");
    return 0;
}

static int parse_json(const msg_ctx *c, twn_src_item *it, twn_json_fast *fast) {
    const char *p = c->value;
    twn_json_fields r;
    if (fast && twn_json_fast_fields(fast, p, c->len, &r)) return json_item(c, it, &r);
    json_error_t je;
    /* jansson accepts only valid UTF-8, so the UTF-8 pass runs only to explain a failure (one
     * pass less per record on the hot path) */
    json_t *obj = json_loadb(p, c->len, JSON_REJECT_DUPLICATES, &je);
    long at = obj ? -1 : twn_src_utf8_invalid_at((const uint8_t *)p, c->len);
    if (at >= 0)
        return bad(c, it, TWN_SRC_BAD_UTF8,
                   "invalid UTF-8 at byte %ld (0x%02x); expected a UTF-8 "
                   "JSON object",
                   at, (uint8_t)p[at]);
    if (!obj)
        return bad(c, it, TWN_SRC_BAD_JSON,
                   "invalid JSON at column %d: %s; expected one JSON "
                   "object",
                   je.column, je.text);
    int rc;
    if (!json_is_object(obj)) {
        rc = bad(c, it, TWN_SRC_BAD_JSON, "the value is %s; expected a JSON object",
                 twn_src_json_kind(obj));
    } else {
        jelems els = {0};
        memset(&r, 0, sizeof r);
        jval_of(&els, json_object_get(obj, "id"), &r.id, 0);
        jval_of(&els, json_object_get(obj, "text"), &r.text, 0);
        jval_of(&els, json_object_get(obj, "instruction"), &r.instruction, 0);
        jval_of(&els, json_object_get(obj, "image"), &r.image, 1);
        jval_of(&els, json_object_get(obj, "image_base64"), &r.image_base64, 1);
        r.elems = els.v;
        r.n_elems = els.n;
        rc = json_item(c, it, &r);
        twn_free(els.v);
    }
    json_decref(obj);
    return rc;
}

static int parse_proto(const msg_ctx *c, twn_src_item *it) {
    Twn__Item *m = twn__item__unpack(NULL, c->len, c->value);
    if (!m) return bad(c, it, TWN_SRC_BAD_JSON, "not a packed twn.Item protobuf message");
    int rc = -1;
    if (m->id && m->id[0]) {
        if (set_id(c, it, "the Item id", m->id, strlen(m->id))) goto out;
    } else if (id_from_key(c, it, "the Item has no id and the message no key; expected one")) {
        goto out;
    }
    if (m->text && m->text[0]) {
        if (check_text(c, it, "the Item text", m->text, strlen(m->text))) goto out;
        it->text = twn_strdup(m->text);
    }
    if (m->instruction && m->instruction[0]) {
        if (check_text(c, it, "the Item instruction", m->instruction, strlen(m->instruction)))
            goto out;
        it->instruction = twn_strdup(m->instruction);
    }
    for (size_t i = 0; i < m->n_image_uris; i++) {
        char label[48];
        snprintf(label, sizeof label, "Item image_uris[%zu]", i);
        if (!m->image_uris[i][0]) {
            bad(c, it, TWN_SRC_BAD_FIELD, "%s is empty; expected a path or an s3:// URI", label);
            goto out;
        }
        if (check_text(c, it, label, m->image_uris[i], strlen(m->image_uris[i]))) goto out;
        new_image(it)->path = twn_strdup(m->image_uris[i]);
    }
    for (size_t i = 0; i < m->n_images; i++) {
        if (!m->images[i].len) {
            bad(c, it, TWN_SRC_BAD_FIELD, "Item images[%zu] is empty; expected encoded image bytes",
                i);
            goto out;
        }
        twn_src_image *im = new_image(it);
        im->data = twn_malloc(m->images[i].len);
        memcpy(im->data, m->images[i].data, m->images[i].len);
        im->size = m->images[i].len;
    }
    if ((!it->text || !it->text[0]) && !it->n_images) {
        bad(c, it, TWN_SRC_EMPTY, "the Item has neither text nor an image; expected at least one");
        goto out;
    }
    rc = 0;
out:
    twn__item__free_unpacked(m, NULL);
    return rc;
}

int twn_kafka_parse_ex(const void *value, size_t len, const void *key, size_t key_len,
                       twn_kafka_format fmt, const char *topic, int32_t partition, int64_t offset,
                       const twn_src_opts *o, size_t max_inline_image_bytes, twn_json_fast *fast,
                       twn_src_item *it) {
    twn_src_opts d = twn_src_opts_default();
    msg_ctx c = {.topic = topic,
                 .partition = partition,
                 .offset = offset,
                 .value = value ? value : "",
                 .len = value ? len : 0,
                 .o = o ? o : &d,
                 .max_inline = max_inline_image_bytes};
    it->index = it->offset = (uint64_t)offset;
    it->length = c.len;
    it->line = 0;
    /* the key is kept when it is text (it may stand in for the id) */
    if (key && key_len && key_len <= 4096 && !memchr(key, 0, key_len) &&
        twn_src_utf8_invalid_at(key, key_len) < 0)
        it->key = twn_strndup(key, key_len);
    if (c.len > c.o->max_item_bytes)
        return bad(&c, it, TWN_SRC_TOO_BIG, "the message is %zu bytes; the limit is %zu", c.len,
                   c.o->max_item_bytes);
    if (!c.len) return bad(&c, it, TWN_SRC_EMPTY, "the message has no value; expected an item");
    if (fmt == TWN_KAFKA_PROTO) return parse_proto(&c, it);
    if (fmt == TWN_KAFKA_JSON) return parse_json(&c, it, fast);
    return bad(&c, it, TWN_SRC_BAD_FIELD, "unknown message format %d", (int)fmt);
}

int twn_kafka_parse(const void *value, size_t len, const void *key, size_t key_len,
                    twn_kafka_format fmt, const char *topic, int32_t partition, int64_t offset,
                    const twn_src_opts *o, size_t max_inline_image_bytes, twn_src_item *it) {
    /* a parser for this message only (the readers keep one per handle) */
    twn_json_fast *fast = fmt == TWN_KAFKA_JSON ? twn_json_fast_new() : NULL;
    int rc = twn_kafka_parse_ex(value, len, key, key_len, fmt, topic, partition, offset, o,
                                max_inline_image_bytes, fast, it);
    twn_json_fast_free(fast);
    return rc;
}
