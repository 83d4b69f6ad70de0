/* test_kafka.c — the Kafka source against librdkafka's mock cluster (3 brokers on 127.0.0.1):
 *   - 3000 JSON records over 4 partitions: the plan is exact (units of 100 offsets from the
 *     watermarks), every record is read exactly once and in order, refs re-read the same items;
 *   - a broker going down and partition leaders moving mid-read: the read completes, in order;
 *   - offset commits never pass the lowest non-durable unit, never go backwards, and a new group
 *     member (a plain librdkafka consumer) starts exactly at the committed offsets;
 *   - bad records (invalid JSON / UTF-8, missing ids, oversized, bad images, bad protobuf) give
 *     exact per-item errors and reading goes on; protobuf twn.Item records with key-as-id;
 *   - a unit reaching past the partition's end: the messages there, then a clear error. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/kafka.h"
#include "tests/testutil.h"
#include "tests/unit/kafka_peer.h"
#include "util/clock.h"
#include "util/mem.h"
#include "util/vec.h"

static kp_cluster g_kc; /* the mock cluster (3 brokers) */

static int group_setup(void **state) {
    (void)state;
    return kp_start(&g_kc, 3);
}

static int group_teardown(void **state) {
    (void)state;
    kp_stop(&g_kc);
    return 0;
}

static rd_kafka_t *producer_batches(int batch) {
    char b[16];
    snprintf(b, sizeof b, "%d", batch);
    return kp_producer(&g_kc, "batch.num.messages", b, "enable.idempotence", "true", NULL);
}

static rd_kafka_t *producer(void) {
    return producer_batches(10000);
}

/* Every broker up again, whatever a failed test left behind. */
static int brokers_up(void **state) {
    (void)state;
    kp_brokers_up(&g_kc);
    return 0;
}

static twn_kafka *handle(const char *group) {
    twn_kafka_config c = twn_kafka_config_default();
    c.brokers = g_kc.brokers;
    c.group = group;
    c.read_timeout_ms = 20000;
    twn_kafka *k;
    twn_err err = {{0}};
    if (twn_kafka_open(&c, &k, &err)) fail_msg("%s", err.msg);
    return k;
}

/* Record i of the "jobs" topic: partition i % 4, offset i / 4. */
static void record(int i, twn_str *s) {
    twn_str_reset(s);
    if (i % 10 == 3)
        twn_str_printf(s,
                       "{\"id\": \"r%04d\", \"text\": \"record %d\", \"image\": "
                       "[\"img/%d.jpg\", \"s3://bkt/img/%d.png\"]}",
                       i, i, i, i);
    else
        twn_str_printf(s, "{\"id\": \"r%04d\", \"text\": \"record %d\", \"instruction\": \"q\"}", i,
                       i);
}

static int g_jobs_ready = 0;
static void make_jobs(void) {
    if (g_jobs_ready) return;
    assert_int_equal(rd_kafka_mock_topic_create(g_kc.mcl, "jobs", 4, 3), 0);
    rd_kafka_t *p = producer();
    twn_str s = {0};
    for (int i = 0; i < 3000; i++) {
        record(i, &s);
        kp_produce(p, "jobs", i % 4, NULL, s.v, s.n);
    }
    kp_flush(p);
    rd_kafka_destroy(p);
    twn_str_free(&s);
    g_jobs_ready = 1;
}

// ------------------------------------------------------------------------------------------------

