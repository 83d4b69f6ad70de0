/* source_jsonl.c — JSONL sources: one item per non-blank line.
 *
 * Planning and reading share one line scanner, so "the k-th non-blank line" means the same thing
 * to the planner, to a unit reader and (through offset/length) to a ref reader.  Lines are never
 * loaded just to be counted: the scanner looks for '\n' in a sliding window and only a line
 * within max_item_bytes is ever parsed. */
#include <jansson.h>
#include <string.h>

#include "common/source_internal.h"
#include "util/fileio.h"
#include "util/mem.h"

static int is_space(uint8_t c) {
    return c == ' ' || c == '\t' || c == '\r';
}

/* The line starting at pos: *eol is where its '\n' is (or limit/EOF), *nl whether a '\n' ends it,
 * *blank whether it holds only spaces, tabs and CRs. */
static int scan_line(twn_src_cursor *c, uint64_t pos, uint64_t limit, uint64_t *eol, int *nl,
                     int *blank, twn_err *err) {
    *blank = 1;
    *nl = 0;
    uint64_t p = pos;
    while (p < limit) {
        uint64_t want64 = limit - p;
        size_t want = want64 < c->cap ? (size_t)want64 : c->cap, got;
        const uint8_t *q;
        if (twn_src_cursor_peek(c, p, want, &q, &got, err)) return -1;
        if (!got) break;
        const uint8_t *n = memchr(q, '\n', got);
        size_t seg = n ? (size_t)(n - q) : got;
        for (size_t i = 0; *blank && i < seg; i++)
            if (!is_space(q[i])) *blank = 0;
        if (n) {
            *eol = p + seg;
            *nl = 1;
            return 0;
        }
        p += got;
    }
    *eol = p;
    return 0;
}

// ------------------------------------------------------------------------------------------------
// One record

/* An optional string field: absent/null -> NULL; a string -> copy; else a bad record. */
static int opt_string(json_t *obj, const char *key, const char *path, twn_src_item *it,
                      char **out) {
    json_t *v = json_object_get(obj, key);
    *out = NULL;
    if (!v || json_is_null(v)) return 0;
    if (!json_is_string(v))
        return twn_src_bad(it, TWN_SRC_BAD_FIELD, path, "\"%s\" is %s; expected a string or null",
                           key, twn_src_json_kind(v));
    *out = twn_strndup(json_string_value(v), json_string_length(v));
    return 0;
}

/* The id of a record: a string or an integer, 1..max_id_bytes bytes. */
static int take_id(json_t *v, const char *what, const char *path, const twn_src_opts *o,
                   twn_src_item *it) {
    char num[32], q[96];
    const char *s;
    size_t n;
    if (json_is_string(v)) {
        s = json_string_value(v);
        n = json_string_length(v);
    } else if (json_is_integer(v)) {
        n = (size_t)snprintf(num, sizeof num, "%lld", (long long)json_integer_value(v));
        s = num;
    } else {
        return twn_src_bad(it, TWN_SRC_BAD_ID, path, "%s is %s; expected a string or an integer",
                           what, twn_src_json_kind(v));
    }
    if (!n)
        return twn_src_bad(it, TWN_SRC_BAD_ID, path, "%s is empty; expected 1..%zu bytes", what,
                           o->max_id_bytes);
    if (memchr(s, 0, n))
        return twn_src_bad(it, TWN_SRC_BAD_ID, path, "%s contains a NUL character", what);
    if (n > o->max_id_bytes) {
        twn_src_quote(s, n, q, 40);
        return twn_src_bad(it, TWN_SRC_BAD_ID, path, "%s \"%s\" is %zu bytes; the limit is %zu",
                           what, q, n, o->max_id_bytes);
    }
    it->id = twn_strndup(s, n);
    return 0;
}

static void add_image_path(twn_src_item *it, const char *base, const char *p) {
    it->images = twn_realloc(it->images, (it->n_images + 1) * sizeof *it->images);
    twn_src_image *im = &it->images[it->n_images++];
    memset(im, 0, sizeof *im);
    /* a URI ("s3://bucket/key") is absolute wherever the JSONL file lives */
    im->path = strstr(p, "://") ? twn_strdup(p) : twn_path_join(base, p);
}

static int take_image(json_t *v, const char *label, const char *base, const char *path,
                      twn_src_item *it) {
    if (!json_is_string(v))
        return twn_src_bad(it, TWN_SRC_BAD_FIELD, path, "%s is %s; expected a path string", label,
                           twn_src_json_kind(v));
    if (!json_string_length(v))
        return twn_src_bad(it, TWN_SRC_BAD_FIELD, path, "%s is an empty string; expected a path",
                           label);
    if (memchr(json_string_value(v), 0, json_string_length(v)))
        return twn_src_bad(it, TWN_SRC_BAD_FIELD, path, "%s contains a NUL character", label);
    add_image_path(it, base, json_string_value(v));
    return 0;
}

