/* jobconf.c — the table of job settings and the four layers that fill it (see jobconf.h).
 *
 * The table is the single source of truth: parsing, validation, the environment names, the
 * `twn config --defaults` listing and the `--check` printout are all driven by its rows, so a new
 * setting is one row plus one field in twn_conf.  Values are always parsed from text (a YAML
 * scalar, an environment value, a flag), so every layer validates exactly the same way and every
 * error carries the same shape: key, value, origin, what is allowed. */
#include "common/jobconf.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#include "common/transport.h"
#include "util/fileio.h"
#include "util/mem.h"
#include "util/vec.h"

// ------------------------------------------------------------------------------------------------
// Validators for string values

static int check_endpoint(const char *v) {
    return twn_endpoint_check(v, NULL);
}

static int check_mode(const char *v) {
    if (!strcmp(v, "adaptive") || !strcmp(v, "never") || !strcmp(v, "always")) return 0;
    if (strncmp(v, "budget=", 7)) return -1;
    char *end;
    double f = strtod(v + 7, &end);
    return end != v + 7 && !*end && f >= 0 && f <= 1 ? 0 : -1;
}

// ------------------------------------------------------------------------------------------------
// The table

#define OFF(f) offsetof(twn_conf, f)
#define BIG    9.2e18 /* "no upper bound" for INT rows */
#define STR(n, f, d, m)                                                                            \
    { n, TWN_CONF_STR, OFF(f), d, 0, 0, NULL, NULL, 0, m }
#define ENDPOINT(n, f, d, m)                                                                       \
    { n, TWN_CONF_STR, OFF(f), d, 0, 0, EP_ALLOWED, check_endpoint, 0, m }
#define SECRET(n, f, m)                                                                            \
    { n, TWN_CONF_STR, OFF(f), "", 0, 0, NULL, NULL, 1, m }
#define INT(n, f, d, lo, hi, m)                                                                    \
    { n, TWN_CONF_INT, OFF(f), d, lo, hi, NULL, NULL, 0, m }
#define BOOL(n, f, d, m)                                                                           \
    { n, TWN_CONF_BOOL, OFF(f), d, 0, 0, NULL, NULL, 0, m }
#define ENUM(n, f, d, allowed, m)                                                                  \
    { n, TWN_CONF_ENUM, OFF(f), d, 0, 0, allowed, NULL, 0, m }
#define EP_ALLOWED "an endpoint inproc://NAME, ipc://PATH (at most 106 bytes) or tcp://HOST:PORT"

