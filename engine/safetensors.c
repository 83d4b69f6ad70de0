/* safetensors.c — the safetensors reader (mmap), model directories (sharded or not), the writer.
 *
 * Checkpoints are several GB, so the reader never copies: it maps the file and hands out views
 * into the mapping.  That makes validation the whole job — every byte a view covers must lie
 * inside the data buffer, so open() re-derives each tensor's size from dtype x shape with
 * overflow checks and insists the offsets tile the buffer exactly, like safetensors' own
 * tensor.rs.  After that, consumers may trust t->nbytes and t->data without re-checking.
 *
 * The writer is for small things we make ourselves (test models, goldens, converted adapters)
 * but can still reach GBs, so it streams the tensors to a tmp file instead of building the whole
 * file in memory, then fsyncs and renames. */
#include "engine/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/fileio.h"
#include "util/hash.h"
#include "util/mem.h"

/* safetensors' MAX_HEADER_SIZE (tensor.rs): bigger headers are refused before parsing. */
#define ST_MAX_HEADER 100000000ull
/* model.safetensors.index.json is ~100 KB for an 8B model; anything near this is not an index. */
#define ST_MAX_INDEX   (64u << 20)

#define ST_INDEX_NAME  "model.safetensors.index.json"
#define ST_SINGLE_NAME "model.safetensors"

struct twn_st_file {
    char *path;          /* path, or the name given to twn_st_open_mem */
    const uint8_t *base; /* the whole file: u64 length, header, data buffer */
    size_t len;
    int mapped;    /* base is our mmap (else borrowed memory) */
    twn_tensor *t; /* sorted by name */
    size_t n;
    char *names;        /* one pool for every tensor name; t[i].name points into it */
    uint8_t *realigned; /* aligned copies of tensors the file left misaligned (usually NULL) */
    char **meta_key, **meta_val; /* point into meta_pool */
    size_t n_meta;
    char *meta_pool;
};