static void test_plan_read_all(void **state) {
    (void)state;
    assert_non_null(strstr(g_kc.brokers, "127.0.0.1:"));
    make_jobs();
    twn_kafka *k = handle(NULL);
    twn_kafka_units units = {0};
    twn_err err = {{0}};
    if (twn_kafka_plan_units(k, "jobs", TWN_KAFKA_JSON, 100, 0, &units, &err))
        fail_msg("%s", err.msg);
    assert_int_equal(units.n, 32); /* 4 partitions x (7 x 100 + 50) */
    for (size_t i = 0; i < units.n; i++) {
        const twn_kafka_unit *u = &units.v[i];
        assert_int_equal(u->id, i);
        assert_string_equal(u->topic, "jobs");
        assert_int_equal(u->partition, (int32_t)(i / 8));
        assert_int_equal(u->start, (int64_t)(i % 8) * 100);
        assert_int_equal(u->end, i % 8 == 7 ? 750 : (int64_t)(i % 8) * 100 + 100);
    }
    unsigned char *seen = calloc(3000, 1);
    twn_str s = {0};
    double t0 = twn_now();
    for (size_t i = 0; i < units.n; i++) {
        const twn_kafka_unit *u = &units.v[i];
        twn_kafka_reader *r;
        if (twn_kafka_reader_open(k, u, NULL, &r, &err)) fail_msg("%s", err.msg);
        twn_src_item it = {0};
        int rc;
        int64_t want = u->start;
        while ((rc = twn_kafka_reader_next(r, &it, &err)) == 1) {
            if (it.fault) fail_msg("%s", it.err.msg);
            assert_int_equal(it.offset, want); /* in order, no gaps */
            assert_int_equal(it.index, want);
            int rec = (int)(want * 4 + u->partition);
            char id[16];
            snprintf(id, sizeof id, "r%04d", rec);
            assert_string_equal(it.id, id);
            record(rec, &s);
            assert_int_equal(it.length, s.n);
            if (rec % 10 == 3) {
                assert_int_equal(it.n_images, 2);
                char p0[32], p1[40];
                snprintf(p0, sizeof p0, "img/%d.jpg", rec);
                snprintf(p1, sizeof p1, "s3://bkt/img/%d.png", rec);
                assert_string_equal(it.images[0].path, p0);
                assert_string_equal(it.images[1].path, p1);
                assert_null(it.instruction);
            } else {
                assert_int_equal(it.n_images, 0);
                assert_string_equal(it.instruction, "q");
            }
            assert_int_equal(seen[rec], 0); /* exactly once */
            seen[rec] = 1;
            want++;
        }
        if (rc) fail_msg("%s", err.msg);
        assert_int_equal(want, u->end);
        twn_src_item_clear(&it);
        twn_kafka_reader_close(r);
    }
    double dt = twn_now() - t0;
    for (int i = 0; i < 3000; i++) assert_int_equal(seen[i], 1);
    fprintf(stderr, "test_kafka: read 3000 records in 32 units in %.2f s\n", dt);

    /* refs re-read the same items; the proto form of a unit round-trips */
    int64_t offs[] = {0, 1, 99, 100, 749};
    for (size_t j = 0; j < 5; j++) {
        twn_src_item it = {0};
        if (twn_kafka_read_ref(k, "jobs", 2, offs[j], TWN_KAFKA_JSON, NULL, &it, &err))
            fail_msg("%s", err.msg);
        char id[16];
        snprintf(id, sizeof id, "r%04d", (int)(offs[j] * 4 + 2));
        assert_string_equal(it.id, id);
        assert_int_equal(it.offset, offs[j]);
        Twn__ItemRef ir;
        Twn__SourceRef sr;
        twn_kafka_ref_to_proto(&units.v[16 + offs[j] / 100], &it, &ir, &sr);
        assert_int_equal(sr.store, TWN__STORE__STORE_KAFKA);
        assert_int_equal(sr.format, TWN__FORMAT__FORMAT_KAFKA_JSON);
        assert_string_equal(sr.path, "jobs");
        assert_int_equal(sr.partition, 2);
        assert_int_equal(ir.offset, offs[j]);
        assert_string_equal(ir.item_id, id);
        twn_kafka_unit back;
        assert_int_equal(twn_kafka_unit_from_proto(ir.unit_id, &sr, &back, &err), 0);
        assert_int_equal(back.start, units.v[16 + offs[j] / 100].start);
        assert_int_equal(back.end, units.v[16 + offs[j] / 100].end);
        assert_int_equal(back.partition, 2);
        twn_free(back.topic);
        twn_src_item_clear(&it);
    }
    Twn__SourceRef sr;
    twn_kafka_unit_to_proto(&units.v[3], &sr);
    assert_int_equal(sr.count, 100);
    assert_int_equal(sr.first_index, 300);
    sr.store = TWN__STORE__STORE_S3;
    twn_kafka_unit back;
    assert_int_equal(twn_kafka_unit_from_proto(3, &sr, &back, &err), -1);
    assert_string_equal(err.msg, "source 'jobs': store 2 is not Kafka (STORE_KAFKA = 3)");

    /* a bad unit is a clear error (the mock cluster creates any topic asked about, so a missing
     * topic cannot be shown here) */
    twn_kafka_unit bogus = {
        .format = TWN_KAFKA_JSON, .topic = "jobs", .partition = 0, .start = 10, .end = 5};
    twn_kafka_reader *r;
    assert_int_equal(twn_kafka_reader_open(k, &bogus, NULL, &r, &err), -1);
    assert_string_equal(err.msg, "kafka: jobs[0]: unit 0 has a bad range [10, 5)");
    free(seen);
    twn_str_free(&s);
    twn_kafka_units_free(&units);
    twn_kafka_close(k);
}

