/* source.c — blobs, units, items and the format-independent half of planning and reading (the
 * formats live in source_jsonl.c and source_tar.c). */
#include "common/source.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/source_internal.h"
#include "util/mem.h"

twn_src_opts twn_src_opts_default(void) {
    twn_src_opts o = {.max_item_bytes = 64u << 20, .max_id_bytes = 256, .derive_missing_id = 0};
    return o;
}

twn_src_format twn_src_format_of(const char *path) {
    size_t n = strlen(path);
    if (n >= 4 && !strcasecmp(path + n - 4, ".tar")) return TWN_SRC_TAR;
    return TWN_SRC_JSONL;
}

const char *twn_src_format_name(twn_src_format f) {
    switch (f) {
    case TWN_SRC_AUTO:
        return "auto";
    case TWN_SRC_JSONL:
        return "jsonl";
    case TWN_SRC_TAR:
        return "tar";
    case TWN_SRC_KAFKA_JSON:
        return "kafka-json";
    case TWN_SRC_KAFKA_PROTO:
        return "kafka-proto";
    }
    return "(unknown)";
}

const char *twn_src_fault_name(twn_src_fault f) {
    switch (f) {
    case TWN_SRC_OK:
        return "ok";
    case TWN_SRC_BAD_JSON:
        return "bad_json";
    case TWN_SRC_BAD_ID:
        return "bad_id";
    case TWN_SRC_BAD_UTF8:
        return "bad_utf8";
    case TWN_SRC_BAD_FIELD:
        return "bad_field";
    case TWN_SRC_EMPTY:
        return "empty";
    case TWN_SRC_TOO_BIG:
        return "too_big";
    case TWN_SRC_BAD_TAR:
        return "bad_tar";
    case TWN_SRC_TRUNCATED:
        return "truncated";
    case TWN_SRC_STALE_REF:
        return "stale_ref";
    }
    return "(unknown)";
}

// ------------------------------------------------------------------------------------------------
// Blobs

typedef struct {
    twn_blob b;
    int fd;
    char *path;
} file_blob;

static int file_read_at(twn_blob *b, uint64_t off, void *buf, size_t n, size_t *got, twn_err *err) {
    file_blob *f = (file_blob *)b;
    size_t done = 0;
    while (done < n) {
        ssize_t r = pread(f->fd, (char *)buf + done, n - done, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR) continue;
            *got = done;
            return twn_err_errno(err, "%s: reading %zu bytes at byte %llu", f->path, n - done,
                                 (unsigned long long)(off + done));
        }
        if (r == 0) break;
        done += (size_t)r;
    }
    *got = done;
    return 0;
}

static void file_close(twn_blob *b) {
    file_blob *f = (file_blob *)b;
    close(f->fd);
    twn_free(f->path);
    twn_free(f);
}

int twn_blob_open_file(const char *path, twn_blob **out, twn_err *err) {
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return twn_err_errno(err, "%s: cannot open", path);
    struct stat st;
    if (fstat(fd, &st)) {
        close(fd);
        return twn_err_errno(err, "%s: cannot stat", path);
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return twn_err_set(err, "%s: not a regular file", path);
    }
    file_blob *f = twn_calloc(1, sizeof *f);
    f->fd = fd;
    f->path = twn_strdup(path);
    f->b.name = f->path;
    f->b.size = (uint64_t)st.st_size;
    f->b.read_at = file_read_at;
    f->b.close = file_close;
    *out = &f->b;
    return 0;
}

typedef struct {
    twn_blob b;
    const uint8_t *data;
} mem_blob;

static int mem_read_at(twn_blob *b, uint64_t off, void *buf, size_t n, size_t *got, twn_err *err) {
    (void)err;
    mem_blob *m = (mem_blob *)b;
    size_t k = 0;
    if (off < b->size) k = b->size - off < n ? (size_t)(b->size - off) : n;
    if (k) memcpy(buf, m->data + off, k);
    *got = k;
    return 0;
}

static void mem_close(twn_blob *b) {
    twn_free(b);
}

twn_blob *twn_blob_mem(const void *data, size_t n, const char *name) {
    mem_blob *m = twn_calloc(1, sizeof *m);
    m->data = data;
    m->b.name = name;
    m->b.size = n;
    m->b.read_at = mem_read_at;
    m->b.close = mem_close;
    return &m->b;
}

void twn_blob_close(twn_blob *b) {
    if (b) b->close(b);
}

