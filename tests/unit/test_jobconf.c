/* test_jobconf.c — the job configuration: values from every layer, derived defaults, and the
 * exact error text for each way a setting can be wrong (the operator reads these at 3 am). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/jobconf.h"
#include "tests/testutil.h"
#include "util/mem.h"

static const char *const no_env[] = {NULL};

/* YAML text -> a resolved config; asserts success. */
static void load_ok(twn_conf *c, const char *yaml) {
    twn_err err = {{0}};
    twn_conf_init(c);
    if (twn_conf_load_yaml(c, yaml, strlen(yaml), "t.yaml", &err) || twn_conf_resolve(c, &err))
        fail_msg("unexpected error: %s", err.msg);
}

/* YAML text -> the error message of the first failing step. */
static void load_fails(const char *yaml, const char *want) {
    twn_conf c;
    twn_err err = {{0}};
    twn_conf_init(&c);
    int rc = twn_conf_load_yaml(&c, yaml, strlen(yaml), "t.yaml", &err);
    if (!rc) rc = twn_conf_resolve(&c, &err);
    assert_int_equal(rc, -1);
    assert_string_equal(err.msg, want);
    twn_conf_free(&c);
}

/* argv (NULL-terminated, argv[0] included) and env -> the error of twn_conf_load. */
static void args_fail(char **argv, const char *const *env, const char *want) {
    int argc = 0;
    while (argv[argc]) argc++;
    twn_conf c;
    twn_err err = {{0}};
    assert_int_equal(twn_conf_load(&c, argc, argv, env, &err), -1);
    assert_string_equal(err.msg, want);
    twn_conf_free(&c);
}

static const char *origin(const twn_conf *c, const char *name) {
    const twn_conf_key *k = twn_conf_find(name);
    assert_non_null(k);
    return c->origin[k - twn_conf_key_at(0)];
}

static void test_defaults_and_derived(void **st) {
    (void)st;
    twn_conf c;
    load_ok(&c, "job:\n  out: /data/run\n");
    assert_int_equal(c.job.shards, 1);
    assert_int_equal(c.job.unit_items, 256);
    assert_int_equal(c.job.dim, 64);
    assert_string_equal(c.job.engine, "twn");
    assert_string_equal(c.job.mode, "adaptive");
    assert_string_equal(c.job.factory, "Flat");
    assert_int_equal(c.job.inputs.n, 0);
    assert_int_equal(c.coordinator.heartbeat_ms, 1000);
    assert_int_equal(c.coordinator.lease_ms, 30000);
    assert_int_equal(c.coordinator.connect_timeout_ms, 60000);
    assert_int_equal(c.gate.credits, 2);
    assert_int_equal(c.worker.batch, 32);
    assert_int_equal(c.security.curve, 0);
    assert_int_equal(c.limits.max_item_bytes, 64 << 20);
    assert_string_equal(c.kafka.group, "twn");
    assert_string_equal(c.s3.path_style, "auto");
    assert_string_equal(c.metrics.listen, "127.0.0.1:0");
    assert_string_equal(c.coordinator.listen, "tcp://127.0.0.1:7600");
    assert_string_equal(c.coordinator.connect, "tcp://127.0.0.1:7600");
    assert_string_equal(c.coordinator.journal, "/data/run/journal");
    assert_string_equal(c.job.dead_letter, "/data/run/dead_letter.jsonl");
    assert_string_equal(c.indexer.dir, "/data/run/shard-00000");
    assert_int_equal(c.indexer.endpoints.n, 1);
    assert_string_equal(c.indexer.endpoints.v[0], "tcp://127.0.0.1:7601");
    assert_string_equal(origin(&c, "job.shards"), "default");
    assert_string_equal(origin(&c, "job.out"), "from t.yaml line 2");
    assert_string_equal(origin(&c, "coordinator.journal"), "derived from job.out");
    assert_string_equal(origin(&c, "coordinator.connect"), "derived from coordinator.listen");
    twn_conf_free(&c);
}