static void test_failover(void **state) {
    (void)state;
    const char *topic = "failover";
    assert_int_equal(rd_kafka_mock_topic_create(g_kc.mcl, topic, 2, 3), 0);
    assert_int_equal(rd_kafka_mock_partition_set_leader(g_kc.mcl, topic, 0, 1), 0);
    assert_int_equal(rd_kafka_mock_partition_set_leader(g_kc.mcl, topic, 1, 1), 0);
    rd_kafka_t *p = producer_batches(20); /* small batches: a fetch returns at least one */
    char v[96];
    for (int i = 0; i < 4000; i++) {
        int n = snprintf(v, sizeof v, "{\"id\": %d, \"text\": \"failover %d\"}", i, i);
        kp_produce(p, topic, i % 2, NULL, v, (size_t)n);
    }
    kp_flush(p);
    rd_kafka_destroy(p);

    /* The records sit in batches of 20 (a fetch returns whole batches) and the read starts at
     * once, so leaders move and brokers die while the consumer is still fetching.  (Capping the
     * prefetch queue would make that certain, but librdkafka 2.0 then pauses 1 s per refill.) */
    twn_kafka *k = handle(NULL);
    twn_err err = {{0}};
    twn_kafka_units units = {0};
    if (twn_kafka_plan_units(k, topic, TWN_KAFKA_JSON, 2000, 0, &units, &err))
        fail_msg("%s", err.msg);
    assert_int_equal(units.n, 2);
    double t0 = twn_now();
    for (size_t u = 0; u < 2; u++) {
        twn_kafka_reader *r;
        if (twn_kafka_reader_open(k, &units.v[u], NULL, &r, &err)) fail_msg("%s", err.msg);
        twn_src_item it = {0};
        int rc;
        int64_t want = 0;
        while ((rc = twn_kafka_reader_next(r, &it, &err)) == 1) {
            if (it.fault) fail_msg("%s", it.err.msg);
            assert_int_equal(it.offset, want);
            char id[16];
            snprintf(id, sizeof id, "%d", (int)(want * 2 + (int64_t)u));
            assert_string_equal(it.id, id);
            want++;
            if (u == 0 && want == 300) {
                /* the leader dies; partition 0 moves to broker 2 */
                assert_int_equal(rd_kafka_mock_broker_set_down(g_kc.mcl, 1), 0);
                assert_int_equal(rd_kafka_mock_partition_set_leader(g_kc.mcl, topic, 0, 2), 0);
            }
            if (u == 0 && want == 1200) /* and moves again, with no broker down */
                assert_int_equal(rd_kafka_mock_partition_set_leader(g_kc.mcl, topic, 0, 3), 0);
            if (u == 1 && want == 500) /* partition 1: its leader moves to broker 3 ... */
                assert_int_equal(rd_kafka_mock_partition_set_leader(g_kc.mcl, topic, 1, 3), 0);
            if (u == 1 && want == 1000) { /* ... which then dies; broker 2 takes over */
                assert_int_equal(rd_kafka_mock_broker_set_down(g_kc.mcl, 3), 0);
                assert_int_equal(rd_kafka_mock_partition_set_leader(g_kc.mcl, topic, 1, 2), 0);
            }
        }
        if (rc) fail_msg("%s", err.msg);
        assert_int_equal(want, 2000);
        twn_src_item_clear(&it);
        twn_kafka_reader_close(r);
        if (u == 0) assert_int_equal(rd_kafka_mock_broker_set_up(g_kc.mcl, 1), 0);
    }
    assert_int_equal(rd_kafka_mock_broker_set_up(g_kc.mcl, 3), 0);
    fprintf(stderr, "test_kafka: failover read of 4000 records in %.2f s (last error: %s)\n",
            twn_now() - t0, twn_kafka_last_error(k));
    /* the brokers really went away under the reader */
    assert_non_null(strstr(twn_kafka_last_error(k), "127.0.0.1:"));
    twn_kafka_units_free(&units);
    twn_kafka_close(k);
}