static const twn_conf_key keys[] = {
    {"job.inputs", TWN_CONF_LIST, OFF(job.inputs), "", 0, 0, NULL, NULL, 0,
     "input sources in plan order: local JSONL / WebDataset .tar paths, s3://bucket/prefix, "
     "kafka://topic"},
    STR("job.out", job.out, "", "output directory: index shards, journal, dead letters"),
    STR("job.model", job.model, "",
        "TWN checkpoint (directory with twn.json); needed unless "
        "job.engine is null"),
    ENUM("job.engine", job.engine, "twn", "twn|null",
         "twn: the model; null: a deterministic stand-in without weights (tests, plumbing)"),
    ENUM("job.backend", job.backend, "cpu", "cpu|cuda|auto",
         "compute backend of the engine (auto: cuda when it can run here, else cpu)"),
    {"job.mode", TWN_CONF_STR, OFF(job.mode), "adaptive", 0, 0,
     "adaptive, never, always or budget=F (0 <= F <= 1)", check_mode, 0,
     "when to think: the gate decides, never, always, or for at most a fraction F of items"},
    INT("job.dim", job.dim, "64", 1, 65536,
        "embedding dimension of the null engine (a model brings its own)"),
    INT("job.null_item_us", job.null_item_us, "0", 0, 1e7,
        "null engine only: microseconds each item pretends to take in a gate or reasoning pass "
        "(paces a plumbing test or a benchmark like a real engine)"),
    INT("job.shards", job.shards, "1", 1, 65536,
        "index shards S; an item goes to shard hash64(id) mod S"),
    INT("job.unit_items", job.unit_items, "256", 1, 1e9,
        "items per work unit (the unit of leasing, retry and journaling)"),
    STR("job.factory", job.factory, "Flat", "FAISS index factory string (Flat, IVF1024,PQ32, ...)"),
    STR("job.dead_letter", job.dead_letter, "{job.out}/dead_letter.jsonl",
        "JSONL file the coordinator appends rejected items to (ref + reason)"),

    ENDPOINT("coordinator.listen", coordinator.listen, "tcp://127.0.0.1:7600",
             "ROUTER endpoint the coordinator binds (twn run always uses inproc://twn-control)"),
    ENDPOINT("coordinator.connect", coordinator.connect, "{coordinator.listen}",
             "where gates, workers and indexers reach the coordinator (a tcp:// wildcard host "
             "becomes 127.0.0.1)"),
    STR("coordinator.journal", coordinator.journal, "{job.out}/journal",
        "the coordinator's journal: plan, leases, finished units (restart state)"),
    INT("coordinator.heartbeat_ms", coordinator.heartbeat_ms, "1000", 1, 3.6e6,
        "heartbeat interval peers are told to keep"),
    INT("coordinator.missed_beats", coordinator.missed_beats, "5", 1, 1000,
        "a peer silent for this many intervals is dead and its leases go back to the queue"),
    INT("coordinator.hard_batch", coordinator.hard_batch, "64", 1, 65536,
        "hard items per reasoning lease"),
    INT("coordinator.lease_ms", coordinator.lease_ms, "30000", 1, 8.64e7,
        "deadline of a unit or reasoning lease; heartbeats extend it"),
    INT("coordinator.ack_timeout_ms", coordinator.ack_timeout_ms, "60000", 1, 8.64e7,
        "after a gate or worker finished a lease, how long the shards' acks may take before the "
        "work is leased again (what a killed indexer had not made durable is redone then)"),
    INT("coordinator.stall_ms", coordinator.stall_ms, "300000", 0, 8.64e7,
        "a lease whose progress (listed in its holder's heartbeats) stands still this long is "
        "leased again although the holder is alive (a hung engine call); longer than the slowest "
        "gate or reasoning batch; 0 = never"),
    INT("coordinator.connect_timeout_ms", coordinator.connect_timeout_ms, "60000", 0, 8.64e7,
        "a gate, worker or indexer not welcomed by the coordinator within this exits with status "
        "1 (job over or coordinator unreachable); 0 = wait forever"),
    INT("coordinator.journal_compact_bytes", coordinator.journal_compact_bytes, "4194304", 0,
        1099511627776,
        "streaming: the journal is rewritten without the records of released "
        "units once it is this large and twice its size after the last rewrite; 0 = never"),

    INT("gate.count", gate.count, "1", 1, 1024, "gate service threads in twn run"),
    INT("gate.credits", gate.credits, "2", 1, 1024,
        "units one gate holds at once; a gate pass is filled across them, so keep it >= "
        "gate.batch / job.unit_items + 1"),
    INT("gate.batch", gate.batch, "32", 1, 65536, "items per gate pass"),
    INT("worker.count", worker.count, "1", 1, 1024, "reasoning worker threads in twn run"),
    INT("worker.credits", worker.credits, "2", 1, 1024, "hard batches one worker holds at once"),
    INT("worker.batch", worker.batch, "32", 1, 65536, "items per reasoning call"),

    {"indexer.endpoints", TWN_CONF_LIST, OFF(indexer.endpoints), "{tcp://127.0.0.1:7601+s}", 0, 0,
     EP_ALLOWED, check_endpoint, 0,
     "one PULL endpoint per shard: bound by that shard's indexer, sent to gates and workers"},
    INT("indexer.shard", indexer.shard, "0", 0, 65535, "the shard a twn indexer process serves"),
    ENDPOINT("indexer.listen", indexer.listen, "{indexer.endpoints[indexer.shard]}",
             "where a twn indexer process's PULL binds, when that differs from the endpoint the "
             "others reach (behind a DNS name: tcp://0.0.0.0:7601; ZeroMQ binds addresses and "
             "interface names, not host names)"),
    STR("indexer.dir", indexer.dir, "{job.out}/shard-NNNNN",
        "directory of the shard a twn indexer process serves (NNNNN = indexer.shard)"),
    INT("indexer.commit_ms", indexer.commit_ms, "5", 1, 60000,
        "group commit interval: WAL fsync, then acks to the coordinator"),
    INT("indexer.credits", indexer.credits, "8", 1, 65536,
        "embedding batches queued per sender and shard, on each side (ZMQ HWM flow control)"),

    STR("metrics.listen", metrics.listen, "127.0.0.1:0",
        "host:port of the HTTP server for /metrics (and the coordinator's status page); port 0 "
        "picks a free one (logged); no host = 127.0.0.1; empty = off"),
    INT("metrics.linger_ms", metrics.linger_ms, "0", 0, 3600000,
        "keep /metrics and the status page up this long after the job ends (a last scrape)"),

    ENUM("log.format", log.format, "plain", "plain|json", "log lines on stderr"),
    ENUM("log.level", log.level, "info", "debug|info|warn|error", "least severe level logged"),
    ENUM("log.progress", log.progress, "auto", "auto|bar|lines|off",
         "progress display: auto = a bar on a TTY, lines otherwise"),

    BOOL("security.curve", security.curve, "false",
         "encrypt and authenticate tcp:// sockets with CurveZMQ"),
    STR("security.server_secret_key_file", security.server_secret_key_file, "",
        "CURVE secret key of the binding side (coordinator, indexers)"),
    STR("security.server_public_key_file", security.server_public_key_file, "",
        "CURVE public key of the binding side, for clients"),
    STR("security.client_secret_key_file", security.client_secret_key_file, "",
        "CURVE secret key of a connecting process"),
    STR("security.client_public_key_file", security.client_public_key_file, "",
        "CURVE public key of a connecting process"),
    STR("security.allowed_clients_file", security.allowed_clients_file, "",
        "client public keys (Z85) allowed to connect, one per line; required on servers "
        "(coordinator, indexers) when security.curve is on"),

    INT("limits.max_message_bytes", limits.max_message_bytes, "67108864", 1024, 2147483647,
        "largest message sent or accepted on any socket, uncompressed"),
    INT("limits.max_item_bytes", limits.max_item_bytes, "67108864", 1, 2147483647,
        "a larger JSONL line or tar member is dead-lettered, never loaded"),
    ENUM("limits.compress", limits.compress, "auto", "auto|always|never",
         "zstd on messages of 4 KiB and more; auto: only over tcp:// (inproc:// and ipc:// "
         "gain nothing from it)"),

    STR("s3.endpoint", s3.endpoint, "",
        "S3-compatible endpoint URL; empty: $AWS_ENDPOINT_URL or AWS"),
    STR("s3.region", s3.region, "", "empty: $AWS_REGION, $AWS_DEFAULT_REGION or us-east-1"),
    ENUM(
        "s3.path_style", s3.path_style, "auto", "auto|true|false",
        "bucket in the path (true) or in the host name (false); auto: path style with an endpoint"),
    INT("s3.readers", s3.readers, "8", 1, 256,
        "S3 readers per gate or worker process: units leased behind the current one are fetched "
        "ahead by this many threads, each with its own connection; the same threads fetch the "
        "s3:// images items name, a batch at once (1 = neither; threads start when first needed)"),
    SECRET("s3.access_key_id", s3.access_key_id, "empty: $AWS_ACCESS_KEY_ID"),
    SECRET("s3.secret_access_key", s3.secret_access_key, "empty: $AWS_SECRET_ACCESS_KEY"),
    SECRET("s3.session_token", s3.session_token, "empty: $AWS_SESSION_TOKEN"),

    STR("kafka.brokers", kafka.brokers, "", "bootstrap servers, host:port[,host:port...]"),
    STR("kafka.group", kafka.group, "twn", "consumer group whose offsets the coordinator commits"),
    {"kafka.properties", TWN_CONF_MAP, OFF(kafka.properties), "", 0, 0, NULL, NULL, 0,
     "more librdkafka settings, passed through (security.protocol, sasl.*, ...)"},
    STR("kafka.output_topic", kafka.output_topic, "",
        "topic each indexer produces every vector it made durable to (key = item id, value = "
        "twn.EmbeddingRecord; at least once); empty: off"),
    INT("kafka.max_inline_image_bytes", kafka.max_inline_image_bytes, "1048576", 1, 2147483647,
        "decoded size limit of an image carried inside a Kafka message"),
    BOOL("kafka.streaming", kafka.streaming, "false",
         "keep consuming new messages instead of stopping at the end offsets seen at start: the "
         "coordinator plans new offsets every 0.5 s and runs until SIGTERM/SIGINT, then drains its "
         "leases and commits what is durable (needs a kafka:// input)"),
    INT("kafka.stream_max_units", kafka.stream_max_units, "1024", 1, 1073741824,
        "streaming: most units the coordinator holds (planned, not yet done and committed); it "
        "plans no further ahead, so its memory stays bounded however long the stream"),
};

