/* test_source_io.c — common/source_io.h without peers: store dispatch by path, Kafka paths, the
 * SourceRef conversions of all three stores (what travels between coordinator, gates and
 * workers), planning local files through it, image reference checks, and the configuration from
 * the environment — with exact messages.  (Reading S3 and Kafka through it is test_run_sources.) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/jobconf.h"
#include "common/source_io.h"
#include "tests/testutil.h"
#include "util/mem.h"

static void test_paths(void **state) {
    (void)state;
    assert_int_equal(twn_srcio_store_of("/data/a.tar"), TWN_STORE_FILE);
    assert_int_equal(twn_srcio_store_of("s3://b/k"), TWN_STORE_S3);
    assert_int_equal(twn_srcio_store_of("kafka://t/0"), TWN_STORE_KAFKA);
    char topic[256];
    int32_t part;
    twn_err err = {{0}};
    assert_int_equal(
        twn_srcio_kafka_path("kafka://items.v2_x-y/17", topic, sizeof topic, &part, &err), 0);
    assert_string_equal(topic, "items.v2_x-y");
    assert_int_equal(part, 17);
    assert_int_equal(
        twn_srcio_kafka_path("kafka://items?format=proto", topic, sizeof topic, &part, &err), 0);
    assert_string_equal(topic, "items");
    assert_int_equal(part, -1);
    assert_int_equal(twn_srcio_kafka_path("kafka://bad topic", topic, sizeof topic, &part, &err),
                     -1);
    assert_string_equal(err.msg, "'kafka://bad topic': not a valid Kafka topic name; expected "
                                 "kafka://topic with 1..249 of a-z A-Z 0-9 . _ -");
    assert_int_equal(twn_srcio_kafka_path("kafka://t/x1", topic, sizeof topic, &part, &err), -1);
    assert_string_equal(err.msg,
                        "'kafka://t/x1': bad partition; expected kafka://topic/<partition>");
    assert_int_equal(twn_srcio_kafka_path("s3://b/k", topic, sizeof topic, &part, &err), -1);
    assert_string_equal(err.msg, "'s3://b/k' is not a Kafka source; expected kafka://topic");
}

static void test_proto_round_trips(void **state) {
    (void)state;
    twn_err err = {{0}};
    twn_srcio_buf buf;
    Twn__SourceRef s;
    twn_src_unit back;

    /* S3: bucket + key on the wire, the URI in the unit */
    twn_src_unit su = {.id = 7,
                       .format = TWN_SRC_TAR,
                       .path = (char *)"s3://my-bkt/shards/000017.tar",
                       .start = 1024,
                       .end = 8192,
                       .first_index = 40,
                       .count = 12};
    assert_int_equal(twn_srcio_unit_to_proto(&su, &s, &buf, &err), 0);
    assert_int_equal(s.store, TWN__STORE__STORE_S3);
    assert_int_equal(s.format, TWN__FORMAT__FORMAT_TAR);
    assert_string_equal(s.bucket, "my-bkt");
    assert_string_equal(s.path, "shards/000017.tar");
    assert_int_equal(s.start, 1024);
    assert_int_equal(s.end, 8192);
    assert_int_equal(twn_srcio_unit_from_proto(99, &s, &back, &err), 0);
    assert_string_equal(back.path, su.path);
    assert_int_equal(back.id, 99);
    assert_int_equal(back.first_index, 40);
    assert_int_equal(back.count, 12);
    twn_free(back.path);

    /* Kafka: topic + partition on the wire, offsets as the range and the item indices */
    twn_src_unit ku = {.id = 3,
                       .format = TWN_SRC_KAFKA_PROTO,
                       .path = (char *)"kafka://events/5",
                       .start = 1000,
                       .end = 1256,
                       .first_index = 1000,
                       .count = 256};
    assert_int_equal(twn_srcio_unit_to_proto(&ku, &s, &buf, &err), 0);
    assert_int_equal(s.store, TWN__STORE__STORE_KAFKA);
    assert_int_equal(s.format, TWN__FORMAT__FORMAT_KAFKA_PROTO);
    assert_string_equal(s.path, "events");
    assert_int_equal(s.partition, 5);
    assert_int_equal(s.first_index, 1000);
    assert_int_equal(s.count, 256);
    assert_int_equal(twn_srcio_unit_from_proto(3, &s, &back, &err), 0);
    assert_string_equal(back.path, "kafka://events/5");
    assert_int_equal(back.format, TWN_SRC_KAFKA_PROTO);
    assert_int_equal(back.start, 1000);
    assert_int_equal(back.end, 1256);
    twn_free(back.path);
    twn_src_item it = {.index = 1100, .offset = 1100, .length = 77, .id = (char *)"ev-1100"};
    Twn__ItemRef r;
    assert_int_equal(twn_srcio_ref_to_proto(&ku, &it, &r, &s, &buf, &err), 0);
    assert_int_equal(r.unit_id, 3);
    assert_int_equal(r.item_index, 1100);
    assert_int_equal(r.offset, 1100);
    assert_int_equal(r.length, 77);
    assert_string_equal(r.item_id, "ev-1100");
    assert_string_equal(r.source->path, "events");

    /* a local file stays STORE_FILE */
    twn_src_unit fu = {.format = TWN_SRC_JSONL, .path = (char *)"/d/x.jsonl", .end = 10};
    assert_int_equal(twn_srcio_unit_to_proto(&fu, &s, &buf, &err), 0);
    assert_int_equal(s.store, TWN__STORE__STORE_FILE);
    assert_string_equal(s.path, "/d/x.jsonl");

    /* a Kafka unit with a broken topic or a byte format is refused */
    twn__source_ref__init(&s);
    s.store = TWN__STORE__STORE_KAFKA;
    s.format = TWN__FORMAT__FORMAT_KAFKA_JSON;
    s.path = (char *)"a/b";
    s.end = 4;
    assert_int_equal(twn_srcio_unit_from_proto(1, &s, &back, &err), -1);
    assert_string_equal(err.msg, "Kafka source ref: 'a/b' is not a valid topic name");
    s.path = (char *)"ok";
    s.format = TWN__FORMAT__FORMAT_JSONL;
    assert_int_equal(twn_srcio_unit_from_proto(1, &s, &back, &err), -1);
    assert_string_equal(err.msg, "source 'ok': format 1; expected FORMAT_KAFKA_JSON (3) or "
                                 "FORMAT_KAFKA_PROTO (4)");
}

