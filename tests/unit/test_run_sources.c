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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/prefetch.h"
#include "common/source_io.h"
#include "common/source_s3.h"
#include "gate_service/null_engine.h"
#include "tests/testutil.h"
#include "tests/unit/corpus.h"
#include "tests/unit/kafka_peer.h"
#include "tests/unit/pipeline_harness.h"
#include "tests/unit/s3_peer.h"
#include "tests/unit/shard_out.h"
#include "util/clock.h"
#include "util/mem.h"
#include "util/vec.h"

#define AK     "TWNRUNAKID"
#define SECRET "twn-run/Secret+Key0123"
#define BUCKET "twn-run"

static s3p g_s3;        /* the S3 front */
static kp_cluster g_kc; /* the Kafka mock cluster (3 brokers) */

static int group_setup(void **state) {
    (void)state;
    if (s3p_start(&g_s3, "test_run_sources", "run-sources-s3", AK, SECRET, BUCKET, 600)) return -1;
    return kp_start(&g_kc, 3);
}

static int group_teardown(void **state) {
    (void)state;
    kp_stop(&g_kc);
    s3p_stop(&g_s3);
    return 0;
}

static int brokers_up(void **state) {
    (void)state;
    kp_brokers_up(&g_kc);
    return ph_teardown(state);
}

// ------------------------------------------------------------------------------------------------
// The pipeline as threads

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
    char out_v[1100];       /* job_init's storage for out and the input */
    const char *inputs_v[1];
} job;

/* A job over one input writing to tu_tmpdir(tag)/out, io for every role, items of at most 4096
 * bytes; the other fields are the test's to set. */
static void job_init(job *jb, const char *tag, const char *input, const twn_srcio_cfg *io,
                     int shards, int gates, int workers, uint64_t unit_items) {
    memset(jb, 0, sizeof *jb);
    snprintf(jb->out_v, sizeof jb->out_v, "%s/out", tu_tmpdir(tag));
    jb->inputs_v[0] = input;
    jb->inputs = jb->inputs_v;
    jb->n_inputs = 1;
    jb->out = jb->out_v;
    jb->shards = shards;
    jb->gates = gates;
    jb->workers = workers;
    jb->unit_items = unit_items;
    jb->io = io;
    jb->max_item_bytes = 4096;
}

typedef struct run_result {
    int status; /* the coordinator's */
    twn_coord_summary sum;
    char err[TWN_ERR_MAX];
} run_result;

/* The job with every role as a thread (pipeline_harness.h: deadlines, the drain after the
 * coordinator, a context shut down under a role still blocked on a vanished coordinator). */
static run_result run_job(const job *jb) {
    ph_pipeline *p = ph_pipeline_new("run_job", jb->out, jb->inputs, jb->n_inputs, jb->shards,
                                     jb->gates, jb->workers, 16);
    ph_coord(p)->unit_items = jb->unit_items;
    ph_coord(p)->io = jb->io;
    for (int k = 0; k < jb->gates + jb->workers; k++) {
        twn_role_cfg *rc = ph_sender(p, k);
        rc->io = jb->io;
        if (jb->max_item_bytes) rc->src.max_item_bytes = jb->max_item_bytes;
        if (k < jb->gates) {
            rc->prefetch = jb->prefetch;
            if (jb->gate_credits) rc->credits = jb->gate_credits;
        }
    }
    p->watch = jb->watch;
    p->user = jb->user;
    ph_pipeline_run(p);
    run_result res = {.status = p->roles[0].status, .sum = p->roles[0].sum};
    snprintf(res.err, sizeof res.err, "%s", p->roles[0].err.msg);
    ph_pipeline_check(p);
    ph_pipeline_free(p);
    return res;
}

/* UNIT_DONE records in a journal so far, and whether it says the job finished. */
static void journal_counts(const char *path, int *done, int *finished) {
    twn_err err;
    ph_journal_counts(path, done, finished, &err); /* a torn tail mid-run counts up to it */
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
    json_t *seen = tp_dead_letter_refs(p);
    size_t n = json_object_size(seen);
    json_decref(seen);
    if (reasons) {
        json_t *dl = tp_jsonl_read(p), *d;
        size_t i;
        json_array_foreach(dl, i, d) {
            twn_str_printf(reasons, "[%s] %s\n", json_string_value(json_object_get(d, "stage")),
                           json_string_value(json_object_get(d, "reason")));
        }
        json_decref(dl);
    }
    return n;
}

static void must_contain(const twn_str *s, const char *what) {
    if (!s->v || !strstr(s->v, what)) fail_msg("dead letters lack \"%s\":\n%s", what, s->v);
}