static void test_commits(void **state) {
    (void)state;
    make_jobs();
    twn_kafka *k = handle("indexers");
    twn_kafka_units units = {0};
    twn_err err = {{0}};
    if (twn_kafka_plan_units(k, "jobs", TWN_KAFKA_JSON, 100, 0, &units, &err))
        fail_msg("%s", err.msg);
    assert_int_equal(units.n, 32);

    /* commit points never pass a unit that is not durable (units out of order too) */
    unsigned char durable[32];
    uint32_t x = 12345;
    for (int round = 0; round < 200; round++) {
        for (int i = 0; i < 32; i++) {
            x ^= x << 13, x ^= x >> 17, x ^= x << 5;
            durable[i] = (x % 4) != 0;
        }
        for (int32_t part = 0; part < 4; part++) {
            int64_t cp = twn_kafka_commit_point(units.v, durable, 32, "jobs", part, 0);
            int64_t expect = 0;
            for (int i = part * 8; i < part * 8 + 8 && durable[i]; i++) expect = units.v[i].end;
            assert_int_equal(cp, expect);
            for (int i = part * 8; i < part * 8 + 8; i++)
                if (!durable[i]) assert_true(cp <= units.v[i].start);
        }
    }
    twn_kafka_unit rev[8];
    unsigned char rdur[8];
    for (int i = 0; i < 8; i++) {
        rev[i] = units.v[7 - i];
        rdur[i] = 7 - i != 5;
    }
    assert_int_equal(twn_kafka_commit_point(rev, rdur, 8, "jobs", 0, 0), 500);
    assert_int_equal(twn_kafka_commit_point(rev, rdur, 8, "other", 0, 0), 0);

    /* partition 0: units 0-2 durable, 3 not -> 300; 1 and 3: all durable; 2: nothing yet */
    memset(durable, 1, sizeof durable);
    durable[3] = 0;
    durable[6] = 0;
    memset(durable + 16, 0, 8);
    int64_t expect[4] = {300, 750, 0, 750}, got;
    for (int32_t part = 0; part < 4; part++) {
        int64_t cp = twn_kafka_commit_point(units.v, durable, 32, "jobs", part, 0);
        assert_int_equal(cp, expect[part]);
        if (twn_kafka_commit(k, "jobs", part, cp, &got, &err)) fail_msg("%s", err.msg);
        assert_int_equal(got, expect[part]);
    }
    /* an older point never moves the group back */
    assert_int_equal(twn_kafka_commit(k, "jobs", 0, 200, &got, &err), 0);
    assert_int_equal(got, 300);
    for (int32_t part = 0; part < 4; part++) {
        assert_int_equal(twn_kafka_committed(k, "jobs", part, &got, &err), 0);
        assert_int_equal(got, expect[part]);
    }
    /* re-planning from the committed offsets */
    twn_kafka_units again = {0};
    if (twn_kafka_plan_units(k, "jobs", TWN_KAFKA_JSON, 100, 1, &again, &err))
        fail_msg("%s", err.msg);
    assert_int_equal(again.n, 5 + 8); /* p0 [300, 750), p2 [0, 750) */
    assert_int_equal(again.v[0].partition, 0);
    assert_int_equal(again.v[0].start, 300);
    assert_int_equal(again.v[4].end, 750);
    assert_int_equal(again.v[5].partition, 2);
    assert_int_equal(again.v[5].start, 0);
    twn_kafka_units_free(&again);
    twn_kafka_units_free(&units);
    twn_kafka_close(k);

    /* a new member of the group (plain librdkafka, subscribe) starts at the committed offsets */
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, kp_quiet_log);
    const char *kv[][2] = {{"bootstrap.servers", g_kc.brokers}, {"group.id", "indexers"},
                           {"auto.offset.reset", "earliest"},   {"enable.auto.commit", "false"},
                           {"session.timeout.ms", "6000"},      {"heartbeat.interval.ms", "500"}};
    for (size_t i = 0; i < 6; i++)
        assert_int_equal(rd_kafka_conf_set(conf, kv[i][0], kv[i][1], errstr, sizeof errstr),
                         RD_KAFKA_CONF_OK);
    rd_kafka_t *c = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof errstr);
    assert_non_null(c);
    rd_kafka_poll_set_consumer(c);
    rd_kafka_topic_partition_list_t *sub = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(sub, "jobs", RD_KAFKA_PARTITION_UA);
    assert_int_equal(rd_kafka_subscribe(c, sub), 0);
    rd_kafka_topic_partition_list_destroy(sub);
    int64_t first[4] = {-1, -1, -1, -1};
    int count[4] = {0};
    int total = 0;
    double t0 = twn_now(), last = 0;
    while (twn_now() - t0 < 30) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(c, 100);
        if (!m) {
            if (total == 1200 && twn_now() - last > 1.0) break; /* and nothing more arrives */
            continue;
        }
        if (!m->err) {
            if (first[m->partition] < 0) first[m->partition] = m->offset;
            count[m->partition]++;
            total++;
            last = twn_now();
        }
        rd_kafka_message_destroy(m);
    }
    rd_kafka_consumer_close(c);
    rd_kafka_destroy(c);
    assert_int_equal(first[0], 300);
    assert_int_equal(first[2], 0);
    assert_int_equal(count[0], 450);
    assert_int_equal(count[1], 0);
    assert_int_equal(count[2], 750);
    assert_int_equal(count[3], 0);
}

