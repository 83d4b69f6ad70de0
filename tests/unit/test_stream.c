/* test_stream.c — kafka.streaming: the coordinator keeps planning what a topic receives while it
 * runs (coordinator/service.h), against librdkafka's mock cluster (3 brokers), with the whole
 * pipeline (coordinator, indexers, gate, reasoning worker as threads over inproc://, the null
 * engine).
 *
 *  - N records, a streaming job: all indexed (the group's committed offsets reach the high
 *    watermarks); M more produced while it runs: indexed too; stopped (the stop flag): it returns
 *    0, every id exactly once in the index, the committed offsets at the high watermarks, no
 *    JOB_FINISHED in the journal.
 *  - The same job started again on the same journal and output: K more records; all N + M + K
 *    ids exactly once, and the restarted coordinator planned and counted only the K new ones.
 *  - twn_srcio_plan_more: new units start where the plan's last unit of their partition ended
 *    (a partition new to the plan: at the group's committed offset), interleaved by rank; the
 *    offsets tracker follows the grown plan (twn_offsets_extend).
 *  - A streaming job without a kafka:// input is refused with a config error.
 * Every wait has a deadline; the test takes a few seconds. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/source_io.h"
#include "coordinator/journal.h"
#include "coordinator/offsets.h"
#include "coordinator/service.h"
#include "tests/testutil.h"
#include "tests/unit/kafka_peer.h"
#include "tests/unit/pipeline_harness.h"
#include "tests/unit/shard_out.h"
#include "util/clock.h"
#include "util/mem.h"
#include "util/vec.h"

#define TOPIC "live"
#define GROUP "streamers"
#define PARTS 3

static kp_cluster g_kc; /* the mock cluster */
static rd_kafka_t *g_q; /* watermarks, for the checks */

static int group_setup(void **state) {
    (void)state;
    if (kp_start(&g_kc, 3)) return -1;
    g_q = kp_producer(&g_kc, NULL);
    return rd_kafka_mock_topic_create(g_kc.mcl, TOPIC, PARTS, 3) ? -1 : 0;
}

