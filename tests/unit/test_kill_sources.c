/* test_kill_sources.c — kill -9 of the coordinator in a job over S3 and Kafka inputs, the roles
 * as real processes (`twn coordinator|gate|worker|indexer --config`, tests/unit/procs.h), the
 * peers real: s3rver behind tests/tools/s3_front.mjs (SigV4 checked) and librdkafka's mock
 * cluster (3 brokers), both on 127.0.0.1.
 *
 * The job: a 4-partition Kafka topic and two JSONL objects under an s3:// prefix (planned in that
 * order, so the kill usually falls after some Kafka offsets were committed), some bad records
 * in each, the null engine paced so the job takes a few seconds.  At a random point (a fraction
 * of the units done, from the coordinator's /metrics) the coordinator is killed with SIGKILL and
 * started again after a random pause.  The restarted coordinator plans Kafka from the group's
 * committed offsets (which never passed a unit that was not durable) and finds the S3 units done
 * in its journal.  Then:
 *   - every good id is in exactly one shard exactly once, and nothing else is;
 *   - the last coordinator's summary counts the S3 items and exactly the Kafka offsets that were
 *     not committed when the first one died (it resumed from them);
 *   - the group's committed offsets end at the high watermarks;
 *   - every bad record is dead-lettered (by path and index, at least once);
 *   - every process exited 0, the killed one 137.
 * The seed is printed (TWN_TEST_SEED=N replays it). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "common/kafka.h"
#include "common/s3.h"
#include "tests/tools/s3_front.h"
#include "tests/unit/procs.h"
#include "util/vec.h"

#define AK         "TWNKILLAKID"
#define SECRET     "twn-kill/Secret+Key7"
#define BUCKET     "twn-kill"
#define GROUP      "killers"
#define TOPIC      "killtopic"
#define PARTS      4
#define N_S3       3000 /* good JSONL lines: 2 objects */
#define N_KAFKA    2000 /* good Kafka records */
#define N_BAD_S3   4
#define N_BAD_K    4
#define UNIT_ITEMS 50
#define SHARDS     2

static s3_front g_front;
static rd_kafka_t *g_rk;
static rd_kafka_mock_cluster_t *g_mcl;
static const char *g_brokers;

static void quiet_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf) {
    (void)rk, (void)level, (void)fac, (void)buf;
}

static int group_setup(void **state) {
    (void)state;
    char why[1400];
    if (s3_front_start(&g_front, TWN_SOURCE_DIR, tu_tmpdir("kill-sources-s3"), AK, SECRET, 600, why,
                       sizeof why)) {
        fprintf(stderr, "test_kill_sources: %s\n", why);
        return -1;
    }
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, quiet_log);
    g_rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    if (!g_rk || !(g_mcl = rd_kafka_mock_cluster_new(g_rk, 3))) return -1;
    g_brokers = rd_kafka_mock_cluster_bootstraps(g_mcl);
    /* the roles find S3 credentials in the environment they inherit */
    setenv("AWS_ACCESS_KEY_ID", AK, 1);
    setenv("AWS_SECRET_ACCESS_KEY", SECRET, 1);
    setenv("AWS_REGION", "us-east-1", 1);
    return 0;
}

