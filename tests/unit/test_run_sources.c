/* test_run_sources.c — the whole pipeline (coordinator, indexers, gates, reasoning workers as
 * threads over inproc://, the null engine) on S3 and Kafka inputs, against real peers on
 * 127.0.0.1: s3rver behind tests/tools/s3_front.mjs (SigV4 checked, faults injected) and
 * librdkafka's mock cluster (3 brokers).
 *
 *  - S3: JSONL and WebDataset tar objects under a prefix, thousands of items, with injected 500s,
 *    dropped connections, truncated and slow bodies: every good id exactly once in the index,
 *    every bad record (invalid JSON, no id, oversized, dangling s3:// image) a dead letter with
 *    its reason; hard items are re-read by ranged GETs (the bytes served stay near one pass).
 *  - Kafka: a 6-partition topic with records keyed by id (JSON; ids from the key when absent,
 *    inline base64 images), a broker going down and partition leaders moving mid-run: every good
 *    id exactly once, bad records dead-lettered, the group's committed offsets at the end are the
 *    high watermarks.
 *  - The coordinator stopped mid-run and started again (S3 and Kafka): it resumes from its
 *    journal and from the committed offsets (fewer units planned), nothing is lost and nothing
 *    is indexed twice.
 *  - `twn run` with s3:// and kafka:// inputs configured from the environment and an s3:// output:
 *    the staged shard snapshots and dead letters uploaded under the prefix, byte for byte. */
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "common/prefetch.h"
#include "common/source_io.h"
#include "common/source_s3.h"
#include "coordinator/journal.h"
#include "coordinator/service.h"
#include "gate_service/null_engine.h"
#include "index/service.h"
#include "tests/testutil.h"
#include "tests/unit/shard_out.h"
#include "tests/tools/s3_front.h"
#include "util/clock.h"
#include "util/mem.h"
#include "util/vec.h"
#include "worker/worker.h"

#define AK     "TWNRUNAKID"
#define SECRET "twn-run/Secret+Key0123"
#define BUCKET "twn-run"

static s3_front g_front;
static rd_kafka_t *g_rk; /* owns the mock cluster */
static rd_kafka_mock_cluster_t *g_mcl;
static const char *g_brokers;

static void quiet_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf) {
    (void)rk, (void)level, (void)fac, (void)buf;
}

static twn_s3_config s3_cfg(void) {
    twn_s3_config c = twn_s3_config_default();
    c.endpoint = g_front.endpoint;
    c.region = "us-east-1";
    c.access_key = AK;
    c.secret_key = SECRET;
    c.backoff_base_s = 0.01;
    c.backoff_max_s = 0.05;
    return c;
}

static twn_s3 *client(void) {
    twn_s3_config c = s3_cfg();
    twn_s3 *s;
    twn_err err = {{0}};
    if (twn_s3_open(&c, &s, &err)) fail_msg("%s", err.msg);
    return s;
}

static int group_setup(void **state) {
    (void)state;
    char why[1400];
    if (s3_front_start(&g_front, TWN_SOURCE_DIR, tu_tmpdir("run-sources-s3"), AK, SECRET, 600, why,
                       sizeof why)) {
        fprintf(stderr, "test_run_sources: %s\n", why);
        return -1;
    }
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, quiet_log);
    g_rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    if (!g_rk || !(g_mcl = rd_kafka_mock_cluster_new(g_rk, 3))) return -1;
    g_brokers = rd_kafka_mock_cluster_bootstraps(g_mcl);
    twn_s3 *s = client();
    twn_err err = {{0}};
    int rc = twn_s3_create_bucket(s, BUCKET, &err);
    twn_s3_close(s);
    if (rc) fprintf(stderr, "test_run_sources: %s\n", err.msg);
    return rc;
}

static int group_teardown(void **state) {
    (void)state;
    if (g_mcl) rd_kafka_mock_cluster_destroy(g_mcl);
    if (g_rk) rd_kafka_destroy(g_rk);
    s3_front_stop(&g_front);
    return 0;
}

static int brokers_up(void **state) {
    (void)state;
    for (int b = 1; b <= 3; b++) rd_kafka_mock_broker_set_up(g_mcl, b);
    return 0;
}

static void front_post(const char *path, const char *json) {
    twn_str r = {0};
    long st = s3_front_control(&g_front, path, json, &r);
    if (st != 200) fail_msg("%s -> %ld %s", path, st, r.v ? r.v : "");
    twn_str_free(&r);
}

static json_t *front_stats(void) {
    twn_str r = {0};
    assert_int_equal(s3_front_control(&g_front, "/__twn/stats", NULL, &r), 200);
    json_error_t je;
    json_t *j = json_loads(r.v, 0, &je);
    twn_str_free(&r);
    assert_non_null(j);
    return j;
}

// ------------------------------------------------------------------------------------------------
// The pipeline as threads

typedef struct role {
    int kind; /* 0 coordinator, 1 indexer, 2 gate, 3 worker */
    twn_coord_cfg cc;
    twn_coord_summary sum;
    twn_indexer_cfg ic;
    twn_role_cfg rc;
    int status;
    volatile int finished;
    twn_err err;
    char id[32], ep[64], dir[1100];
} role;

static void *role_main(void *arg) {
    role *r = arg;
    switch (r->kind) {
    case 0:
        r->status = twn_coord_run(&r->cc, &r->sum, &r->err);
        break;
    case 1:
        r->status = twn_indexer_run(&r->ic, &r->err);
        break;
    case 2:
        r->status = twn_gate_run(&r->rc, &r->err);
        break;
    default:
        r->status = twn_worker_run(&r->rc, &r->err);
        break;
    }
    r->finished = 1;
    return NULL;
}

typedef struct job {
    const char *const *inputs;
    size_t n_inputs;
    const char *out;
    int shards, gates, workers;
    uint64_t unit_items;
    const twn_srcio_cfg *io;
    size_t max_item_bytes;
    /* called every 20 ms while the coordinator runs (NULL: none); returns 1 to stop it */
    int (*watch)(void *user, const char *journal);
    void *user;
    twn_prefetch *prefetch; /* the gates' S3 read-ahead pool (NULL: none) */
    uint32_t gate_credits;  /* 0: the default */
} job;