#define NKEYS (sizeof keys / sizeof *keys)

const char *const twn_conf_aliases[][2] = {
    {"model", "job.model"},
    {"input", "job.inputs"},
    {"out", "job.out"},
    {"shards", "job.shards"},
    {"mode", "job.mode"},
    {"factory", "job.factory"},
    {"unit-items", "job.unit_items"},
    {"gates", "gate.count"},
    {"workers", "worker.count"},
    {"engine", "job.engine"},
    {"dim", "job.dim"},
    {"backend", "job.backend"},
    {"shard", "indexer.shard"},
    {NULL, NULL},
};

size_t twn_conf_nkeys(void) {
    return NKEYS;
}
const twn_conf_key *twn_conf_key_at(size_t i) {
    return i < NKEYS ? &keys[i] : NULL;
}

const twn_conf_key *twn_conf_find(const char *name) {
    for (size_t i = 0; i < NKEYS; i++)
        if (!strcmp(keys[i].name, name)) return &keys[i];
    return NULL;
}

static size_t key_index(const twn_conf_key *k) {
    return (size_t)(k - keys);
}
static void *slot(twn_conf *c, const twn_conf_key *k) {
    return (char *)c + k->offset;
}
static const void *cslot(const twn_conf *c, const twn_conf_key *k) {
    return (const char *)c + k->offset;
}

// ------------------------------------------------------------------------------------------------
// "did you mean"

static size_t edit_distance(const char *a, const char *b) {
    size_t na = strlen(a), nb = strlen(b);
    if (na > 80 || nb > 80) return 1000;
    size_t d[81][81];
    for (size_t i = 0; i <= na; i++) d[i][0] = i;
    for (size_t j = 0; j <= nb; j++) d[0][j] = j;
    for (size_t i = 1; i <= na; i++)
        for (size_t j = 1; j <= nb; j++) {
            size_t s = d[i - 1][j - 1] + (a[i - 1] != b[j - 1]);
            if (d[i - 1][j] + 1 < s) s = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < s) s = d[i][j - 1] + 1;
            d[i][j] = s;
        }
    return d[na][nb];
}

/* The key (or, for flags, alias) closest to `name`, or NULL when none is close.  A name compared
 * with a key's last component too, so `shards` finds `job.shards`. */
static const char *suggest(const char *name, int flags) {
    const char *best = NULL;
    size_t bd = 1000;
    for (size_t i = 0; i < NKEYS; i++) {
        const char *leaf = strrchr(keys[i].name, '.');
        size_t d = edit_distance(name, keys[i].name);
        size_t dl = leaf ? edit_distance(name, leaf + 1) : 1000;
        if (dl < d) d = dl;
        if (d < bd) bd = d, best = keys[i].name;
    }
    for (size_t i = 0; flags && twn_conf_aliases[i][0]; i++) {
        size_t d = edit_distance(name, twn_conf_aliases[i][0]);
        if (d < bd) bd = d, best = twn_conf_aliases[i][0];
    }
    size_t n = strlen(name), limit = n / 3 > 2 ? n / 3 : 2;
    return bd <= limit ? best : NULL;
}

static int unknown_key(twn_err *err, const char *name, const char *origin) {
    const char *s = suggest(name, 0);
    if (s)
        return twn_err_set(err, "config: unknown key \"%s\" (%s); did you mean \"%s\"?", name,
                           origin, s);
    return twn_err_set(err, "config: unknown key \"%s\" (%s); `twn config --defaults` lists them",
                       name, origin);
}

// ------------------------------------------------------------------------------------------------
// Values from text

/* What a key accepts, in words ("an integer 1..65536"). */
static void expected(const twn_conf_key *k, char *buf, size_t n) {
    switch (k->type) {
    case TWN_CONF_INT:
        if (k->max >= BIG)
            snprintf(buf, n, "an integer >= %.0f", k->min);
        else
            snprintf(buf, n, "an integer %.0f..%.0f", k->min, k->max);
        break;
    case TWN_CONF_FLOAT:
        snprintf(buf, n, "a number %g..%g", k->min, k->max);
        break;
    case TWN_CONF_BOOL:
        snprintf(buf, n, "true or false");
        break;
    case TWN_CONF_ENUM: {
        size_t o = (size_t)snprintf(buf, n, "one of ");
        for (const char *p = k->allowed; *p && o + 3 < n; p++) {
            if (*p == '|') {
                buf[o++] = ',';
                buf[o++] = ' ';
            } else
                buf[o++] = *p;
        }
        buf[o] = 0;
        break;
    }
    case TWN_CONF_MAP:
        snprintf(buf, n, "a map of name: value");
        break;
    case TWN_CONF_LIST:
        snprintf(buf, n, "%s", k->allowed ? k->allowed : "a list of strings");
        break;
    default:
        snprintf(buf, n, "%s", k->allowed ? k->allowed : "a string");
    }
}

static int bad_value(twn_err *err, const twn_conf_key *k, const char *value, const char *origin) {
    char ex[256];
    expected(k, ex, sizeof ex);
    return twn_err_set(err, "config: %s = \"%.200s\" (%s): expected %s", k->name, value, origin,
                       ex);
}

static void set_origin(twn_conf *c, const twn_conf_key *k, const char *origin) {
    char **o = &c->origin[key_index(k)];
    twn_free(*o);
    *o = twn_strdup(origin);
}