static void test_yaml_nested_dotted_lists_maps(void **st) {
    (void)st;
    twn_conf c;
    load_ok(&c, "# a fleet job\n"
                "job:\n"
                "  inputs: [a.jsonl, \"b c.tar\"]\n"
                "  shards: 3\n"
                "  out: /o\n"
                "  engine: null\n"
                "coordinator.listen: \"tcp://*:9000\"\n"
                "indexer:\n"
                "  shard: 2\n"
                "  endpoints:\n"
                "    - ipc:///tmp/s0\n"
                "    - ipc:///tmp/s1\n"
                "    - tcp://10.0.0.7:7603\n"
                "kafka:\n"
                "  properties:\n"
                "    security.protocol: SASL_SSL\n"
                "    sasl.password: hunter2\n"
                "security: {curve: yes}\n");
    assert_int_equal(c.job.inputs.n, 2);
    assert_string_equal(c.job.inputs.v[0], "a.jsonl");
    assert_string_equal(c.job.inputs.v[1], "b c.tar");
    assert_int_equal(c.job.shards, 3);
    assert_string_equal(c.job.engine, "null"); /* an enum value, not YAML's null */
    assert_string_equal(c.coordinator.listen, "tcp://*:9000");
    assert_string_equal(c.coordinator.connect, "tcp://127.0.0.1:9000");
    assert_string_equal(c.indexer.dir, "/o/shard-00002");
    assert_int_equal(c.indexer.endpoints.n, 3);
    assert_string_equal(c.indexer.endpoints.v[2], "tcp://10.0.0.7:7603");
    assert_int_equal(c.kafka.properties.n, 2);
    assert_string_equal(c.kafka.properties.keys[0], "security.protocol");
    assert_string_equal(c.kafka.properties.vals[0], "SASL_SSL");
    assert_string_equal(c.kafka.properties.vals[1], "hunter2");
    assert_int_equal(c.security.curve, 1);
    assert_string_equal(origin(&c, "job.shards"), "from t.yaml line 4");
    assert_string_equal(origin(&c, "coordinator.listen"), "from t.yaml line 7");
    assert_string_equal(origin(&c, "indexer.endpoints"), "from t.yaml line 11");
    twn_conf_free(&c);
}

static void test_value_errors(void **st) {
    (void)st;
    load_fails("job:\n  shards: zero\n",
               "config: job.shards = \"zero\" (from t.yaml line 2): expected an integer 1..65536");
    load_fails("job:\n  shards: 70000\n",
               "config: job.shards = \"70000\" (from t.yaml line 2): expected an integer 1..65536");
    load_fails("job:\n  unit_items: 12x\n",
               "config: job.unit_items = \"12x\" (from t.yaml line 2): expected an integer "
               "1..1000000000");
    load_fails("job: {engine: gpu}\n",
               "config: job.engine = \"gpu\" (from t.yaml line 1): expected one of twn, null");
    load_fails("log:\n  level: loud\n", "config: log.level = \"loud\" (from t.yaml line 2): "
                                        "expected one of debug, info, warn, error");
    load_fails("security:\n  curve: maybe\n",
               "config: security.curve = \"maybe\" (from t.yaml line 2): expected true or false");
    load_fails("job:\n  mode: budget=1.5\n",
               "config: job.mode = \"budget=1.5\" (from t.yaml line 2): expected adaptive, never, "
               "always or budget=F (0 <= F <= 1)");
    load_fails("coordinator:\n  listen: localhost:7600\n",
               "config: coordinator.listen = \"localhost:7600\" (from t.yaml line 2): expected an "
               "endpoint inproc://NAME, ipc://PATH (at most 106 bytes) or tcp://HOST:PORT");
    load_fails("indexer:\n  endpoints: [tcp://a:1, udp://b:2]\n",
               "config: indexer.endpoints = \"udp://b:2\" (from t.yaml line 2): expected an "
               "endpoint inproc://NAME, ipc://PATH (at most 106 bytes) or tcp://HOST:PORT");
}

static void test_unknown_keys(void **st) {
    (void)st;
    load_fails("job:\n  out: /o\n  shard: 3\n",
               "config: unknown key \"job.shard\" (from t.yaml line 3); did you mean "
               "\"job.shards\"?");
    load_fails("shards: 3\n", "config: unknown key \"shards\" (from t.yaml line 1); did you mean "
                              "\"job.shards\"?");
    load_fails("coordinatr:\n  lease_ms: 5\n",
               "config: unknown key \"coordinatr.lease_ms\" (from t.yaml line 2); did you mean "
               "\"coordinator.lease_ms\"?");
    load_fails("frobnicate: 1\n", "config: unknown key \"frobnicate\" (from t.yaml line 1); "
                                  "`twn config --defaults` lists them");
    char *a1[] = {"x", "--job.shard", "2", NULL};
    args_fail(a1, no_env, "config: unknown flag --job.shard; did you mean --job.shards?");
    char *a2[] = {"x", "--gate", "2", NULL};
    args_fail(a2, no_env, "config: unknown flag --gate; did you mean --gates?");
    char *a3[] = {"x", "--out", "/o", "stray", NULL};
    args_fail(a3, no_env, "config: unexpected argument \"stray\" (settings are --key value)");
    char *a4[] = {"x", "--out", NULL};
    args_fail(a4, no_env, "config: flag --out needs a value (job.out)");
}