static int st_fail(const twn_st_file *f, twn_err *err, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Every reader error is "<file>: <problem>". */
static int st_fail(const twn_st_file *f, twn_err *err, const char *fmt, ...) {
    char msg[TWN_ERR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return twn_err_set(err, "%s: %s", f->path, msg);
}

static const char *json_kind(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "object";
    case JSON_ARRAY:
        return "array";
    case JSON_STRING:
        return "string";
    case JSON_INTEGER:
        return "integer";
    case JSON_REAL:
        return "number";
    case JSON_TRUE:
        return "true";
    case JSON_FALSE:
        return "false";
    default:
        return "null";
    }
}

// ------------------------------------------------------------------------------------------------
// Reader: header parsing and validation

/* One header entry while validating; begin/end are offsets into the data buffer. */
typedef struct {
    const char *name; /* borrowed from the json header until the pool copy */
    twn_tensor t;
    uint64_t begin, end;
} st_entry;

static int cmp_offsets(const void *a, const void *b) {
    const st_entry *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

static int cmp_names(const void *a, const void *b) {
    return strcmp(((const st_entry *)a)->name, ((const st_entry *)b)->name);
}

/* A JSON integer >= 0, as u64. */
static int get_u64(const json_t *v, uint64_t *out) {
    if (!json_is_integer(v) || json_integer_value(v) < 0) return -1;
    *out = (uint64_t)json_integer_value(v);
    return 0;
}

/* Parses and checks one tensor entry on its own (dtype, shape, byte count); placement in the
 * buffer is checked afterwards over all entries. */
static int parse_entry(const twn_st_file *f, const char *name, json_t *v, st_entry *e,
                       twn_err *err) {
    e->name = name;
    if (!json_is_object(v))
        return st_fail(f, err, "tensor \"%s\" is a JSON %s, not an object", name, json_kind(v));
    json_t *dt = json_object_get(v, "dtype"), *shape = json_object_get(v, "shape"),
           *offs = json_object_get(v, "data_offsets");
    if (!dt || !json_is_string(dt))
        return st_fail(f, err, "tensor \"%s\" has no \"dtype\" string", name);
    if (twn_dtype_parse(json_string_value(dt), &e->t.dtype) != 0)
        return st_fail(f, err, "tensor \"%s\" has unknown dtype \"%s\"", name,
                       json_string_value(dt));
    if (!shape || !json_is_array(shape))
        return st_fail(f, err, "tensor \"%s\" has no \"shape\" array", name);
    size_t nd = json_array_size(shape);
    if (nd > TWN_MAX_DIMS)
        return st_fail(f, err, "tensor \"%s\" has %zu dims; at most %d are supported", name, nd,
                       TWN_MAX_DIMS);
    e->t.ndim = (int)nd;
    uint64_t numel = 1;
    int overflow = 0;
    for (size_t i = 0; i < nd; i++) {
        json_t *d = json_array_get(shape, i);
        uint64_t dim;
        if (get_u64(d, &dim) != 0) {
            if (json_is_integer(d))
                return st_fail(f, err, "tensor \"%s\" shape[%zu] = %lld is negative", name, i,
                               (long long)json_integer_value(d));
            return st_fail(f, err, "tensor \"%s\" shape[%zu] is a JSON %s, not an integer", name, i,
                           json_kind(d));
        }
        e->t.shape[i] = (int64_t)dim;
        overflow |= __builtin_mul_overflow(numel, dim, &numel);
    }
    uint64_t need;
    overflow |= __builtin_mul_overflow(numel, (uint64_t)twn_dtype_size(e->t.dtype), &need);
    overflow |= numel > (uint64_t)INT64_MAX;
    char sh[160];
    if (overflow)
        return st_fail(f, err, "tensor \"%s\" %s %s has more bytes than fit in 64 bits", name,
                       twn_dtype_name(e->t.dtype), twn_shape_str(&e->t, sh, sizeof sh));
    if (!offs || !json_is_array(offs) || json_array_size(offs) != 2 ||
        get_u64(json_array_get(offs, 0), &e->begin) != 0 ||
        get_u64(json_array_get(offs, 1), &e->end) != 0)
        return st_fail(
            f, err, "tensor \"%s\" needs \"data_offsets\": [begin, end] (two integers >= 0)", name);
    if (e->end < e->begin)
        return st_fail(f, err, "tensor \"%s\" data_offsets [%llu, %llu] end before they begin",
                       name, (unsigned long long)e->begin, (unsigned long long)e->end);
    if (e->end - e->begin != need)
        return st_fail(
            f, err, "tensor \"%s\" data_offsets [%llu, %llu] is %llu bytes, but %s %s needs %llu",
            name, (unsigned long long)e->begin, (unsigned long long)e->end,
            (unsigned long long)(e->end - e->begin), twn_dtype_name(e->t.dtype),
            twn_shape_str(&e->t, sh, sizeof sh), (unsigned long long)need);
    e->t.nbytes = (size_t)need;
    return 0;
}

/* "__metadata__": a flat {string: string} map, copied into one pool. */
static int parse_metadata(twn_st_file *f, json_t *m, twn_err *err) {
    if (!json_is_object(m))
        return st_fail(f, err, "__metadata__ is a JSON %s, not an object", json_kind(m));
    size_t pool = 0;
    const char *k;
    json_t *v;
    json_object_foreach(m, k, v) {
        if (!json_is_string(v))
            return st_fail(f, err, "__metadata__ \"%s\" is a JSON %s, not a string", k,
                           json_kind(v));
        pool += strlen(k) + json_string_length(v) + 2;
    }
    f->n_meta = json_object_size(m);
    f->meta_key = twn_calloc(f->n_meta, sizeof *f->meta_key);
    f->meta_val = twn_calloc(f->n_meta, sizeof *f->meta_val);
    f->meta_pool = twn_malloc(pool);
    char *p = f->meta_pool;
    size_t i = 0;
    json_object_foreach(m, k, v) {
        size_t kl = strlen(k) + 1, vl = strlen(json_string_value(v)) + 1;
        f->meta_key[i] = memcpy(p, k, kl), p += kl;
        f->meta_val[i] = memcpy(p, json_string_value(v), vl), p += vl;
        i++;
    }
    return 0;
}

/* Tiling check: sorted by offset, each tensor starts where the previous ended, and the last one
 * ends exactly at the end of the data buffer. */
static int check_layout(const twn_st_file *f, st_entry *e, size_t n, uint64_t buflen,
                        twn_err *err) {
    qsort(e, n, sizeof *e, cmp_offsets);
    uint64_t at = 0;
    for (size_t i = 0; i < n; i++) {
        if (e[i].begin < at)
            return st_fail(f, err,
                           "tensor \"%s\" data_offsets [%llu, %llu] overlaps tensor \"%s\" "
                           "data_offsets [%llu, %llu]",
                           e[i].name, (unsigned long long)e[i].begin, (unsigned long long)e[i].end,
                           e[i - 1].name, (unsigned long long)e[i - 1].begin,
                           (unsigned long long)e[i - 1].end);
        if (e[i].begin > at)
            return st_fail(f, err,
                           "gap of %llu bytes before tensor \"%s\" data_offsets [%llu, %llu] (the "
                           "previous data ends at %llu)",
                           (unsigned long long)(e[i].begin - at), e[i].name,
                           (unsigned long long)e[i].begin, (unsigned long long)e[i].end,
                           (unsigned long long)at);
        at = e[i].end;
    }
    if (at > buflen)
        return st_fail(f, err,
                       "tensor data ends at byte %llu of the data buffer, but the file has only "
                       "%llu bytes after the header (truncated?)",
                       (unsigned long long)at, (unsigned long long)buflen);
    if (at < buflen)
        return st_fail(
            f, err,
            "%llu stray bytes after the last tensor (data ends at %llu, the buffer holds %llu)",
            (unsigned long long)(buflen - at), (unsigned long long)at, (unsigned long long)buflen);
    return 0;
}

/* Tensors the file left misaligned for their dtype (legal, but never produced by safetensors'
 * writer or ours) are copied into one 64-byte-aligned block, so consumers can cast data to
 * uint16_t * or float * without undefined behaviour. */
static int realign_tensors(twn_st_file *f, twn_err *err) {
    size_t extra = 0;
    for (size_t i = 0; i < f->n; i++) {
        const twn_tensor *t = &f->t[i];
        if (t->nbytes && (uintptr_t)t->data % twn_dtype_size(t->dtype))
            extra += (t->nbytes + 63) & ~(size_t)63;
    }
    if (!extra) return 0;
    f->realigned = twn_try_alloc(extra);
    if (!f->realigned)
        return st_fail(f, err, "cannot allocate %zu bytes to realign misaligned tensors", extra);
    uint8_t *p = f->realigned;
    for (size_t i = 0; i < f->n; i++) {
        twn_tensor *t = &f->t[i];
        if (!t->nbytes || (uintptr_t)t->data % twn_dtype_size(t->dtype) == 0) continue;
        memcpy(p, t->data, t->nbytes);
        t->data = p;
        p += (t->nbytes + 63) & ~(size_t)63;
    }
    return 0;
}

static int st_parse(twn_st_file *f, twn_err *err) {
    if (f->len < 8)
        return st_fail(f, err, "file is %zu bytes, too short for the 8-byte header length", f->len);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | f->base[i];
    if (hlen > ST_MAX_HEADER)
        return st_fail(f, err, "header length %llu is over the %llu-byte limit",
                       (unsigned long long)hlen, ST_MAX_HEADER);
    if (hlen > f->len - 8)
        return st_fail(f, err, "header length %llu runs past the end of the file (%zu bytes)",
                       (unsigned long long)hlen, f->len);
    json_error_t je;
    json_t *root = json_loadb((const char *)f->base + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return st_fail(f, err, "header is not valid JSON: %s (byte %d of the header)", je.text,
                       je.position);
    int rc = -1;
    st_entry *e = NULL;
    if (!json_is_object(root)) {
        st_fail(f, err, "header is a JSON %s, not an object", json_kind(root));
        goto done;
    }
    size_t cap = json_object_size(root), n = 0, pool = 0;
    e = twn_calloc(cap ? cap : 1, sizeof *e);
    const char *k;
    json_t *v;
    json_object_foreach(root, k, v) {
        if (!strcmp(k, "__metadata__")) {
            if (parse_metadata(f, v, err) != 0) goto done;
            continue;
        }
        if (parse_entry(f, k, v, &e[n], err) != 0) goto done;
        pool += strlen(k) + 1;
        n++;
    }
    if (check_layout(f, e, n, f->len - 8 - hlen, err) != 0) goto done;

    qsort(e, n, sizeof *e, cmp_names);
    f->n = n;
    f->t = twn_calloc(n ? n : 1, sizeof *f->t);
    f->names = twn_malloc(pool ? pool : 1);
    char *p = f->names;
    const uint8_t *buf = f->base + 8 + hlen;
    for (size_t i = 0; i < n; i++) {
        size_t kl = strlen(e[i].name) + 1;
        f->t[i] = e[i].t;
        f->t[i].name = memcpy(p, e[i].name, kl);
        f->t[i].data = buf + e[i].begin;
        p += kl;
    }
    rc = realign_tensors(f, err);
done:
    twn_free(e);
    json_decref(root);
    return rc;
}

// ------------------------------------------------------------------------------------------------
// Reader: public entry points

int twn_st_open_mem(const void *data, size_t len, const char *name, twn_st_file **out,
                    twn_err *err) {
    *out = NULL;
    twn_st_file *f = twn_calloc(1, sizeof *f);
    f->path = twn_strdup(name);
    f->base = data;
    f->len = len;
    if (st_parse(f, err) != 0) {
        twn_st_close(f);
        return -1;
    }
    *out = f;
    return 0;
}

int twn_st_open(const char *path, twn_st_file **out, twn_err *err) {
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return twn_err_errno(err, "cannot open %s", path);
    struct stat st;
    if (fstat(fd, &st) != 0) {
        close(fd);
        return twn_err_errno(err, "cannot stat %s", path);
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return twn_err_set(err, "%s: not a regular file", path);
    }
    size_t len = (size_t)st.st_size;
    if (len < 8) { /* also keeps mmap away from empty files */
        close(fd);
        return twn_err_set(err, "%s: file is %zu bytes, too short for the 8-byte header length",
                           path, len);
    }
    void *m = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (m == MAP_FAILED) return twn_err_errno(err, "cannot mmap %s (%zu bytes)", path, len);
    twn_st_file *f = twn_calloc(1, sizeof *f);
    f->path = twn_strdup(path);
    f->base = m;
    f->len = len;
    f->mapped = 1;
    if (st_parse(f, err) != 0) {
        twn_st_close(f);
        return -1;
    }
    *out = f;
    return 0;
}

void twn_st_close(twn_st_file *f) {
    if (!f) return;
    if (f->mapped) munmap((void *)f->base, f->len);
    twn_free(f->t);
    twn_free(f->names);
    twn_free(f->realigned);
    twn_free(f->meta_key);
    twn_free(f->meta_val);
    twn_free(f->meta_pool);
    twn_free(f->path);
    twn_free(f);
}

const char *twn_st_path(const twn_st_file *f) {
    return f->path;
}
size_t twn_st_count(const twn_st_file *f) {
    return f->n;
}
const twn_tensor *twn_st_at(const twn_st_file *f, size_t i) {
    return i < f->n ? &f->t[i] : NULL;
}

const twn_tensor *twn_st_find(const twn_st_file *f, const char *name) {
    size_t lo = 0, hi = f->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(f->t[mid].name, name);
        if (c == 0) return &f->t[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

const char *twn_st_metadata(const twn_st_file *f, const char *key) {
    for (size_t i = 0; i < f->n_meta; i++)
        if (!strcmp(f->meta_key[i], key)) return f->meta_val[i];
    return NULL;
}

// ------------------------------------------------------------------------------------------------
// Model directories: model.safetensors.index.json (sharded) or model.safetensors

typedef struct {
    const twn_tensor *t;
    size_t file; /* index into files */
} st_ref;

struct twn_st_set {
    twn_st_file **files;
    size_t nfiles;
    st_ref *refs; /* sorted by name */
    size_t n;
};

static int cmp_refs(const void *a, const void *b) {
    return strcmp(((const st_ref *)a)->t->name, ((const st_ref *)b)->t->name);
}

/* Shard names are file names relative to the model directory; an absolute path or ".." would
 * make the index point outside it. */
static int shard_name_ok(const char *s) {
    if (!s[0] || s[0] == '/') return 0;
    for (const char *p = s; *p;) {
        const char *q = strchr(p, '/');
        size_t n = q ? (size_t)(q - p) : strlen(p);
        if (n == 2 && p[0] == '.' && p[1] == '.') return 0;
        p += n + (q != NULL);
    }
    return 1;
}

static size_t set_add_file(twn_st_set *s, twn_st_file *f) {
    s->files = twn_realloc(s->files, (s->nfiles + 1) * sizeof *s->files);
    s->files[s->nfiles] = f;
    return s->nfiles++;
}

static int open_index(twn_st_set *s, const char *dir, const char *index, twn_err *err) {
    char *text = NULL;
    size_t len = 0;
    if (twn_read_file(index, ST_MAX_INDEX, &text, &len, err) != 0) return -1;
    json_error_t je;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    twn_free(text);
    if (!root)
        return twn_err_set(err, "%s: invalid JSON at line %d, column %d: %s", index, je.line,
                           je.column, je.text);
    int rc = -1;
    twn_strmap *shard_of = twn_strmap_new(8); /* shard file name -> index into s->files */
    json_t *wm = json_is_object(root) ? json_object_get(root, "weight_map") : NULL;
    if (!wm || !json_is_object(wm)) {
        twn_err_set(err, "%s: no \"weight_map\" object", index);
        goto done;
    }
    s->refs = twn_calloc(json_object_size(wm) ? json_object_size(wm) : 1, sizeof *s->refs);
    const char *name;
    json_t *v;
    json_object_foreach(wm, name, v) {
        if (!json_is_string(v) || !shard_name_ok(json_string_value(v))) {
            twn_err_set(
                err,
                "%s: weight_map entry \"%s\" must be a shard file name inside the model directory",
                index, name);
            goto done;
        }
        const char *shard = json_string_value(v);
        int64_t fi;
        if (!twn_strmap_get(shard_of, shard, strlen(shard), &fi)) {
            char *path = twn_path_join(dir, shard);
            twn_st_file *f;
            int orc = twn_st_open(path, &f, err);
            twn_free(path);
            if (orc != 0) {
                twn_err_wrap(err, "%s: weight_map puts tensor \"%s\" in %s", index, name, shard);
                goto done;
            }
            fi = (int64_t)set_add_file(s, f);
            twn_strmap_put(shard_of, shard, strlen(shard), fi);
        }
        const twn_tensor *t = twn_st_find(s->files[fi], name);
        if (!t) {
            twn_err_set(
                err, "%s: weight_map puts tensor \"%s\" in %s, but that file has no tensor \"%s\"",
                index, name, shard, name);
            goto done;
        }
        s->refs[s->n++] = (st_ref){t, (size_t)fi};
    }
    rc = 0;
done:
    twn_strmap_free(shard_of);
    json_decref(root);
    return rc;
}

int twn_st_set_open_dir(const char *dir, twn_st_set **out, twn_err *err) {
    *out = NULL;
    twn_st_set *s = twn_calloc(1, sizeof *s);
    char *index = twn_path_join(dir, ST_INDEX_NAME), *single = twn_path_join(dir, ST_SINGLE_NAME);
    int rc = -1;
    if (twn_path_exists(index)) {
        if (open_index(s, dir, index, err) != 0) goto done;
    } else if (twn_path_exists(single)) {
        twn_st_file *f;
        if (twn_st_open(single, &f, err) != 0) goto done;
        size_t fi = set_add_file(s, f);
        s->refs = twn_calloc(f->n ? f->n : 1, sizeof *s->refs);
        for (size_t i = 0; i < f->n; i++) s->refs[s->n++] = (st_ref){&f->t[i], fi};
    } else {
        twn_err_set(err, "%s: neither %s nor %s exists", dir, ST_INDEX_NAME, ST_SINGLE_NAME);
        goto done;
    }
    qsort(s->refs, s->n, sizeof *s->refs, cmp_refs);
    rc = 0;
done:
    twn_free(index);
    twn_free(single);
    if (rc != 0)
        twn_st_set_close(s);
    else
        *out = s;
    return rc;
}

void twn_st_set_close(twn_st_set *s) {
    if (!s) return;
    for (size_t i = 0; i < s->nfiles; i++) twn_st_close(s->files[i]);
    twn_free(s->files);
    twn_free(s->refs);
    twn_free(s);
}

size_t twn_st_set_count(const twn_st_set *s) {
    return s->n;
}

const twn_tensor *twn_st_set_at(const twn_st_set *s, size_t i) {
    return i < s->n ? s->refs[i].t : NULL;
}

static const st_ref *set_find(const twn_st_set *s, const char *name) {
    size_t lo = 0, hi = s->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(s->refs[mid].t->name, name);
        if (c == 0) return &s->refs[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

const twn_tensor *twn_st_set_find(const twn_st_set *s, const char *name) {
    const st_ref *r = set_find(s, name);
    return r ? r->t : NULL;
}

const char *twn_st_set_file_of(const twn_st_set *s, const char *name) {
    const st_ref *r = set_find(s, name);
    return r ? s->files[r->file]->path : NULL;
}

void twn_st_set_release(const twn_st_set *s, const char *name) {
    const st_ref *r = set_find(s, name);
    if (!r) return;
    const twn_st_file *f = s->files[r->file];
    const twn_tensor *t = twn_st_find(f, name);
    const uint8_t *p = t ? (const uint8_t *)t->data : NULL;
    if (!f->mapped || !p || p < f->base || p >= f->base + f->len) return;
    uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo = ((uintptr_t)p + pg - 1) & ~(pg - 1), hi = ((uintptr_t)p + t->nbytes) & ~(pg - 1);
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_DONTNEED);
}

// ------------------------------------------------------------------------------------------------
// Writer

typedef struct {
    char *name;
    twn_dtype dt;
    int ndim;
    int64_t shape[TWN_MAX_DIMS];
    void *data; /* owned copy, nbytes long (NULL when 0) */
    size_t nbytes;
} st_wtensor;

struct twn_st_writer {
    st_wtensor *t;
    size_t n, cap;
    twn_strmap *names;
    char **meta_key, **meta_val;
    size_t n_meta;
    size_t bytes;
};

twn_st_writer *twn_st_writer_new(void) {
    twn_st_writer *w = twn_calloc(1, sizeof *w);
    w->names = twn_strmap_new(64);
    return w;
}

void twn_st_writer_free(twn_st_writer *w) {
    if (!w) return;
    for (size_t i = 0; i < w->n; i++) {
        twn_free(w->t[i].name);
        twn_free(w->t[i].data);
    }
    for (size_t i = 0; i < w->n_meta; i++) {
        twn_free(w->meta_key[i]);
        twn_free(w->meta_val[i]);
    }
    twn_free(w->t);
    twn_free(w->meta_key);
    twn_free(w->meta_val);
    twn_strmap_free(w->names);
    twn_free(w);
}

/* Checks a tensor to be added and returns its byte size in *nbytes. */
static int writer_check(const twn_st_writer *w, const char *name, twn_dtype dt, int ndim,
                        const int64_t *shape, size_t *nbytes, twn_err *err) {
    if (!name || !strcmp(name, "__metadata__"))
        return twn_err_set(err, "safetensors writer: \"%s\" cannot be a tensor name",
                           name ? name : "(null)");
    json_t *utf8 = json_string(name); /* NULL when the name is not valid UTF-8 */
    if (!utf8) return twn_err_set(err, "safetensors writer: tensor name is not valid UTF-8");
    json_decref(utf8);
    if (twn_strmap_get(w->names, name, strlen(name), NULL))
        return twn_err_set(err, "safetensors writer: tensor \"%s\" added twice", name);
    if ((unsigned)dt >= TWN_DT_COUNT)
        return twn_err_set(err, "safetensors writer: tensor \"%s\" has invalid dtype %d", name,
                           (int)dt);
    if (ndim < 0 || ndim > TWN_MAX_DIMS)
        return twn_err_set(err, "safetensors writer: tensor \"%s\" has %d dims (0..%d allowed)",
                           name, ndim, TWN_MAX_DIMS);
    size_t n = twn_dtype_size(dt);
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return twn_err_set(err,
                               "safetensors writer: tensor \"%s\" shape[%d] = %lld is negative",
                               name, i, (long long)shape[i]);
        if (twn_mul_size(n, (size_t)shape[i], &n) != 0 || n > (size_t)INT64_MAX)
            return twn_err_set(err, "safetensors writer: tensor \"%s\" is too large", name);
    }
    *nbytes = n;
    return 0;
}

/* Takes ownership of data (nbytes long, or NULL when nbytes == 0). */
static void writer_push(twn_st_writer *w, const char *name, twn_dtype dt, int ndim,
                        const int64_t *shape, void *data, size_t nbytes) {
    if (w->n == w->cap) {
        w->cap = w->cap ? w->cap * 2 : 16;
        w->t = twn_realloc(w->t, w->cap * sizeof *w->t);
    }
    st_wtensor *t = &w->t[w->n++];
    memset(t, 0, sizeof *t);
    t->name = twn_strdup(name);
    t->dt = dt;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
    t->data = data;
    t->nbytes = nbytes;
    w->bytes += nbytes;
    twn_strmap_put(w->names, name, strlen(name), 1);
}

int twn_st_writer_add(twn_st_writer *w, const char *name, twn_dtype dt, int ndim,
                      const int64_t *shape, const void *data, twn_err *err) {
    size_t nbytes;
    if (writer_check(w, name, dt, ndim, shape, &nbytes, err) != 0) return -1;
    void *copy = NULL;
    if (nbytes) {
        copy = twn_try_alloc(nbytes);
        if (!copy)
            return twn_err_set(err,
                               "safetensors writer: cannot allocate %zu bytes for tensor \"%s\"",
                               nbytes, name);
        memcpy(copy, data, nbytes);
    }
    writer_push(w, name, dt, ndim, shape, copy, nbytes);
    return 0;
}

int twn_st_writer_add_f32(twn_st_writer *w, const char *name, twn_dtype dt, int ndim,
                          const int64_t *shape, const float *data, twn_err *err) {
    if (dt != TWN_DT_F32 && dt != TWN_DT_F16 && dt != TWN_DT_BF16)
        return twn_err_set(err,
                           "safetensors writer: tensor \"%s\": cannot convert float32 to %s (F32, "
                           "F16 or BF16 only)",
                           name ? name : "(null)", twn_dtype_name(dt));
    size_t nbytes;
    if (writer_check(w, name, dt, ndim, shape, &nbytes, err) != 0) return -1;
    void *out = NULL;
    if (nbytes) {
        out = twn_try_alloc(nbytes);
        if (!out)
            return twn_err_set(err,
                               "safetensors writer: cannot allocate %zu bytes for tensor \"%s\"",
                               nbytes, name);
        size_t n = nbytes / twn_dtype_size(dt);
        if (dt == TWN_DT_F32)
            memcpy(out, data, nbytes);
        else {
            uint16_t *h = out;
            for (size_t i = 0; i < n; i++)
                h[i] = dt == TWN_DT_BF16 ? twn_f32_to_bf16(data[i]) : twn_f32_to_f16(data[i]);
        }
    }
    writer_push(w, name, dt, ndim, shape, out, nbytes);
    return 0;
}

void twn_st_writer_meta(twn_st_writer *w, const char *key, const char *value) {
    for (size_t i = 0; i < w->n_meta; i++)
        if (!strcmp(w->meta_key[i], key)) {
            twn_free(w->meta_val[i]);
            w->meta_val[i] = twn_strdup(value);
            return;
        }
    w->meta_key = twn_realloc(w->meta_key, (w->n_meta + 1) * sizeof *w->meta_key);
    w->meta_val = twn_realloc(w->meta_val, (w->n_meta + 1) * sizeof *w->meta_val);
    w->meta_key[w->n_meta] = twn_strdup(key);
    w->meta_val[w->n_meta] = twn_strdup(value);
    w->n_meta++;
}

size_t twn_st_writer_bytes(const twn_st_writer *w) {
    return w->bytes;
}

/* Layout order: bigger dtypes first (keeps every tensor aligned), then by name. */
static int cmp_layout(const void *a, const void *b) {
    const st_wtensor *x = *(const st_wtensor *const *)a, *y = *(const st_wtensor *const *)b;
    size_t sx = twn_dtype_size(x->dt), sy = twn_dtype_size(y->dt);
    if (sx != sy) return sx > sy ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* The JSON header for the given layout, padded with spaces so 8 + length is a multiple of 8. */
static char *writer_header(const twn_st_writer *w, st_wtensor **order, size_t *len, twn_err *err) {
    json_t *root = json_object();
    if (w->n_meta) {
        json_t *m = json_object();
        json_object_set_new(root, "__metadata__", m);
        for (size_t i = 0; i < w->n_meta; i++)
            if (json_object_set_new(m, w->meta_key[i], json_string(w->meta_val[i])) != 0) {
                twn_err_set(err, "safetensors writer: metadata \"%s\" is not valid UTF-8",
                            w->meta_key[i]);
                json_decref(root);
                return NULL;
            }
    }
    uint64_t at = 0;
    for (size_t i = 0; i < w->n; i++) {
        const st_wtensor *t = order[i];
        json_t *shape = json_array();
        for (int d = 0; d < t->ndim; d++) json_array_append_new(shape, json_integer(t->shape[d]));
        json_t *e = json_pack("{s:s, s:o, s:[I, I]}", "dtype", twn_dtype_name(t->dt), "shape",
                              shape, "data_offsets", (json_int_t)at, (json_int_t)(at + t->nbytes));
        json_object_set_new(root, t->name, e);
        at += t->nbytes;
    }
    char *js = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    if (!js) {
        twn_err_set(err, "safetensors writer: cannot encode the header");
        return NULL;
    }
    size_t n = strlen(js), padded = (n + 7) & ~(size_t)7;
    char *h = twn_malloc(padded);
    memcpy(h, js, n);
    memset(h + n, ' ', padded - n);
    free(js); /* jansson's allocator is malloc */
    *len = padded;
    return h;
}

int twn_st_writer_write(twn_st_writer *w, const char *path, twn_err *err) {
    st_wtensor **order = twn_calloc(w->n ? w->n : 1, sizeof *order);
    for (size_t i = 0; i < w->n; i++) order[i] = &w->t[i];
    qsort(order, w->n, sizeof *order, cmp_layout);
    size_t hlen = 0;
    char *header = writer_header(w, order, &hlen, err);
    if (!header) {
        twn_free(order);
        return -1;
    }
    size_t tl = strlen(path) + 32;
    char *tmp = twn_malloc(tl);
    snprintf(tmp, tl, "%s.tmp.%d", path, (int)getpid());
    int rc = -1;
    FILE *fp = fopen(tmp, "wb");
    if (!fp) {
        twn_err_errno(err, "cannot create %s", tmp);
        goto done;
    }
    uint8_t le[8];
    for (int i = 0; i < 8; i++) le[i] = (uint8_t)((uint64_t)hlen >> (8 * i));
    int ok = fwrite(le, 1, 8, fp) == 8 && fwrite(header, 1, hlen, fp) == hlen;
    for (size_t i = 0; ok && i < w->n; i++)
        ok = !order[i]->nbytes ||
             fwrite(order[i]->data, 1, order[i]->nbytes, fp) == order[i]->nbytes;
    ok = ok && fflush(fp) == 0 && fsync(fileno(fp)) == 0;
    if (!ok) {
        twn_err_errno(err, "cannot write %s", tmp);
        fclose(fp);
        unlink(tmp);
        goto done;
    }
    if (fclose(fp) != 0) {
        twn_err_errno(err, "cannot write %s", tmp);
        unlink(tmp);
        goto done;
    }
    if (rename(tmp, path) != 0) {
        twn_err_errno(err, "cannot rename %s to %s", tmp, path);
        unlink(tmp);
        goto done;
    }
    char *dir = twn_path_dirname(path); /* make the rename itself durable */
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
    twn_free(dir);
    rc = 0;
done:
    twn_free(tmp);
    twn_free(header);
    twn_free(order);
    return rc;
}