typedef struct run_result {
    int status; /* the coordinator's */
    twn_coord_summary sum;
    char err[TWN_ERR_MAX];
} run_result;

static run_result run_job(const job *jb) {
    static int seq;
    char control[64], journal[1100], dead[1100];
    int tag = ++seq;
    snprintf(control, sizeof control, "inproc://src-control-%d", tag);
    snprintf(journal, sizeof journal, "%s/journal", jb->out);
    snprintf(dead, sizeof dead, "%s/dead_letter.jsonl", jb->out);
    mkdir(jb->out, 0755);
    volatile int stop_coord = 0, stop_rest = 0;
    void *zctx = zmq_ctx_new();
    size_t n = 1 + (size_t)jb->shards + (size_t)jb->gates + (size_t)jb->workers;
    role *roles = twn_calloc(n, sizeof *roles);
    pthread_t *th = twn_calloc(n, sizeof *th);
    const char **eps = twn_calloc((size_t)jb->shards, sizeof *eps);
    role *c = &roles[0];
    twn_coord_cfg_default(&c->cc);
    c->cc.zctx = zctx;
    c->cc.endpoint = control;
    c->cc.inputs = jb->inputs;
    c->cc.n_inputs = jb->n_inputs;
    c->cc.unit_items = jb->unit_items;
    c->cc.journal_path = journal;
    c->cc.dead_letter_path = dead;
    c->cc.model_hash = "null";
    c->cc.shards = (uint32_t)jb->shards;
    c->cc.shard_endpoints = eps;
    c->cc.stop = &stop_coord;
    c->cc.io = jb->io;
    for (int s = 0; s < jb->shards; s++) {
        role *r = &roles[1 + s];
        r->kind = 1;
        snprintf(r->ep, sizeof r->ep, "inproc://src-shard-%d-%d", tag, s);
        snprintf(r->dir, sizeof r->dir, "%s/shard-%05d", jb->out, s);
        snprintf(r->id, sizeof r->id, "indexer-%d", s);
        eps[s] = r->ep;
        twn_indexer_cfg_default(&r->ic);
        r->ic.zctx = zctx;
        r->ic.control = control;
        r->ic.id = r->id;
        r->ic.endpoint = r->ep;
        r->ic.dir = r->dir;
        r->ic.shard = s;
        r->ic.n_shards = jb->shards;
        r->ic.dim = 16;
        r->ic.factory = "Flat";
        r->ic.model = "null";
        r->ic.model_hash = "null";
        r->ic.stop = &stop_rest;
    }
    for (int g = 0; g < jb->gates + jb->workers; g++) {
        role *r = &roles[1 + jb->shards + g];
        r->kind = g < jb->gates ? 2 : 3;
        snprintf(r->id, sizeof r->id, g < jb->gates ? "gate-%d" : "worker-%d",
                 g < jb->gates ? g : g - jb->gates);
        twn_role_cfg_default(&r->rc);
        r->rc.zctx = zctx;
        r->rc.control = control;
        r->rc.id = r->id;
        r->rc.null_dim = 16;
        r->rc.stop = &stop_rest;
        r->rc.io = jb->io;
        if (jb->max_item_bytes) r->rc.src.max_item_bytes = jb->max_item_bytes;
        if (g < jb->gates) {
            r->rc.prefetch = jb->prefetch;
            if (jb->gate_credits) r->rc.credits = jb->gate_credits;
        }
    }
    for (size_t i = 1; i <= (size_t)jb->shards; i++)
        pthread_create(&th[i], NULL, role_main, &roles[i]);
    pthread_create(&th[0], NULL, role_main, &roles[0]);
    for (size_t i = 1 + (size_t)jb->shards; i < n; i++)
        pthread_create(&th[i], NULL, role_main, &roles[i]);
    while (jb->watch && !stop_coord && !roles[0].finished) {
        s3_front_nap(0.02);
        if (jb->watch(jb->user, journal)) stop_coord = 1;
    }
    pthread_join(th[0], NULL);
    /* After the coordinator: the indexers got Shutdown and write their outputs, gates and workers
     * stop.  A coordinator that failed (stopped mid-job) takes the rest down as if the process
     * died.  A role still blocked sending to the vanished coordinator (its DEALER sends without
     * a timeout; seen under ASan when a slow gate outlives the coordinator's shutdown wait) is
     * released by shutting the context down, and said so. */
    if (roles[0].status) stop_rest = 1;
    double until = twn_now() + (roles[0].status ? 1.0 : 30.0);
    int forced = 0;
    for (;;) {
        size_t left = 0;
        for (size_t i = 1; i < n; i++) left += !roles[i].finished;
        if (!left) break;
        if (twn_now() > until) {
            if (!roles[0].status)
                printf("run_job: %zu role(s) still running %.0f s after the coordinator ended; "
                       "shutting the context down\n",
                       left, 30.0);
            stop_rest = 1;
            s3_front_nap(0.5);
            zmq_ctx_shutdown(zctx);
            forced = 1;
            break;
        }
        /* indexers first; then gates and workers are told to stop */
        size_t ix_left = 0;
        for (size_t i = 1; i <= (size_t)jb->shards; i++) ix_left += !roles[i].finished;
        if (!ix_left) stop_rest = 1;
        s3_front_nap(0.01);
    }
    for (size_t i = 1; i < n; i++) pthread_join(th[i], NULL);
    run_result res = {.status = roles[0].status, .sum = roles[0].sum};
    snprintf(res.err, sizeof res.err, "%s", roles[0].err.msg);
    if (!roles[0].status)
        for (size_t i = 1; i < n; i++)
            if (roles[i].status && !(forced && strstr(roles[i].err.msg, "Context was terminated")))
                fail_msg("%s failed: %s", roles[i].id, roles[i].err.msg);
    zmq_ctx_term(zctx);
    twn_free(roles);
    twn_free(th);
    twn_free(eps);
    return res;
}

