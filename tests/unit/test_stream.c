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
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "common/source_io.h"
#include "coordinator/journal.h"
#include "coordinator/offsets.h"
#include "coordinator/service.h"
#include "gate_service/null_engine.h"
#include "index/service.h"
#include "tests/testutil.h"
#include "tests/unit/shard_out.h"
#include "util/clock.h"
#include "util/mem.h"
#include "util/vec.h"
#include "worker/worker.h"

#define TOPIC "live"
#define GROUP "streamers"
#define PARTS 3

static rd_kafka_t *g_rk; /* owns the mock cluster */
static rd_kafka_mock_cluster_t *g_mcl;
static const char *g_brokers;
static rd_kafka_t *g_q; /* watermarks, for the checks */

static void nap(double s) {
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

static void quiet_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf) {
    (void)rk, (void)level, (void)fac, (void)buf;
}

static int group_setup(void **state) {
    (void)state;
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, quiet_log);
    g_rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    if (!g_rk || !(g_mcl = rd_kafka_mock_cluster_new(g_rk, 3))) return -1;
    g_brokers = rd_kafka_mock_cluster_bootstraps(g_mcl);
    conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, quiet_log);
    if (rd_kafka_conf_set(conf, "bootstrap.servers", g_brokers, errstr, sizeof errstr) ||
        !(g_q = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr)))
        return -1;
    return rd_kafka_mock_topic_create(g_mcl, TOPIC, PARTS, 3) ? -1 : 0;
}

static int group_teardown(void **state) {
    (void)state;
    if (g_q) rd_kafka_destroy(g_q);
    if (g_mcl) rd_kafka_mock_cluster_destroy(g_mcl);
    if (g_rk) rd_kafka_destroy(g_rk);
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Kafka: producing, watermarks, committed offsets

static json_t *g_good; /* every id produced so far */
static int g_produced;

/* Records g_produced .. g_produced + n - 1, JSON keyed by id, round robin over the partitions;
 * flushed before returning. */
static void produce_more(int n) {
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, quiet_log);
    assert_int_equal(rd_kafka_conf_set(conf, "bootstrap.servers", g_brokers, errstr, sizeof errstr),
                     RD_KAFKA_CONF_OK);
    rd_kafka_t *p = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    assert_non_null(p);
    for (int i = g_produced; i < g_produced + n; i++) {
        char id[64], v[160];
        snprintf(id, sizeof id, TOPIC "-%05d", i);
        int len = snprintf(v, sizeof v, "{\"id\": \"%s\", \"text\": \"record %d\"}", id, i);
        rd_kafka_resp_err_t e;
        for (;;) {
            e = rd_kafka_producev(p, RD_KAFKA_V_TOPIC(TOPIC), RD_KAFKA_V_PARTITION(i % PARTS),
                                  RD_KAFKA_V_KEY(id, strlen(id)), RD_KAFKA_V_VALUE(v, (size_t)len),
                                  RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
            if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL) break;
            rd_kafka_poll(p, 10);
        }
        assert_int_equal(e, 0);
        json_object_set_new(g_good, id, json_true());
    }
    g_produced += n;
    assert_int_equal(rd_kafka_flush(p, 20000), 0);
    rd_kafka_destroy(p);
}

static twn_kafka *g_k; /* committed offsets, for the checks */