static int group_teardown(void **state) {
    (void)state;
    tp_kill_all();
    if (g_mcl) rd_kafka_mock_cluster_destroy(g_mcl);
    if (g_rk) rd_kafka_destroy(g_rk);
    s3_front_stop(&g_front);
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Inputs

static json_t *g_good;

static void make_inputs(void) {
    g_good = json_object();
    twn_s3_config c = twn_s3_config_default();
    c.endpoint = g_front.endpoint;
    twn_s3 *s;
    twn_err err = {{0}};
    if (twn_s3_open(&c, &s, &err) || twn_s3_create_bucket(s, BUCKET, &err)) fail_msg("%s", err.msg);
    twn_str b = {0};
    for (int f = 0; f < 2; f++) {
        twn_str_reset(&b);
        for (int i = 0; i < N_S3 / 2; i++) {
            char id[32];
            snprintf(id, sizeof id, "s%d-%04d", f, i);
            twn_str_printf(&b, "{\"id\": \"%s\", \"text\": \"s3 item %d\"}\n", id, i);
            json_object_set_new(g_good, id, json_true());
            if (i == 100 || i == 900) twn_str_printf(&b, "{\"id\": \"bad\", \"text\": \n");
        }
        char key[64];
        snprintf(key, sizeof key, "in/part-%d.jsonl", f);
        if (twn_s3_put(s, BUCKET, key, b.v, b.n, &err)) fail_msg("%s", err.msg);
    }
    twn_s3_close(s);

    assert_int_equal(rd_kafka_mock_topic_create(g_mcl, TOPIC, PARTS, 3), 0);
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, quiet_log);
    rd_kafka_conf_set(conf, "bootstrap.servers", g_brokers, errstr, sizeof errstr);
    rd_kafka_t *p = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    assert_non_null(p);
    for (int i = 0; i < N_KAFKA + N_BAD_K; i++) {
        char id[32];
        snprintf(id, sizeof id, "k%04d", i);
        twn_str_reset(&b);
        if (i % 500 == 7) /* no text nor image: a dead letter */
            twn_str_printf(&b, "{\"id\": \"%s\"}", id);
        else {
            twn_str_printf(&b, "{\"text\": \"kafka record %d\"}", i); /* id = the key */
            json_object_set_new(g_good, id, json_true());
        }
        while (rd_kafka_producev(p, RD_KAFKA_V_TOPIC(TOPIC), RD_KAFKA_V_PARTITION(i % PARTS),
                                 RD_KAFKA_V_KEY(id, strlen(id)), RD_KAFKA_V_VALUE(b.v, b.n),
                                 RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                 RD_KAFKA_V_END) == RD_KAFKA_RESP_ERR__QUEUE_FULL)
            rd_kafka_poll(p, 10);
    }
    assert_int_equal(rd_kafka_flush(p, 20000), 0);
    rd_kafka_destroy(p);
    twn_str_free(&b);
    assert_int_equal((int)json_object_size(g_good), N_S3 + N_KAFKA);
}

static const char *write_config(const char *dir, const char *control, char eps[SHARDS][256]) {
    static char path[1200];
    char yaml[8192];
    int n = snprintf(yaml, sizeof yaml,
                     "# written by test_kill_sources.c\n"
                     "job:\n"
                     "  inputs:\n"
                     "    - kafka://" TOPIC "\n"
                     "    - s3://" BUCKET "/in/\n"
                     "  out: %s/out\n"
                     "  engine: null\n"
                     "  null_item_us: 400\n"
                     "  dim: 16\n"
                     "  shards: %d\n"
                     "  unit_items: %d\n"
                     "coordinator:\n"
                     "  listen: %s\n"
                     "  heartbeat_ms: 200\n"
                     "  missed_beats: 5\n"
                     "  lease_ms: 5000\n"
                     "  hard_batch: 16\n"
                     "  connect_timeout_ms: 60000\n"
                     "gate:\n"
                     "  credits: 1\n"
                     "  batch: 8\n"
                     "worker:\n"
                     "  credits: 1\n"
                     "  batch: 8\n"
                     "s3:\n"
                     "  endpoint: %s\n"
                     "kafka:\n"
                     "  brokers: %s\n"
                     "  group: " GROUP "\n"
                     "indexer:\n"
                     "  commit_ms: 10\n"
                     "  endpoints:\n",
                     dir, SHARDS, UNIT_ITEMS, control, g_front.endpoint, g_brokers);
    for (int s = 0; s < SHARDS; s++)
        n += snprintf(yaml + n, sizeof yaml - (size_t)n, "    - %s\n", eps[s]);
    snprintf(path, sizeof path, "%s/job.yaml", dir);
    tu_write(path, yaml, strlen(yaml));
    return path;
}

// ------------------------------------------------------------------------------------------------
// Randomness and the coordinator's progress (as test_kill.c)