/* UNIT_DONE records in a journal so far, and whether it says the job finished. */
static int count_done(void *ctx, const twn_jrec *r, twn_err *err) {
    (void)err;
    int *c = ctx;
    if (r->type == TWN_JREC_UNIT_DONE) c[0]++;
    if (r->type == TWN_JREC_JOB_FINISHED) c[1] = 1;
    return 0;
}

static void journal_counts(const char *path, int *done, int *finished) {
    int c[2] = {0, 0};
    FILE *f = fopen(path, "rb");
    if (f) {
        fseek(f, 0, SEEK_END);
        long n = ftell(f);
        fseek(f, 0, SEEK_SET);
        char *b = malloc((size_t)n + 1);
        if (fread(b, 1, (size_t)n, f) == (size_t)n) {
            twn_err err;
            twn_journal_replay_mem(b, (size_t)n, path, NULL, count_done, c, NULL, &err);
        }
        free(b);
        fclose(f);
    }
    *done = c[0];
    *finished = c[1];
}

// ------------------------------------------------------------------------------------------------
// What the index holds

/* The ids in the shards' current snapshots (id -> true); an id seen twice fails the test. */
static json_t *index_ids(const char *out, int shards) {
    tp_shards s = tp_shards_read(out, shards); /* fails on an id seen twice */
    json_t *ids = json_object();
    const char *id;
    json_t *v;
    json_object_foreach(s.items, id, v) json_object_set_new(ids, id, json_true());
    tp_shards_free(&s);
    return ids;
}

/* Every id of `want` is in `got` and nothing else. */
static void assert_same_ids(json_t *got, json_t *want) {
    const char *id;
    json_t *v;
    json_object_foreach(want, id, v) {
        if (!json_object_get(got, id)) fail_msg("%s is missing from the index", id);
    }
    json_object_foreach(got, id, v) {
        if (!json_object_get(want, id)) fail_msg("%s is in the index but should not be", id);
    }
    assert_int_equal(json_object_size(got), json_object_size(want));
}

/* Dead letters: reasons joined (for substring checks) and the number of distinct item refs. */
static size_t dead_letters(const char *out, twn_str *reasons) {
    char p[1200];
    snprintf(p, sizeof p, "%s/dead_letter.jsonl", out);
    json_t *dl = tp_jsonl_read(p);
    json_t *seen = json_object();
    size_t i;
    json_t *d;
    json_array_foreach(dl, i, d) {
        json_t *ref = json_object_get(d, "ref");
        char key[1400];
        snprintf(key, sizeof key, "%s#%.0f", json_string_value(json_object_get(ref, "path")),
                 json_number_value(json_object_get(ref, "index")));
        json_object_set_new(seen, key, json_true());
        if (reasons) {
            twn_str_printf(reasons, "[%s] %s\n", json_string_value(json_object_get(d, "stage")),
                           json_string_value(json_object_get(d, "reason")));
        }
    }
    size_t n = json_object_size(seen);
    json_decref(seen);
    json_decref(dl);
    return n;
}

static void must_contain(const twn_str *s, const char *what) {
    if (!s->v || !strstr(s->v, what)) fail_msg("dead letters lack \"%s\":\n%s", what, s->v);
}

// ------------------------------------------------------------------------------------------------
// S3 data: JSONL and tar objects

static void put(twn_s3 *s, const char *key, const void *data, size_t n) {
    twn_err err = {{0}};
    if (twn_s3_put(s, BUCKET, key, data, n, &err)) fail_msg("%s", err.msg);
}

/* A ustar member. */
static void tar_member(twn_str *t, const char *name, const void *data, size_t n) {
    char h[512];
    memset(h, 0, sizeof h);
    snprintf(h, 100, "%s", name);
    snprintf(h + 100, 8, "%07o", 0644);
    snprintf(h + 108, 8, "%07o", 0);
    snprintf(h + 116, 8, "%07o", 0);
    snprintf(h + 124, 12, "%011o", (unsigned)n);
    snprintf(h + 136, 12, "%011o", 1700000000u);
    h[156] = '0';
    memcpy(h + 257, "ustar", 6);
    memcpy(h + 263, "00", 2);
    memset(h + 148, ' ', 8);
    unsigned sum = 0;
    for (int i = 0; i < 512; i++) sum += (unsigned char)h[i];
    snprintf(h + 148, 8, "%06o", sum);
    twn_str_append(t, h, 512);
    twn_str_append(t, data, n);
    static const char zero[512];
    if (n % 512) twn_str_append(t, zero, 512 - n % 512);
}

typedef struct s3_data {
    json_t *good; /* ids expected in the index */
    size_t bad;   /* records expected as dead letters */
    size_t bytes; /* bytes of all objects */
} s3_data;

/* Under prefix: 3 JSONL objects of 500 lines and 2 tar objects of 400 items (2300 good items),
 * plus 5 bad records: invalid JSON, no id, oversized, a dangling s3:// image and a dangling
 * relative image (resolved next to the object).  One good record refers to an image that
 * exists. */