static int group_teardown(void **state) {
    (void)state;
    if (g_q) rd_kafka_destroy(g_q);
    kp_stop(&g_kc);
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Kafka: producing, watermarks, committed offsets

static json_t *g_good; /* every id produced so far */
static int g_produced;

/* Records g_produced .. g_produced + n - 1, JSON keyed by id, round robin over the partitions;
 * flushed before returning. */
static void produce_more(int n) {
    rd_kafka_t *p = kp_producer(&g_kc, NULL);
    for (int i = g_produced; i < g_produced + n; i++) {
        char id[64], v[160];
        snprintf(id, sizeof id, TOPIC "-%05d", i);
        int len = snprintf(v, sizeof v, "{\"id\": \"%s\", \"text\": \"record %d\"}", id, i);
        kp_produce(p, TOPIC, i % PARTS, id, v, (size_t)len);
        json_object_set_new(g_good, id, json_true());
    }
    g_produced += n;
    kp_flush(p);
    rd_kafka_destroy(p);
}

static twn_kafka *g_k; /* committed offsets, for the checks */

static void high_water(int64_t out[PARTS]) {
    kp_high_water(g_q, TOPIC, PARTS, out, 5000);
}

static void committed(int64_t out[PARTS]) {
    twn_err err = {{0}};
    for (int p = 0; p < PARTS; p++)
        if (twn_kafka_committed(g_k, TOPIC, p, &out[p], &err)) out[p] = -2;
}

static int caught_up(void) {
    int64_t hw[PARTS], c[PARTS];
    high_water(hw);
    committed(c);
    for (int p = 0; p < PARTS; p++)
        if (c[p] != hw[p]) return 0;
    return 1;
}

// ------------------------------------------------------------------------------------------------
// The pipeline as threads (pipeline_harness.h)

/* What the job's driver does while the coordinator runs: produce more when the previous records
 * are all committed, then stop.  Deadline: 20 s per run. */
typedef struct driver {
    int produce_at_start; /* records produced once the roles run */
    int produce_later;    /* records produced once the first ones are committed */
    int phase;            /* 0 waiting for the first ones, 1 for the later ones, 2 done */
    int timed_out;
    double t0;
} driver;

/* 1: stop the coordinator. */
static int drive(driver *d) {
    if (twn_now() - d->t0 > 20.0) {
        d->timed_out = 1;
        return 1;
    }
    if (d->produce_at_start) {
        produce_more(d->produce_at_start);
        d->produce_at_start = 0;
        return 0;
    }
    if (!caught_up()) return 0;
    if (d->phase == 0 && d->produce_later) {
        produce_more(d->produce_later);
        d->phase = 1;
        return 0;
    }
    d->phase = 2;
    return 1;
}

static int watch_drive(void *user, const char *journal) {
    (void)journal;
    return drive(user);
}

typedef struct run_result {
    int status; /* the coordinator's */
    twn_coord_summary sum;
    char err[TWN_ERR_MAX];
} run_result;

/* The streaming job (2 shards, a gate, a worker) driven by d every 50 ms until it stops. */
static run_result run_stream(const char *out, const twn_srcio_cfg *io, driver *d) {
    const char *inputs[] = {"kafka://" TOPIC};
    ph_pipeline *p = ph_pipeline_new("run_stream", out, inputs, 1, 2, 1, 1, 16);
    twn_coord_cfg *cc = ph_coord(p);
    cc->unit_items = 16;
    cc->io = io;
    cc->streaming = 1;
    cc->stream_poll_s = 0.1;
    for (int k = 0; k < p->gates + p->workers; k++) ph_sender(p, k)->io = io;
    p->watch = watch_drive;
    p->user = d;
    p->watch_s = 0.05;
    p->drain_s = 20;
    ph_pipeline_start(p);
    d->t0 = twn_now();
    ph_pipeline_wait(p);
    run_result res = {.status = p->roles[0].status, .sum = p->roles[0].sum};
    snprintf(res.err, sizeof res.err, "%s", p->roles[0].err.msg);
    ph_pipeline_check(p);
    ph_pipeline_free(p);
    return res;
}

// ------------------------------------------------------------------------------------------------
// What the index and the journal hold

/* Every id of g_good exactly once in the shards' current snapshots, and nothing else. */
static void assert_index_exact(const char *out, int shards) {
    tp_index_exact(out, shards, g_good);
}

static void journal_counts(const char *path, int *done, int *finished) {
    twn_err err = {{0}};
    assert_int_equal(access(path, F_OK), 0);
    if (ph_journal_counts(path, done, finished, &err)) fail_msg("%s", err.msg);
}

static void assert_committed_at_high_water(void) {
    int64_t hw[PARTS], c[PARTS];
    high_water(hw);
    committed(c);
    for (int p = 0; p < PARTS; p++) {
        if (c[p] != hw[p])
            fail_msg("partition %d: committed %lld, high watermark %lld", p, (long long)c[p],
                     (long long)hw[p]);
    }
}

// ------------------------------------------------------------------------------------------------

enum { N = 300, M = 200, K = 150 };

static void test_stream_and_restart(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("stream");
    char out[1100], journal[1200];
    snprintf(out, sizeof out, "%s/out", dir);
    snprintf(journal, sizeof journal, "%s/journal", out);
    g_good = json_object();
    twn_srcio_cfg io;
    kp_srcio_cfg(&io, &g_kc, GROUP, 3000, 10000);
    twn_kafka_config kc = twn_kafka_config_default();
    kc.brokers = g_kc.brokers;
    kc.group = GROUP;
    kc.op_timeout_ms = 3000;
    twn_err err = {{0}};
    if (twn_kafka_open(&kc, &g_k, &err)) fail_msg("%s", err.msg);

    /* N before the start, M while it runs */
    produce_more(N);
    double t0 = twn_now();
    driver d1 = {.produce_later = M};
    run_result r1 = run_stream(out, &io, &d1);
    if (r1.status) fail_msg("first run: %s", r1.err);
    printf("stream: first run %.2f s, %llu items in %llu units\n", twn_now() - t0,
           (unsigned long long)r1.sum.items, (unsigned long long)r1.sum.units);
    assert_false(d1.timed_out);
    assert_int_equal(d1.phase, 2);
    assert_int_equal(r1.sum.items, N + M);
    assert_int_equal(r1.sum.duplicates, 0);
    assert_int_equal(r1.sum.rejected, 0);
    assert_committed_at_high_water();
    assert_index_exact(out, 2);
    int done1, fin1;
    journal_counts(journal, &done1, &fin1);
    assert_int_equal(done1, (int)r1.sum.units);
    assert_int_equal(fin1, 0); /* a stream is never finished */

    /* restarted on the same journal: planned from the committed offsets (nothing), K more */
    t0 = twn_now();
    driver d2 = {.produce_at_start = K};
    run_result r2 = run_stream(out, &io, &d2);
    if (r2.status) fail_msg("second run: %s", r2.err);
    printf("stream: second run %.2f s, %llu items in %llu units\n", twn_now() - t0,
           (unsigned long long)r2.sum.items, (unsigned long long)r2.sum.units);
    assert_false(d2.timed_out);
    assert_int_equal(r2.sum.items, K); /* only the new records were planned and indexed */
    assert_int_equal(r2.sum.duplicates, 0);
    assert_committed_at_high_water();
    assert_index_exact(out, 2);
    assert_int_equal(json_object_size(g_good), N + M + K);
    int done2, fin2;
    journal_counts(journal, &done2, &fin2);
    assert_int_equal(done2, done1 + (int)r2.sum.units);
    assert_int_equal(fin2, 0);

    twn_kafka_close(g_k);
    g_k = NULL;
    json_decref(g_good);
}

static void produce_to(const char *topic, int32_t part, int n) {
    for (int i = 0; i < n; i++) {
        char v[64];
        int len = snprintf(v, sizeof v, "{\"id\": \"%s-%d-%d\", \"text\": \"t\"}", topic, part, i);
        kp_produce(g_q, topic, part, NULL, v, (size_t)len);
    }
    assert_int_equal(rd_kafka_flush(g_q, 10000), 0);
}

static void assert_unit(const twn_src_unit *u, const char *path, uint64_t start, uint64_t end) {
    if (strcmp(u->path, path) || u->start != start || u->end != end)
        fail_msg("unit %llu: %s [%llu,%llu); expected %s [%llu,%llu)", (unsigned long long)u->id,
                 u->path, (unsigned long long)u->start, (unsigned long long)u->end, path,
                 (unsigned long long)start, (unsigned long long)end);
    assert_int_equal(u->first_index, start);
    assert_int_equal(u->count, end - start);
}

static void test_plan_more(void **state) {
    (void)state;
    assert_int_equal(rd_kafka_mock_topic_create(g_kc.mcl, "grow", 2, 3), 0);
    produce_to("grow", 0, 5);
    twn_srcio_cfg cfg;
    twn_srcio_cfg_default(&cfg);
    cfg.kafka.brokers = g_kc.brokers;
    cfg.kafka.group = "grow-group";
    cfg.kafka.op_timeout_ms = 3000;
    twn_srcio *io;
    twn_err err = {{0}};
    assert_int_equal(twn_srcio_open(&cfg, &io, &err), 0);
    const char *inputs[] = {"kafka://grow"};
    twn_src_units plan = {0};
    size_t nk = 0, n_new = 9;
    if (twn_srcio_plan(io, inputs, 1, 4, &plan, &nk, &err)) fail_msg("%s", err.msg);
    assert_int_equal(plan.n, 2);
    assert_unit(&plan.v[0], "kafka://grow/0", 0, 4);
    assert_unit(&plan.v[1], "kafka://grow/0", 4, 5);
    twn_offsets *o;
    assert_int_equal(twn_offsets_new(&plan, 0, &o, &err), 0);
    assert_int_equal(twn_offsets_count(o), 1);
    if (twn_offsets_commit(o, io, 2, 1.0, 1, &err)) fail_msg("%s", err.msg);
    assert_int_equal(twn_offsets_committed(o, 0, NULL, NULL), 5);

    /* nothing new: nothing planned */
    if (twn_srcio_plan_more(io, inputs, 1, 4, &plan, &n_new, &err)) fail_msg("%s", err.msg);
    assert_int_equal(n_new, 0);
    assert_int_equal(plan.n, 2);

    /* p0 grows to 8, p1 (empty until now) to 6 */
    produce_to("grow", 0, 3);
    produce_to("grow", 1, 6);
    if (twn_srcio_plan_more(io, inputs, 1, 4, &plan, &n_new, &err)) fail_msg("%s", err.msg);
    assert_int_equal(n_new, 3);
    assert_int_equal(plan.n, 5);
    assert_unit(&plan.v[2], "kafka://grow/0", 5, 8);
    assert_unit(&plan.v[3], "kafka://grow/1", 0, 4);
    assert_unit(&plan.v[4], "kafka://grow/1", 4, 6);
    for (size_t i = 0; i < plan.n; i++) assert_int_equal(plan.v[i].id, i);
    if (twn_srcio_plan_more(io, inputs, 1, 4, &plan, &n_new, &err)) fail_msg("%s", err.msg);
    assert_int_equal(n_new, 0);

    /* the tracker follows: p0 at 8 and p1 at 4 with units 0..3 durable, then p1 at 6 */
    assert_int_equal(twn_offsets_extend(o, &err), 0);
    assert_int_equal(twn_offsets_count(o), 2);
    if (twn_offsets_commit(o, io, 4, 2.0, 1, &err)) fail_msg("%s", err.msg);
    assert_int_equal(twn_offsets_committed(o, 0, NULL, NULL), 8);
    assert_int_equal(twn_offsets_committed(o, 1, NULL, NULL), 4);
    if (twn_offsets_commit(o, io, 5, 3.0, 1, &err)) fail_msg("%s", err.msg);
    assert_int_equal(twn_offsets_committed(o, 1, NULL, NULL), 6);

    /* a partition the plan has no unit of starts at the group's committed offset */
    twn_src_units fresh = {0};
    produce_to("grow", 1, 2);
    if (twn_srcio_plan_more(io, inputs, 1, 4, &fresh, &n_new, &err)) fail_msg("%s", err.msg);
    assert_int_equal(n_new, 1);
    assert_unit(&fresh.v[0], "kafka://grow/1", 6, 8);
    twn_src_units_free(&fresh);

    twn_offsets_free(o);
    twn_src_units_free(&plan);
    twn_srcio_close(io);
}

static void test_stream_needs_kafka(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("stream-nokafka");
    char in[1100];
    snprintf(in, sizeof in, "%s/a.jsonl", dir);
    tu_write(in, "{\"id\": \"a\", \"text\": \"x\"}\n", 26);
    const char *inputs[] = {in};
    twn_coord_cfg cc;
    twn_coord_cfg_default(&cc);
    cc.inputs = inputs;
    cc.n_inputs = 1;
    cc.streaming = 1;
    twn_coord_summary sum;
    twn_err err = {{0}};
    assert_int_equal(twn_coord_run(&cc, &sum, &err), -1);
    assert_string_equal(err.msg, "config: kafka.streaming = true but job.inputs has no kafka:// "
                                 "input; expected at least one kafka://topic (or kafka.streaming "
                                 "= false)");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stream_needs_kafka),
        cmocka_unit_test(test_plan_more),
        cmocka_unit_test_teardown(test_stream_and_restart, ph_teardown),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