// ------------------------------------------------------------------------------------------------

typedef struct {
    const char *key;
    const char *value;
    size_t len; /* 0: strlen */
} rec;

static void read_topic(twn_kafka *k, const char *topic, twn_kafka_format fmt, const twn_src_opts *o,
                       twn_src_item *items, size_t n) {
    twn_kafka_units units = {0};
    twn_err err = {{0}};
    if (twn_kafka_plan_units(k, topic, fmt, 1000, 0, &units, &err)) fail_msg("%s", err.msg);
    assert_int_equal(units.n, 1);
    assert_int_equal(units.v[0].end - units.v[0].start, (int64_t)n);
    twn_kafka_reader *r;
    if (twn_kafka_reader_open(k, &units.v[0], o, &r, &err)) fail_msg("%s", err.msg);
    twn_src_item it = {0};
    size_t i = 0;
    int rc;
    while ((rc = twn_kafka_reader_next(r, &it, &err)) == 1) {
        assert_true(i < n);
        items[i++] = it;
        memset(&it, 0, sizeof it);
    }
    if (rc) fail_msg("%s", err.msg);
    assert_int_equal(i, n);
    twn_kafka_reader_close(r);
    twn_kafka_units_free(&units);
}

static void test_bad_records(void **state) {
    (void)state;
    assert_int_equal(rd_kafka_mock_topic_create(g_kc.mcl, "dirty", 1, 3), 0);
    char big[400];
    memset(big, 'x', sizeof big);
    int bn = snprintf(big, sizeof big, "{\"id\": \"big\", \"text\": \"");
    big[bn] = 'x';
    memcpy(big + sizeof big - 3, "\"}", 2);
    big[sizeof big - 1] = 0;
    const rec recs[] = {
        {NULL, "{\"id\": \"ok1\", \"text\": \"fine\"}", 0},
        {NULL, "{\"id\": \"broken\", \"text\": ", 0},
        {NULL, "{\"text\": \"no id, no key\"}", 0},
        {"key-7", "{\"text\": \"the key is the id\"}", 0},
        {NULL, "{\"id\": \"u\", \"text\": \"bad \xff utf8\"}", 0},
        {NULL, big, 0},
        {NULL, "[1, 2]", 0},
        {NULL, "{\"id\": 12, \"text\": 5}", 0},
        {NULL, "{\"id\": \"img\", \"image\": \"data:image/png;base64,iVBORw0KGgo=\"}", 0},
        {NULL, "{\"id\": \"img2\", \"image_base64\": [\"AAEC\", \"not base64!\"]}", 0},
        {NULL, "{\"id\": \"img3\", \"image\": \"data:image/png,raw\"}", 0},
        {NULL, "{\"id\": \"nothing\"}", 0},
        {NULL, "{\"id\": {\"a\": 1}, \"text\": \"t\"}", 0},
        {NULL, "{\"id\": \"nul\", \"text\": \"a\\u0000b\"}", 0},
        {NULL, "{\"id\": \"ok2\", \"text\": \"still reading\", \"image_base64\": \"/9j/4AAQ\"}", 0},
    };
    size_t n = sizeof recs / sizeof *recs;
    rd_kafka_t *p = producer();
    for (size_t i = 0; i < n; i++)
        kp_produce(p, "dirty", 0, recs[i].key, recs[i].value, strlen(recs[i].value));
    kp_flush(p);
    rd_kafka_destroy(p);

    twn_kafka *k = handle(NULL);
    twn_src_opts o = twn_src_opts_default();
    o.max_item_bytes = 300;
    twn_src_item items[16];
    read_topic(k, "dirty", TWN_KAFKA_JSON, &o, items, n);
    struct {
        twn_src_fault fault;
        const char *msg;
    } want[] = {
        {TWN_SRC_OK, ""},
        {TWN_SRC_BAD_JSON,
         "kafka dirty[0]@1: invalid JSON at column 25: unexpected token near end of file; "
         "expected one JSON object; value: '{\"id\": \"broken\", \"text\": '"},
        {TWN_SRC_BAD_ID,
         "kafka dirty[0]@2: no \"id\" and no message key; expected a string or an integer id; "
         "value: '{\"text\": \"no id, no key\"}'"},
        {TWN_SRC_OK, ""},
        {TWN_SRC_BAD_UTF8,
         "kafka dirty[0]@4: invalid UTF-8 at byte 25 (0xff); expected a UTF-8 JSON object; value: "
         "'{\"id\": \"u\", \"text\": \"bad \\xff utf8\"}'"},
        {TWN_SRC_TOO_BIG, NULL},
        {TWN_SRC_BAD_JSON,
         "kafka dirty[0]@6: the value is a JSON array; expected a JSON object; value: '[1, 2]'"},
        {TWN_SRC_BAD_FIELD,
         "kafka dirty[0]@7: \"text\" is a JSON integer; expected a string or null; value: "
         "'{\"id\": 12, \"text\": 5}'"},
        {TWN_SRC_OK, ""},
        {TWN_SRC_BAD_FIELD,
         "kafka dirty[0]@9: \"image_base64\"[1] is 11 characters of base64; expected standard "
         "base64 with padding (a multiple of 4, not empty); value: '{\"id\": \"img2\", "
         "\"image_base64\": [\"AAEC\", \"not base64!\"]}'"},
        {TWN_SRC_BAD_FIELD,
         "kafka dirty[0]@10: \"image\" is a data: URI without ';base64,'; expected "
         "data:<type>;base64,<data>; value: '{\"id\": \"img3\", \"image\": "
         "\"data:image/png,raw\"}'"},
        {TWN_SRC_EMPTY,
         "kafka dirty[0]@11: the item has neither \"text\" nor an image; expected at least one; "
         "value: '{\"id\": \"nothing\"}'"},
        {TWN_SRC_BAD_ID,
         "kafka dirty[0]@12: \"id\" is a JSON object; expected a string or an integer; value: "
         "'{\"id\": {\"a\": 1}, \"text\": \"t\"}'"},
        {TWN_SRC_BAD_JSON,
         "kafka dirty[0]@13: invalid JSON at column 32: \\u0000 is not allowed without "
         "JSON_ALLOW_NUL near '\"a\\u0000b\"'; expected one JSON object; value: '{\"id\": "
         "\"nul\", \"text\": \"a\\x5cu0000b\"}'"},
        {TWN_SRC_OK, ""},
    };
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(items[i].offset, i);
        if (items[i].fault != want[i].fault)
            fail_msg("record %zu: fault %s (%s), expected %s", i,
                     twn_src_fault_name(items[i].fault), items[i].err.msg,
                     twn_src_fault_name(want[i].fault));
        if (want[i].msg) assert_string_equal(items[i].err.msg, want[i].msg);
    }
    assert_true(!strncmp(items[5].err.msg,
                         "kafka dirty[0]@5: the message is 399 bytes; the limit is 300; value: "
                         "'{\"id\": \"big\", \"text\": \"xxxx",
                         90));
    assert_string_equal(items[0].id, "ok1");
    assert_string_equal(items[3].id, "key-7");
    assert_string_equal(items[3].key, "key-7");
    assert_string_equal(items[7].id, "12");
    assert_int_equal(items[8].n_images, 1);
    assert_int_equal(items[8].images[0].size, 8);
    assert_memory_equal(items[8].images[0].data, "\x89PNG\r\n\x1a\n", 8);
    assert_null(items[8].images[0].path);
    assert_string_equal(items[14].id, "ok2");
    assert_int_equal(items[14].images[0].size, 6);
    assert_memory_equal(items[14].images[0].data, "\xff\xd8\xff\xe0\x00\x10", 6);
    for (size_t i = 0; i < n; i++) twn_src_item_clear(&items[i]);

    /* inline images above the limit */
    twn_src_item it = {0};
    const char *v = "{\"id\": \"i\", \"image_base64\": \"AAECAwQFBgcICQ==\"}";
    twn_kafka_parse(v, strlen(v), NULL, 0, TWN_KAFKA_JSON, "t", 3, 42, NULL, 8, &it);
    assert_int_equal(it.fault, TWN_SRC_TOO_BIG);
    assert_string_equal(it.err.msg,
                        "kafka t[3]@42: \"image_base64\" is a 10-byte inline image; the "
                        "limit is 8; value: '{\"id\": \"i\", \"image_base64\": "
                        "\"AAECAwQFBgcICQ==\"}'");
    twn_src_item_clear(&it);
    /* derive_missing_id: a record without id or key is named by its place */
    twn_src_opts od = twn_src_opts_default();
    od.derive_missing_id = 1;
    v = "{\"text\": \"anonymous\"}";
    assert_int_equal(
        twn_kafka_parse(v, strlen(v), NULL, 0, TWN_KAFKA_JSON, "jobs", 2, 1234, &od, 8, &it), 0);
    assert_string_equal(it.id, "jobs[2]@1234");
    twn_src_item_clear(&it);
    twn_kafka_close(k);
}