// ------------------------------------------------------------------------------------------------
// S3 data: JSONL and tar objects

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
    twn_s3 *s = s3p_client(&g_s3);
    char key[256];
    twn_str b = {0};
    static const uint8_t img[] = {0xff, 0xd8, 0xff, 0xe0, 'f', 'a', 'k', 'e', 0xff, 0xd9};
    snprintf(key, sizeof key, "%s-img/cat.jpg", prefix); /* outside the prefix: not an input */
    s3p_put(s, BUCKET, key, img, sizeof img);
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
        s3p_put(s, BUCKET, key, b.v, b.n);
        d.bytes += b.n;
    }
    for (int f = 0; f < 2; f++) {
        twn_str_reset(&b);
        for (int i = 0; i < 400; i++) {
            char name[128], text[64];
            snprintf(name, sizeof name, "%s-t%d-%03d.txt", prefix, f, i);
            snprintf(text, sizeof text, "tar item %d of %d", i, f);
            tc_tar_member(&b, name, text, strlen(text));
            snprintf(name, sizeof name, "%s-t%d-%03d.jpg", prefix, f, i);
            tc_tar_member(&b, name, img, sizeof img);
            snprintf(name, sizeof name, "%s-t%d-%03d", prefix, f, i);
            json_object_set_new(d.good, name, json_true());
        }
        tc_tar_end(&b);
        snprintf(key, sizeof key, "%s/shard-%d.tar", prefix, f);
        s3p_put(s, BUCKET, key, b.v, b.n);
        d.bytes += b.n;
    }
    twn_str_free(&b);
    twn_s3_close(s);
    return d;
}

static twn_srcio_cfg s3_io(void) {
    twn_srcio_cfg io;
    twn_srcio_cfg_default(&io);
    io.s3 = s3p_config(&g_s3);
    return io;
}