static void list_clear(twn_conf_list *l) {
    for (size_t i = 0; i < l->n; i++) twn_free(l->v[i]);
    twn_free(l->v);
    l->v = NULL;
    l->n = 0;
}

static void list_push(twn_conf_list *l, const char *s) {
    l->v = twn_realloc(l->v, (l->n + 1) * sizeof *l->v);
    l->v[l->n++] = twn_strdup(s);
}

static void map_clear(twn_conf_map *m) {
    for (size_t i = 0; i < m->n; i++) {
        twn_free(m->keys[i]);
        twn_free(m->vals[i]);
    }
    twn_free(m->keys);
    twn_free(m->vals);
    m->keys = m->vals = NULL;
    m->n = 0;
}

static void map_put(twn_conf_map *m, const char *k, size_t kn, const char *v) {
    for (size_t i = 0; i < m->n; i++)
        if (strlen(m->keys[i]) == kn && !memcmp(m->keys[i], k, kn)) {
            twn_free(m->vals[i]);
            m->vals[i] = twn_strdup(v);
            return;
        }
    m->keys = twn_realloc(m->keys, (m->n + 1) * sizeof *m->keys);
    m->vals = twn_realloc(m->vals, (m->n + 1) * sizeof *m->vals);
    m->keys[m->n] = twn_strndup(k, kn);
    m->vals[m->n++] = twn_strdup(v);
}

/* One scalar into a non-container slot. */
static int set_scalar(twn_conf *c, const twn_conf_key *k, const char *v, const char *origin,
                      twn_err *err) {
    void *p = slot(c, k);
    switch (k->type) {
    case TWN_CONF_STR:
    case TWN_CONF_ENUM:
        if (k->type == TWN_CONF_ENUM) {
            size_t n = strlen(v);
            const char *a = k->allowed;
            int ok = 0;
            while (*a && !ok) {
                const char *e = strchr(a, '|');
                size_t an = e ? (size_t)(e - a) : strlen(a);
                ok = an == n && n && !memcmp(a, v, n);
                a += an + (e != NULL);
            }
            if (!ok) return bad_value(err, k, v, origin);
        } else if (k->check && *v && k->check(v))
            return bad_value(err, k, v, origin);
        twn_free(*(char **)p);
        *(char **)p = twn_strdup(v);
        break;
    case TWN_CONF_INT: {
        char *end;
        errno = 0;
        long long x = strtoll(v, &end, 10);
        if (!*v || isspace((unsigned char)*v) || *end || errno || (double)x < k->min ||
            (double)x > k->max)
            return bad_value(err, k, v, origin);
        *(int64_t *)p = x;
        break;
    }
    case TWN_CONF_FLOAT: {
        char *end;
        double x = strtod(v, &end);
        if (!*v || isspace((unsigned char)*v) || *end || !isfinite(x) || x < k->min || x > k->max)
            return bad_value(err, k, v, origin);
        *(double *)p = x;
        break;
    }
    case TWN_CONF_BOOL: {
        static const char *yes[] = {"true", "yes", "on", "1"}, *no[] = {"false", "no", "off", "0"};
        int r = -1;
        for (int i = 0; i < 4; i++) {
            if (!strcasecmp(v, yes[i])) r = 1;
            if (!strcasecmp(v, no[i])) r = 0;
        }
        if (r < 0) return bad_value(err, k, v, origin);
        *(int *)p = r;
        break;
    }
    default:
        return twn_err_set(err, "config: %s: not a scalar key", k->name);
    }
    set_origin(c, k, origin);
    return 0;
}

static int list_append(twn_conf *c, const twn_conf_key *k, const char *item, const char *origin,
                       twn_err *err) {
    if (k->check && k->check(item)) return bad_value(err, k, item, origin);
    list_push(slot(c, k), item);
    set_origin(c, k, origin);
    return 0;
}

/* "k=v[,k=v...]" merged into a map. */
static int map_merge(twn_conf *c, const twn_conf_key *k, const char *text, const char *origin,
                     twn_err *err) {
    twn_conf_map *m = slot(c, k);
    const char *p = text;
    while (*p) {
        const char *e = strchr(p, ','), *end = e ? e : p + strlen(p);
        const char *eq = memchr(p, '=', (size_t)(end - p));
        if (!eq || eq == p)
            return twn_err_set(err,
                               "config: %s = \"%.200s\" (%s): expected name=value pairs "
                               "separated by commas",
                               k->name, text, origin);
        char *val = twn_strndup(eq + 1, (size_t)(end - eq - 1));
        map_put(m, p, (size_t)(eq - p), val);
        twn_free(val);
        p = e ? e + 1 : end;
    }
    set_origin(c, k, origin);
    return 0;
}

/* A whole value from text, replacing (append = 0) or adding to (append = 1) a list / map. */
static int set_text(twn_conf *c, const twn_conf_key *k, const char *value, const char *origin,
                    int append, twn_err *err) {
    if (k->type == TWN_CONF_LIST) {
        if (append) return list_append(c, k, value, origin, err);
        list_clear(slot(c, k));
        set_origin(c, k, origin);
        const char *p = value;
        while (*p) {
            const char *e = strchr(p, ',');
            char *item = e ? twn_strndup(p, (size_t)(e - p)) : twn_strdup(p);
            int rc = *item ? list_append(c, k, item, origin, err) : 0;
            twn_free(item);
            if (rc) return -1;
            p = e ? e + 1 : p + strlen(p);
        }
        return 0;
    }
    if (k->type == TWN_CONF_MAP) {
        if (!append) map_clear(slot(c, k));
        return map_merge(c, k, value, origin, err);
    }
    return set_scalar(c, k, value, origin, err);
}

int twn_conf_set(twn_conf *c, const char *name, const char *value, const char *origin, int append,
                 twn_err *err) {
    const twn_conf_key *k = twn_conf_find(name);
    if (!k) return unknown_key(err, name, origin);
    return set_text(c, k, value, origin, append, err);
}

// ------------------------------------------------------------------------------------------------
// Init / free

