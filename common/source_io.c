/* source_io.c — planning and reading across stores (source_io.h): the dispatch on a unit's path,
 * the lazily opened S3 client and Kafka handle, and the SourceRef conversions of all stores. */
#include "common/source_io.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/jobconf.h"
#include "common/prefetch.h"
#include "common/source_s3.h"
#include "util/mem.h"

void twn_srcio_cfg_default(twn_srcio_cfg *c) {
    memset(c, 0, sizeof *c);
    c->s3 = twn_s3_config_default();
    c->kafka = twn_kafka_config_default();
    c->max_image_bytes = 64u << 20;
}

static int env_int(const char *name, long lo, long hi, long *out, twn_err *err) {
    const char *v = getenv(name);
    if (!v || !v[0]) return 0;
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || x < lo || x > hi)
        return twn_err_set(err, "environment: %s = \"%s\": expected an integer %ld..%ld", name, v,
                           lo, hi);
    *out = x;
    return 1;
}

int twn_srcio_cfg_from_env(twn_srcio_cfg *c, twn_err *err) {
    const char *v;
    if ((v = getenv("TWN_S3_ENDPOINT")) && v[0]) c->s3.endpoint = v;
    if ((v = getenv("TWN_S3_REGION")) && v[0]) c->s3.region = v;
    if ((v = getenv("TWN_KAFKA_BROKERS")) && v[0]) c->kafka.brokers = v;
    if ((v = getenv("TWN_KAFKA_GROUP")) && v[0]) c->kafka.group = v;
    long x;
    int rc = env_int("TWN_S3_PATH_STYLE", 0, 1, &x, err);
    if (rc < 0) return -1;
    if (rc) c->s3.path_style = (int)x;
    rc = env_int("TWN_KAFKA_MAX_INLINE_IMAGE_BYTES", 0, 1L << 30, &x, err);
    if (rc < 0) return -1;
    if (rc) c->kafka.max_inline_image_bytes = (size_t)x;
    return 0;
}

static const char *nonempty(const char *s) {
    return s && s[0] ? s : NULL;
}

int twn_srcio_cfg_from_conf(twn_srcio_cfg *c, const twn_conf *conf, twn_err *err) {
    c->s3.endpoint = nonempty(conf->s3.endpoint);
    c->s3.region = nonempty(conf->s3.region);
    c->s3.access_key = nonempty(conf->s3.access_key_id);
    c->s3.secret_key = nonempty(conf->s3.secret_access_key);
    c->s3.session_token = nonempty(conf->s3.session_token);
    const char *ps = conf->s3.path_style ? conf->s3.path_style : "auto";
    if (!strcmp(ps, "true"))
        c->s3.path_style = 1;
    else if (!strcmp(ps, "false"))
        c->s3.path_style = 0;
    else if (!strcmp(ps, "auto") || !ps[0])
        c->s3.path_style = -1;
    else
        return twn_err_set(err, "config: s3.path_style = \"%s\": expected auto, true or false", ps);
    c->kafka.brokers = nonempty(conf->kafka.brokers);
    c->kafka.group = nonempty(conf->kafka.group);
    c->kafka.max_inline_image_bytes = (size_t)conf->kafka.max_inline_image_bytes;
    if (conf->limits.max_item_bytes > 0) c->max_image_bytes = (size_t)conf->limits.max_item_bytes;
    twn_srcio_cfg_free(c);
    const twn_conf_map *m = &conf->kafka.properties;
    if (m->n) {
        c->owned = twn_calloc(m->n + 1, sizeof *c->owned);
        for (size_t i = 0; i < m->n; i++) {
            size_t n = strlen(m->keys[i]) + strlen(m->vals[i]) + 2;
            c->owned[i] = twn_malloc(n);
            snprintf(c->owned[i], n, "%s=%s", m->keys[i], m->vals[i]);
        }
        c->kafka.props = (const char *const *)c->owned;
    }
    return 0;
}