static void test_plan_local_and_errors(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("source-io");
    char path[1024];
    snprintf(path, sizeof path, "%s/a.jsonl", dir);
    const char *jl = "{\"id\": 1, \"text\": \"a\"}\n{\"id\": 2, \"text\": \"b\"}\n"
                     "{\"id\": 3, \"text\": \"c\"}\n";
    tu_write(path, jl, strlen(jl));
    twn_srcio_cfg cfg;
    twn_srcio_cfg_default(&cfg);
    twn_srcio *io;
    twn_err err = {{0}};
    assert_int_equal(twn_srcio_open(&cfg, &io, &err), 0);
    const char *inputs[] = {path};
    twn_src_units units = {0};
    size_t nk = 99;
    assert_int_equal(twn_srcio_plan(io, inputs, 1, 2, &units, &nk, &err), 0);
    assert_int_equal(units.n, 2);
    assert_int_equal(nk, 0);
    assert_int_equal(units.v[1].first_index, 2);
    /* read a unit through the same interface */
    twn_srcio_reader *r;
    assert_int_equal(twn_srcio_reader_open(io, &units.v[1], NULL, &r, &err), 0);
    twn_src_item it = {0};
    assert_int_equal(twn_srcio_reader_next(r, &it, &err), 1);
    assert_string_equal(it.id, "3");
    assert_int_equal(twn_srcio_reader_next(r, &it, &err), 0);
    twn_srcio_reader_close(r);
    twn_src_item_clear(&it);
    twn_src_units_free(&units);

    /* Kafka without brokers, a partition in an input, an unknown option */
    const char *k1[] = {"kafka://topic"};
    assert_int_equal(twn_srcio_plan(io, k1, 1, 10, &units, NULL, &err), -1);
    assert_string_equal(err.msg, "kafka: no brokers configured; expected kafka.brokers "
                                 "(TWN_KAFKA_BROKERS) host:port[,...]");
    const char *k2[] = {"kafka://topic/3"};
    assert_int_equal(twn_srcio_plan(io, k2, 1, 10, &units, NULL, &err), -1);
    assert_string_equal(err.msg,
                        "'kafka://topic/3': an input names a whole topic; expected kafka://topic");
    const char *k3[] = {"kafka://topic?format=avro"};
    assert_int_equal(twn_srcio_plan(io, k3, 1, 10, &units, NULL, &err), -1);
    assert_string_equal(err.msg, "'kafka://topic?format=avro': unknown option 'format=avro'; "
                                 "expected ?format=json or ?format=proto");
    assert_int_equal(units.n, 0);

    /* images by reference: a dangling local path, a directory, an existing file */
    twn_src_image im[2] = {{.path = path}, {.path = (char *)"/nonexistent/twn/a.png"}};
    twn_src_item x = {.id = (char *)"x1", .n_images = 2, .images = im};
    assert_int_equal(twn_srcio_fetch_images(io, &x, &err), -1);
    assert_string_equal(err.msg, "item 'x1': image '/nonexistent/twn/a.png' cannot be read: No "
                                 "such file or directory");
    im[1].path = (char *)dir;
    assert_int_equal(twn_srcio_fetch_images(io, &x, &err), -1);
    char want[1200];
    snprintf(want, sizeof want, "item 'x1': image '%s' is not a regular file", dir);
    assert_string_equal(err.msg, want);
    x.n_images = 1;
    assert_int_equal(twn_srcio_fetch_images(io, &x, &err), 0);
    twn_srcio_close(io);
}