static void test_yaml_types(void **st) {
    (void)st;
    load_fails("job:\n  shards: [1, 2]\n",
               "config: job.shards (from t.yaml line 2): expected an integer 1..65536, got a list");
    load_fails("job:\n  inputs: {a: b}\n",
               "config: job.inputs (from t.yaml line 2): expected a list, got a map");
    load_fails("job:\n  inputs: [[a]]\n",
               "config: job.inputs (from t.yaml line 2): list items must be strings, got a list");
    load_fails("kafka:\n  properties: acks=all\n",
               "config: kafka.properties (from t.yaml line 2): expected a map of name: value, got "
               "a scalar");
    load_fails("job: 3\n",
               "config: job (from t.yaml line 1): expected a map of job.* keys, got a scalar");
    load_fails("- a\n- b\n",
               "config: t.yaml line 1: expected a map of keys at the top, got a list");
    /* a scalar for a list is one item; an empty document is the defaults */
    twn_conf c;
    load_ok(&c, "job:\n  inputs: only.jsonl\n");
    assert_int_equal(c.job.inputs.n, 1);
    assert_string_equal(c.job.inputs.v[0], "only.jsonl");
    twn_conf_free(&c);
    load_ok(&c, "# nothing here\n");
    assert_int_equal(c.job.shards, 1);
    twn_conf_free(&c);
}

static void test_yaml_syntax_error(void **st) {
    (void)st;
    load_fails("job:\n  shards: 3\n  out: [a, b\n",
               "config: t.yaml line 4: did not find expected ',' or ']' while parsing a flow "
               "sequence (line 3)");
    load_fails("job:\n  shards: 3\n bad: 1\n",
               "config: t.yaml line 3: did not find expected key while parsing a block mapping "
               "(line 1)");
    load_fails("job: {}\n---\njob: {shards: 2}\n",
               "config: t.yaml line 3: a second YAML document; put every key in one");
}

static void test_cross_key_checks(void **st) {
    (void)st;
    load_fails("job: {shards: 3}\nindexer: {endpoints: [ipc:///a, ipc:///b]}\n",
               "config: indexer.endpoints has 2 endpoint(s) (from t.yaml line 2) but job.shards "
               "= 3 (from t.yaml line 1): expected one endpoint per shard");
    load_fails("job: {shards: 2}\nindexer: {shard: 2}\n",
               "config: indexer.shard = 2 (from t.yaml line 2): expected 0..1 (job.shards = 2)");
}

static void test_precedence(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("jobconf-prec");
    char path[1024];
    snprintf(path, sizeof path, "%s/job.yaml", dir);
    const char *yaml = "job:\n  shards: 2\n  inputs: [a.jsonl]\n  out: /from/file\n"
                       "kafka:\n  properties: {acks: all}\n";
    tu_write(path, yaml, strlen(yaml));
    const char *env[] = {"TWN_JOB_SHARDS=3",
                         "TWN_JOB_INPUTS=b.jsonl,c.tar",
                         "TWN_KAFKA_PROPERTIES=acks=1,linger.ms=5",
                         "TWN_TEST_OTHER=ignored",
                         "PATH=/bin",
                         NULL};
    twn_conf c;
    twn_err err = {{0}};
    char origin_file[1100];
    snprintf(origin_file, sizeof origin_file, "from %s line 2", path);

    char *a1[] = {"x", "--config", path, NULL};
    assert_int_equal(twn_conf_load(&c, 3, a1, no_env, &err), 0);
    assert_int_equal(c.job.shards, 2);
    assert_string_equal(origin(&c, "job.shards"), origin_file);
    assert_string_equal(c.kafka.properties.vals[0], "all");
    twn_conf_free(&c);

    assert_int_equal(twn_conf_load(&c, 3, a1, env, &err), 0);
    assert_int_equal(c.job.shards, 3);
    assert_string_equal(origin(&c, "job.shards"), "from env TWN_JOB_SHARDS");
    assert_int_equal(c.job.inputs.n, 2);
    assert_string_equal(c.job.inputs.v[1], "c.tar");
    assert_int_equal(c.kafka.properties.n, 2);
    assert_string_equal(c.kafka.properties.vals[0], "1");
    assert_string_equal(c.kafka.properties.keys[1], "linger.ms");
    assert_string_equal(c.job.out, "/from/file");
    twn_conf_free(&c);

    char *a2[] = {
        "x",       "--shards",         "4",       "--config", path,       "--input",
        "d.jsonl", "--input",          "e.jsonl", "f.tar",    "--out=/o", "--job.unit_items",
        "100",     "--security.curve", "--gates", "3",        NULL};
    assert_int_equal(twn_conf_load(&c, 16, a2, env, &err), 0);
    assert_int_equal(c.job.shards, 4);
    assert_string_equal(origin(&c, "job.shards"), "from flag --shards");
    assert_int_equal(c.job.inputs.n, 3);
    assert_string_equal(c.job.inputs.v[0], "d.jsonl");
    assert_string_equal(c.job.inputs.v[2], "f.tar");
    assert_string_equal(c.job.out, "/o");
    assert_string_equal(c.coordinator.journal, "/o/journal");
    assert_int_equal(c.job.unit_items, 100);
    assert_int_equal(c.security.curve, 1);
    assert_int_equal(c.gate.count, 3);
    assert_int_equal(c.indexer.endpoints.n, 4);
    assert_string_equal(c.indexer.endpoints.v[3], "tcp://127.0.0.1:7604");
    twn_conf_free(&c);

    const char *bad_env[] = {"TWN_JOB_ENGINE=gpu", NULL};
    char *a3[] = {"x", NULL};
    args_fail(a3, bad_env,
              "config: job.engine = \"gpu\" (from env TWN_JOB_ENGINE): expected one of twn, null");
    char *a4[] = {"x", "--shards", "0", NULL};
    args_fail(a4, no_env,
              "config: job.shards = \"0\" (from flag --shards): expected an integer 1..65536");
    char *a5[] = {"x", "--config", "/nonexistent/job.yaml", NULL};
    int argc = 3;
    assert_int_equal(twn_conf_load(&c, argc, a5, no_env, &err), -1);
    assert_non_null(strstr(err.msg, "config: cannot read /nonexistent/job.yaml: "));
    twn_conf_free(&c);
}