void twn_srcio_cfg_free(twn_srcio_cfg *c) {
    for (size_t i = 0; c->owned && c->owned[i]; i++) twn_free(c->owned[i]);
    twn_free(c->owned);
    c->owned = NULL;
    c->kafka.props = NULL;
}

struct twn_srcio {
    twn_srcio_cfg cfg;
    void (*on_wait)(void *);
    void *on_wait_user;
    twn_s3 *s3;
    twn_kafka *kafka;
    /* The S3 object read last by twn_srcio_read_ref: a worker's batch of hard items from one
     * object costs one HEAD, and the blob's kept range can serve neighbouring items. */
    twn_blob *ref_blob;
};

int twn_srcio_open(const twn_srcio_cfg *cfg, twn_srcio **out, twn_err *err) {
    (void)err;
    twn_srcio *io = twn_calloc(1, sizeof *io);
    if (cfg)
        io->cfg = *cfg;
    else
        twn_srcio_cfg_default(&io->cfg);
    *out = io;
    return 0;
}

void twn_srcio_close(twn_srcio *io) {
    if (!io) return;
    twn_blob_close(io->ref_blob);
    twn_s3_close(io->s3);
    twn_kafka_close(io->kafka);
    twn_free(io);
}

void twn_srcio_set_wait_hook(twn_srcio *io, void (*fn)(void *user), void *user) {
    io->on_wait = fn;
    io->on_wait_user = user;
    if (io->kafka) twn_kafka_set_wait_hook(io->kafka, fn, user);
}

int twn_srcio_s3(twn_srcio *io, twn_s3 **out, twn_err *err) {
    if (!io->s3 && twn_s3_open(&io->cfg.s3, &io->s3, err)) return -1;
    *out = io->s3;
    return 0;
}