void twn_conf_init(twn_conf *c) {
    memset(c, 0, sizeof *c);
    c->origin = twn_calloc(NKEYS, sizeof *c->origin);
    for (size_t i = 0; i < NKEYS; i++) {
        const twn_conf_key *k = &keys[i];
        const char *d = k->def[0] == '{' ? "" : k->def; /* derived: resolved later */
        if (k->type == TWN_CONF_STR || k->type == TWN_CONF_ENUM)
            *(char **)slot(c, k) = twn_strdup(d);
        else if (k->type != TWN_CONF_LIST && k->type != TWN_CONF_MAP) {
            twn_err e;
            if (set_scalar(c, k, d, "default", &e)) abort(); /* a broken table row */
        }
        set_origin(c, k, "default");
    }
}

void twn_conf_free(twn_conf *c) {
    if (!c->origin) return;
    for (size_t i = 0; i < NKEYS; i++) {
        const twn_conf_key *k = &keys[i];
        if (k->type == TWN_CONF_STR || k->type == TWN_CONF_ENUM)
            twn_free(*(char **)slot(c, k));
        else if (k->type == TWN_CONF_LIST)
            list_clear(slot(c, k));
        else if (k->type == TWN_CONF_MAP)
            map_clear(slot(c, k));
        twn_free(c->origin[i]);
    }
    twn_free(c->origin);
    memset(c, 0, sizeof *c);
}

// ------------------------------------------------------------------------------------------------
// Layer 2: YAML

static const char *yaml_kind(const yaml_node_t *n) {
    return n->type == YAML_MAPPING_NODE    ? "a map"
           : n->type == YAML_SEQUENCE_NODE ? "a list"
                                           : "a scalar";
}

static int is_section(const char *prefix) {
    size_t n = strlen(prefix);
    for (size_t i = 0; i < NKEYS; i++)
        if (!strncmp(keys[i].name, prefix, n) && keys[i].name[n] == '.') return 1;
    return 0;
}

static int is_null_scalar(const yaml_node_t *n) {
    const char *v = (const char *)n->data.scalar.value;
    return n->data.scalar.style == YAML_PLAIN_SCALAR_STYLE &&
           (!*v || !strcmp(v, "~") || !strcmp(v, "null") || !strcmp(v, "Null") ||
            !strcmp(v, "NULL"));
}

typedef struct yctx {
    twn_conf *c;
    yaml_document_t *doc;
    const char *name;
    twn_err *err;
} yctx;

static int wrong_type(yctx *y, const twn_conf_key *k, const yaml_node_t *v, const char *origin) {
    char ex[256];
    if (k->type == TWN_CONF_LIST)
        snprintf(ex, sizeof ex, "a list");
    else
        expected(k, ex, sizeof ex);
    return twn_err_set(y->err, "config: %s (%s): expected %s, got %s", k->name, origin, ex,
                       yaml_kind(v));
}

static int yaml_value(yctx *y, const char *full, const yaml_node_t *kn, const yaml_node_t *v,
                      int depth);

static int yaml_map(yctx *y, const char *prefix, const yaml_node_t *m, int depth) {
    if (depth > 8) return twn_err_set(y->err, "config: %s: maps nested too deep", y->name);
    for (yaml_node_pair_t *p = m->data.mapping.pairs.start; p < m->data.mapping.pairs.top; p++) {
        yaml_node_t *kn = yaml_document_get_node(y->doc, p->key);
        yaml_node_t *vn = yaml_document_get_node(y->doc, p->value);
        if (!kn || !vn) return twn_err_set(y->err, "config: %s: broken YAML document", y->name);
        if (kn->type != YAML_SCALAR_NODE)
            return twn_err_set(y->err, "config: %s line %zu: a key must be a plain name, not %s",
                               y->name, kn->start_mark.line + 1, yaml_kind(kn));
        twn_str full = {0};
        if (*prefix) twn_str_printf(&full, "%s.", prefix);
        twn_str_puts(&full, (const char *)kn->data.scalar.value);
        int rc = yaml_value(y, full.v, kn, vn, depth);
        twn_str_free(&full);
        if (rc) return -1;
    }
    return 0;
}

static int yaml_value(yctx *y, const char *full, const yaml_node_t *kn, const yaml_node_t *v,
                      int depth) {
    char origin[512];
    snprintf(origin, sizeof origin, "from %s line %zu", y->name, v->start_mark.line + 1);
    const twn_conf_key *k = twn_conf_find(full);
    if (!k) {
        if (is_section(full)) {
            if (v->type == YAML_MAPPING_NODE) return yaml_map(y, full, v, depth + 1);
            if (v->type == YAML_SCALAR_NODE && is_null_scalar(v)) return 0; /* `job:` alone */
            return twn_err_set(y->err, "config: %s (%s): expected a map of %s.* keys, got %s", full,
                               origin, full, yaml_kind(v));
        }
        /* an unknown section: report its first key, which can suggest the real section */
        if (v->type == YAML_MAPPING_NODE && v->data.mapping.pairs.top > v->data.mapping.pairs.start)
            return yaml_map(y, full, v, depth + 1);
        char ko[512];
        snprintf(ko, sizeof ko, "from %s line %zu", y->name, kn->start_mark.line + 1);
        return unknown_key(y->err, full, ko);
    }
    if (k->type == TWN_CONF_LIST) {
        if (v->type == YAML_MAPPING_NODE) return wrong_type(y, k, v, origin);
        list_clear(slot(y->c, k));
        set_origin(y->c, k, origin);
        if (v->type == YAML_SCALAR_NODE) /* one item; null = empty */
            return is_null_scalar(v)
                       ? 0
                       : list_append(y->c, k, (const char *)v->data.scalar.value, origin, y->err);
        for (yaml_node_item_t *i = v->data.sequence.items.start; i < v->data.sequence.items.top;
             i++) {
            yaml_node_t *in = yaml_document_get_node(y->doc, *i);
            if (!in || in->type != YAML_SCALAR_NODE)
                return twn_err_set(y->err, "config: %s (%s): list items must be strings, got %s",
                                   k->name, origin, in ? yaml_kind(in) : "nothing");
            if (list_append(y->c, k, (const char *)in->data.scalar.value, origin, y->err))
                return -1;
        }
        return 0;
    }
    if (k->type == TWN_CONF_MAP) {
        if (v->type == YAML_SCALAR_NODE && is_null_scalar(v)) {
            map_clear(slot(y->c, k));
            set_origin(y->c, k, origin);
            return 0;
        }
        if (v->type != YAML_MAPPING_NODE) return wrong_type(y, k, v, origin);
        twn_conf_map *m = slot(y->c, k);
        map_clear(m);
        for (yaml_node_pair_t *p = v->data.mapping.pairs.start; p < v->data.mapping.pairs.top;
             p++) {
            yaml_node_t *a = yaml_document_get_node(y->doc, p->key);
            yaml_node_t *b = yaml_document_get_node(y->doc, p->value);
            if (!a || !b || a->type != YAML_SCALAR_NODE || b->type != YAML_SCALAR_NODE)
                return twn_err_set(y->err, "config: %s (%s): expected a map of name: value strings",
                                   k->name, origin);
            const char *ks = (const char *)a->data.scalar.value;
            map_put(m, ks, strlen(ks), (const char *)b->data.scalar.value);
        }
        set_origin(y->c, k, origin);
        return 0;
    }
    if (v->type != YAML_SCALAR_NODE) return wrong_type(y, k, v, origin);
    /* `engine: null` names the null engine; for other keys a YAML null is the empty value */
    const char *text =
        is_null_scalar(v) && k->type != TWN_CONF_ENUM ? "" : (const char *)v->data.scalar.value;
    return set_scalar(y->c, k, text, origin, y->err);
}