/* --check's printout is YAML that loads back to the same values; secrets are redacted. */
static void test_print_round_trip(void **st) {
    (void)st;
    twn_conf c, d;
    load_ok(&c, "job: {inputs: [a.jsonl, \"q\\\"uote\"], out: /o, shards: 2}\n"
                "s3: {secret_access_key: hunter2, region: eu-west-1}\n"
                "kafka: {properties: {sasl.password: pw, acks: all}}\n");
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    twn_conf_print(&c, f);
    fclose(f);
    assert_null(strstr(buf, "hunter2"));
    assert_null(strstr(buf, ": \"pw\""));
    assert_non_null(strstr(buf, "  secret_access_key: \"<redacted>\""));
    assert_non_null(strstr(buf, "\"sasl.password\": \"<redacted>\", \"acks\": \"all\""));
    assert_non_null(strstr(buf, "job:\n  inputs: [\"a.jsonl\", \"q\\\"uote\"]"));
    assert_non_null(strstr(buf, "  shards: 2"));
    assert_non_null(strstr(buf, "# from t.yaml line 1\n"));
    load_ok(&d, buf);
    assert_int_equal(d.job.inputs.n, 2);
    assert_string_equal(d.job.inputs.v[1], "q\"uote");
    assert_string_equal(d.s3.region, "eu-west-1");
    assert_string_equal(d.s3.secret_access_key, "<redacted>");
    assert_string_equal(d.indexer.endpoints.v[1], c.indexer.endpoints.v[1]);
    assert_string_equal(d.coordinator.journal, "/o/journal");
    free(buf);
    twn_conf_free(&c);
    twn_conf_free(&d);

    /* --defaults is a template that loads back to the defaults. */
    buf = NULL;
    f = open_memstream(&buf, &n);
    twn_conf_print_defaults(f);
    fclose(f);
    assert_non_null(strstr(buf, "job:\n  # input sources in plan order"));
    assert_non_null(strstr(buf, "  # index shards S; an item goes to shard hash64(id) mod S\n"
                                "  # (an integer 1..65536; flag --shards)\n  shards: 1\n"));
    assert_non_null(strstr(buf, "  # (default {job.out}/journal)\n  journal: \"\"\n"));
    assert_non_null(strstr(buf, "  # (secret)\n  session_token: \"\"\n"));
    assert_non_null(strstr(buf, "  # (one of twn, null; flag --engine)\n  engine: \"twn\"\n"));
    load_ok(&d, buf);
    assert_int_equal(d.job.shards, 1);
    assert_string_equal(d.job.engine, "twn");
    twn_conf_free(&d);
    free(buf);
    /* every row has a meaning and a unique name */
    for (size_t i = 0; i < twn_conf_nkeys(); i++) {
        assert_true(strlen(twn_conf_key_at(i)->meaning) > 8);
        assert_ptr_equal(twn_conf_find(twn_conf_key_at(i)->name), twn_conf_key_at(i));
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults_and_derived),
        cmocka_unit_test(test_yaml_nested_dotted_lists_maps),
        cmocka_unit_test(test_value_errors),
        cmocka_unit_test(test_unknown_keys),
        cmocka_unit_test(test_yaml_types),
        cmocka_unit_test(test_yaml_syntax_error),
        cmocka_unit_test(test_cross_key_checks),
        cmocka_unit_test(test_precedence),
        cmocka_unit_test(test_print_round_trip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