static uint64_t rng_state;

static uint32_t rnd(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (uint32_t)((z ^ (z >> 31)) >> 32);
}

static double rnd_uniform(double lo, double hi) {
    return lo + (hi - lo) * (double)rnd() / 4294967296.0;
}

static double metric(int port, const char *name) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) return -1;
    struct timeval tv = {2, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons((uint16_t)port);
    double v = -1;
    static char buf[1 << 18];
    size_t n = 0;
    const char *req = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if (connect(s, (struct sockaddr *)&a, sizeof a) || write(s, req, strlen(req)) < 0) goto out;
    for (ssize_t got; n < sizeof buf - 1 && (got = read(s, buf + n, sizeof buf - 1 - n)) > 0;)
        n += (size_t)got;
    buf[n] = 0;
    char key[256];
    snprintf(key, sizeof key, "\n%s ", name);
    const char *p = strstr(buf, key);
    if (p) v = strtod(p + strlen(key), NULL);
out:
    close(s);
    return v;
}

#define UNITS_DONE "twn_job_units{state=\"done\"}"

static tp_proc *start_coordinator(const char *dir, const char *cfg, int run, int *port) {
    char name[32], listen[64];
    snprintf(name, sizeof name, "coordinator-%d", run);
    *port = tp_free_port();
    snprintf(listen, sizeof listen, "127.0.0.1:%d", *port);
    return tp_spawn(name, dir, TWN_BIN, "coordinator", "--config", cfg, "--metrics.listen", listen,
                    NULL);
}

static void committed(int64_t out[PARTS], int64_t *sum) {
    twn_kafka_config c = twn_kafka_config_default();
    c.brokers = g_brokers;
    c.group = GROUP;
    twn_kafka *k;
    twn_err err = {{0}};
    if (twn_kafka_open(&c, &k, &err)) fail_msg("%s", err.msg);
    *sum = 0;
    for (int p = 0; p < PARTS; p++) {
        if (twn_kafka_committed(k, TOPIC, p, &out[p], &err)) fail_msg("%s", err.msg);
        *sum += out[p] > 0 ? out[p] : 0;
    }
    twn_kafka_close(k);
}

