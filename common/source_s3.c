/* source_s3.c — the S3 blob (ranged GETs through the borrowed client), the s3:// prefix planner
 * and the STORE_S3 protobuf conversions. */
#include "common/source_s3.h"

#include <stdio.h>
#include <string.h>

#include "util/mem.h"

/* The last range fetched (when at most S3_BLOB_KEEP bytes, or a read-ahead window) is kept: the
 * readers often read a span and then a part of it again (the tar reader scans an item's headers
 * through its cursor, then reads the member data), and that second read must not cost a GET.
 *
 * A reader that announces the range it will walk (will_read: a unit reader its unit, the planner
 * the whole object) gets it in GETs of up to 8 MiB from the first read on.  Otherwise sequential
 * reads (each starting where the previous one ended) fetch ahead, in windows doubling from 512 KiB
 * to 8 MiB, so a large range costs a few GETs instead of one per 256 KiB cursor window.  A first
 * read, or one that does not continue the previous one (a worker re-reading one item by its ref),
 * fetches exactly what it asks for. */
#define S3_BLOB_KEEP   (1u << 20)
#define S3_BLOB_RA_MIN (512u << 10)
#define S3_BLOB_RA_MAX (8u << 20)

typedef struct {
    twn_blob b;
    twn_s3 *s;
    char *bucket, *key, *uri, *etag;
    uint8_t *kept;
    size_t kept_cap, kept_len;
    uint64_t kept_off;
    uint64_t hint_off, hint_end; /* will_read: the range being walked (empty: none) */
    int have_seq;                /* a read happened: seq_end is meaningful */
    uint64_t seq_end;            /* where the previous read ended */
    size_t ahead;                /* the current read-ahead window, 0 when not sequential */
} s3_blob;

static void keep_room(s3_blob *o, size_t n) {
    if (o->kept_cap >= n) return;
    twn_free(o->kept);
    o->kept = twn_malloc(n);
    o->kept_cap = n;
    o->kept_len = 0;
}

static int s3_read_at(twn_blob *b, uint64_t off, void *buf, size_t n, size_t *got, twn_err *err) {
    s3_blob *o = (s3_blob *)b;
    *got = 0;
    if (off >= b->size || !n) return 0;
    if (n > b->size - off) n = (size_t)(b->size - off);
    int seq = o->have_seq && off == o->seq_end;
    o->have_seq = 1;
    o->seq_end = off + n;
    if (!seq) o->ahead = 0;
    if (o->kept_len && off >= o->kept_off && off + n <= o->kept_off + o->kept_len) {
        memcpy(buf, o->kept + (off - o->kept_off), n);
        *got = n;
        return 0;
    }
    if (seq)
        o->ahead = o->ahead ? (o->ahead * 2 > S3_BLOB_RA_MAX ? S3_BLOB_RA_MAX : o->ahead * 2)
                            : S3_BLOB_RA_MIN;
    size_t want = n;
    if (o->ahead > want) want = b->size - off < o->ahead ? (size_t)(b->size - off) : o->ahead;
    if (off >= o->hint_off && off < o->hint_end) {
        /* inside the announced range: the rest of it, up to the largest window */
        uint64_t rest = o->hint_end - off;
        size_t w = rest < S3_BLOB_RA_MAX ? (size_t)rest : S3_BLOB_RA_MAX;
        if (w > want) want = w;
    }
    if (want > n) { /* read ahead into the kept buffer */
        keep_room(o, want);
        size_t k = 0;
        o->kept_len = 0;
        if (twn_s3_get_range(o->s, o->bucket, o->key, o->etag, off, want, o->kept, &k, err))
            return -1;
        o->kept_off = off;
        o->kept_len = k;
        *got = k < n ? k : n;
        memcpy(buf, o->kept, *got);
        return 0;
    }
    if (twn_s3_get_range(o->s, o->bucket, o->key, o->etag, off, n, buf, got, err)) return -1;
    if (*got <= S3_BLOB_KEEP) {
        keep_room(o, *got);
        memcpy(o->kept, buf, *got);
        o->kept_off = off;
        o->kept_len = *got;
    }
    return 0;
}