static s3_data make_s3_data(const char *prefix) {
    s3_data d = {json_object(), 0, 0};
    twn_s3 *s = client();
    char key[256];
    twn_str b = {0};
    static const uint8_t img[] = {0xff, 0xd8, 0xff, 0xe0, 'f', 'a', 'k', 'e', 0xff, 0xd9};
    snprintf(key, sizeof key, "%s-img/cat.jpg", prefix); /* outside the prefix: not an input */
    put(s, key, img, sizeof img);
    d.bytes += sizeof img;
    for (int f = 0; f < 3; f++) {
        twn_str_reset(&b);
        for (int i = 0; i < 500; i++) {
            char id[64];
            snprintf(id, sizeof id, "%s-j%d-%03d", prefix, f, i);
            if (f == 1 && i == 7)
                twn_str_printf(&b,
                               "{\"id\": \"%s\", \"text\": \"a cat\", \"image\": "
                               "\"s3://" BUCKET "/%s-img/cat.jpg\"}\n",
                               id, prefix);
            else
                twn_str_printf(&b, "{\"id\": \"%s\", \"text\": \"item %d of file %d\"}\n", id, i,
                               f);
            json_object_set_new(d.good, id, json_true());
        }
        if (f == 0) {
            twn_str_printf(&b, "{\"id\": \"broken\", \"text\": \n");
            twn_str_printf(&b, "{\"text\": \"no id here\"}\n");
            twn_str_printf(&b, "{\"id\": \"big\", \"text\": \"");
            for (int k = 0; k < 5000; k++) twn_str_append(&b, "x", 1);
            twn_str_printf(&b, "\"}\n");
            d.bad += 3;
        }
        if (f == 2) {
            twn_str_printf(&b, "{\"id\": \"ghost-s3\", \"text\": \"t\", \"image\": "
                               "\"s3://" BUCKET "/nowhere/ghost.jpg\"}\n");
            twn_str_printf(&b, "{\"id\": \"ghost-rel\", \"text\": \"t\", \"image\": "
                               "\"img/ghost.jpg\"}\n");
            d.bad += 2;
        }
        snprintf(key, sizeof key, "%s/part-%d.jsonl", prefix, f);
        put(s, key, b.v, b.n);
        d.bytes += b.n;
    }
    for (int f = 0; f < 2; f++) {
        twn_str_reset(&b);
        for (int i = 0; i < 400; i++) {
            char name[128], text[64];
            snprintf(name, sizeof name, "%s-t%d-%03d.txt", prefix, f, i);
            snprintf(text, sizeof text, "tar item %d of %d", i, f);
            tar_member(&b, name, text, strlen(text));
            snprintf(name, sizeof name, "%s-t%d-%03d.jpg", prefix, f, i);
            tar_member(&b, name, img, sizeof img);
            snprintf(name, sizeof name, "%s-t%d-%03d", prefix, f, i);
            json_object_set_new(d.good, name, json_true());
        }
        static const char end[1024];
        twn_str_append(&b, end, sizeof end);
        snprintf(key, sizeof key, "%s/shard-%d.tar", prefix, f);
        put(s, key, b.v, b.n);
        d.bytes += b.n;
    }
    twn_str_free(&b);
    twn_s3_close(s);
    return d;
}

static twn_srcio_cfg s3_io(void) {
    twn_srcio_cfg io;
    twn_srcio_cfg_default(&io);
    io.s3 = s3_cfg();
    return io;
}

static void test_s3_exactly_once_with_faults(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("run-sources-s3-e2e");
    s3_data d = make_s3_data("e2e");
    char out[1100], input[64] = "s3://" BUCKET "/e2e/";
    snprintf(out, sizeof out, "%s/out", dir);
    twn_srcio_cfg io = s3_io();
    const char *inputs[] = {input};
    front_post("/__twn/reset", "{}");
    /* faults on object GETs (the listing and HEADs stay clean, so each rule is used by a read) */
    front_post("/__twn/fault", "{\"kind\": \"500\", \"count\": 3, \"method\": \"GET\", "
                               "\"match\": \"/e2e/part-\"}");
    front_post("/__twn/fault", "{\"kind\": \"reset\", \"count\": 2, \"method\": \"GET\", "
                               "\"match\": \"/e2e/shard-\"}");
    front_post("/__twn/fault", "{\"kind\": \"truncate\", \"count\": 2, \"method\": \"GET\", "
                               "\"match\": \"/e2e/shard-1\"}");
    front_post("/__twn/fault", "{\"kind\": \"slow\", \"count\": 1, \"delay_ms\": 1500, "
                               "\"method\": \"GET\", \"match\": \"/e2e/part-2\"}");
    job jb = {.inputs = inputs,
              .n_inputs = 1,
              .out = out,
              .shards = 3,
              .gates = 2,
              .workers = 2,
              .unit_items = 100,
              .io = &io,
              .max_item_bytes = 4096};
    double t0 = twn_now();
    run_result r = run_job(&jb);
    double secs = twn_now() - t0;
    if (r.status) fail_msg("coordinator: %s", r.err);
    assert_int_equal(r.sum.items, 2300 + d.bad);
    assert_int_equal(r.sum.rejected, d.bad);
    assert_int_equal(r.sum.easy + r.sum.hard, 2300);
    assert_true(r.sum.hard > 100 && r.sum.easy > 100); /* both paths ran */
    json_t *ids = index_ids(out, 3);
    assert_same_ids(ids, d.good);
    twn_str reasons = {0};
    assert_int_equal(dead_letters(out, &reasons), d.bad);
    must_contain(&reasons, "[parse] s3://" BUCKET "/e2e/part-0.jsonl: line 501");
    must_contain(&reasons, "invalid JSON");
    must_contain(&reasons, "[parse] s3://" BUCKET "/e2e/part-0.jsonl: line 502");
    must_contain(&reasons, "[parse] s3://" BUCKET "/e2e/part-0.jsonl: line 503");
    must_contain(&reasons, "bytes; the limit is 4096");
    must_contain(&reasons, "[read] item 'ghost-s3': image 's3://" BUCKET
                           "/nowhere/ghost.jpg' cannot be read");
    must_contain(&reasons, "[read] item 'ghost-rel': image 's3://" BUCKET
                           "/e2e/img/ghost.jpg' cannot be read");
    must_contain(&reasons, "HTTP 404");
    json_t *st = front_stats();
    /* every injected fault was met and retried through */
    assert_int_equal(json_integer_value(json_object_get(st, "faults")), 8);
    /* The coordinator scans each object once to plan, the gates read each unit once (their
     * read-ahead windows, 512 KiB and up, may run past a unit's end), and a hard item is re-read
     * by a ranged GET of its own bytes (a tar item here is 2048 bytes: two headers and two padded
     * members).  Re-reading whole objects for hard items would be hundreds of passes. */
    double bytes_out = (double)json_integer_value(json_object_get(st, "bytes_out"));
    double bound = 3.0 * (double)d.bytes + (double)r.sum.hard * 2048;
    printf("s3 e2e: %.2f s, %llu easy, %llu hard, %llu rejected, %.0f bytes served for %zu "
           "bytes of objects (bound %.0f)\n",
           secs, (unsigned long long)r.sum.easy, (unsigned long long)r.sum.hard,
           (unsigned long long)r.sum.rejected, bytes_out, d.bytes, bound);
    assert_true(bytes_out >= 2.0 * (double)d.bytes && bytes_out <= bound);
    json_decref(st);
    twn_str_free(&reasons);
    json_decref(ids);
    json_decref(d.good);
}