static void high_water(int64_t out[PARTS]) {
    for (int p = 0; p < PARTS; p++) {
        int64_t lo;
        assert_int_equal(rd_kafka_query_watermark_offsets(g_q, TOPIC, p, &lo, &out[p], 5000), 0);
    }
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
// The pipeline as threads (as test_run_sources.c)

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

typedef struct run_result {
    int status; /* the coordinator's */
    twn_coord_summary sum;
    char err[TWN_ERR_MAX];
} run_result;

static run_result run_stream(const char *out, const twn_srcio_cfg *io, driver *d) {
    static int seq;
    char control[64], journal[1100], dead[1100];
    int tag = ++seq;
    const char *inputs[] = {"kafka://" TOPIC};
    const int shards = 2, gates = 1, workers = 1;
    snprintf(control, sizeof control, "inproc://stream-control-%d", tag);
    snprintf(journal, sizeof journal, "%s/journal", out);
    snprintf(dead, sizeof dead, "%s/dead_letter.jsonl", out);
    mkdir(out, 0755);
    volatile int stop_coord = 0, stop_rest = 0;
    void *zctx = zmq_ctx_new();
    size_t n = 1 + shards + gates + workers;
    role *roles = twn_calloc(n, sizeof *roles);
    pthread_t *th = twn_calloc(n, sizeof *th);
    const char *eps[2];
    role *c = &roles[0];
    twn_coord_cfg_default(&c->cc);
    c->cc.zctx = zctx;
    c->cc.endpoint = control;
    c->cc.inputs = inputs;
    c->cc.n_inputs = 1;
    c->cc.unit_items = 16;
    c->cc.journal_path = journal;
    c->cc.dead_letter_path = dead;
    c->cc.model_hash = "null";
    c->cc.shards = (uint32_t)shards;
    c->cc.shard_endpoints = eps;
    c->cc.stop = &stop_coord;
    c->cc.io = io;
    c->cc.streaming = 1;
    c->cc.stream_poll_s = 0.1;
    for (int s = 0; s < shards; s++) {
        role *r = &roles[1 + s];
        r->kind = 1;
        snprintf(r->ep, sizeof r->ep, "inproc://stream-shard-%d-%d", tag, s);
        snprintf(r->dir, sizeof r->dir, "%s/shard-%05d", out, s);
        snprintf(r->id, sizeof r->id, "indexer-%d", s);
        eps[s] = r->ep;
        twn_indexer_cfg_default(&r->ic);
        r->ic.zctx = zctx;
        r->ic.control = control;
        r->ic.id = r->id;
        r->ic.endpoint = r->ep;
        r->ic.dir = r->dir;
        r->ic.shard = s;
        r->ic.n_shards = shards;
        r->ic.dim = 16;
        r->ic.factory = "Flat";
        r->ic.model = "null";
        r->ic.model_hash = "null";
        r->ic.stop = &stop_rest;
    }
    for (int g = 0; g < gates + workers; g++) {
        role *r = &roles[1 + shards + g];
        r->kind = g < gates ? 2 : 3;
        snprintf(r->id, sizeof r->id, g < gates ? "gate-%d" : "worker-%d",
                 g < gates ? g : g - gates);
        twn_role_cfg_default(&r->rc);
        r->rc.zctx = zctx;
        r->rc.control = control;
        r->rc.id = r->id;
        r->rc.null_dim = 16;
        r->rc.stop = &stop_rest;
        r->rc.io = io;
    }
    for (size_t i = 1; i <= (size_t)shards; i++) pthread_create(&th[i], NULL, role_main, &roles[i]);
    pthread_create(&th[0], NULL, role_main, &roles[0]);
    for (size_t i = 1 + (size_t)shards; i < n; i++)
        pthread_create(&th[i], NULL, role_main, &roles[i]);
    d->t0 = twn_now();
    while (!stop_coord && !roles[0].finished) {
        nap(0.05);
        if (drive(d)) stop_coord = 1;
    }
    pthread_join(th[0], NULL);
    /* the indexers got Shutdown and write their snapshots; then gates and workers stop */
    if (roles[0].status) stop_rest = 1;
    double until = twn_now() + (roles[0].status ? 1.0 : 20.0);
    int forced = 0;
    for (;;) {
        size_t left = 0, ix_left = 0;
        for (size_t i = 1; i < n; i++) left += !roles[i].finished;
        for (size_t i = 1; i <= (size_t)shards; i++) ix_left += !roles[i].finished;
        if (!left) break;
        if (twn_now() > until) {
            stop_rest = 1;
            nap(0.5);
            zmq_ctx_shutdown(zctx);
            forced = 1;
            break;
        }
        if (!ix_left) stop_rest = 1;
        nap(0.01);
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
    return res;
}

// ------------------------------------------------------------------------------------------------
// What the index and the journal hold

/* Every id of g_good exactly once in the shards' current snapshots, and nothing else. */
static void assert_index_exact(const char *out, int shards) {
    tp_shards s = tp_shards_read(out, shards); /* fails on an id seen twice */
    const char *id;
    json_t *v;
    json_object_foreach(s.items, id, v) {
        if (!json_object_get(g_good, id)) fail_msg("id %s is in the index but was never sent", id);
    }
    json_object_foreach(g_good, id, v) {
        if (!json_object_get(s.items, id)) fail_msg("%s is missing from the index", id);
    }
    assert_int_equal(json_object_size(s.items), json_object_size(g_good));
    tp_shards_free(&s);
}

static int count_recs(void *ctx, const twn_jrec *r, twn_err *err) {
    (void)err;
    int *c = ctx;
    if (r->type == TWN_JREC_UNIT_DONE) c[0]++;
    if (r->type == TWN_JREC_JOB_FINISHED) c[1]++;
    return 0;
}

static void journal_counts(const char *path, int *done, int *finished) {
    int c[2] = {0, 0};
    size_t n;
    char *b = tu_read(path, &n);
    twn_err err = {{0}};
    if (twn_journal_replay_mem(b, n, path, NULL, count_recs, c, NULL, &err))
        fail_msg("%s", err.msg);
    free(b);
    *done = c[0];
    *finished = c[1];
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
    twn_srcio_cfg_default(&io);
    io.kafka.brokers = g_brokers;
    io.kafka.group = GROUP;
    io.kafka.op_timeout_ms = 3000;
    io.kafka.read_timeout_ms = 10000;
    twn_kafka_config kc = twn_kafka_config_default();
    kc.brokers = g_brokers;
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
        assert_int_equal(rd_kafka_producev(g_q, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_PARTITION(part),
                                           RD_KAFKA_V_VALUE(v, (size_t)len),
                                           RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                           RD_KAFKA_V_END),
                         0);
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
    assert_int_equal(rd_kafka_mock_topic_create(g_mcl, "grow", 2, 3), 0);
    produce_to("grow", 0, 5);
    twn_srcio_cfg cfg;
    twn_srcio_cfg_default(&cfg);
    cfg.kafka.brokers = g_brokers;
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
        cmocka_unit_test(test_stream_and_restart),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