static void s3_will_read(twn_blob *b, uint64_t off, uint64_t n) {
    s3_blob *o = (s3_blob *)b;
    o->hint_off = off;
    o->hint_end = off + n < b->size ? off + n : b->size;
}

static void s3_close(twn_blob *b) {
    s3_blob *o = (s3_blob *)b;
    twn_free(o->bucket);
    twn_free(o->key);
    twn_free(o->uri);
    twn_free(o->etag);
    twn_free(o->kept);
    twn_free(o);
}

int twn_blob_open_s3(twn_s3 *s, const char *bucket, const char *key, uint64_t size,
                     const char *etag, twn_blob **out, twn_err *err) {
    *out = NULL;
    char head_etag[128] = "";
    if (!etag) {
        if (twn_s3_head(s, bucket, key, &size, head_etag, sizeof head_etag, err)) return -1;
        etag = head_etag;
    }
    s3_blob *o = twn_calloc(1, sizeof *o);
    o->s = s;
    o->bucket = twn_strdup(bucket);
    o->key = twn_strdup(key);
    size_t n = strlen(bucket) + strlen(key) + 7;
    o->uri = twn_malloc(n);
    snprintf(o->uri, n, "s3://%s/%s", bucket, key);
    o->etag = etag[0] ? twn_strdup(etag) : NULL;
    o->b.name = o->uri;
    o->b.size = size;
    o->b.read_at = s3_read_at;
    o->b.close = s3_close;
    o->b.will_read = s3_will_read;
    *out = &o->b;
    return 0;
}

int twn_blob_open_s3_uri(twn_s3 *s, const char *uri, twn_blob **out, twn_err *err) {
    *out = NULL;
    twn_s3_uri u;
    if (twn_s3_uri_parse(uri, &u, err)) return -1;
    int rc;
    if (!u.key[0])
        rc = twn_err_set(err, "'%s' names a bucket, not an object; expected s3://bucket/key", uri);
    else
        rc = twn_blob_open_s3(s, u.bucket, u.key, 0, NULL, out, err);
    twn_s3_uri_free(&u);
    return rc;
}

int twn_blob_open_path(twn_s3 *s, const char *path, twn_blob **out, twn_err *err) {
    if (!twn_s3_is_uri(path)) return twn_blob_open_file(path, out, err);
    if (!s) {
        *out = NULL;
        return twn_err_set(err, "%s: an S3 object, but no S3 client was configured", path);
    }
    return twn_blob_open_s3_uri(s, path, out, err);
}

// ------------------------------------------------------------------------------------------------
// Planning

