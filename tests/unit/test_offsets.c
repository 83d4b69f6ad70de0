/* test_offsets.c — coordinator/offsets.h against librdkafka's mock cluster: the commit point of
 * each partition is the start of its first unit at or after the durable low-water mark (plan
 * order, partitions interleaved), commits only move forward, are paced by min_interval unless
 * forced, and a failed commit (every broker down) is an error that leaves the offsets alone. */
#include <stdio.h>
#include <string.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "coordinator/offsets.h"
#include "tests/testutil.h"
#include "util/mem.h"

static void quiet_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf) {
    (void)rk, (void)level, (void)fac, (void)buf;
}

static void committed(twn_kafka *k, int64_t *p0, int64_t *p1) {
    twn_err err = {{0}};
    if (twn_kafka_committed(k, "off", 0, p0, &err) || twn_kafka_committed(k, "off", 1, p1, &err))
        fail_msg("%s", err.msg);
}

static void test_commit_points(void **state) {
    (void)state;
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, quiet_log);
    rd_kafka_t *owner = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    rd_kafka_mock_cluster_t *mcl = rd_kafka_mock_cluster_new(owner, 3);
    assert_non_null(mcl);
    assert_int_equal(rd_kafka_mock_topic_create(mcl, "off", 2, 3), 0);

    /* the plan: p0 [0,10) p1 [0,10) p0 [10,20) p1 [10,20) p0 [20,25), after a local file */
    twn_src_units plan = {0};
    const char *paths[] = {"/x.jsonl",      "kafka://off/0", "kafka://off/1",
                           "kafka://off/0", "kafka://off/1", "kafka://off/0"};
    const uint64_t st[] = {0, 0, 0, 10, 10, 20}, en[] = {100, 10, 10, 20, 20, 25};
    for (int i = 0; i < 6; i++) {
        if (plan.n == plan.cap) {
            plan.cap = plan.cap ? 2 * plan.cap : 8;
            plan.v = twn_realloc(plan.v, plan.cap * sizeof *plan.v);
        }
        plan.v[plan.n++] = (twn_src_unit){.id = (uint64_t)i,
                                          .format = i ? TWN_SRC_KAFKA_JSON : TWN_SRC_JSONL,
                                          .path = twn_strdup(paths[i]),
                                          .start = st[i],
                                          .end = en[i]};
    }
    twn_offsets *o;
    twn_err err = {{0}};
    assert_int_equal(twn_offsets_new(&plan, 0.5, &o, &err), 0);
    assert_int_equal(twn_offsets_count(o), 2);

    twn_srcio_cfg cfg;
    twn_srcio_cfg_default(&cfg);
    cfg.kafka.brokers = rd_kafka_mock_cluster_bootstraps(mcl);
    cfg.kafka.group = "off-group";
    cfg.kafka.op_timeout_ms = 2000;
    twn_srcio *io;
    assert_int_equal(twn_srcio_open(&cfg, &io, &err), 0);
    twn_kafka *k;
    assert_int_equal(twn_srcio_kafka(io, &k, &err), 0);

    int64_t p0, p1;
    /* units 0..3 durable (the file, p0 [0,10), p1 [0,10), p0 [10,20)): p0 at 20, p1 at 10 */
    if (twn_offsets_commit(o, io, 4, 100.0, 0, &err)) fail_msg("%s", err.msg);
    committed(k, &p0, &p1);
    assert_int_equal(p0, 20);
    assert_int_equal(p1, 10);
    /* 0.2 s later everything is durable, but the pace is 0.5 s: nothing yet */
    assert_int_equal(twn_offsets_commit(o, io, 6, 100.2, 0, &err), 0);
    committed(k, &p0, &p1);
    assert_int_equal(p0, 20);
    /* a lower low-water mark never moves them back (forced) */
    assert_int_equal(twn_offsets_commit(o, io, 1, 100.3, 1, &err), 0);
    committed(k, &p0, &p1);
    assert_int_equal(p0, 20);
    assert_int_equal(p1, 10);
    /* once due: the ends of the partitions */
    assert_int_equal(twn_offsets_commit(o, io, 6, 100.8, 0, &err), 0);
    committed(k, &p0, &p1);
    assert_int_equal(p0, 25);
    assert_int_equal(p1, 20);
    const char *topic;
    int32_t part;
    assert_int_equal(twn_offsets_committed(o, 0, &topic, &part), 25);
    assert_string_equal(topic, "off");
    assert_int_equal(part, 0);
    twn_srcio_close(io);
    twn_offsets_free(o);

    /* every broker down: the commit fails within op_timeout_ms, naming the partition */
    assert_int_equal(twn_offsets_new(&plan, 0, &o, &err), 0);
    cfg.kafka.group = "off-group-2";
    assert_int_equal(twn_srcio_open(&cfg, &io, &err), 0);
    for (int b = 1; b <= 3; b++) rd_kafka_mock_broker_set_down(mcl, b);
    assert_int_equal(twn_offsets_commit(o, io, 6, 200.0, 1, &err), -1);
    assert_non_null(strstr(err.msg, "kafka: committed offset of group 'off-group-2' for off[0]"));
    for (int b = 1; b <= 3; b++) rd_kafka_mock_broker_set_up(mcl, b);
    twn_srcio_close(io);
    twn_offsets_free(o);
    twn_src_units_free(&plan);
    rd_kafka_mock_cluster_destroy(mcl);
    rd_kafka_destroy(owner);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_commit_points),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