static void test_proto_records(void **state) {
    (void)state;
    assert_int_equal(rd_kafka_mock_topic_create(g_kc.mcl, "items-pb", 1, 3), 0);
    rd_kafka_t *p = producer();
    uint8_t buf[512];
    for (int i = 0; i < 6; i++) {
        Twn__Item m = TWN__ITEM__INIT;
        char id[16], text[32];
        snprintf(id, sizeof id, "pb-%d", i);
        snprintf(text, sizeof text, "proto %d", i);
        m.id = i == 2 || i == 3 ? (char *)"" : id; /* 2: key stands in; 3: no key either */
        m.text = text;
        char *uris[1] = {"s3://bkt/a.jpg"};
        ProtobufCBinaryData img = {4, (uint8_t *)"\x89PNG"};
        if (i == 1) {
            m.n_image_uris = 1;
            m.image_uris = uris;
            m.n_images = 1;
            m.images = &img;
        }
        size_t n = twn__item__pack(&m, buf);
        kp_produce(p, "items-pb", 0, i == 2 ? "key-of-2" : NULL, buf, n);
    }
    kp_produce(p, "items-pb", 0, NULL, "\xff\xff\xff", 3); /* not a protobuf */
    kp_flush(p);
    rd_kafka_destroy(p);

    twn_kafka *k = handle(NULL);
    twn_src_item items[7];
    read_topic(k, "items-pb", TWN_KAFKA_PROTO, NULL, items, 7);
    assert_int_equal(items[0].fault, TWN_SRC_OK);
    assert_string_equal(items[0].id, "pb-0");
    assert_string_equal(items[0].text, "proto 0");
    assert_int_equal(items[1].n_images, 2);
    assert_string_equal(items[1].images[0].path, "s3://bkt/a.jpg");
    assert_int_equal(items[1].images[1].size, 4);
    assert_memory_equal(items[1].images[1].data, "\x89PNG", 4);
    assert_string_equal(items[2].id, "key-of-2");
    assert_int_equal(items[3].fault, TWN_SRC_BAD_ID);
    assert_string_equal(items[3].err.msg, "kafka items-pb[0]@3: the Item has no id and the message "
                                          "no key; expected one; value: '\\x12\\x07proto 3'");
    assert_int_equal(items[6].fault, TWN_SRC_BAD_JSON);
    assert_string_equal(items[6].err.msg, "kafka items-pb[0]@6: not a packed twn.Item protobuf "
                                          "message; value: '\\xff\\xff\\xff'");
    for (size_t i = 0; i < 7; i++) twn_src_item_clear(&items[i]);
    twn_kafka_close(k);
}