/* s3.readers: one gate holding 4 leases, the next units fetched by a pool of 4 readers while it
 * works, every object GET slowed by the front (easy items only: no worker reads): every item
 * exactly once, most units read from the pool with no extra GETs, several fetches under way at
 * once, and the job faster than without the pool. */
static void test_s3_prefetch_pipeline(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("run-sources-s3-prefetch");
    twn_s3 *s = client();
    json_t *want = json_object();
    twn_str b = {0};
    for (int f = 0; f < 8; f++) {
        twn_str_reset(&b);
        for (int i = 0; i < 40; i++) {
            char id[64];
            /* easy items only (the null engine's choice by id): the gate's reads are the job */
            for (int v = 0; !v || twn_null_hard(id); v++)
                snprintf(id, sizeof id, "pfe-%d-%02d-%d", f, i, v);
            twn_str_printf(&b, "{\"id\": \"%s\", \"text\": \"item %d of %d\"}\n", id, i, f);
            json_object_set_new(want, id, json_true());
        }
        char key[64];
        snprintf(key, sizeof key, "pfe/part-%d.jsonl", f);
        put(s, key, b.v, b.n);
    }
    twn_str_free(&b);
    twn_s3_close(s);
    char input[64] = "s3://" BUCKET "/pfe/";
    const char *inputs[] = {input};
    twn_srcio_cfg io = s3_io();
    double secs[2];
    size_t n_gets[2];
    for (int pass = 0; pass < 2; pass++) { /* 0: 4 readers, 1: none */
        char out[1100];
        snprintf(out, sizeof out, "%s/out-%d", dir, pass);
        twn_prefetch *pool = NULL;
        twn_err err = {{0}};
        if (!pass) assert_int_equal(twn_prefetch_open(&io.s3, 4, 0, &pool, &err), 0);
        front_post("/__twn/reset", "{}");
        front_post("/__twn/fault", "{\"kind\": \"slow\", \"count\": 100000, \"delay_ms\": 100, "
                                   "\"method\": \"GET\", \"match\": \"/pfe/\"}");
        job jb = {.inputs = inputs,
                  .n_inputs = 1,
                  .out = out,
                  .shards = 2,
                  .gates = 1,
                  .workers = 2,
                  .unit_items = 10,
                  .io = &io,
                  .prefetch = pool,
                  .gate_credits = 4};
        double t0 = twn_now();
        run_result r = run_job(&jb);
        secs[pass] = twn_now() - t0;
        if (r.status) fail_msg("coordinator: %s", r.err);
        assert_int_equal(r.sum.units, 32);
        assert_int_equal(r.sum.items, 320);
        assert_int_equal(r.sum.rejected, 0);
        assert_int_equal(r.sum.hard, 0);
        json_t *ids = index_ids(out, 2);
        assert_same_ids(ids, want);
        json_decref(ids);
        json_t *fst = front_stats(), *log = json_object_get(fst, "log");
        size_t gets = 0;
        for (size_t i = 0; i < json_array_size(log); i++)
            gets += !strcmp(json_string_value(json_object_get(json_array_get(log, i), "method")),
                            "GET");
        n_gets[pass] = gets;
        json_decref(fst);
        if (!pass) {
            /* a dropped fetch still under way gives its room back when it ends */
            for (int i = 0; i < 500 && twn_prefetch_get_stats(pool).held; i++) s3_front_nap(0.01);
            twn_prefetch_stats st = twn_prefetch_get_stats(pool);
            printf("s3 prefetch: %llu of 32 units fetched ahead, at most %d at once, %llu bytes\n",
                   (unsigned long long)st.fetched, st.busy_max, (unsigned long long)st.bytes);
            assert_true(st.fetched >= 24); /* all but the first of each batch of leases */
            assert_int_equal(st.failed, 0);
            assert_true(st.busy_max >= 2); /* the leases queued behind the current one */
            assert_int_equal(st.held, 0);
            twn_prefetch_close(pool);
        }
    }
    printf("s3 prefetch: 32 units, 100 ms per GET: %.2f s with 4 readers, %.2f s without (%zu "
           "and %zu GETs)\n",
           secs[0], secs[1], n_gets[0], n_gets[1]);
    /* the pool's windows cover what the readers look at: no unit is fetched twice */
    assert_true(n_gets[0] <= n_gets[1] + 2);
    /* the wall times are printed, not asserted: busy_max and fetched above show the read-ahead */
    json_decref(want);
    front_post("/__twn/reset", "{}");
}

/* Stops the coordinator once `want` units are durably done. */
typedef struct stop_at {
    int want, done_seen;
    int (*extra)(void *); /* also required before stopping (may be NULL) */
    void *extra_user;
} stop_at;

static int watch_stop(void *user, const char *journal) {
    stop_at *s = user;
    int done, fin;
    journal_counts(journal, &done, &fin);
    if (fin) return 0; /* too late: it finished */
    if (done >= s->want && (!s->extra || s->extra(s->extra_user))) {
        s->done_seen = done;
        return 1;
    }
    return 0;
}

