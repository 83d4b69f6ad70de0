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

#include "tests/unit/kafka_peer.h"
#include "tests/unit/procs.h"
#include "tests/unit/s3_peer.h"
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

static s3p g_s3;
static kp_cluster g_kc;

static int group_setup(void **state) {
    (void)state;
    if (s3p_start(&g_s3, "test_kill_sources", "kill-sources-s3", AK, SECRET, NULL, 600) ||
        kp_start(&g_kc, 3))
        return -1;
    /* the roles find S3 credentials in the environment they inherit */
    setenv("AWS_ACCESS_KEY_ID", AK, 1);
    setenv("AWS_SECRET_ACCESS_KEY", SECRET, 1);
    setenv("AWS_REGION", "us-east-1", 1);
    return 0;
}

static int group_teardown(void **state) {
    (void)state;
    tp_kill_all();
    kp_stop(&g_kc);
    s3p_stop(&g_s3);
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Inputs

static json_t *g_good;

static void make_inputs(void) {
    g_good = json_object();
    twn_s3_config c = twn_s3_config_default(); /* the keys from the environment */
    c.endpoint = g_s3.front.endpoint;
    twn_s3 *s = s3p_open(&c);
    s3p_bucket(s, BUCKET);
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
        s3p_put(s, BUCKET, key, b.v, b.n);
    }
    twn_s3_close(s);

    assert_int_equal(rd_kafka_mock_topic_create(g_kc.mcl, TOPIC, PARTS, 3), 0);
    rd_kafka_t *p = kp_producer(&g_kc, NULL);
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
        kp_produce(p, TOPIC, i % PARTS, id, b.v, b.n);
    }
    kp_flush(p);
    rd_kafka_destroy(p);
    twn_str_free(&b);
    assert_int_equal((int)json_object_size(g_good), N_S3 + N_KAFKA);
}

static const char *write_config(const char *dir, const char *control, char eps[SHARDS][256]) {
    char yaml[8192];
    snprintf(yaml, sizeof yaml,
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
             dir, SHARDS, UNIT_ITEMS, control, g_s3.front.endpoint, g_kc.brokers);
    return tp_job_yaml(dir, yaml, eps[0], sizeof eps[0], SHARDS);
}

// ------------------------------------------------------------------------------------------------
// The coordinator's progress and the group's offsets

static void committed(int64_t out[PARTS], int64_t *sum) {
    *sum = kp_committed(&g_kc, TOPIC, GROUP, PARTS, out);
}

static void test_kill_coordinator_s3_kafka(void **state) {
    (void)state;
    uint32_t seed = tp_test_seed();
    tp_rng = seed;
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
    tp_proc *co = tp_spawn_coordinator("coordinator-0", dir, cfg, &port);

    /* S3: 2 x 1502 lines; Kafka: 4 x 501 offsets */
    int units = 2 * ((N_S3 / 2 + 2 + UNIT_ITEMS - 1) / UNIT_ITEMS) +
                PARTS * (((N_KAFKA + N_BAD_K) / PARTS + UNIT_ITEMS - 1) / UNIT_ITEMS);
    double at = tp_rnd_uniform(0.1, 0.45); /* mostly inside the Kafka units (the first 44) */
    double done;
    if (tp_wait_metric(co, port, TP_UNITS_DONE, at * units, 120, &done))
        fail_msg("the job ended before %.0f%% of the units were done:%s", at * 100, tp_report());
    tp_sleep_ms((int)tp_rnd_uniform(0, 20));
    tp_kill9(co);
    int64_t c1[PARTS], sum1;
    committed(c1, &sum1); /* nobody commits while no coordinator runs */
    int pause = (int)tp_rnd_uniform(0, 1500);
    printf("[   KILL   ] coordinator at %.0f/%d units done, %lld of %d Kafka offsets committed; "
           "restarted after %d ms\n",
           done, units, (long long)sum1, N_KAFKA + N_BAD_K, pause);
    fflush(stdout);
    tp_sleep_ms(pause);
    co = tp_spawn_coordinator("coordinator-1", dir, cfg, &port);
    if (tp_wait_all(300)) fail_msg("processes did not end by themselves:%s", tp_report());
    for (size_t i = 0; i < tp_nprocs; i++) {
        tp_proc *p = &tp_procs[i];
        int killed = !strcmp(p->name, "coordinator-0");
        if (p->status != (killed ? 137 : 0))
            fail_msg("%s exited with %d:%s", p->name, p->status, tp_report());
    }
    /* the restarted coordinator planned S3 whole (its journal knew the done units) and Kafka
     * from the committed offsets */
    tp_summary sum = tp_summary_of(co, "the last coordinator's log");
    assert_int_equal(sum.items, (unsigned long long)(N_S3 + N_BAD_S3 + N_KAFKA + N_BAD_K - sum1));
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
    json_t *seen = tp_dead_letter_refs(dl);
    assert_int_equal((int)json_object_size(seen), N_BAD_S3 + N_BAD_K);
    json_decref(seen);
    json_decref(g_good);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_kill_coordinator_s3_kafka, tp_teardown),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