int twn_src_plan_s3(twn_s3 *s, const char *uri, twn_src_format fmt, uint64_t items_per_unit,
                    uint64_t *next_id, twn_src_unit_fn fn, void *user, size_t *n_objects,
                    twn_err *err) {
    if (n_objects) *n_objects = 0;
    twn_s3_uri u;
    if (twn_s3_uri_parse(uri, &u, err)) return -1;
    twn_s3_objects objs = {0};
    int rc = twn_s3_list(s, u.bucket, u.key, &objs, err);
    for (size_t i = 0; !rc && i < objs.n; i++) {
        const twn_s3_object *o = &objs.v[i];
        size_t kl = strlen(o->key);
        if (!kl || o->key[kl - 1] == '/' || !o->size) continue;
        twn_blob *b;
        if ((rc = twn_blob_open_s3(s, u.bucket, o->key, o->size, o->etag, &b, err))) break;
        b->will_read(b, 0, o->size); /* planning walks the whole object */
        rc = twn_src_plan_blob(b, b->name, fmt, items_per_unit, next_id, fn, user, err);
        twn_blob_close(b);
        if (!rc && n_objects) (*n_objects)++;
    }
    twn_s3_objects_free(&objs);
    twn_s3_uri_free(&u);
    return rc;
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

int twn_src_plan_s3_units(twn_s3 *s, const char *uri, twn_src_format fmt, uint64_t items_per_unit,
                          twn_src_units *out, twn_err *err) {
    uint64_t next_id = out->n ? out->v[out->n - 1].id + 1 : 0;
    return twn_src_plan_s3(s, uri, fmt, items_per_unit, &next_id, collect, out, NULL, err);
}

// ------------------------------------------------------------------------------------------------
// Protobuf

/* Splits "s3://bucket/key" into buf->bucket and a pointer to the key inside `path`. */
static int split(const char *path, twn_s3_proto_buf *buf, const char **key, twn_err *err) {
    twn_s3_uri u;
    if (twn_s3_uri_parse(path, &u, err)) return -1;
    snprintf(buf->bucket, sizeof buf->bucket, "%s", u.bucket);
    int empty = !u.key[0];
    twn_s3_uri_free(&u);
    if (empty) return twn_err_set(err, "'%s' names a bucket, not an object", path);
    *key = path + 5 + strlen(buf->bucket) + 1;
    return 0;
}

int twn_src_s3_unit_to_proto(const twn_src_unit *u, Twn__SourceRef *s, twn_s3_proto_buf *buf,
                             twn_err *err) {
    const char *key;
    if (split(u->path, buf, &key, err)) return -1;
    twn_src_unit_to_proto(u, s);
    s->store = TWN__STORE__STORE_S3;
    s->bucket = buf->bucket;
    s->path = (char *)key;
    return 0;
}

static int check_s3_source(const Twn__SourceRef *s, twn_err *err) {
    if (!s) return twn_err_set(err, "source ref is missing");
    if (s->store != TWN__STORE__STORE_S3)
        return twn_err_set(err, "source '%s': store %d is not S3 (STORE_S3 = 2)", s->path,
                           (int)s->store);
    if (s->format != TWN__FORMAT__FORMAT_JSONL && s->format != TWN__FORMAT__FORMAT_TAR)
        return twn_err_set(err,
                           "source s3://%s/%s: format %d; expected FORMAT_JSONL (1) or FORMAT_TAR "
                           "(2)",
                           s->bucket, s->path, (int)s->format);
    if (!s->path[0])
        return twn_err_set(err, "S3 source ref in bucket '%s' has an empty key", s->bucket);
    if (s->end < s->start)
        return twn_err_set(err, "source s3://%s/%s: range [%llu, %llu) ends before it starts",
                           s->bucket, s->path, (unsigned long long)s->start,
                           (unsigned long long)s->end);
    char uri[80];
    snprintf(uri, sizeof uri, "s3://%s", s->bucket);
    twn_s3_uri u;
    if (twn_s3_uri_parse(uri, &u, err)) return -1;
    twn_s3_uri_free(&u);
    return 0;
}

static char *join_uri(const char *bucket, const char *key) {
    size_t n = strlen(bucket) + strlen(key) + 7;
    char *p = twn_malloc(n);
    snprintf(p, n, "s3://%s/%s", bucket, key);
    return p;
}

int twn_src_s3_unit_from_proto(uint64_t unit_id, const Twn__SourceRef *s, twn_src_unit *u,
                               twn_err *err) {
    memset(u, 0, sizeof *u);
    if (check_s3_source(s, err)) return -1;
    u->id = unit_id;
    u->format = (twn_src_format)s->format;
    u->path = join_uri(s->bucket, s->path);
    u->start = s->start;
    u->end = s->end;
    u->first_index = s->first_index;
    u->count = s->count;
    u->first_line = s->first_line;
    return 0;
}

int twn_src_s3_ref_to_proto(const twn_src_unit *u, const twn_src_item *it, Twn__ItemRef *r,
                            Twn__SourceRef *s, twn_s3_proto_buf *buf, twn_err *err) {
    twn_src_ref_to_proto(u, it, r, s);
    const char *key;
    if (split(u->path, buf, &key, err)) return -1;
    s->store = TWN__STORE__STORE_S3;
    s->bucket = buf->bucket;
    s->path = (char *)key;
    return 0;
}

int twn_src_s3_ref_from_proto(const Twn__ItemRef *r, twn_src_ref *out, char **path_out,
                              twn_err *err) {
    memset(out, 0, sizeof *out);
    *path_out = NULL;
    if (!r) return twn_err_set(err, "item ref is missing");
    if (check_s3_source(r->source, err)) return -1;
    *path_out = join_uri(r->source->bucket, r->source->path);
    out->format = (twn_src_format)r->source->format;
    out->path = *path_out;
    out->offset = r->offset;
    out->length = r->length;
    out->index = r->item_index;
    out->line = r->line;
    return 0;
}