static void test_s3_coordinator_restart(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("run-sources-s3-restart");
    s3_data d = make_s3_data("rs");
    char out[1100], input[64] = "s3://" BUCKET "/rs/";
    snprintf(out, sizeof out, "%s/out", dir);
    twn_srcio_cfg io = s3_io();
    const char *inputs[] = {input};
    front_post("/__twn/reset", "{}");
    /* slow bodies keep the first run going long enough to be stopped in the middle */
    front_post("/__twn/fault", "{\"kind\": \"slow\", \"count\": 6, \"delay_ms\": 300, "
                               "\"method\": \"GET\", \"match\": \"/rs/\"}");
    stop_at sa = {.want = 5};
    job jb = {.inputs = inputs,
              .n_inputs = 1,
              .out = out,
              .shards = 2,
              .gates = 1,
              .workers = 1,
              .unit_items = 50,
              .io = &io,
              .max_item_bytes = 4096,
              .watch = watch_stop,
              .user = &sa};
    run_result r1 = run_job(&jb);
    assert_int_equal(r1.status, -1);
    assert_string_equal(r1.err, "coordinator: stopped before the job finished");
    char journal[1200];
    snprintf(journal, sizeof journal, "%s/journal", out);
    int done1, fin1;
    journal_counts(journal, &done1, &fin1);
    int total_units = 0;
    {
        twn_s3 *s = client();
        twn_src_units u = {0};
        twn_err err = {{0}};
        if (twn_src_plan_s3_units(s, input, TWN_SRC_AUTO, 50, &u, &err)) fail_msg("%s", err.msg);
        total_units = (int)u.n;
        twn_src_units_free(&u);
        twn_s3_close(s);
    }
    printf("s3 restart: stopped with %d of %d units durably done\n", done1, total_units);
    assert_true(done1 >= 5 && done1 < total_units && !fin1);

    jb.watch = NULL;
    run_result r2 = run_job(&jb);
    if (r2.status) fail_msg("second run: %s", r2.err);
    assert_int_equal(r2.sum.units, total_units);
    assert_int_equal(r2.sum.items, 2300 + d.bad);
    assert_int_equal(r2.sum.rejected, d.bad);
    int done2, fin2;
    journal_counts(journal, &done2, &fin2);
    assert_true(fin2);
    /* units done before the stop were not done again */
    assert_int_equal(done2, total_units);
    json_t *ids = index_ids(out, 2);
    assert_same_ids(ids, d.good);
    assert_int_equal(dead_letters(out, NULL), d.bad);
    json_decref(ids);
    json_decref(d.good);
}

// ------------------------------------------------------------------------------------------------
// Kafka

static rd_kafka_t *producer(void) {
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, quiet_log);
    assert_int_equal(rd_kafka_conf_set(conf, "bootstrap.servers", g_brokers, errstr, sizeof errstr),
                     RD_KAFKA_CONF_OK);
    assert_int_equal(rd_kafka_conf_set(conf, "enable.idempotence", "true", errstr, sizeof errstr),
                     RD_KAFKA_CONF_OK);
    rd_kafka_t *p = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    assert_non_null(p);
    return p;
}

static void produce(rd_kafka_t *p, const char *topic, int32_t part, const char *key,
                    const void *value, size_t len) {
    rd_kafka_resp_err_t e;
    for (;;) {
        e = rd_kafka_producev(p, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_PARTITION(part),
                              RD_KAFKA_V_KEY(key, key ? strlen(key) : 0),
                              RD_KAFKA_V_VALUE((void *)value, len),
                              RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
        if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL) break;
        rd_kafka_poll(p, 10);
    }
    assert_int_equal(e, 0);
}

typedef struct kafka_data {
    json_t *good;
    size_t bad;
    int64_t hw[6];
} kafka_data;

/* 3000 good records over 6 partitions keyed by id (every 5th without an "id": the key names
 * it; every 50th with a small inline image), plus per partition one bad record: invalid JSON,
 * no text nor image, oversized, a dangling s3:// image, a dangling local image, an inline image
 * over kafka.max_inline_image_bytes. */
static kafka_data make_kafka_data(const char *topic) {
    kafka_data d = {json_object(), 0, {0}};
    assert_int_equal(rd_kafka_mock_topic_create(g_mcl, topic, 6, 3), 0);
    rd_kafka_t *p = producer();
    twn_str s = {0};
    for (int i = 0; i < 3000; i++) {
        char id[64];
        snprintf(id, sizeof id, "%s-%04d", topic, i);
        twn_str_reset(&s);
        if (i % 5 == 0)
            twn_str_printf(&s, "{\"text\": \"record %d\"}", i);
        else if (i % 50 == 1)
            twn_str_printf(&s,
                           "{\"id\": \"%s\", \"text\": \"r\", \"image_base64\": "
                           "\"/9j/4AAQSkZJRgABAQ==\"}",
                           id);
        else
            twn_str_printf(&s, "{\"id\": \"%s\", \"text\": \"record %d\"}", id, i);
        produce(p, topic, i % 6, id, s.v, s.n);
        json_object_set_new(d.good, id, json_true());
        if (i % 500 == 250) { /* six bad records spread over the partitions */
            int b = i / 500;
            twn_str_reset(&s);
            char bid[64];
            snprintf(bid, sizeof bid, "%s-bad%d", topic, b);
            switch (b) {
            case 0:
                twn_str_printf(&s, "{\"id\": \"x\", \"text\": ");
                break;
            case 1:
                twn_str_printf(&s, "{\"id\": \"%s\", \"instruction\": \"only\"}", bid);
                break;
            case 2:
                twn_str_printf(&s, "{\"id\": \"%s\", \"text\": \"", bid);
                for (int k = 0; k < 5000; k++) twn_str_append(&s, "y", 1);
                twn_str_printf(&s, "\"}");
                break;
            case 3:
                twn_str_printf(&s, "{\"id\": \"%s\", \"image\": \"s3://" BUCKET "/gone.jpg\"}",
                               bid);
                break;
            case 4:
                twn_str_printf(&s, "{\"id\": \"%s\", \"image\": \"/nonexistent/twn/x.png\"}", bid);
                break;
            default:
                twn_str_printf(&s, "{\"id\": \"%s\", \"image_base64\": \"", bid);
                for (int k = 0; k < 400; k++) twn_str_append(&s, "QUFB", 4);
                twn_str_printf(&s, "\"}");
                break;
            }
            produce(p, topic, b, bid, s.v, s.n);
            d.bad++;
        }
    }
    assert_int_equal(rd_kafka_flush(p, 20000), 0);
    for (int k = 0; k < 6; k++) {
        int64_t lo;
        assert_int_equal(rd_kafka_query_watermark_offsets(p, topic, k, &lo, &d.hw[k], 10000), 0);
    }
    rd_kafka_destroy(p);
    twn_str_free(&s);
    return d;
}