int twn_src_jsonl_parse(const char *line, size_t len, const char *path, const twn_src_opts *o,
                        twn_src_item *it) {
    long bad = twn_src_utf8_invalid_at((const uint8_t *)line, len);
    if (bad >= 0)
        return twn_src_bad(it, TWN_SRC_BAD_UTF8, path,
                           "invalid UTF-8 at column %ld (byte 0x%02x); expected UTF-8 text",
                           bad + 1, (uint8_t)line[bad]);
    json_error_t je;
    json_t *obj = json_loadb(line, len, JSON_REJECT_DUPLICATES, &je);
    if (!obj)
        return twn_src_bad(it, TWN_SRC_BAD_JSON, path, "invalid JSON at column %d: %s", je.column,
                           je.text);
    int rc = -1;
    char *base = NULL;
    if (!json_is_object(obj)) {
        twn_src_bad(it, TWN_SRC_BAD_JSON, path, "the record is %s; expected a JSON object",
                    twn_src_json_kind(obj));
        goto out;
    }
    json_t *id = json_object_get(obj, "id");
    if (id && !json_is_null(id)) {
        if (take_id(id, "\"id\"", path, o, it)) goto out;
    } else if (o->derive_missing_id) {
        char d[64];
        if (it->line)
            snprintf(d, sizeof d, ":%llu", (unsigned long long)it->line);
        else
            snprintf(d, sizeof d, "@%llu", (unsigned long long)it->offset);
        size_t pl = strlen(path), dl = strlen(d);
        it->id = twn_malloc(pl + dl + 1);
        memcpy(it->id, path, pl);
        memcpy(it->id + pl, d, dl + 1);
    } else {
        twn_src_bad(it, TWN_SRC_BAD_ID, path,
                    "no \"id\"; expected a string or an integer id (or derive_missing_id)");
        goto out;
    }
    if (opt_string(obj, "text", path, it, &it->text)) goto out;
    if (opt_string(obj, "instruction", path, it, &it->instruction)) goto out;
    json_t *img = json_object_get(obj, "image");
    if (img && !json_is_null(img)) {
        base = twn_path_dirname(path);
        if (json_is_array(img)) {
            for (size_t i = 0; i < json_array_size(img); i++) {
                char label[48];
                snprintf(label, sizeof label, "\"image\"[%zu]", i);
                if (take_image(json_array_get(img, i), label, base, path, it)) goto out;
            }
        } else if (json_is_string(img)) {
            if (take_image(img, "\"image\"", base, path, it)) goto out;
        } else {
            twn_src_bad(it, TWN_SRC_BAD_FIELD, path,
                        "\"image\" is %s; expected a path or a list of paths",
                        twn_src_json_kind(img));
            goto out;
        }
    }
    if ((!it->text || !it->text[0]) && !it->n_images) {
        twn_src_bad(it, TWN_SRC_EMPTY, path,
                    "the item has neither \"text\" nor \"image\"; expected at least one");
        goto out;
    }
    rc = 0;
out:
    twn_free(base);
    json_decref(obj);
    return rc;
}