static void test_s3_exactly_once_with_faults(void **state) {
    (void)state;
    s3_data d = make_s3_data("e2e");
    twn_srcio_cfg io = s3_io();
    job jb;
    job_init(&jb, "run-sources-s3-e2e", "s3://" BUCKET "/e2e/", &io, 3, 2, 2, 100);
    s3p_post(&g_s3, "/__twn/reset", "{}");
    /* faults on object GETs (the listing and HEADs stay clean, so each rule is used by a read) */
    s3p_post(&g_s3, "/__twn/fault",
             "{\"kind\": \"500\", \"count\": 3, \"method\": \"GET\", "
             "\"match\": \"/e2e/part-\"}");
    s3p_post(&g_s3, "/__twn/fault",
             "{\"kind\": \"reset\", \"count\": 2, \"method\": \"GET\", "
             "\"match\": \"/e2e/shard-\"}");
    s3p_post(&g_s3, "/__twn/fault",
             "{\"kind\": \"truncate\", \"count\": 2, \"method\": \"GET\", "
             "\"match\": \"/e2e/shard-1\"}");
    s3p_post(&g_s3, "/__twn/fault",
             "{\"kind\": \"slow\", \"count\": 1, \"delay_ms\": 1500, "
             "\"method\": \"GET\", \"match\": \"/e2e/part-2\"}");
    double t0 = twn_now();
    run_result r = run_job(&jb);
    double secs = twn_now() - t0;
    if (r.status) fail_msg("coordinator: %s", r.err);
    assert_int_equal(r.sum.items, 2300 + d.bad);
    assert_int_equal(r.sum.rejected, d.bad);
    assert_int_equal(r.sum.easy + r.sum.hard, 2300);
    assert_true(r.sum.hard > 100 && r.sum.easy > 100); /* both paths ran */
    json_t *ids = index_ids(jb.out, 3);
    assert_same_ids(ids, d.good);
    twn_str reasons = {0};
    assert_int_equal(dead_letters(jb.out, &reasons), d.bad);
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
    json_t *st = s3p_stats(&g_s3);
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
    twn_s3 *s = s3p_client(&g_s3);
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
        s3p_put(s, BUCKET, key, b.v, b.n);
    }
    twn_str_free(&b);
    twn_s3_close(s);
    char input[64] = "s3://" BUCKET "/pfe/";
    const char *inputs[] = {input};
    twn_srcio_cfg io = s3_io();
    double secs[2];
    size_t n_gets[2];
    /* leases re-leased (expired, abandoned, their holder declared dead): each may read its unit
     * again; none is expected in a job this short */
    double expired0 = ph_metric("twn_lease_expiries_total", "lease=unit");
    for (int pass = 0; pass < 2; pass++) { /* 0: 4 readers, 1: none */
        char out[1100];
        snprintf(out, sizeof out, "%s/out-%d", dir, pass);
        twn_prefetch *pool = NULL;
        twn_err err = {{0}};
        if (!pass) assert_int_equal(twn_prefetch_open(&io.s3, 4, 0, &pool, &err), 0);
        s3p_post(&g_s3, "/__twn/reset", "{}");
        s3p_post(&g_s3, "/__twn/fault",
                 "{\"kind\": \"slow\", \"count\": 100000, \"delay_ms\": 100, "
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
        json_t *fst = s3p_stats(&g_s3), *log = json_object_get(fst, "log");
        size_t gets = 0;
        for (size_t i = 0; i < json_array_size(log); i++)
            gets += !strcmp(json_string_value(json_object_get(json_array_get(log, i), "method")),
                            "GET");
        n_gets[pass] = gets;
        json_decref(fst);
        if (!pass) {
            /* a dropped fetch still under way gives its room back when it ends */
            for (int i = 0; i < 500 && twn_prefetch_get_stats(pool).held; i++) ph_nap(0.01);
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
    /* the pool's windows cover what the readers look at: no unit is fetched twice unless its
     * lease was re-leased (a gate's Hello sent again before its Welcome came used to end its
     * first leases: 4 units read twice in both passes on a loaded machine) */
    double expired = ph_metric("twn_lease_expiries_total", "lease=unit") - expired0;
    printf("s3 prefetch: %.0f leases re-leased\n", expired);
    assert_true((double)n_gets[0] <= (double)n_gets[1] + expired);
    assert_true(expired == 0);
    /* the wall times are printed, not asserted: busy_max and fetched above show the read-ahead */
    json_decref(want);
    s3p_post(&g_s3, "/__twn/reset", "{}");
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
    s3_data d = make_s3_data("rs");
    twn_srcio_cfg io = s3_io();
    job jb;
    job_init(&jb, "run-sources-s3-restart", "s3://" BUCKET "/rs/", &io, 2, 1, 1, 50);
    s3p_post(&g_s3, "/__twn/reset", "{}");
    /* slow bodies keep the first run going long enough to be stopped in the middle */
    s3p_post(&g_s3, "/__twn/fault",
             "{\"kind\": \"slow\", \"count\": 6, \"delay_ms\": 300, "
             "\"method\": \"GET\", \"match\": \"/rs/\"}");
    stop_at sa = {.want = 5};
    jb.watch = watch_stop;
    jb.user = &sa;
    run_result r1 = run_job(&jb);
    assert_int_equal(r1.status, -1);
    assert_string_equal(r1.err, "coordinator: stopped before the job finished");
    char journal[1200];
    snprintf(journal, sizeof journal, "%s/journal", jb.out);
    int done1, fin1;
    journal_counts(journal, &done1, &fin1);
    int total_units = 0;
    {
        twn_s3 *s = s3p_client(&g_s3);
        twn_src_units u = {0};
        twn_err err = {{0}};
        if (twn_src_plan_s3_units(s, jb.inputs[0], TWN_SRC_AUTO, 50, &u, &err))
            fail_msg("%s", err.msg);
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
    json_t *ids = index_ids(jb.out, 2);
    assert_same_ids(ids, d.good);
    assert_int_equal(dead_letters(jb.out, NULL), d.bad);
    json_decref(ids);
    json_decref(d.good);
}

// ------------------------------------------------------------------------------------------------
// Kafka

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
    assert_int_equal(rd_kafka_mock_topic_create(g_kc.mcl, topic, 6, 3), 0);
    rd_kafka_t *p = kp_producer(&g_kc, "enable.idempotence", "true", NULL);
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
        kp_produce(p, topic, i % 6, id, s.v, s.n);
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
            kp_produce(p, topic, b, bid, s.v, s.n);
            d.bad++;
        }
    }
    kp_flush(p);
    kp_high_water(p, topic, 6, d.hw, 10000);
    rd_kafka_destroy(p);
    twn_str_free(&s);
    return d;
}

static twn_srcio_cfg kafka_io(const char *group) {
    twn_srcio_cfg io = s3_io();
    io.kafka.brokers = g_kc.brokers;
    io.kafka.group = group;
    io.kafka.read_timeout_ms = 30000;
    io.kafka.op_timeout_ms = 3000;
    io.kafka.max_inline_image_bytes = 1000;
    return io;
}