static void test_kill_coordinator_s3_kafka(void **state) {
    (void)state;
    const char *s = getenv("TWN_TEST_SEED");
    uint32_t seed = s && *s ? (uint32_t)strtoul(s, NULL, 0)
                            : (uint32_t)(time(NULL) ^ ((uint32_t)getpid() << 16));
    rng_state = seed;
    printf("[   SEED   ] test_kill_coordinator_s3_kafka: TWN_TEST_SEED=%u\n", seed);
    make_inputs();
    const char *dir = tu_tmpdir("kill-sources");
    char control[256], eps[SHARDS][256];
    snprintf(control, sizeof control, "tcp://127.0.0.1:%d", tp_free_port());
    for (int k = 0; k < SHARDS; k++)
        snprintf(eps[k], sizeof eps[k], "tcp://127.0.0.1:%d", tp_free_port());
    const char *cfg = write_config(dir, control, eps);
    for (int k = 0; k < SHARDS; k++) {
        char name[16], shard[8];
        snprintf(name, sizeof name, "indexer-%d", k);
        snprintf(shard, sizeof shard, "%d", k);
        tp_spawn(name, dir, TWN_BIN, "indexer", "--config", cfg, "--shard", shard, NULL);
    }
    tp_spawn("gate-0", dir, TWN_BIN, "gate", "--config", cfg, NULL);
    tp_spawn("gate-1", dir, TWN_BIN, "gate", "--config", cfg, NULL);
    tp_spawn("worker-0", dir, TWN_BIN, "worker", "--config", cfg, NULL);
    int port;
    tp_proc *co = start_coordinator(dir, cfg, 0, &port);

    /* S3: 2 x 1502 lines; Kafka: 4 x 501 offsets */
    int units = 2 * ((N_S3 / 2 + 2 + UNIT_ITEMS - 1) / UNIT_ITEMS) +
                PARTS * (((N_KAFKA + N_BAD_K) / PARTS + UNIT_ITEMS - 1) / UNIT_ITEMS);
    double at = rnd_uniform(0.1, 0.45); /* mostly inside the Kafka units (the first 44) */
    double end = tp_now() + 120;
    double done = -1;
    while (tp_now() < end && !tp_poll(co) && (done = metric(port, UNITS_DONE)) < at * units)
        tp_sleep_ms(3);
    if (tp_poll(co) || done < at * units)
        fail_msg("the job ended before %.0f%% of the units were done:%s", at * 100, tp_report());
    tp_sleep_ms((int)rnd_uniform(0, 20));
    tp_kill9(co);
    int64_t c1[PARTS], sum1;
    committed(c1, &sum1); /* nobody commits while no coordinator runs */
    int pause = (int)rnd_uniform(0, 1500);
    printf("[   KILL   ] coordinator at %.0f/%d units done, %lld of %d Kafka offsets committed; "
           "restarted after %d ms\n",
           done, units, (long long)sum1, N_KAFKA + N_BAD_K, pause);
    fflush(stdout);
    tp_sleep_ms(pause);
    co = start_coordinator(dir, cfg, 1, &port);
    if (tp_wait_all(300)) fail_msg("processes did not end by themselves:%s", tp_report());
    for (size_t i = 0; i < tp_nprocs; i++) {
        tp_proc *p = &tp_procs[i];
        int killed = !strcmp(p->name, "coordinator-0");
        if (p->status != (killed ? 137 : 0))
            fail_msg("%s exited with %d:%s", p->name, p->status, tp_report());
    }
    /* the restarted coordinator planned S3 whole (its journal knew the done units) and Kafka
     * from the committed offsets */
    char *log = tp_log(co);
    unsigned long long u, items, easy, hard, rejected;
    const char *line = strstr(log, "units ");
    if (!line) fail_msg("no summary line in the last coordinator's log:%s", tp_report());
    assert_int_equal(sscanf(line, "units %llu items %llu easy %llu hard %llu rejected %llu", &u,
                            &items, &easy, &hard, &rejected),
                     5);
    free(log);
    assert_int_equal(items, (unsigned long long)(N_S3 + N_BAD_S3 + N_KAFKA + N_BAD_K - sum1));
    int64_t c2[PARTS], sum2;
    committed(c2, &sum2);
    assert_int_equal(sum2, N_KAFKA + N_BAD_K);
    for (int p = 0; p < PARTS; p++) assert_true(c2[p] >= c1[p]);

    char out[1200], dl[1300];
    snprintf(out, sizeof out, "%s/out", dir);
    tp_shards sh = tp_shards_read(out, SHARDS); /* fails on any id seen twice */
    assert_int_equal((int)json_object_size(sh.items), N_S3 + N_KAFKA);
    const char *id;
    json_t *v;
    json_object_foreach(g_good, id, v) {
        if (!json_object_get(sh.items, id)) fail_msg("%s is missing from the index", id);
    }
    tp_shards_free(&sh);
    /* every bad record dead-lettered (a dead letter of a unit that was not yet journaled done
     * when the coordinator died is written again by the next one) */
    snprintf(dl, sizeof dl, "%s/out/dead_letter.jsonl", dir);
    json_t *lines = tp_jsonl_read(dl);
    json_t *seen = json_object();
    size_t i;
    json_t *l;
    json_array_foreach(lines, i, l) {
        json_t *ref = json_object_get(l, "ref");
        char key[1400];
        snprintf(key, sizeof key, "%s#%lld", json_string_value(json_object_get(ref, "path")),
                 (long long)json_number_value(json_object_get(ref, "index")));
        json_object_set_new(seen, key, json_true());
    }
    assert_int_equal((int)json_object_size(seen), N_BAD_S3 + N_BAD_K);
    json_decref(seen);
    json_decref(lines);
    json_decref(g_good);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_kill_coordinator_s3_kafka, tp_teardown),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