/* Loads [it->offset, +it->length) and parses it; `c` may serve the bytes.  -1 only on I/O. */
static int load_and_parse(twn_blob *b, twn_src_cursor *c, const char *path, const twn_src_opts *o,
                          twn_src_item *it, twn_err *err) {
    if (it->length > o->max_item_bytes) {
        twn_src_bad(it, TWN_SRC_TOO_BIG, path, "the line is %llu bytes; the limit is %zu",
                    (unsigned long long)it->length, o->max_item_bytes);
        return 0;
    }
    size_t len = (size_t)it->length;
    if (c && len <= c->cap) {
        const uint8_t *p;
        size_t got;
        if (twn_src_cursor_get(c, it->offset, len, &p, &got, err)) return -1;
        if (got != len)
            return twn_err_set(err, "%s: the file ends inside line %llu (byte %llu)", path,
                               (unsigned long long)it->line, (unsigned long long)it->offset);
        twn_src_jsonl_parse((const char *)p, len, path, o, it);
        return 0;
    }
    char *buf = twn_try_alloc(len ? len : 1);
    if (!buf) {
        twn_src_bad(it, TWN_SRC_TOO_BIG, path, "cannot allocate %zu bytes for the line", len);
        return 0;
    }
    if (twn_blob_read_exact(b, it->offset, buf, len, err)) {
        twn_free(buf);
        return -1;
    }
    twn_src_jsonl_parse(buf, len, path, o, it);
    twn_free(buf);
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Planner

int twn_src_jsonl_plan(twn_blob *b, const char *path, uint64_t per_unit, uint64_t *next_id,
                       twn_src_unit_fn fn, void *user, twn_err *err) {
    twn_src_cursor c;
    twn_src_cursor_init(&c, b, b->size);
    twn_src_unit u = {.format = TWN_SRC_JSONL, .path = (char *)path};
    int open = 0, rc = 0;
    uint64_t pos = 0, line = 1, index = 0, last_end = 0;
    while (pos < b->size) {
        uint64_t eol;
        int nl, blank;
        if (scan_line(&c, pos, b->size, &eol, &nl, &blank, err)) {
            rc = -1;
            goto out;
        }
        if (!blank) {
            if (open && u.count == per_unit) {
                u.end = pos;
                if ((rc = fn(&u, user, err))) goto out;
                open = 0;
            }
            if (!open) {
                u.id = (*next_id)++;
                u.start = pos;
                u.first_index = index;
                u.first_line = line;
                u.count = 0;
                open = 1;
            }
            u.count++;
            index++;
            last_end = eol + (uint64_t)nl;
        }
        pos = eol + (uint64_t)nl;
        line++;
    }
    if (open) {
        u.end = last_end;
        rc = fn(&u, user, err);
    }
out:
    twn_src_cursor_free(&c);
    return rc;
}

// ------------------------------------------------------------------------------------------------
// Readers

int twn_src_jsonl_next(twn_src_reader *r, twn_src_item *it, twn_err *err) {
    while (r->pos < r->limit) {
        uint64_t eol;
        int nl, blank;
        if (scan_line(&r->cur, r->pos, r->limit, &eol, &nl, &blank, err)) return -1;
        uint64_t start = r->pos, line = r->line;
        r->pos = eol + (uint64_t)nl;
        if (r->line) r->line++;
        if (blank) continue;
        if (r->produced == r->u.count)
            return twn_err_set(err,
                               "%s: unit %llu holds more than its %llu items in bytes [%llu, "
                               "%llu); the file changed since planning",
                               r->u.path, (unsigned long long)r->u.id,
                               (unsigned long long)r->u.count, (unsigned long long)r->u.start,
                               (unsigned long long)r->u.end);
        r->produced++;
        it->index = r->index++;
        it->offset = start;
        it->length = eol - start;
        it->line = line;
        if (load_and_parse(r->b, &r->cur, r->u.path, &r->o, it, err)) return -1;
        return 1;
    }
    if (r->produced != r->u.count)
        return twn_err_set(err,
                           "%s: unit %llu has %llu of its %llu items in bytes [%llu, %llu) (the "
                           "file is %llu bytes); the file changed since planning",
                           r->u.path, (unsigned long long)r->u.id, (unsigned long long)r->produced,
                           (unsigned long long)r->u.count, (unsigned long long)r->u.start,
                           (unsigned long long)r->u.end, (unsigned long long)r->b->size);
    return 0;
}

int twn_src_jsonl_read_ref(twn_blob *b, const twn_src_ref *ref, const twn_src_opts *o,
                           twn_src_item *it, twn_err *err) {
    it->index = ref->index;
    it->offset = ref->offset;
    it->length = ref->length;
    it->line = ref->line;
    const char *path = ref->path;
    if (ref->offset > b->size || ref->length > b->size - ref->offset) {
        twn_src_bad(it, TWN_SRC_STALE_REF, path,
                    "the ref [%llu, +%llu) lies past the end of the file (%llu bytes)",
                    (unsigned long long)ref->offset, (unsigned long long)ref->length,
                    (unsigned long long)b->size);
        return 0;
    }
    /* A whole line: preceded by '\n' (or the file start), followed by '\n' (or the file end). */
    uint8_t before = '\n', after = '\n';
    if (ref->offset && twn_blob_read_exact(b, ref->offset - 1, &before, 1, err)) return -1;
    if (ref->offset + ref->length < b->size &&
        twn_blob_read_exact(b, ref->offset + ref->length, &after, 1, err))
        return -1;
    if (before != '\n' || after != '\n') {
        twn_src_bad(it, TWN_SRC_STALE_REF, path,
                    "the ref [%llu, +%llu) is not a whole line; the file changed since planning",
                    (unsigned long long)ref->offset, (unsigned long long)ref->length);
        return 0;
    }
    if (ref->length > o->max_item_bytes) return load_and_parse(b, NULL, path, o, it, err);
    size_t len = (size_t)ref->length;
    char *buf = twn_try_alloc(len ? len : 1);
    if (!buf) return load_and_parse(b, NULL, path, o, it, err); /* reports the allocation */
    if (twn_blob_read_exact(b, ref->offset, buf, len, err)) {
        twn_free(buf);
        return -1;
    }
    /* One non-blank line without '\n' inside: otherwise the ref is not one item. */
    int blank = 1;
    for (size_t i = 0; blank && i < len; i++) blank = is_space((uint8_t)buf[i]);
    if (blank || memchr(buf, '\n', len))
        twn_src_bad(it, TWN_SRC_STALE_REF, path,
                    "the ref [%llu, +%llu) is not one non-blank line; the file changed since "
                    "planning",
                    (unsigned long long)ref->offset, (unsigned long long)ref->length);
    else
        twn_src_jsonl_parse(buf, len, path, o, it);
    twn_free(buf);
    return 0;
}