static twn_srcio_cfg kafka_io(const char *group) {
    twn_srcio_cfg io = s3_io();
    io.kafka.brokers = g_brokers;
    io.kafka.group = group;
    io.kafka.read_timeout_ms = 30000;
    io.kafka.op_timeout_ms = 3000;
    io.kafka.max_inline_image_bytes = 1000;
    return io;
}

static void committed(const char *topic, const char *group, int64_t out[6]) {
    twn_kafka_config c = twn_kafka_config_default();
    c.brokers = g_brokers;
    c.group = group;
    twn_kafka *k;
    twn_err err = {{0}};
    if (twn_kafka_open(&c, &k, &err)) fail_msg("%s", err.msg);
    for (int p = 0; p < 6; p++)
        if (twn_kafka_committed(k, topic, p, &out[p], &err)) fail_msg("%s", err.msg);
    twn_kafka_close(k);
}

/* Mid-run (once 8 units are done): broker 2 goes down and the leaders of its partitions move to
 * broker 3; later broker 2 comes back and leadership moves back. */
typedef struct chaos {
    int phase;
    double t_down;
} chaos;

static int watch_chaos(void *user, const char *journal) {
    chaos *c = user;
    int done, fin;
    journal_counts(journal, &done, &fin);
    if (c->phase == 0 && done >= 8) {
        rd_kafka_mock_broker_set_down(g_mcl, 2);
        for (int p = 0; p < 6; p++) rd_kafka_mock_partition_set_leader(g_mcl, "stream", p, 3);
        c->phase = 1;
        c->t_down = twn_now();
    } else if (c->phase == 1 && (twn_now() - c->t_down > 2.0 || done >= 24)) {
        /* back up after 2 s, or sooner when the job has moved on (24 of its 60 units done): a
         * fast run must still see the broker return before it ends */
        rd_kafka_mock_broker_set_up(g_mcl, 2);
        for (int p = 0; p < 6; p += 2) rd_kafka_mock_partition_set_leader(g_mcl, "stream", p, 2);
        c->phase = 2;
    }
    (void)fin;
    return 0;
}

static void test_kafka_exactly_once_failover(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("run-sources-kafka");
    kafka_data d = make_kafka_data("stream");
    /* the group coordinator stays on broker 1; leaders start on broker 2 */
    assert_int_equal(rd_kafka_mock_coordinator_set(g_mcl, "group", "indexers", 1), 0);
    for (int p = 0; p < 6; p++)
        assert_int_equal(rd_kafka_mock_partition_set_leader(g_mcl, "stream", p, 2), 0);
    char out[1100];
    snprintf(out, sizeof out, "%s/out", dir);
    twn_srcio_cfg io = kafka_io("indexers");
    const char *inputs[] = {"kafka://stream"};
    chaos ch = {0};
    job jb = {.inputs = inputs,
              .n_inputs = 1,
              .out = out,
              .shards = 3,
              .gates = 3,
              .workers = 2,
              .unit_items = 50,
              .io = &io,
              .max_item_bytes = 4096,
              .watch = watch_chaos,
              .user = &ch};
    double t0 = twn_now();
    run_result r = run_job(&jb);
    if (r.status) fail_msg("coordinator: %s", r.err);
    printf("kafka failover: %.2f s, phase %d, %llu items\n", twn_now() - t0, ch.phase,
           (unsigned long long)r.sum.items);
    assert_int_equal(ch.phase, 2); /* the broker went down and came back during the run */
    assert_int_equal(r.sum.items, 3000 + d.bad);
    assert_int_equal(r.sum.rejected, d.bad);
    json_t *ids = index_ids(out, 3);
    assert_same_ids(ids, d.good);
    twn_str reasons = {0};
    assert_int_equal(dead_letters(out, &reasons), d.bad);
    must_contain(&reasons, "[parse] kafka stream[0]@");
    must_contain(&reasons, "invalid JSON");
    must_contain(&reasons, "the item has neither \"text\" nor an image");
    must_contain(&reasons, "the message is 5");
    must_contain(&reasons, "the limit is 4096");
    must_contain(&reasons,
                 "[read] item 'stream-bad3': image 's3://" BUCKET "/gone.jpg' cannot be read");
    must_contain(&reasons, "[read] item 'stream-bad4': image '/nonexistent/twn/x.png' cannot be "
                           "read: No such file or directory");
    must_contain(&reasons, "inline image; the limit is 1000");
    int64_t c[6];
    committed("stream", "indexers", c);
    for (int p = 0; p < 6; p++) assert_int_equal(c[p], d.hw[p]);
    twn_str_free(&reasons);
    json_decref(ids);
    json_decref(d.good);
}

typedef struct commit_seen {
    const char *topic, *group;
} commit_seen;

static int some_committed(void *user) {
    commit_seen *cs = user;
    int64_t c[6];
    committed(cs->topic, cs->group, c);
    for (int p = 0; p < 6; p++)
        if (c[p] > 0) return 1;
    return 0;
}

static void test_kafka_coordinator_restart(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("run-sources-kafka-restart");
    kafka_data d = make_kafka_data("resume");
    char out[1100];
    snprintf(out, sizeof out, "%s/out", dir);
    twn_srcio_cfg io = kafka_io("resumers");
    const char *inputs[] = {"kafka://resume"};
    commit_seen cs = {"resume", "resumers"};
    stop_at sa = {.want = 12, .extra = some_committed, .extra_user = &cs};
    job jb = {.inputs = inputs,
              .n_inputs = 1,
              .out = out,
              .shards = 2,
              .gates = 1,
              .workers = 1,
              .unit_items = 20,
              .io = &io,
              .max_item_bytes = 4096,
              .watch = watch_stop,
              .user = &sa};
    run_result r1 = run_job(&jb);
    assert_int_equal(r1.status, -1);
    int64_t c1[6], sum1 = 0, total = 0;
    committed("resume", "resumers", c1);
    for (int p = 0; p < 6; p++) {
        assert_true(c1[p] <= d.hw[p]);
        sum1 += c1[p] > 0 ? c1[p] : 0;
        total += d.hw[p];
    }
    printf("kafka restart: stopped with %d units done, %lld of %lld offsets committed\n",
           sa.done_seen, (long long)sum1, (long long)total);
    assert_true(sum1 > 0 && sum1 < total);

    jb.watch = NULL;
    run_result r2 = run_job(&jb);
    if (r2.status) fail_msg("second run: %s", r2.err);
    /* planned from the committed offsets: fewer items than the topic holds */
    assert_int_equal(r2.sum.items, (uint64_t)(total - sum1));
    int64_t c2[6];
    committed("resume", "resumers", c2);
    for (int p = 0; p < 6; p++) assert_int_equal(c2[p], d.hw[p]);
    json_t *ids = index_ids(out, 2);
    assert_same_ids(ids, d.good);
    assert_int_equal(dead_letters(out, NULL), d.bad);
    json_decref(ids);
    json_decref(d.good);
}