/* A unit reaching past the partition's end (planned against other watermarks, or the log was
 * truncated): the items that exist, then a clear error once nothing arrives. */
static void test_range_past_end(void **state) {
    (void)state;
    assert_int_equal(rd_kafka_mock_topic_create(g_kc.mcl, "short", 1, 3), 0);
    rd_kafka_t *p = producer();
    char v[64];
    for (int i = 0; i < 5; i++) {
        int n = snprintf(v, sizeof v, "{\"id\": \"s%d\", \"text\": \"t\"}", i);
        kp_produce(p, "short", 0, NULL, v, (size_t)n);
    }
    kp_flush(p);
    rd_kafka_destroy(p);
    twn_kafka_config c = twn_kafka_config_default();
    c.brokers = g_kc.brokers;
    c.read_timeout_ms = 1000;
    twn_kafka *k;
    twn_err err = {{0}};
    assert_int_equal(twn_kafka_open(&c, &k, &err), 0);
    twn_kafka_unit u = {
        .id = 9, .format = TWN_KAFKA_JSON, .topic = "short", .partition = 0, .start = 3, .end = 7};
    twn_kafka_reader *r;
    assert_int_equal(twn_kafka_reader_open(k, &u, NULL, &r, &err), 0);
    twn_src_item it = {0};
    assert_int_equal(twn_kafka_reader_next(r, &it, &err), 1);
    assert_string_equal(it.id, "s3");
    assert_int_equal(twn_kafka_reader_next(r, &it, &err), 1);
    assert_string_equal(it.id, "s4");
    double t0 = twn_now();
    assert_int_equal(twn_kafka_reader_next(r, &it, &err), -1);
    assert_true(twn_now() - t0 >= 0.9);
    assert_string_equal(err.msg, "kafka: short[0]: no message at offset 5 for 1000 ms (unit 9 [3, "
                                 "7); the partition ends at 5)");
    /* the handle is free again for the next unit */
    twn_kafka_reader_close(r);
    assert_int_equal(twn_kafka_read_ref(k, "short", 0, 1, TWN_KAFKA_JSON, NULL, &it, &err), 0);
    assert_string_equal(it.id, "s1");
    twn_src_item_clear(&it);
    /* bad configuration */
    twn_kafka_close(k);
    c.brokers = NULL;
    assert_int_equal(twn_kafka_open(&c, &k, &err), -1);
    assert_string_equal(err.msg, "kafka: no brokers; expected bootstrap servers host:port[,...]");
    c.brokers = g_kc.brokers;
    const char *props[] = {"fetch.wait.max.ms=abc", NULL};
    c.props = props;
    assert_int_equal(twn_kafka_open(&c, &k, &err), -1);
    assert_non_null(strstr(err.msg, "kafka: setting 'fetch.wait.max.ms': "));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plan_read_all), cmocka_unit_test_teardown(test_failover, brokers_up),
        cmocka_unit_test(test_commits),       cmocka_unit_test(test_bad_records),
        cmocka_unit_test(test_proto_records), cmocka_unit_test(test_range_past_end),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