static void test_env(void **state) {
    (void)state;
    twn_srcio_cfg cfg;
    twn_srcio_cfg_default(&cfg);
    twn_err err = {{0}};
    setenv("TWN_KAFKA_BROKERS", "127.0.0.1:9092", 1);
    setenv("TWN_KAFKA_GROUP", "g1", 1);
    setenv("TWN_S3_PATH_STYLE", "1", 1);
    setenv("TWN_KAFKA_MAX_INLINE_IMAGE_BYTES", "5000", 1);
    assert_int_equal(twn_srcio_cfg_from_env(&cfg, &err), 0);
    assert_string_equal(cfg.kafka.brokers, "127.0.0.1:9092");
    assert_string_equal(cfg.kafka.group, "g1");
    assert_int_equal(cfg.s3.path_style, 1);
    assert_int_equal(cfg.kafka.max_inline_image_bytes, 5000);
    setenv("TWN_S3_PATH_STYLE", "yes", 1);
    assert_int_equal(twn_srcio_cfg_from_env(&cfg, &err), -1);
    assert_string_equal(err.msg,
                        "environment: TWN_S3_PATH_STYLE = \"yes\": expected an integer 0..1");
    unsetenv("TWN_KAFKA_BROKERS");
    unsetenv("TWN_KAFKA_GROUP");
    unsetenv("TWN_S3_PATH_STYLE");
    unsetenv("TWN_KAFKA_MAX_INLINE_IMAGE_BYTES");
}

/* The job configuration's s3.* / kafka.* keys (common/jobconf.h) as the roles take them. */
static void test_from_conf(void **state) {
    (void)state;
    twn_conf conf;
    twn_conf_init(&conf);
    twn_err err = {{0}};
    const char *kv[][2] = {{"s3.endpoint", "http://127.0.0.1:9000"},
                           {"s3.region", "eu-central-1"},
                           {"s3.path_style", "false"},
                           {"s3.access_key_id", "AKID"},
                           {"s3.secret_access_key", "SECRET"},
                           {"kafka.brokers", "b1:9092,b2:9092"},
                           {"kafka.properties", "security.protocol=ssl,fetch.min.bytes=1"},
                           {"kafka.max_inline_image_bytes", "4096"},
                           {"limits.max_item_bytes", "1000000"}};
    for (size_t i = 0; i < sizeof kv / sizeof *kv; i++)
        if (twn_conf_set(&conf, kv[i][0], kv[i][1], "test", 0, &err)) fail_msg("%s", err.msg);
    twn_srcio_cfg c;
    twn_srcio_cfg_default(&c);
    assert_int_equal(twn_srcio_cfg_from_conf(&c, &conf, &err), 0);
    assert_string_equal(c.s3.endpoint, "http://127.0.0.1:9000");
    assert_string_equal(c.s3.region, "eu-central-1");
    assert_int_equal(c.s3.path_style, 0);
    assert_string_equal(c.s3.access_key, "AKID");
    assert_string_equal(c.s3.secret_key, "SECRET");
    assert_null(c.s3.session_token); /* "" leaves AWS_SESSION_TOKEN in charge */
    assert_string_equal(c.kafka.brokers, "b1:9092,b2:9092");
    assert_string_equal(c.kafka.group, "twn"); /* the key's default */
    assert_int_equal(c.kafka.max_inline_image_bytes, 4096);
    assert_int_equal(c.max_image_bytes, 1000000);
    assert_non_null(c.kafka.props);
    assert_string_equal(c.kafka.props[0], "security.protocol=ssl");
    assert_string_equal(c.kafka.props[1], "fetch.min.bytes=1");
    assert_null(c.kafka.props[2]);
    twn_srcio_cfg_free(&c);
    assert_null(c.kafka.props);
    twn_conf_free(&conf);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_paths),
        cmocka_unit_test(test_proto_round_trips),
        cmocka_unit_test(test_plan_local_and_errors),
        cmocka_unit_test(test_env),
        cmocka_unit_test(test_from_conf),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