/* libyaml's own words, with the line of the problem and of the construct it was inside. */
static void syntax_error(const yaml_parser_t *p, const char *name, twn_err *err) {
    if (p->context)
        twn_err_set(err, "config: %s line %zu: %s %s (line %zu)", name, p->problem_mark.line + 1,
                    p->problem ? p->problem : "error", p->context, p->context_mark.line + 1);
    else
        twn_err_set(err, "config: %s line %zu: %s", name, p->problem_mark.line + 1,
                    p->problem ? p->problem : "YAML error");
}

int twn_conf_load_yaml(twn_conf *c, const char *text, size_t len, const char *name, twn_err *err) {
    yaml_parser_t parser;
    yaml_document_t doc;
    if (!yaml_parser_initialize(&parser))
        return twn_err_set(err, "config: %s: cannot initialise the YAML parser", name);
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);
    int rc = -1;
    if (!yaml_parser_load(&parser, &doc)) {
        syntax_error(&parser, name, err);
        yaml_parser_delete(&parser);
        return -1;
    }
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    yctx y = {c, &doc, name, err};
    yaml_document_t more;
    if (yaml_parser_load(&parser, &more)) { /* a second document would be silently ignored */
        yaml_node_t *r2 = yaml_document_get_root_node(&more);
        size_t line = r2 ? r2->start_mark.line + 1 : 0;
        yaml_document_delete(&more);
        if (r2) {
            twn_err_set(err, "config: %s line %zu: a second YAML document; put every key in one",
                        name, line);
            goto out;
        }
    } else {
        syntax_error(&parser, name, err);
        goto out;
    }
    if (!root || (root->type == YAML_SCALAR_NODE && is_null_scalar(root)))
        rc = 0; /* an empty file */
    else if (root->type != YAML_MAPPING_NODE)
        twn_err_set(err, "config: %s line %zu: expected a map of keys at the top, got %s", name,
                    root->start_mark.line + 1, yaml_kind(root));
    else
        rc = yaml_map(&y, "", root, 0);
out:
    yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
    return rc;
}

int twn_conf_load_file(twn_conf *c, const char *path, twn_err *err) {
    char *text;
    size_t len;
    if (twn_read_file(path, 16u << 20, &text, &len, err))
        return twn_err_wrap(err, "config: cannot read %s: ", path);
    int rc = twn_conf_load_yaml(c, text, len, path, err);
    twn_free(text);
    return rc;
}

// ------------------------------------------------------------------------------------------------
// Layer 3: environment

static void env_name(const twn_conf_key *k, char *buf, size_t n) {
    size_t o = (size_t)snprintf(buf, n, "TWN_");
    for (const char *p = k->name; *p && o + 1 < n; p++)
        buf[o++] = *p == '.' ? '_' : (char)toupper((unsigned char)*p);
    buf[o] = 0;
}

int twn_conf_load_env(twn_conf *c, const char *const *env, twn_err *err) {
    for (size_t i = 0; env && i < NKEYS; i++) {
        char name[128], origin[160];
        env_name(&keys[i], name, sizeof name);
        size_t n = strlen(name);
        const char *val = NULL;
        for (const char *const *e = env; *e; e++)
            if (!strncmp(*e, name, n) && (*e)[n] == '=') val = *e + n + 1; /* the last wins */
        if (!val) continue;
        snprintf(origin, sizeof origin, "from env %s", name);
        if (set_text(c, &keys[i], val, origin, 0, err)) return -1;
    }
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Layer 4: flags

static const twn_conf_key *flag_key(const char *name) {
    for (size_t i = 0; twn_conf_aliases[i][0]; i++)
        if (!strcmp(name, twn_conf_aliases[i][0])) return twn_conf_find(twn_conf_aliases[i][1]);
    return twn_conf_find(name);
}

int twn_conf_load_args(twn_conf *c, int argc, char **argv, twn_err *err) {
    char *seen = twn_calloc(NKEYS, 1); /* a list / map flag's first use replaces, later ones add */
    int rc = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--", 2) || !a[2]) {
            twn_err_set(err, "config: unexpected argument \"%s\" (settings are --key value)", a);
            goto out;
        }
        char name[256];
        const char *eq = strchr(a + 2, '='), *val = eq ? eq + 1 : NULL;
        size_t nl = eq ? (size_t)(eq - a - 2) : strlen(a + 2);
        snprintf(name, sizeof name, "%.*s", (int)(nl < 255 ? nl : 255), a + 2);
        if (!strcmp(name, "config")) { /* read by twn_conf_load, before the environment */
            if (!val) i++;
            continue;
        }
        const twn_conf_key *k = flag_key(name);
        if (!k) {
            const char *s = suggest(name, 1);
            if (s)
                twn_err_set(err, "config: unknown flag --%s; did you mean --%s?", name, s);
            else
                twn_err_set(err,
                            "config: unknown flag --%s; `twn config --defaults` lists the "
                            "keys (--section.key value)",
                            name);
            goto out;
        }
        char origin[300];
        snprintf(origin, sizeof origin, "from flag --%s", name);
        int more = i + 1 < argc && strncmp(argv[i + 1], "--", 2);
        if (!val && k->type == TWN_CONF_BOOL && !more) {
            val = "true"; /* a bare --security.curve */
        } else if (!val) {
            if (!more) {
                twn_err_set(err, "config: flag --%s needs a value (%s)", name, k->name);
                goto out;
            }
            val = argv[++i];
        }
        size_t ki = key_index(k);
        if (k->type == TWN_CONF_LIST || k->type == TWN_CONF_MAP) {
            if (!seen[ki]) {
                if (k->type == TWN_CONF_LIST)
                    list_clear(slot(c, k));
                else
                    map_clear(slot(c, k));
            }
            seen[ki] = 1;
            if (set_text(c, k, val, origin, 1, err)) goto out;
            /* several values after one flag: --input a.jsonl b.tar */
            while (!eq && i + 1 < argc && argv[i + 1][0] != '-')
                if (set_text(c, k, argv[++i], origin, 1, err)) goto out;
        } else if (set_text(c, k, val, origin, 0, err))
            goto out;
    }
    rc = 0;
