/* source_kafka.c — one Kafka message -> one item: the JSON record (the JSONL fields, plus inline
 * base64 images) or a packed twn.Item, with per-item errors that name the topic, partition and
 * offset, what was wrong, what was expected and the value itself. */
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <openssl/evp.h>

#include "common/kafka.h"
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

static int set_id(const msg_ctx *c, twn_src_item *it, const char *what, const char *s, size_t n) {
    char q[96];
    if (!n)
        return bad(c, it, TWN_SRC_BAD_ID, "%s is empty; expected 1..%zu bytes", what,
                   c->o->max_id_bytes);
    if (n > c->o->max_id_bytes) {
        twn_src_quote(s, n, q, 40);
        return bad(c, it, TWN_SRC_BAD_ID, "%s \"%s\" is %zu bytes; the limit is %zu", what, q, n,
                   c->o->max_id_bytes);
    }
    if (check_text(c, it, what, s, n)) {
        it->fault = TWN_SRC_BAD_ID;
        return -1;
    }
    it->id = twn_strndup(s, n);
    return 0;
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

/* Standard base64 with padding (whitespace not allowed) into a new image. */
static int add_base64(const msg_ctx *c, twn_src_item *it, const char *label, const char *s,
                      size_t n) {
    if (!n || n % 4)
        return bad(c, it, TWN_SRC_BAD_FIELD,
                   "%s is %zu characters of base64; expected standard base64 with padding (a "
                   "multiple of 4, not empty)",
                   label, n);
    size_t pad = (s[n - 1] == '=') + (n > 1 && s[n - 2] == '=');
    size_t size = n / 4 * 3 - pad;
    if (size > c->max_inline)
        return bad(c, it, TWN_SRC_TOO_BIG, "%s is a %zu-byte inline image; the limit is %zu", label,
                   size, c->max_inline);
    if (n > INT32_MAX) return bad(c, it, TWN_SRC_TOO_BIG, "%s is too long", label);
    uint8_t *out = twn_try_alloc(n / 4 * 3 + 1);
    if (!out) return bad(c, it, TWN_SRC_TOO_BIG, "cannot allocate %zu bytes for %s", size, label);
    int k = EVP_DecodeBlock(out, (const unsigned char *)s, (int)n);
    if (k < 0 || (size_t)k != n / 4 * 3) {
        twn_free(out);
        return bad(c, it, TWN_SRC_BAD_FIELD,
                   "%s is not valid base64; expected standard base64 "
                   "(A-Z a-z 0-9 + /, '=' padding)",
                   label);
    }
    twn_src_image *im = new_image(it);
    im->data = out;
    im->size = size;
    return 0;
}

/* A path, an s3:// URI or a data:...;base64, URI. */
static int add_image_ref(const msg_ctx *c, twn_src_item *it, const char *label, json_t *v) {
    if (!json_is_string(v))
        return bad(c, it, TWN_SRC_BAD_FIELD,
                   "%s is %s; expected a path, an s3:// URI or a data: "
                   "URI",
                   label, twn_src_json_kind(v));
    const char *s = json_string_value(v);
    size_t n = json_string_length(v);
    if (!n) return bad(c, it, TWN_SRC_BAD_FIELD, "%s is an empty string; expected a path", label);
    if (memchr(s, 0, n)) return bad(c, it, TWN_SRC_BAD_FIELD, "%s contains a NUL character", label);
    if (n >= 5 && !memcmp(s, "data:", 5)) {
        const char *comma = memchr(s, ',', n);
        if (!comma || comma - s < 12 || memcmp(comma - 7, ";base64", 7))
            return bad(c, it, TWN_SRC_BAD_FIELD,
                       "%s is a data: URI without ';base64,'; expected "
                       "data:<type>;base64,<data>",
                       label);
        return add_base64(c, it, label, comma + 1, n - (size_t)(comma + 1 - s));
    }
    new_image(it)->path = twn_strndup(s, n);
    return 0;
}

/* "image" / "image_base64": one value or a list of them. */
static int add_images(const msg_ctx *c, twn_src_item *it, json_t *obj, const char *field,
                      int base64) {
    json_t *v = json_object_get(obj, field);
    if (!v || json_is_null(v)) return 0;
    char label[64];
    if (json_is_array(v)) {
        for (size_t i = 0; i < json_array_size(v); i++) {
            snprintf(label, sizeof label, "\"%s\"[%zu]", field, i);
            json_t *e = json_array_get(v, i);
            if (base64) {
                if (!json_is_string(e))
                    return bad(c, it, TWN_SRC_BAD_FIELD, "%s is %s; expected a base64 string",
                               label, twn_src_json_kind(e));
                if (add_base64(c, it, label, json_string_value(e), json_string_length(e)))
                    return -1;
            } else if (add_image_ref(c, it, label, e)) {
                return -1;
            }
        }
        return 0;
    }
    snprintf(label, sizeof label, "\"%s\"", field);
    if (!base64) return add_image_ref(c, it, label, v);
    if (!json_is_string(v))
        return bad(c, it, TWN_SRC_BAD_FIELD, "%s is %s; expected a base64 string or a list of them",
                   label, twn_src_json_kind(v));
    return add_base64(c, it, label, json_string_value(v), json_string_length(v));
}

static int opt_text(const msg_ctx *c, twn_src_item *it, json_t *obj, const char *field,
                    char **out) {
    json_t *v = json_object_get(obj, field);
    if (!v || json_is_null(v)) return 0;
    char label[32];
    snprintf(label, sizeof label, "\"%s\"", field);
    if (!json_is_string(v))
        return bad(c, it, TWN_SRC_BAD_FIELD, "%s is %s; expected a string or null", label,
                   twn_src_json_kind(v));
    if (check_text(c, it, label, json_string_value(v), json_string_length(v))) return -1;
    *out = twn_strndup(json_string_value(v), json_string_length(v));
    return 0;
}

static int parse_json(const msg_ctx *c, twn_src_item *it) {
    const char *p = c->value;
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
    int rc = -1;
    if (!json_is_object(obj)) {
        bad(c, it, TWN_SRC_BAD_JSON, "the value is %s; expected a JSON object",
            twn_src_json_kind(obj));
        goto out;
    }
    json_t *id = json_object_get(obj, "id");
    if (id && !json_is_null(id)) {
        char num[32];
        if (json_is_string(id)) {
            if (set_id(c, it, "\"id\"", json_string_value(id), json_string_length(id))) goto out;
        } else if (json_is_integer(id)) {
            snprintf(num, sizeof num, "%lld", (long long)json_integer_value(id));
            if (set_id(c, it, "\"id\"", num, strlen(num))) goto out;
        } else {
            bad(c, it, TWN_SRC_BAD_ID, "\"id\" is %s; expected a string or an integer",
                twn_src_json_kind(id));
            goto out;
        }
    } else if (id_from_key(c, it,
                           "no \"id\" and no message key; expected a string or an integer "
                           "id")) {
        goto out;
    }
    if (opt_text(c, it, obj, "text", &it->text)) goto out;
    if (opt_text(c, it, obj, "instruction", &it->instruction)) goto out;
    json_t *img = json_object_get(obj, "image");
    if (img && !json_is_null(img) && !json_is_string(img) && !json_is_array(img)) {
        bad(c, it, TWN_SRC_BAD_FIELD, "\"image\" is %s; expected a path/URI or a list of them",
            twn_src_json_kind(img));
        goto out;
    }
    if (add_images(c, it, obj, "image", 0)) goto out;
    if (add_images(c, it, obj, "image_base64", 1)) goto out;
    if ((!it->text || !it->text[0]) && !it->n_images) {
        bad(c, it, TWN_SRC_EMPTY,
            "the item has neither \"text\" nor an image; expected at least one");
        goto out;
    }
    rc = 0;
out:
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

int twn_kafka_parse(const void *value, size_t len, const void *key, size_t key_len,
                    twn_kafka_format fmt, const char *topic, int32_t partition, int64_t offset,
                    const twn_src_opts *o, size_t max_inline_image_bytes, twn_src_item *it) {
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
    if (fmt == TWN_KAFKA_JSON) return parse_json(&c, it);
    return bad(&c, it, TWN_SRC_BAD_FIELD, "unknown message format %d", (int)fmt);
}