static void committed(const char *topic, const char *group, int64_t out[6]) {
    kp_committed(&g_kc, topic, group, 6, out);
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
        rd_kafka_mock_broker_set_down(g_kc.mcl, 2);
        for (int p = 0; p < 6; p++) rd_kafka_mock_partition_set_leader(g_kc.mcl, "stream", p, 3);
        c->phase = 1;
        c->t_down = twn_now();
    } else if (c->phase == 1 && (twn_now() - c->t_down > 2.0 || done >= 24)) {
        /* back up after 2 s, or sooner when the job has moved on (24 of its 60 units done): a
         * fast run must still see the broker return before it ends */
        rd_kafka_mock_broker_set_up(g_kc.mcl, 2);
        for (int p = 0; p < 6; p += 2) rd_kafka_mock_partition_set_leader(g_kc.mcl, "stream", p, 2);
        c->phase = 2;
    }
    (void)fin;
    return 0;
}

static void test_kafka_exactly_once_failover(void **state) {
    (void)state;
    kafka_data d = make_kafka_data("stream");
    /* the group coordinator stays on broker 1; leaders start on broker 2 */
    assert_int_equal(rd_kafka_mock_coordinator_set(g_kc.mcl, "group", "indexers", 1), 0);
    for (int p = 0; p < 6; p++)
        assert_int_equal(rd_kafka_mock_partition_set_leader(g_kc.mcl, "stream", p, 2), 0);
    twn_srcio_cfg io = kafka_io("indexers");
    chaos ch = {0};
    job jb;
    job_init(&jb, "run-sources-kafka", "kafka://stream", &io, 3, 3, 2, 50);
    jb.watch = watch_chaos;
    jb.user = &ch;
    double t0 = twn_now();
    run_result r = run_job(&jb);
    if (r.status) fail_msg("coordinator: %s", r.err);
    printf("kafka failover: %.2f s, phase %d, %llu items\n", twn_now() - t0, ch.phase,
           (unsigned long long)r.sum.items);
    assert_int_equal(ch.phase, 2); /* the broker went down and came back during the run */
    assert_int_equal(r.sum.items, 3000 + d.bad);
    assert_int_equal(r.sum.rejected, d.bad);
    json_t *ids = index_ids(jb.out, 3);
    assert_same_ids(ids, d.good);
    twn_str reasons = {0};
    assert_int_equal(dead_letters(jb.out, &reasons), d.bad);
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
    kafka_data d = make_kafka_data("resume");
    twn_srcio_cfg io = kafka_io("resumers");
    commit_seen cs = {"resume", "resumers"};
    stop_at sa = {.want = 12, .extra = some_committed, .extra_user = &cs};
    job jb;
    job_init(&jb, "run-sources-kafka-restart", "kafka://resume", &io, 2, 1, 1, 20);
    jb.watch = watch_stop;
    jb.user = &sa;
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
    json_t *ids = index_ids(jb.out, 2);
    assert_same_ids(ids, d.good);
    assert_int_equal(dead_letters(jb.out, NULL), d.bad);
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
             g_s3.front.endpoint, g_kc.brokers, TWN_BIN, stage);
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
    twn_s3 *s = s3p_client(&g_s3);
    twn_str keys = {0};
    s3p_keys(s, BUCKET, "outputs/cli/", &keys);
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
        char shard[1200], snap[1400], p[1500], key[128];
        snprintf(shard, sizeof shard, "%s/shard-%05d", stage, k2);
        tp_snapshot_dir(shard, snap, sizeof snap);
        snprintf(p, sizeof p, "%s/items.jsonl", snap);
        snprintf(key, sizeof key, "outputs/cli/shard-%05d/items.jsonl", k2);
        s3p_same_object(s, BUCKET, key, p);
    }
    twn_str_free(&keys);
    twn_s3_close(s);
    json_decref(ids);
    json_decref(d.good);
    json_decref(k.good);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_s3_exactly_once_with_faults, ph_teardown),
        cmocka_unit_test_teardown(test_s3_coordinator_restart, ph_teardown),
        cmocka_unit_test_teardown(test_s3_prefetch_pipeline, ph_teardown),
        cmocka_unit_test_teardown(test_kafka_exactly_once_failover, brokers_up),
        cmocka_unit_test_teardown(test_kafka_coordinator_restart, ph_teardown),
        cmocka_unit_test(test_twn_run_cli),
    };
    if (getenv("TWN_TEST_FILTER")) cmocka_set_test_filter(getenv("TWN_TEST_FILTER"));
    if (getenv("TWN_TEST_FILTER")) cmocka_set_test_filter(getenv("TWN_TEST_FILTER"));
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