out:
    twn_free(seen);
    return rc;
}

// ------------------------------------------------------------------------------------------------
// Derived defaults and checks across keys

static void derive(twn_conf *c, const char *name, const char *value, const char *origin) {
    const twn_conf_key *k = twn_conf_find(name);
    char **p = slot(c, k);
    twn_free(*p);
    *p = twn_strdup(value);
    set_origin(c, k, origin);
}

static const char *origin_of(const twn_conf *c, const char *name) {
    return c->origin[key_index(twn_conf_find(name))];
}

int twn_conf_resolve(twn_conf *c, twn_err *err) {
    char buf[4096];
    if (!*c->coordinator.connect) {
        const char *l = c->coordinator.listen;
        if (!strncmp(l, "tcp://*:", 8))
            snprintf(buf, sizeof buf, "tcp://127.0.0.1:%s", l + 8);
        else if (!strncmp(l, "tcp://0.0.0.0:", 14))
            snprintf(buf, sizeof buf, "tcp://127.0.0.1:%s", l + 14);
        else
            snprintf(buf, sizeof buf, "%s", l);
        derive(c, "coordinator.connect", buf, "derived from coordinator.listen");
    }
    if (*c->job.out) {
        if (!*c->coordinator.journal) {
            snprintf(buf, sizeof buf, "%s/journal", c->job.out);
            derive(c, "coordinator.journal", buf, "derived from job.out");
        }
        if (!*c->job.dead_letter) {
            snprintf(buf, sizeof buf, "%s/dead_letter.jsonl", c->job.out);
            derive(c, "job.dead_letter", buf, "derived from job.out");
        }
        if (!*c->indexer.dir) {
            snprintf(buf, sizeof buf, "%s/shard-%05d", c->job.out, (int)c->indexer.shard);
            derive(c, "indexer.dir", buf, "derived from job.out and indexer.shard");
        }
    }
    const twn_conf_key *ek = twn_conf_find("indexer.endpoints");
    if (!c->indexer.endpoints.n && 7601 + c->job.shards - 1 <= 65535) {
        for (int64_t s = 0; s < c->job.shards; s++) {
            snprintf(buf, sizeof buf, "tcp://127.0.0.1:%d", (int)(7601 + s));
            list_push(&c->indexer.endpoints, buf);
        }
        set_origin(c, ek, "derived from job.shards");
    }
    if (c->indexer.endpoints.n != (size_t)c->job.shards)
        return twn_err_set(err,
                           "config: indexer.endpoints has %zu endpoint(s) (%s) but job.shards = "
                           "%lld (%s): expected one endpoint per shard",
                           c->indexer.endpoints.n, origin_of(c, "indexer.endpoints"),
                           (long long)c->job.shards, origin_of(c, "job.shards"));
    if (c->indexer.shard >= c->job.shards)
        return twn_err_set(err,
                           "config: indexer.shard = %lld (%s): expected 0..%lld (job.shards = "
                           "%lld)",
                           (long long)c->indexer.shard, origin_of(c, "indexer.shard"),
                           (long long)c->job.shards - 1, (long long)c->job.shards);
    if (!*c->indexer.listen)
        derive(c, "indexer.listen", c->indexer.endpoints.v[c->indexer.shard],
               "derived from indexer.endpoints and indexer.shard");
    if (*c->kafka.output_topic && !*c->kafka.brokers)
        return twn_err_set(err,
                           "config: kafka.output_topic = \"%s\" (%s) needs kafka.brokers "
                           "(bootstrap servers host:port[,...]), which is empty",
                           c->kafka.output_topic, origin_of(c, "kafka.output_topic"));
    return 0;
}

int twn_conf_load(twn_conf *c, int argc, char **argv, const char *const *env, twn_err *err) {
    twn_conf_init(c);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *path = !strncmp(a, "--config=", 9) ? a + 9
                           : !strcmp(a, "--config")    ? (i + 1 < argc ? argv[i + 1] : NULL)
                                                       : (const char *)"";
        if (path && !*path) continue;
        if (!path) return twn_err_set(err, "config: flag --config needs a file name");
        if (twn_conf_load_file(c, path, err)) return -1;
    }
    if (twn_conf_load_env(c, env, err) || twn_conf_load_args(c, argc, argv, err) ||
        twn_conf_resolve(c, err))
        return -1;
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Printing

/* A YAML double-quoted scalar that reads back as exactly v: quotes and backslashes escaped, and
 * every code point YAML would not take raw (controls, DEL, C1, BOM, non-characters) or would fold
 * as a line break (U+0085, U+2028, U+2029) written as an escape.  Bytes that are not UTF-8 never
 * get here (libyaml refuses them), but are escaped one by one just the same. */