int twn_srcio_kafka(twn_srcio *io, twn_kafka **out, twn_err *err) {
    if (!io->kafka) {
        if (!io->cfg.kafka.brokers || !io->cfg.kafka.brokers[0])
            return twn_err_set(err, "kafka: no brokers configured; expected kafka.brokers "
                                    "(TWN_KAFKA_BROKERS) host:port[,...]");
        if (twn_kafka_open(&io->cfg.kafka, &io->kafka, err)) return -1;
        twn_kafka_set_wait_hook(io->kafka, io->on_wait, io->on_wait_user);
    }
    *out = io->kafka;
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Paths

twn_store_kind twn_srcio_store_of(const char *path) {
    if (!strncmp(path, "s3://", 5)) return TWN_STORE_S3;
    if (!strncmp(path, "kafka://", 8)) return TWN_STORE_KAFKA;
    return TWN_STORE_FILE;
}

/* Kafka topic names: 1..249 of [a-zA-Z0-9._-]. */
static int topic_ok(const char *t, size_t n) {
    if (!n || n > 249) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = t[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

int twn_srcio_kafka_path(const char *path, char *topic, size_t cap, int32_t *partition,
                         twn_err *err) {
    *partition = -1;
    if (strncmp(path, "kafka://", 8))
        return twn_err_set(err, "'%s' is not a Kafka source; expected kafka://topic", path);
    const char *t = path + 8;
    size_t n = strcspn(t, "/?");
    if (!topic_ok(t, n) || n >= cap)
        return twn_err_set(err,
                           "'%s': not a valid Kafka topic name; expected kafka://topic with 1..249 "
                           "of a-z A-Z 0-9 . _ -",
                           path);
    memcpy(topic, t, n);
    topic[n] = 0;
    if (t[n] == '/') {
        char *end;
        errno = 0;
        long p = strtol(t + n + 1, &end, 10);
        if (errno || end == t + n + 1 || (*end && *end != '?') || p < 0 || p > INT32_MAX)
            return twn_err_set(err, "'%s': bad partition; expected kafka://topic/<partition>",
                               path);
        *partition = (int32_t)p;
    }
    return 0;
}

/* "kafka://t?format=proto" -> KAFKA_PROTO; no option -> KAFKA_JSON. */
static int kafka_format(const char *path, twn_kafka_format *fmt, twn_err *err) {
    const char *q = strchr(path, '?');
    *fmt = TWN_KAFKA_JSON;
    if (!q) return 0;
    if (!strcmp(q, "?format=json")) return 0;
    if (!strcmp(q, "?format=proto")) {
        *fmt = TWN_KAFKA_PROTO;
        return 0;
    }
    return twn_err_set(err, "'%s': unknown option '%s'; expected ?format=json or ?format=proto",
                       path, q + 1);
}

static char *kafka_unit_path(const char *topic, int32_t partition) {
    size_t n = strlen(topic) + 24;
    char *p = twn_malloc(n);
    snprintf(p, n, "kafka://%s/%d", topic, (int)partition);
    return p;
}

// ------------------------------------------------------------------------------------------------
// Planning

static void push_unit(twn_src_units *l, const twn_src_unit *u) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 16;
        l->v = twn_realloc(l->v, l->cap * sizeof *l->v);
    }
    l->v[l->n++] = *u;
}

static int cmp_kafka_order(const void *a, const void *b) {
    /* sorted by (rank within its partition, partition); the rank is kept in `id` meanwhile */
    const twn_kafka_unit *x = a, *y = b;
    if (x->id != y->id) return x->id < y->id ? -1 : 1;
    return (x->partition > y->partition) - (x->partition < y->partition);
}

/* A kafka:// input of a plan: its topic (topic[256]), record format and the process's handle. */
static int kafka_input(twn_srcio *io, const char *input, char *topic, twn_kafka_format *fmt,
                       twn_kafka **k, twn_err *err) {
    int32_t part;
    if (twn_srcio_kafka_path(input, topic, 256, &part, err) || kafka_format(input, fmt, err))
        return -1;
    if (part >= 0)
        return twn_err_set(err, "'%s': an input names a whole topic; expected kafka://%s", input,
                           topic);
    return twn_srcio_kafka(io, k, err);
}

static int plan_kafka(twn_srcio *io, const char *input, uint64_t unit_items, twn_src_units *out,
                      size_t *n_kafka, twn_err *err) {
    char topic[256];
    twn_kafka_format fmt;
    twn_kafka *k;
    if (kafka_input(io, input, topic, &fmt, &k, err)) return -1;
    twn_kafka_units ku = {0};
    if (twn_kafka_plan_units(k, topic, fmt, unit_items, io->cfg.kafka.group != NULL, &ku, err)) {
        twn_kafka_units_free(&ku);
        return -1;
    }
    /* rank within the partition (units of a partition come in offset order) */
    for (size_t i = 0; i < ku.n; i++)
        ku.v[i].id = i && ku.v[i - 1].partition == ku.v[i].partition ? ku.v[i - 1].id + 1 : 0;
    if (ku.n) qsort(ku.v, ku.n, sizeof *ku.v, cmp_kafka_order);
    uint64_t next_id = out->n ? out->v[out->n - 1].id + 1 : 0;
    for (size_t i = 0; i < ku.n; i++) {
        const twn_kafka_unit *x = &ku.v[i];
        twn_src_unit u = {.id = next_id++,
                          .format = (twn_src_format)x->format,
                          .path = kafka_unit_path(topic, x->partition),
                          .start = (uint64_t)x->start,
                          .end = (uint64_t)x->end,
                          .first_index = (uint64_t)x->start,
                          .count = (uint64_t)(x->end - x->start)};
        push_unit(out, &u);
    }
    if (n_kafka) *n_kafka += ku.n;
    twn_kafka_units_free(&ku);
    return 0;
}

int twn_srcio_plan(twn_srcio *io, const char *const *inputs, size_t n, uint64_t unit_items,
                   twn_src_units *out, size_t *n_kafka, twn_err *err) {
    if (n_kafka) *n_kafka = 0;
    for (size_t i = 0; i < n; i++) {
        switch (twn_srcio_store_of(inputs[i])) {
        case TWN_STORE_S3: {
            twn_s3 *s;
            if (twn_srcio_s3(io, &s, err) ||
                twn_src_plan_s3_units(s, inputs[i], TWN_SRC_AUTO, unit_items, out, err))
                return -1;
            break;
        }
        case TWN_STORE_KAFKA:
            if (plan_kafka(io, inputs[i], unit_items, out, n_kafka, err)) return -1;
            break;
        case TWN_STORE_FILE:
            if (twn_src_plan_files(&inputs[i], 1, TWN_SRC_AUTO, unit_items, out, err)) return -1;
            break;
        }
    }
    return 0;
}

/* The newest unit of `path` in the plan (units of a partition are appended in offset order, so
 * the last one has the highest end), or NULL. */
static const twn_src_unit *last_unit_of(const twn_src_units *plan, const char *path) {
    for (size_t i = plan->n; i-- > 0;)
        if (!strcmp(plan->v[i].path, path)) return &plan->v[i];
    return NULL;
}

static int plan_kafka_more(twn_srcio *io, const char *input, uint64_t unit_items,
                           twn_src_units *plan, size_t max_new, size_t *n_new, int *truncated,
                           twn_err *err) {
    char topic[256];
    twn_kafka_format fmt;
    twn_kafka *k;
    if (kafka_input(io, input, topic, &fmt, &k, err)) return -1;
    twn_kafka_units ku = {0}, add = {0};
    if (twn_kafka_plan_units(k, topic, fmt, unit_items, io->cfg.kafka.group != NULL, &ku, err)) {
        twn_kafka_units_free(&ku);
        return -1;
    }
    /* per partition (ku: partitions ascending, offsets ascending): [from, high) where from is the
     * end of what the plan has for it, or where a first planning would start */
    for (size_t i = 0; i < ku.n;) {
        size_t j = i;
        while (j < ku.n && ku.v[j].partition == ku.v[i].partition) j++;
        int64_t from = ku.v[i].start, high = ku.v[j - 1].end;
        char *path = kafka_unit_path(topic, ku.v[i].partition);
        const twn_src_unit *last = last_unit_of(plan, path);
        twn_free(path);
        if (last) from = (int64_t)last->end;
        for (uint64_t rank = 0; from < high; rank++) {
            int64_t end = high - from > (int64_t)unit_items ? from + (int64_t)unit_items : high;
            if (add.n == add.cap) {
                add.cap = add.cap ? 2 * add.cap : 16;
                add.v = twn_realloc(add.v, add.cap * sizeof *add.v);
            }
            add.v[add.n++] = (twn_kafka_unit){.id = rank,
                                              .format = fmt,
                                              .partition = ku.v[i].partition,
                                              .start = from,
                                              .end = end};
            from = end;
        }
        i = j;
    }
    twn_kafka_units_free(&ku);
    if (add.n) qsort(add.v, add.n, sizeof *add.v, cmp_kafka_order);
    /* (rank, partition) order: a cut keeps a prefix of every partition's new units */
    if (add.n > max_new) {
        add.n = max_new;
        *truncated = 1;
    }
    uint64_t next_id = plan->n ? plan->v[plan->n - 1].id + 1 : 0;
    for (size_t i = 0; i < add.n; i++) {
        const twn_kafka_unit *x = &add.v[i];
        twn_src_unit u = {.id = next_id++,
                          .format = (twn_src_format)x->format,
                          .path = kafka_unit_path(topic, x->partition),
                          .start = (uint64_t)x->start,
                          .end = (uint64_t)x->end,
                          .first_index = (uint64_t)x->start,
                          .count = (uint64_t)(x->end - x->start)};
        push_unit(plan, &u);
    }
    *n_new += add.n;
    twn_free(add.v); /* topics were never set: nothing else to free */
    return 0;
}

int twn_srcio_plan_more(twn_srcio *io, const char *const *inputs, size_t n, uint64_t unit_items,
                        twn_src_units *plan, size_t *n_new, twn_err *err) {
    return twn_srcio_plan_more_max(io, inputs, n, unit_items, SIZE_MAX, plan, n_new, NULL, err);
}

int twn_srcio_plan_more_max(twn_srcio *io, const char *const *inputs, size_t n, uint64_t unit_items,
                            size_t max_new, twn_src_units *plan, size_t *n_new, int *truncated,
                            twn_err *err) {
    int cut = 0;
    *n_new = 0;
    if (truncated) *truncated = 0;
    if (!unit_items) return twn_err_set(err, "planning: unit size 0; expected at least 1 item");
    for (size_t i = 0; i < n; i++)
        if (twn_srcio_store_of(inputs[i]) == TWN_STORE_KAFKA &&
            plan_kafka_more(io, inputs[i], unit_items, plan, max_new - *n_new, n_new, &cut, err))
            return -1;
    if (truncated) *truncated = cut;
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Reading

struct twn_srcio_reader {
    twn_blob *b;
    twn_src_reader *r;
    twn_kafka_reader *kr;
    char *topic;
};

static int kafka_unit_of(const twn_src_unit *u, twn_kafka_unit *ku, char *topic, size_t cap,
                         twn_err *err) {
    int32_t part;
    if (twn_srcio_kafka_path(u->path, topic, cap, &part, err)) return -1;
    if (part < 0)
        return twn_err_set(err, "unit %llu: '%s' names no partition; expected kafka://topic/N",
                           (unsigned long long)u->id, u->path);
    if (u->format != TWN_SRC_KAFKA_JSON && u->format != TWN_SRC_KAFKA_PROTO)
        return twn_err_set(err, "unit %llu: '%s' has format %s; expected kafka-json or kafka-proto",
                           (unsigned long long)u->id, u->path, twn_src_format_name(u->format));
    if (u->end > (uint64_t)INT64_MAX || u->end < u->start)
        return twn_err_set(err, "unit %llu: '%s' has a bad offset range [%llu, %llu)",
                           (unsigned long long)u->id, u->path, (unsigned long long)u->start,
                           (unsigned long long)u->end);
    *ku = (twn_kafka_unit){.id = u->id,
                           .format = (twn_kafka_format)u->format,
                           .topic = topic,
                           .partition = part,
                           .start = (int64_t)u->start,
                           .end = (int64_t)u->end};
    return 0;
}

/* A blob for a file or an S3 object. */
static int open_blob(twn_srcio *io, const char *path, twn_blob **b, twn_err *err) {
    *b = NULL;
    if (twn_srcio_store_of(path) == TWN_STORE_FILE) return twn_blob_open_file(path, b, err);
    twn_s3 *s;
    if (twn_srcio_s3(io, &s, err)) return -1;
    return twn_blob_open_s3_uri(s, path, b, err);
}

int twn_srcio_reader_open(twn_srcio *io, const twn_src_unit *u, const twn_src_opts *o,
                          twn_srcio_reader **out, twn_err *err) {
    *out = NULL;
    twn_srcio_reader *r = twn_calloc(1, sizeof *r);
    if (twn_srcio_store_of(u->path) == TWN_STORE_KAFKA) {
        char topic[256];
        twn_kafka_unit ku;
        twn_kafka *k;
        if (kafka_unit_of(u, &ku, topic, sizeof topic, err) || twn_srcio_kafka(io, &k, err) ||
            twn_kafka_reader_open(k, &ku, o, &r->kr, err))
            goto fail;
    } else if (open_blob(io, u->path, &r->b, err) || twn_src_reader_open(r->b, u, o, &r->r, err)) {
        goto fail;
    }
    *out = r;
    return 0;
fail:
    twn_srcio_reader_close(r);
    return -1;
}

int twn_srcio_reader_open_blob(twn_blob *b, const twn_src_unit *u, const twn_src_opts *o,
                               twn_srcio_reader **out, twn_err *err) {
    *out = NULL;
    twn_srcio_reader *r = twn_calloc(1, sizeof *r);
    r->b = b;
    if (twn_src_reader_open(b, u, o, &r->r, err)) {
        twn_srcio_reader_close(r);
        return -1;
    }
    *out = r;
    return 0;
}

int twn_srcio_reader_next(twn_srcio_reader *r, twn_src_item *it, twn_err *err) {
    return r->kr ? twn_kafka_reader_next(r->kr, it, err) : twn_src_reader_next(r->r, it, err);
}

void twn_srcio_reader_close(twn_srcio_reader *r) {
    if (!r) return;
    if (r->kr) twn_kafka_reader_close(r->kr);
    if (r->r) twn_src_reader_close(r->r);
    twn_blob_close(r->b);
    twn_free(r);
}

/* Finds item r->item_index by reading its whole unit (a ref that lost its offsets). */
static int scan_unit(twn_srcio *io, const twn_src_unit *u, uint64_t index, const twn_src_opts *o,
                     twn_src_item *it, twn_err *err) {
    twn_srcio_reader *rd;
    if (twn_srcio_reader_open(io, u, o, &rd, err)) return -1;
    int got;
    while ((got = twn_srcio_reader_next(rd, it, err)) == 1 && it->index != index) {
    }
    twn_srcio_reader_close(rd);
    if (got == 1) return 0;
    if (got == 0)
        twn_err_set(err, "%s: item %llu not found in unit %llu", u->path, (unsigned long long)index,
                    (unsigned long long)u->id);
    return -1;
}

int twn_srcio_read_ref(twn_srcio *io, const Twn__ItemRef *r, const twn_src_opts *o,
                       twn_src_item *it, twn_err *err) {
    twn_src_item_clear(it);
    if (!r) return twn_err_set(err, "item ref is missing");
    twn_src_unit u;
    if (twn_srcio_unit_from_proto(r->unit_id, r->source, &u, err)) return -1;
    int rc = -1;
    if (!r->length) {
        rc = scan_unit(io, &u, r->item_index, o, it, err);
        goto out;
    }
    if (twn_srcio_store_of(u.path) == TWN_STORE_KAFKA) {
        char topic[256];
        twn_kafka_unit ku;
        twn_kafka *k;
        if (!kafka_unit_of(&u, &ku, topic, sizeof topic, err) && !twn_srcio_kafka(io, &k, err))
            rc = twn_kafka_read_ref(k, topic, ku.partition, (int64_t)r->offset, ku.format, o, it,
                                    err);
        goto out;
    }
    twn_blob *b = NULL;
    int keep = twn_srcio_store_of(u.path) == TWN_STORE_S3;
    if (keep && io->ref_blob && !strcmp(io->ref_blob->name, u.path)) {
        b = io->ref_blob;
    } else {
        if (open_blob(io, u.path, &b, err)) goto out;
        if (keep) {
            twn_blob_close(io->ref_blob);
            io->ref_blob = b;
        }
    }
    twn_src_ref ref = {.format = u.format,
                       .path = u.path,
                       .offset = r->offset,
                       .length = r->length,
                       .index = r->item_index,
                       .line = r->line};
    rc = twn_src_read_ref(b, &ref, o, it, err);
    if (!keep) twn_blob_close(b);
out:
    twn_free(u.path);
    return rc;
}

/* The local checks of twn_srcio_fetch_images (0, or -1 with its message). */
static int check_local(twn_srcio *io, const char *id, const twn_src_image *im, twn_err *err) {
    struct stat st;
    if (stat(im->path, &st))
        return twn_err_set(err, "item '%s': image '%s' cannot be read: %s", id, im->path,
                           strerror(errno));
    if (!S_ISREG(st.st_mode))
        return twn_err_set(err, "item '%s': image '%s' is not a regular file", id, im->path);
    /* the same limit as an s3:// image or a tar member: never loaded */
    if ((uint64_t)st.st_size > io->cfg.max_image_bytes)
        return twn_err_set(err,
                           "item '%s': image '%s' is %llu bytes; the limit is %zu "
                           "(limits.max_item_bytes)",
                           id, im->path, (unsigned long long)st.st_size, io->cfg.max_image_bytes);
    return 0;
}

int twn_srcio_fetch_images(twn_srcio *io, twn_src_item *it, twn_err *err) {
    for (size_t i = 0; i < it->n_images; i++) {
        twn_src_image *im = &it->images[i];
        if (im->data || !im->path) continue;
        const char *id = it->id ? it->id : "(no id)";
        if (twn_srcio_store_of(im->path) == TWN_STORE_S3) {
            twn_s3 *s;
            twn_s3_uri u;
            twn_err e;
            if (twn_srcio_s3(io, &s, &e))
                return twn_err_set(err, "item '%s': image '%s': %s", id, im->path, e.msg);
            if (twn_s3_uri_parse(im->path, &u, &e))
                return twn_err_set(err, "item '%s': image: %s", id, e.msg);
            int rc =
                twn_s3_get(s, u.bucket, u.key, io->cfg.max_image_bytes, &im->data, &im->size, &e);
            twn_s3_uri_free(&u);
            if (rc)
                return twn_err_set(err, "item '%s': image '%s' cannot be read: %s", id, im->path,
                                   e.msg);
            continue;
        }
        if (check_local(io, id, im, err)) return -1;
    }
    return 0;
}

/* One image of a batch (twn_srcio_fetch_begin): entries are in item order, then image order. */
typedef struct img_fetch {
    size_t item;
    twn_src_image *im;
    twn_prefetch_job *j; /* the GET under way (NULL: none) */
    int failed;
    twn_err err; /* the item's message when failed */
} img_fetch;

struct twn_srcio_fetch {
    twn_srcio *io;
    twn_src_item *items;
    size_t n;
    img_fetch *v;
    size_t nv;
};

static img_fetch *push_fetch(twn_srcio_fetch *f, size_t item, twn_src_image *im) {
    f->v = twn_realloc(f->v, (f->nv + 1) * sizeof *f->v);
    img_fetch *x = &f->v[f->nv++];
    memset(x, 0, sizeof *x);
    x->item = item;
    x->im = im;
    return x;
}

twn_srcio_fetch *twn_srcio_fetch_begin(twn_srcio *io, twn_src_item *items, size_t n) {
    twn_srcio_fetch *f = twn_calloc(1, sizeof *f);
    f->io = io;
    f->items = items;
    f->n = n;
    twn_prefetch *pool = io->cfg.pool;
    if (!pool) return f; /* one after the other, in _end */
    for (size_t i = 0; i < n; i++) {
        twn_src_item *it = &items[i];
        if (it->fault) continue;
        const char *id = it->id ? it->id : "(no id)";
        for (size_t k = 0; k < it->n_images; k++) {
            twn_src_image *im = &it->images[k];
            if (im->data || !im->path) continue;
            img_fetch *x = push_fetch(f, i, im);
            if (twn_srcio_store_of(im->path) == TWN_STORE_S3) {
                twn_s3 *s;
                twn_s3_uri u;
                twn_err e;
                /* the readers' clients come from the same config: opening ours names a bad one
                 * exactly as the one-by-one path does */
                if (twn_srcio_s3(io, &s, &e)) {
                    x->failed = 1;
                    twn_err_set(&x->err, "item '%s': image '%s': %s", id, im->path, e.msg);
                } else if (twn_s3_uri_parse(im->path, &u, &e)) {
                    x->failed = 1;
                    twn_err_set(&x->err, "item '%s': image: %s", id, e.msg);
                } else {
                    x->j = twn_prefetch_get(pool, u.bucket, u.key, io->cfg.max_image_bytes);
                    twn_s3_uri_free(&u);
                }
            } else {
                x->failed = check_local(io, id, im, &x->err) != 0;
            }
            if (x->failed) break; /* the images after it are never looked at (as one by one) */
        }
    }
    return f;
}

size_t twn_srcio_fetch_end(twn_srcio_fetch *f, twn_err *errs) {
    size_t bad = 0;
    for (size_t i = 0; i < f->n; i++) twn_err_clear(&errs[i]);
    if (!f->io->cfg.pool) {
        for (size_t i = 0; i < f->n; i++)
            if (!f->items[i].fault && twn_srcio_fetch_images(f->io, &f->items[i], &errs[i])) bad++;
        twn_free(f);
        return bad;
    }
    for (size_t k = 0; k < f->nv; k++) {
        img_fetch *x = &f->v[k];
        if (!x->j) continue;
        twn_err e;
        if (twn_prefetch_take_object(x->j, &x->im->data, &x->im->size, &e)) {
            const twn_src_item *it = &f->items[x->item];
            x->failed = 1;
            twn_err_set(&x->err, "item '%s': image '%s' cannot be read: %s",
                        it->id ? it->id : "(no id)", x->im->path, e.msg);
        }
        x->j = NULL;
    }
    for (size_t k = 0; k < f->nv; k++) { /* each item's first bad image */
        img_fetch *x = &f->v[k];
        if (x->failed && !errs[x->item].msg[0]) {
            errs[x->item] = x->err;
            bad++;
        }
    }
    twn_free(f->v);
    twn_free(f);
    return bad;
}

size_t twn_srcio_fetch_images_n(twn_srcio *io, twn_src_item *items, size_t n, twn_err *errs) {
    return twn_srcio_fetch_end(twn_srcio_fetch_begin(io, items, n), errs);
}

// ------------------------------------------------------------------------------------------------
// twn.proto

int twn_srcio_unit_to_proto(const twn_src_unit *u, Twn__SourceRef *s, twn_srcio_buf *buf,
                            twn_err *err) {
    switch (twn_srcio_store_of(u->path)) {
    case TWN_STORE_S3: {
        twn_s3_proto_buf pb;
        if (twn_src_s3_unit_to_proto(u, s, &pb, err)) return -1;
        memcpy(buf->bucket, pb.bucket, sizeof buf->bucket);
        s->bucket = buf->bucket;
        return 0;
    }
    case TWN_STORE_KAFKA: {
        twn_kafka_unit ku;
        if (kafka_unit_of(u, &ku, buf->topic, sizeof buf->topic, err)) return -1;
        twn_kafka_unit_to_proto(&ku, s);
        return 0;
    }
    case TWN_STORE_FILE:
        break;
    }
    twn_src_unit_to_proto(u, s);
    return 0;
}

int twn_srcio_unit_from_proto(uint64_t unit_id, const Twn__SourceRef *s, twn_src_unit *u,
                              twn_err *err) {
    memset(u, 0, sizeof *u);
    if (!s) return twn_err_set(err, "source ref is missing");
    if (s->store == TWN__STORE__STORE_S3) return twn_src_s3_unit_from_proto(unit_id, s, u, err);
    if (s->store != TWN__STORE__STORE_KAFKA) return twn_src_unit_from_proto(unit_id, s, u, err);
    twn_kafka_unit ku;
    if (twn_kafka_unit_from_proto(unit_id, s, &ku, err)) return -1;
    int rc = 0;
    if (!topic_ok(ku.topic, strlen(ku.topic))) {
        rc = twn_err_set(err, "Kafka source ref: '%s' is not a valid topic name", ku.topic);
    } else {
        u->id = unit_id;
        u->format = (twn_src_format)ku.format;
        u->path = kafka_unit_path(ku.topic, ku.partition);
        u->start = (uint64_t)ku.start;
        u->end = (uint64_t)ku.end;
        u->first_index = (uint64_t)ku.start;
        u->count = (uint64_t)(ku.end - ku.start);
    }
    twn_free(ku.topic);
    return rc;
}

int twn_srcio_ref_to_proto(const twn_src_unit *u, const twn_src_item *it, Twn__ItemRef *r,
                           Twn__SourceRef *s, twn_srcio_buf *buf, twn_err *err) {
    if (twn_srcio_unit_to_proto(u, s, buf, err)) return -1;
    twn__item_ref__init(r);
    r->unit_id = u->id;
    r->item_index = it->index;
    r->source = s;
    r->offset = it->offset;
    r->length = it->length;
    r->item_id = it->id ? it->id : (char *)"";
    r->line = it->line;
    return 0;
}