// ------------------------------------------------------------------------------------------------
// twn run

/* `twn run` with s3:// and kafka:// inputs (S3 and Kafka settings from the environment) and an
 * s3:// output: the job is staged next to coordinator.journal and each shard's snapshot uploaded
 * under the output prefix, manifest last. */
static void test_twn_run_cli(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("run-sources-cli");
    s3_data d = make_s3_data("cli");
    kafka_data k = make_kafka_data("clitopic");
    char cmd[4096], stage[1100];
    snprintf(stage, sizeof stage, "%s/state", dir);
    snprintf(cmd, sizeof cmd,
             "AWS_ACCESS_KEY_ID=" AK " AWS_SECRET_ACCESS_KEY='" SECRET "' AWS_REGION=us-east-1 "
             "AWS_ENDPOINT_URL=%s TWN_KAFKA_BROKERS=%s TWN_KAFKA_GROUP=cli "
             "%s run --engine null --dim 16 --input s3://" BUCKET "/cli/ kafka://clitopic "
             "--out s3://" BUCKET "/outputs/cli --coordinator.journal %s/journal --shards 2 "
             "--unit-items 200 2>&1",
             g_front.endpoint, g_brokers, TWN_BIN, stage);
    char *log = NULL;
    int rc = tu_run(cmd, &log);
    if (rc) fail_msg("twn run failed (%d): %s", rc, log);
    char want[128];
    snprintf(want, sizeof want, "items %zu ", 2300 + d.bad + 3000 + k.bad);
    if (!strstr(log, want)) fail_msg("expected \"%s\" in: %s", want, log);
    if (!strstr(log, "bytes to s3://" BUCKET "/outputs/cli\n"))
        fail_msg("no upload line in: %s", log);
    free(log);
    json_t *ids = index_ids(stage, 2);
    /* twn run keeps the default limits.max_item_bytes (64 MiB) and kafka.max_inline_image_bytes
     * (1 MiB): the 5000-byte records and the 1200-byte inline image are good */
    json_object_set_new(d.good, "big", json_true());
    json_object_set_new(k.good, "clitopic-bad2", json_true());
    json_object_set_new(k.good, "clitopic-bad5", json_true());
    json_object_update(d.good, k.good);
    assert_same_ids(ids, d.good);

    /* the outputs in S3: every shard's files, byte for byte what was staged */
    twn_s3 *s = client();
    twn_s3_objects l = {0};
    twn_err err = {{0}};
    if (twn_s3_list(s, BUCKET, "outputs/cli/", &l, &err)) fail_msg("%s", err.msg);
    twn_str keys = {0};
    for (size_t i = 0; i < l.n; i++) twn_str_printf(&keys, "%s\n", l.v[i].key);
    assert_string_equal(keys.v, "outputs/cli/dead_letter.jsonl\n"
                                "outputs/cli/shard-00000/embeddings.npy\n"
                                "outputs/cli/shard-00000/faiss_ids.npy\n"
                                "outputs/cli/shard-00000/index.faiss\n"
                                "outputs/cli/shard-00000/items.jsonl\n"
                                "outputs/cli/shard-00000/manifest.json\n"
                                "outputs/cli/shard-00001/embeddings.npy\n"
                                "outputs/cli/shard-00001/faiss_ids.npy\n"
                                "outputs/cli/shard-00001/index.faiss\n"
                                "outputs/cli/shard-00001/items.jsonl\n"
                                "outputs/cli/shard-00001/manifest.json\n");
    for (int k2 = 0; k2 < 2; k2++) {
        char cur[1200], p[1400], key[128];
        snprintf(cur, sizeof cur, "%s/shard-%05d/CURRENT", stage, k2);
        size_t n;
        char *name = tu_read(cur, &n);
        name[strcspn(name, "\n")] = 0;
        snprintf(p, sizeof p, "%s/shard-%05d/%s/items.jsonl", stage, k2, name);
        free(name);
        snprintf(key, sizeof key, "outputs/cli/shard-%05d/items.jsonl", k2);
        char *want_b = tu_read(p, &n);
        uint8_t *got;
        size_t gn;
        if (twn_s3_get(s, BUCKET, key, 64u << 20, &got, &gn, &err)) fail_msg("%s", err.msg);
        assert_int_equal(gn, n);
        assert_memory_equal(got, want_b, n);
        twn_free(got);
        free(want_b);
    }
    twn_str_free(&keys);
    twn_s3_objects_free(&l);
    twn_s3_close(s);
    json_decref(ids);
    json_decref(d.good);
    json_decref(k.good);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_s3_exactly_once_with_faults),
        cmocka_unit_test(test_s3_coordinator_restart),
        cmocka_unit_test(test_s3_prefetch_pipeline),
        cmocka_unit_test_teardown(test_kafka_exactly_once_failover, brokers_up),
        cmocka_unit_test(test_kafka_coordinator_restart),
        cmocka_unit_test(test_twn_run_cli),
    };
    if (getenv("TWN_TEST_FILTER")) cmocka_set_test_filter(getenv("TWN_TEST_FILTER"));
    if (getenv("TWN_TEST_FILTER")) cmocka_set_test_filter(getenv("TWN_TEST_FILTER"));
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