static void put_quoted(twn_str *s, const char *v) {
    twn_str_puts(s, "\"");
    const unsigned char *p = (const unsigned char *)v;
    while (*p) {
        uint32_t cp = *p;
        int n = 1;
        if (*p >= 0xc2 && *p <= 0xdf && (p[1] & 0xc0) == 0x80) {
            cp = (uint32_t)(p[0] & 0x1f) << 6 | (p[1] & 0x3f), n = 2;
        } else if (*p >= 0xe0 && *p <= 0xef && (p[1] & 0xc0) == 0x80 && (p[2] & 0xc0) == 0x80) {
            cp = (uint32_t)(p[0] & 0x0f) << 12 | (uint32_t)(p[1] & 0x3f) << 6 | (p[2] & 0x3f);
            n = 3;
        } else if (*p >= 0xf0 && *p <= 0xf4 && (p[1] & 0xc0) == 0x80 && (p[2] & 0xc0) == 0x80 &&
                   (p[3] & 0xc0) == 0x80) {
            cp = (uint32_t)(p[0] & 0x07) << 18 | (uint32_t)(p[1] & 0x3f) << 12 |
                 (uint32_t)(p[2] & 0x3f) << 6 | (p[3] & 0x3f);
            n = 4;
        }
        int raw = (cp >= 0x20 && cp <= 0x7e) || (cp >= 0xa0 && cp <= 0xd7ff && n > 1) ||
                  (cp >= 0xe000 && cp <= 0xfffd && cp != 0xfeff && n > 1) ||
                  (cp >= 0x10000 && n == 4);
        if (cp == 0x2028 || cp == 0x2029) raw = 0;
        if (cp == '"' || cp == '\\')
            twn_str_printf(s, "\\%c", (char)cp);
        else if (raw)
            twn_str_append(s, (const char *)p, (size_t)n);
        else if (cp <= 0xff)
            twn_str_printf(s, "\\x%02x", cp);
        else if (cp <= 0xffff)
            twn_str_printf(s, "\\u%04x", cp);
        else
            twn_str_printf(s, "\\U%08x", cp);
        p += n;
    }
    twn_str_puts(s, "\"");
}

static int secret_name(const char *k) {
    return strstr(k, "password") || strstr(k, "secret") || strstr(k, "token");
}

static void put_value(twn_str *s, const twn_conf *c, const twn_conf_key *k) {
    const void *p = cslot(c, k);
    switch (k->type) {
    case TWN_CONF_STR:
    case TWN_CONF_ENUM: {
        const char *v = *(char *const *)p;
        put_quoted(s, k->secret && *v ? "<redacted>" : v);
        break;
    }
    case TWN_CONF_INT:
        twn_str_printf(s, "%lld", (long long)*(const int64_t *)p);
        break;
    case TWN_CONF_FLOAT:
        twn_str_printf(s, "%.17g", *(const double *)p);
        break;
    case TWN_CONF_BOOL:
        twn_str_puts(s, *(const int *)p ? "true" : "false");
        break;
    case TWN_CONF_LIST: {
        const twn_conf_list *l = p;
        twn_str_puts(s, "[");
        for (size_t i = 0; i < l->n; i++) {
            if (i) twn_str_puts(s, ", ");
            put_quoted(s, l->v[i]);
        }
        twn_str_puts(s, "]");
        break;
    }
    case TWN_CONF_MAP: {
        const twn_conf_map *m = p;
        twn_str_puts(s, "{");
        for (size_t i = 0; i < m->n; i++) {
            if (i) twn_str_puts(s, ", ");
            put_quoted(s, m->keys[i]);
            twn_str_puts(s, ": ");
            put_quoted(s, secret_name(m->keys[i]) ? "<redacted>" : m->vals[i]);
        }
        twn_str_puts(s, "}");
        break;
    }
    }
}

/* "section:" before the first key of each section; returns the leaf name. */
static const char *section_header(twn_str *s, size_t i) {
    const char *name = keys[i].name, *dot = strchr(name, '.');
    size_t sl = (size_t)(dot - name);
    if (!i || strncmp(keys[i - 1].name, name, sl + 1))
        twn_str_printf(s, "%s%.*s:\n", i ? "\n" : "", (int)sl, name);
    return dot + 1;
}

void twn_conf_print(const twn_conf *c, FILE *f) {
    twn_str s = {0};
    for (size_t i = 0; i < NKEYS; i++) {
        const char *leaf = section_header(&s, i);
        size_t start = s.n;
        twn_str_printf(&s, "  %s: ", leaf);
        put_value(&s, c, &keys[i]);
        while (s.n - start < 48) twn_str_puts(&s, " ");
        twn_str_printf(&s, " # %s\n", c->origin[i]);
    }
    fputs(s.v, f);
    twn_str_free(&s);
}

void twn_conf_print_defaults(FILE *f) {
    twn_str s = {0};
    twn_str_puts(&s, "# twn job configuration: every key with its default.  Layers, later wins:\n"
                     "# defaults < --config FILE < TWN_SECTION_KEY env < --section.key flags.\n");
    for (size_t i = 0; i < NKEYS; i++) {
        const twn_conf_key *k = &keys[i];
        const char *leaf = section_header(&s, i);
        char ex[256];
        expected(k, ex, sizeof ex);
        twn_str details = {0}; /* "(what it accepts; flag --x; default {...}; secret)" */
        if (strcmp(ex, "a string")) twn_str_printf(&details, "; %s", ex);
        for (size_t a = 0; twn_conf_aliases[a][0]; a++)
            if (!strcmp(twn_conf_aliases[a][1], k->name))
                twn_str_printf(&details, "; flag --%s", twn_conf_aliases[a][0]);
        if (k->def[0] == '{') twn_str_printf(&details, "; default %s", k->def);
        if (k->secret) twn_str_puts(&details, "; secret");
        twn_str_printf(&s, "  # %s\n", k->meaning);
        if (details.n) twn_str_printf(&s, "  # (%s)\n", details.v + 2);
        twn_str_free(&details);
        twn_str_printf(&s, "  %s: ", leaf);
        if (k->type == TWN_CONF_LIST)
            twn_str_puts(&s, "[]");
        else if (k->type == TWN_CONF_MAP)
            twn_str_puts(&s, "{}");
        else if (k->type == TWN_CONF_STR || k->type == TWN_CONF_ENUM)
            put_quoted(&s, k->def[0] == '{' ? "" : k->def);
        else
            twn_str_puts(&s, k->def);
        twn_str_puts(&s, "\n");
    }
    fputs(s.v, f);
    twn_str_free(&s);
}