int twn_blob_read_exact(twn_blob *b, uint64_t off, void *buf, size_t n, twn_err *err) {
    size_t got = 0;
    if (b->read_at(b, off, buf, n, &got, err)) return -1;
    if (got != n)
        return twn_err_set(err, "%s: wanted %zu bytes at byte %llu but the file ends after %zu",
                           b->name, n, (unsigned long long)off, got);
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Cursor

void twn_src_cursor_init(twn_src_cursor *c, twn_blob *b, uint64_t span) {
    memset(c, 0, sizeof *c);
    c->b = b;
    c->cap = span < 4096 ? 4096 : span > TWN_SRC_CURSOR_BYTES ? TWN_SRC_CURSOR_BYTES : (size_t)span;
    c->buf = twn_malloc(c->cap);
}

void twn_src_cursor_free(twn_src_cursor *c) {
    twn_free(c->buf);
    memset(c, 0, sizeof *c);
}

int twn_src_cursor_get(twn_src_cursor *c, uint64_t off, size_t n, const uint8_t **p, size_t *got,
                       twn_err *err) {
    if (n > c->cap) n = c->cap;
    int at_eof = c->off + c->len >= c->b->size;
    if (off >= c->off && off <= c->off + c->len && (off + n <= c->off + c->len || at_eof)) {
        size_t avail = (size_t)(c->off + c->len - off);
        *p = c->buf + (off - c->off);
        *got = avail < n ? avail : n;
        return 0;
    }
    c->off = off;
    c->len = 0;
    if (off < c->b->size) {
        size_t want = c->cap;
        if (c->b->size - off < want) want = (size_t)(c->b->size - off);
        if (c->b->read_at(c->b, off, c->buf, want, &c->len, err)) {
            c->len = 0;
            return -1;
        }
    }
    *p = c->buf;
    *got = c->len < n ? c->len : n;
    return 0;
}

int twn_src_cursor_peek(twn_src_cursor *c, uint64_t off, size_t n, const uint8_t **p, size_t *got,
                        twn_err *err) {
    if (off >= c->off && off < c->off + c->len) {
        size_t avail = (size_t)(c->off + c->len - off);
        *p = c->buf + (off - c->off);
        *got = avail < n ? avail : n;
        return 0;
    }
    return twn_src_cursor_get(c, off, n, p, got, err);
}

// ------------------------------------------------------------------------------------------------
// Text helpers

long twn_src_utf8_invalid_at(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t k;
        uint32_t cp, min;
        if ((c & 0xe0) == 0xc0)
            k = 1, cp = c & 0x1f, min = 0x80;
        else if ((c & 0xf0) == 0xe0)
            k = 2, cp = c & 0x0f, min = 0x800;
        else if ((c & 0xf8) == 0xf0)
            k = 3, cp = c & 0x07, min = 0x10000;
        else
            return (long)i;
        for (size_t j = 1; j <= k; j++) {
            if (i + j >= n || (s[i + j] & 0xc0) != 0x80) return (long)i;
            cp = cp << 6 | (s[i + j] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return (long)i;
        i += k + 1;
    }
    return -1;
}

void twn_src_quote(const void *s, size_t n, char *out, size_t cap) {
    const uint8_t *p = s;
    size_t w = 0, lim = cap > 8 ? cap - 8 : 0;
    for (size_t i = 0; i < n; i++) {
        if (w >= lim) {
            w += (size_t)snprintf(out + w, cap - w, "...");
            return;
        }
        if (p[i] >= 0x20 && p[i] < 0x7f && p[i] != '\\')
            out[w++] = (char)p[i];
        else
            w += (size_t)snprintf(out + w, cap - w, "\\x%02x", p[i]);
    }
    if (cap) out[w < cap ? w : cap - 1] = 0;
}

const char *twn_src_json_kind(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "a JSON object";
    case JSON_ARRAY:
        return "a JSON array";
    case JSON_STRING:
        return "a JSON string";
    case JSON_INTEGER:
        return "a JSON integer";
    case JSON_REAL:
        return "a JSON number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a JSON boolean";
    case JSON_NULL:
        return "null";
    }
    return "a JSON value";
}

int twn_src_bad(twn_src_item *it, twn_src_fault fault, const char *path, const char *fmt, ...) {
    char msg[TWN_ERR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    it->fault = fault;
    if (it->key)
        twn_err_set(&it->err, "%s: item %llu '%s' at byte %llu: %s", path,
                    (unsigned long long)it->index, it->key, (unsigned long long)it->offset, msg);
    else if (it->line)
        twn_err_set(&it->err, "%s: line %llu (byte %llu): %s", path, (unsigned long long)it->line,
                    (unsigned long long)it->offset, msg);
    else
        twn_err_set(&it->err, "%s: item %llu at byte %llu: %s", path, (unsigned long long)it->index,
                    (unsigned long long)it->offset, msg);
    return -1;
}

// ------------------------------------------------------------------------------------------------
// Items

void twn_src_item_clear(twn_src_item *it) {
    twn_free(it->id);
    twn_free(it->text);
    twn_free(it->instruction);
    twn_free(it->key);
    for (size_t i = 0; i < it->n_images; i++) {
        twn_free(it->images[i].path);
        twn_free(it->images[i].member);
        twn_free(it->images[i].data);
    }
    twn_free(it->images);
    memset(it, 0, sizeof *it);
}

// ------------------------------------------------------------------------------------------------
// Planning

void twn_src_units_free(twn_src_units *l) {
    for (size_t i = 0; i < l->n; i++) twn_free(l->v[i].path);
    twn_free(l->v);
    memset(l, 0, sizeof *l);
}

int twn_src_plan_blob(twn_blob *b, const char *path, twn_src_format fmt, uint64_t items_per_unit,
                      uint64_t *next_id, twn_src_unit_fn fn, void *user, twn_err *err) {
    if (!items_per_unit) return twn_err_set(err, "%s: items per unit must be at least 1", path);
    if (fmt == TWN_SRC_AUTO) fmt = twn_src_format_of(path);
    if (fmt == TWN_SRC_JSONL)
        return twn_src_jsonl_plan(b, path, items_per_unit, next_id, fn, user, err);
    if (fmt == TWN_SRC_TAR)
        return twn_src_tar_plan(b, path, items_per_unit, next_id, fn, user, err);
    return twn_err_set(err, "%s: unknown source format %d", path, (int)fmt);
}

static int collect(const twn_src_unit *u, void *user, twn_err *err) {
    (void)err;
    twn_src_units *l = user;
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 16;
        l->v = twn_realloc(l->v, l->cap * sizeof *l->v);
    }
    l->v[l->n] = *u;
    l->v[l->n].path = twn_strdup(u->path);
    l->n++;
    return 0;
}

int twn_src_plan_files(const char *const *paths, size_t n, twn_src_format fmt,
                       uint64_t items_per_unit, twn_src_units *out, twn_err *err) {
    uint64_t next_id = out->n ? out->v[out->n - 1].id + 1 : 0;
    for (size_t i = 0; i < n; i++) {
        twn_blob *b;
        if (twn_blob_open_file(paths[i], &b, err)) return -1;
        int rc = twn_src_plan_blob(b, paths[i], fmt, items_per_unit, &next_id, collect, out, err);
        twn_blob_close(b);
        if (rc) return -1;
    }
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Reading

int twn_src_reader_open(twn_blob *b, const twn_src_unit *u, const twn_src_opts *o,
                        twn_src_reader **out, twn_err *err) {
    *out = NULL;
    twn_src_format fmt = u->format == TWN_SRC_AUTO ? twn_src_format_of(u->path) : u->format;
    if (fmt != TWN_SRC_JSONL && fmt != TWN_SRC_TAR)
        return twn_err_set(err, "%s: unit %llu has unknown format %d", u->path,
                           (unsigned long long)u->id, (int)u->format);
    if (u->end < u->start)
        return twn_err_set(err, "%s: unit %llu ends (byte %llu) before it starts (byte %llu)",
                           u->path, (unsigned long long)u->id, (unsigned long long)u->end,
                           (unsigned long long)u->start);
    twn_src_reader *r = twn_calloc(1, sizeof *r);
    r->b = b;
    r->u = *u;
    r->u.format = fmt;
    r->u.path = twn_strdup(u->path);
    r->o = o ? *o : twn_src_opts_default();
    r->pos = u->start;
    r->limit = u->end < b->size ? u->end : b->size;
    if (b->will_read && r->limit > r->pos) b->will_read(b, r->pos, r->limit - r->pos);
    twn_src_cursor_init(&r->cur, b, (r->limit > r->pos ? r->limit - r->pos : 0) + 1024);
    r->index = u->first_index;
    r->line = u->first_line;
    if (fmt == TWN_SRC_TAR && twn_src_tar_open(r, err)) {
        twn_src_reader_close(r);
        return -1;
    }
    *out = r;
    return 0;
}

int twn_src_reader_next(twn_src_reader *r, twn_src_item *it, twn_err *err) {
    twn_src_item_clear(it);
    return r->u.format == TWN_SRC_TAR ? twn_src_tar_next(r, it, err)
                                      : twn_src_jsonl_next(r, it, err);
}

void twn_src_reader_close(twn_src_reader *r) {
    if (!r) return;
    if (r->u.format == TWN_SRC_TAR) twn_src_tar_close(r);
    twn_src_cursor_free(&r->cur);
    twn_free(r->u.path);
    twn_free(r);
}

twn_src_ref twn_src_ref_of(const twn_src_unit *u, const twn_src_item *it) {
    twn_src_ref r = {.format = u->format == TWN_SRC_AUTO ? twn_src_format_of(u->path) : u->format,
                     .path = u->path,
                     .offset = it->offset,
                     .length = it->length,
                     .index = it->index,
                     .line = it->line};
    return r;
}

int twn_src_read_ref(twn_blob *b, const twn_src_ref *ref, const twn_src_opts *o, twn_src_item *it,
                     twn_err *err) {
    twn_src_item_clear(it);
    twn_src_opts d = twn_src_opts_default();
    if (!o) o = &d;
    twn_src_format fmt = ref->format == TWN_SRC_AUTO ? twn_src_format_of(ref->path) : ref->format;
    if (fmt == TWN_SRC_JSONL) return twn_src_jsonl_read_ref(b, ref, o, it, err);
    if (fmt == TWN_SRC_TAR) return twn_src_tar_read_ref(b, ref, o, it, err);
    return twn_err_set(err, "%s: item ref has unknown format %d", ref->path, (int)ref->format);
}

// ------------------------------------------------------------------------------------------------
// Protobuf

void twn_src_unit_to_proto(const twn_src_unit *u, Twn__SourceRef *s) {
    twn__source_ref__init(s);
    s->store = TWN__STORE__STORE_FILE;
    s->format = (Twn__Format)(u->format == TWN_SRC_AUTO ? twn_src_format_of(u->path) : u->format);
    s->path = u->path;
    s->start = u->start;
    s->end = u->end;
    s->first_index = u->first_index;
    s->count = u->count;
    s->first_line = u->first_line;
}

static int check_file_source(const Twn__SourceRef *s, twn_err *err) {
    if (!s) return twn_err_set(err, "source ref is missing");
    if (s->store != TWN__STORE__STORE_FILE)
        return twn_err_set(err, "source '%s': store %d is not a local file (STORE_FILE = 1)",
                           s->path, (int)s->store);
    if (s->format != TWN__FORMAT__FORMAT_JSONL && s->format != TWN__FORMAT__FORMAT_TAR)
        return twn_err_set(err,
                           "source '%s': format %d; expected FORMAT_JSONL (1) or FORMAT_TAR (2)",
                           s->path, (int)s->format);
    if (!s->path[0]) return twn_err_set(err, "source ref has an empty path");
    if (s->end < s->start)
        return twn_err_set(err, "source '%s': range [%llu, %llu) ends before it starts", s->path,
                           (unsigned long long)s->start, (unsigned long long)s->end);
    return 0;
}

int twn_src_unit_from_proto(uint64_t unit_id, const Twn__SourceRef *s, twn_src_unit *u,
                            twn_err *err) {
    memset(u, 0, sizeof *u);
    if (check_file_source(s, err)) return -1;
    u->id = unit_id;
    u->format = (twn_src_format)s->format;
    u->path = twn_strdup(s->path);
    u->start = s->start;
    u->end = s->end;
    u->first_index = s->first_index;
    u->count = s->count;
    u->first_line = s->first_line;
    return 0;
}

void twn_src_ref_to_proto(const twn_src_unit *u, const twn_src_item *it, Twn__ItemRef *r,
                          Twn__SourceRef *s) {
    twn_src_unit_to_proto(u, s);
    twn__item_ref__init(r);
    r->unit_id = u->id;
    r->item_index = it->index;
    r->source = s;
    r->offset = it->offset;
    r->length = it->length;
    r->item_id = it->id ? it->id : (char *)"";
    r->line = it->line;
}

int twn_src_ref_from_proto(const Twn__ItemRef *r, twn_src_ref *out, twn_err *err) {
    memset(out, 0, sizeof *out);
    if (!r) return twn_err_set(err, "item ref is missing");
    if (check_file_source(r->source, err)) return -1;
    out->format = (twn_src_format)r->source->format;
    out->path = r->source->path;
    out->offset = r->offset;
    out->length = r->length;
    out->index = r->item_index;
    out->line = r->line;
    return 0;
}
