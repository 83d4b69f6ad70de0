/* test_out_kafka.c — the output topic (kafka.output_topic, index/out_kafka.h) against
 * librdkafka's mock cluster (3 brokers on 127.0.0.1, started by this process; kafka_peer.h):
 *   - `twn run --engine null` over 3,000 items and 3 shards with the output topic on: the topic
 *     holds every indexed id exactly once (idempotent producer, no crash), key = id, and each
 *     twn.EmbeddingRecord matches the index: its float32 vector rounds to the very float16 bytes
 *     of the shard's embeddings.npy row, dim 32, route / p_think / think tokens / FAISS id as in
 *     items.jsonl, the shard that holds it, model and model hash "null", a WAL seq;
 *   - the same with broker 1 taken down mid-run (its partitions' leaders moved to broker 2) and
 *     brought back 2 s later: every id is still there, records intact;
 *   - a bad config: an output topic without kafka.brokers is refused at start with one line;
 *   - at least once: a process adding to a shard under a committer with the output topic hooked
 *     is killed (SIGKILL); reopening the shard replays its WAL, which produces the replayed
 *     records again: every acked id is in the topic, some twice (consumers dedupe by key), every
 *     copy carrying the exact float32 vector that was added. */
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "index/committer.h"
#include "index/out_kafka.h"
#include "index/shard.h"
#include "index/store.h"
#include "proto/twn.pb-c.h"
#include "tests/unit/kafka_peer.h"
#include "tests/unit/procs.h"
#include "tests/unit/shard_out.h"

#define N     3000
#define DIM   32
#define PARTS 4

static kp_cluster g_kc;

static int group_setup(void **st) {
    (void)st;
    return kp_start(&g_kc, 3);
}

static int group_teardown(void **st) {
    (void)st;
    kp_stop(&g_kc);
    return 0;
}

static int teardown(void **st) {
    kp_brokers_up(&g_kc);
    return tp_teardown(st);
}

/* DIR/items.jsonl: N items "o<i>". */
static void corpus(const char *dir, char *path, size_t cap) {
    snprintf(path, cap, "%s/items.jsonl", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    for (int i = 0; i < N; i++) fprintf(f, "{\"id\": \"o%05d\", \"text\": \"item %d\"}\n", i, i);
    fclose(f);
}

static void make_topic(const char *topic) {
    assert_int_equal(rd_kafka_mock_topic_create(g_kc.mcl, topic, PARTS, 3), 0);
    for (int p = 0; p < PARTS; p++) /* leaders 1, 2, 3, 1 */
        assert_int_equal(rd_kafka_mock_partition_set_leader(g_kc.mcl, topic, p, 1 + p % 3), 0);
}

/* Every record of topic (partitions 0..PARTS-1, from the beginning to the high watermark). */
typedef struct {
    size_t n, cap;
    char **key;
    Twn__EmbeddingRecord **rec;
} records;

static void records_free(records *r) {
    for (size_t i = 0; i < r->n; i++) {
        free(r->key[i]);
        twn__embedding_record__free_unpacked(r->rec[i], NULL);
    }
    free(r->key);
    free(r->rec);
    memset(r, 0, sizeof *r);
}

static records consume_all(const char *topic) {
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, kp_quiet_log);
    assert_int_equal(
        rd_kafka_conf_set(conf, "bootstrap.servers", g_kc.brokers, errstr, sizeof errstr),
        RD_KAFKA_CONF_OK);
    assert_int_equal(rd_kafka_conf_set(conf, "group.id", "test-out", errstr, sizeof errstr),
                     RD_KAFKA_CONF_OK);
    assert_int_equal(rd_kafka_conf_set(conf, "enable.auto.commit", "false", errstr, sizeof errstr),
                     RD_KAFKA_CONF_OK);
    rd_kafka_t *c = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof errstr);
    assert_non_null(c);
    int64_t high[PARTS], left = 0;
    kp_high_water(c, topic, PARTS, high, 10000);
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(PARTS);
    for (int p = 0; p < PARTS; p++) {
        rd_kafka_topic_partition_list_add(l, topic, p)->offset = RD_KAFKA_OFFSET_BEGINNING;
        left += high[p];
    }
    assert_int_equal(rd_kafka_assign(c, l), 0);
    rd_kafka_topic_partition_list_destroy(l);
    records r = {0};
    double end = tp_now() + 60;
    while (left > 0) {
        if (tp_now() > end)
            fail_msg("topic %s: %lld records not read within 60 s", topic, (long long)left);
        rd_kafka_message_t *m = rd_kafka_consumer_poll(c, 100);
        if (!m) continue;
        if (m->err) {
            rd_kafka_message_destroy(m);
            continue;
        }
        if (m->partition >= 0 && m->partition < PARTS && m->offset < high[m->partition]) {
            left--;
            if (r.n == r.cap) {
                r.cap = r.cap ? 2 * r.cap : 1024;
                r.key = realloc(r.key, r.cap * sizeof *r.key);
                r.rec = realloc(r.rec, r.cap * sizeof *r.rec);
            }
            r.key[r.n] = strndup(m->key ? (const char *)m->key : "", m->key_len);
            r.rec[r.n] = twn__embedding_record__unpack(NULL, m->len, m->payload);
            if (!r.rec[r.n])
                fail_msg("%s[%d]@%lld: value is not a twn.EmbeddingRecord", topic, m->partition,
                         (long long)m->offset);
            r.n++;
        }
        rd_kafka_message_destroy(m);
    }
    rd_kafka_consumer_close(c);
    rd_kafka_destroy(c);
    return r;
}

/* Every id of the index (the shards' outputs under out) is in r with a record equal to the
 * index's; every record names an indexed id.  max_copies: how often one id may appear. */
static void check_topic(const records *r, const char *out, int n_shards, int max_copies) {
    tp_shards s = tp_shards_read(out, n_shards);
    assert_int_equal((int)json_object_size(s.items), N);
    json_t *seen = json_object();
    for (size_t k = 0; k < r->n; k++) {
        const Twn__EmbeddingRecord *e = r->rec[k];
        if (strcmp(r->key[k], e->id)) fail_msg("key %s holds the record of %s", r->key[k], e->id);
        json_t *it = json_object_get(s.items, e->id);
        if (!it) fail_msg("the topic has %s, which is not in the index", e->id);
        json_int_t copies = json_integer_value(json_object_get(seen, e->id)) + 1;
        json_object_set_new(seen, e->id, json_integer(copies));
        if (copies > max_copies) fail_msg("%s is in the topic %d times", e->id, (int)copies);
        assert_int_equal(e->dim, DIM);
        assert_int_equal(e->vector.len, DIM * sizeof(float));
        int row = (int)json_integer_value(json_object_get(it, "row"));
        for (int j = 0; j < DIM; j++) {
            float v;
            memcpy(&v, e->vector.data + 4 * j, 4);
            uint16_t got = twn_half_from_float(v),
                     want = twn_half_from_float(s.all.v[(size_t)row * DIM + (size_t)j]);
            if (got != want)
                fail_msg("%s[%d]: the topic's %.9g rounds to float16 %04x, embeddings.npy holds "
                         "%04x",
                         e->id, j, (double)v, got, want);
        }
        const char *route = json_string_value(json_object_get(it, "route"));
        assert_int_equal(e->route,
                         !strcmp(route, "hard") ? TWN__ROUTE__ROUTE_HARD : TWN__ROUTE__ROUTE_EASY);
        json_t *pt = json_object_get(it, "p_think");
        if (json_is_number(pt))
            assert_true(e->p_think == (float)json_number_value(pt));
        else
            assert_true(isnan(e->p_think));
        assert_int_equal(e->think_tokens,
                         (uint32_t)json_integer_value(json_object_get(it, "think_tokens")));
        assert_int_equal((int64_t)e->faiss_id,
                         (int64_t)json_integer_value(json_object_get(it, "faiss_id")));
        assert_int_equal(e->shard, (uint32_t)json_integer_value(json_object_get(it, "shard")));
        assert_string_equal(e->model, "null");
        assert_string_equal(e->model_hash, "null");
        assert_true(e->wal_seq > 0);
    }
    assert_int_equal((int)json_object_size(seen), N); /* every id */
    json_decref(seen);
    tp_shards_free(&s);
}

/* job.yaml for `twn run` with the output topic (and extra yaml appended). */
static const char *run_yaml(const char *dir, const char *topic, const char *extra) {
    static char path[1200];
    char y[4096];
    snprintf(y, sizeof y, "kafka:\n  brokers: \"%s\"\n  output_topic: %s\n%s", g_kc.brokers, topic,
             extra);
    snprintf(path, sizeof path, "%s/job.yaml", dir);
    tu_write(path, y, strlen(y));
    return path;
}

static void test_run_produces_every_vector(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("out_kafka_run");
    char in[1100], out[1100];
    corpus(dir, in, sizeof in);
    snprintf(out, sizeof out, "%s/out", dir);
    make_topic("emb");
    const char *cfg = run_yaml(dir, "emb", "");
    tp_proc *p =
        tp_spawn("run", dir, TWN_BIN, "run", "--config", cfg, "--engine", "null", "--dim", "32",
                 "--input", in, "--out", out, "--shards", "3", "--unit-items", "100", NULL);
    if (tp_wait(p, 120)) fail_msg("twn run did not end within 120 s: %s", tp_report());
    if (p->status) fail_msg("twn run failed: %s", tp_report());
    records r = consume_all("emb");
    assert_int_equal((int)r.n, N); /* exactly once without a crash */
    check_topic(&r, out, 3, 1);
    records_free(&r);
}

static void test_broker_down_mid_run(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("out_kafka_down");
    char in[1100], out[1100];
    corpus(dir, in, sizeof in);
    snprintf(out, sizeof out, "%s/out", dir);
    make_topic("emb-down");
    /* ~1 ms per item on one gate: a run of ~3 s to take a broker down in */
    const char *cfg = run_yaml(dir, "emb-down", "job:\n  null_item_us: 1000\n");
    tp_proc *p = tp_spawn("run", dir, TWN_BIN, "run", "--config", cfg, "--engine", "null", "--dim",
                          "32", "--input", in, "--out", out, "--shards", "3", "--gates", "1",
                          "--unit-items", "50", NULL);
    rd_kafka_t *h = kp_producer(&g_kc, NULL); /* a handle for watermarks */
    int64_t high[PARTS], sum = 0;
    double end = tp_now() + 60;
    while (sum < N / 5) { /* a fifth of the records arrived */
        if (tp_poll(p) || tp_now() > end)
            fail_msg("the run ended or stalled before the topic had %d records (%lld): %s", N / 5,
                     (long long)sum, tp_report());
        tp_sleep_ms(20);
        kp_high_water(h, "emb-down", PARTS, high, 5000);
        sum = 0;
        for (int q = 0; q < PARTS; q++) sum += high[q];
    }
    rd_kafka_destroy(h);
    assert_int_equal(rd_kafka_mock_broker_set_down(g_kc.mcl, 1), 0);
    assert_int_equal(rd_kafka_mock_partition_set_leader(g_kc.mcl, "emb-down", 0, 2), 0);
    assert_int_equal(rd_kafka_mock_partition_set_leader(g_kc.mcl, "emb-down", 3, 2), 0);
    tp_sleep_ms(2000);
    int ended_while_down = tp_poll(p);
    assert_int_equal(rd_kafka_mock_broker_set_up(g_kc.mcl, 1), 0);
    if (tp_wait(p, 120)) fail_msg("twn run did not end within 120 s: %s", tp_report());
    if (p->status) fail_msg("twn run failed: %s", tp_report());
    printf("broker 1 down at %lld records; the run %s while it was down\n", (long long)sum,
           ended_while_down ? "ended" : "went on");
    records r = consume_all("emb-down");
    assert_true(r.n >= N);
    check_topic(&r, out, 3, 2);
    records_free(&r);
}

static void test_no_brokers(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("out_kafka_nobrokers");
    char in[1100], out[1100], cfg[1200];
    corpus(dir, in, sizeof in);
    snprintf(out, sizeof out, "%s/out", dir);
    snprintf(cfg, sizeof cfg, "%s/job.yaml", dir);
    const char *y = "kafka:\n  output_topic: emb\n";
    tu_write(cfg, y, strlen(y));
    tp_proc *p = tp_spawn("run", dir, TWN_BIN, "run", "--config", cfg, "--engine", "null", "--dim",
                          "32", "--input", in, "--out", out, NULL);
    if (tp_wait(p, 60)) fail_msg("twn run did not end within 60 s: %s", tp_report());
    assert_int_equal(p->status, 2); /* a config error */
    char *log = tp_log(p);
    char want[1400];
    snprintf(want, sizeof want,
             "config: kafka.output_topic = \"emb\" (from %s line 2) needs kafka.brokers "
             "(bootstrap servers host:port[,...]), which is empty",
             cfg);
    if (!strstr(log, want)) fail_msg("log:\n%s\nexpected:\n%s", log, want);
    free(log);
}

/* Item i of the replay test: id "r<i>", vector components exact functions of (i, j). */
static void replay_item(int i, char *id, size_t cap, float *v, twn_index_item *it) {
    snprintf(id, cap, "r%d", i);
    for (int j = 0; j < 8; j++) v[j] = sinf(0.37f * (float)i + (float)j);
    *it = (twn_index_item){.id = id,
                           .vec = v,
                           .route = (uint8_t)(i % 2),
                           .p_think = 0.25f,
                           .think_tokens = (uint32_t)(i % 7)};
}

static twn_shard *replay_shard(const char *dir, twn_out_kafka **o) {
    twn_err err = {{0}};
    twn_out_kafka_cfg oc = {.brokers = g_kc.brokers,
                            .topic = "emb-replay",
                            .model = "m",
                            .model_hash = "h",
                            .shard = 5,
                            .dim = 8};
    if (twn_out_kafka_open(&oc, o, &err)) fail_msg("%s", err.msg);
    twn_shard_opts so = {.dim = 8, .factory = "Flat", .model = "m", .model_hash = "h"};
    so.wal_defer_writes = 1;
    so.on_durable = twn_out_kafka_on_durable;
    so.on_durable_ctx = *o;
    twn_shard *s = NULL;
    if (twn_shard_open(dir, &so, &s, NULL, &err)) fail_msg("%s", err.msg);
    return s;
}

static void test_replay_produces_again(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("out_kafka_replay");
    make_topic("emb-replay");
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) { /* adds 10 items at a time, "acks" each durable seq, until killed */
        close(fds[0]);
        twn_out_kafka *o = NULL;
        twn_shard *s = replay_shard(dir, &o);
        twn_committer *c = NULL;
        twn_err err = {{0}};
        if (twn_committer_start(s, 2, NULL, &c, &err)) _exit(2);
        uint64_t acked = 0;
        for (int k = 0;; k++) {
            char id[10][16];
            float v[10][8];
            twn_index_item it[10];
            for (int i = 0; i < 10; i++) replay_item(10 * k + i, id[i], 16, v[i], &it[i]);
            if (twn_shard_add(s, it, 10, NULL, &err)) _exit(3);
            twn_committer_kick(c);
            uint64_t durable = 0;
            if (twn_committer_poll(c, &durable, &err) < 0) _exit(4);
            if (durable > acked) {
                acked = durable;
                if (write(fds[1], &acked, sizeof acked) != (ssize_t)sizeof acked) _exit(5);
            }
            usleep(500);
        }
    }
    close(fds[1]);
    rd_kafka_t *h = kp_producer(&g_kc, NULL);
    uint64_t acked = 0, v;
    int64_t high[PARTS], sum = 0;
    double end = tp_now() + 60;
    while ((acked < 1000 || sum < 200) && tp_now() < end) { /* some delivered by the child */
        if (read(fds[0], &v, sizeof v) != sizeof v) break;
        acked = v;
        kp_high_water(h, "emb-replay", PARTS, high, 5000);
        sum = 0;
        for (int q = 0; q < PARTS; q++) sum += high[q];
    }
    rd_kafka_destroy(h);
    kill(pid, SIGKILL);
    int status;
    waitpid(pid, &status, 0);
    while (read(fds[0], &v, sizeof v) == sizeof v) acked = v;
    close(fds[0]);
    assert_true(WIFSIGNALED(status));
    assert_true(acked >= 1000 && sum >= 200);

    /* Reopen: the replay produces every record of the WAL again. */
    twn_out_kafka *o = NULL;
    twn_shard *s = replay_shard(dir, &o);
    twn_shard_stats ss;
    twn_shard_get_stats(s, &ss);
    assert_true((uint64_t)ss.items >= acked);
    twn_err err = {{0}};
    assert_int_equal(twn_out_kafka_flush(o, 20000, &err), 0);
    twn_out_kafka_stats os;
    twn_out_kafka_get_stats(o, &os);
    assert_int_equal(os.produced, (uint64_t)ss.items); /* the whole WAL, replayed */
    assert_int_equal(os.delivered, os.produced);
    assert_int_equal(os.errors, 0);
    assert_int_equal(twn_shard_close(s, &err), 0);
    twn_out_kafka_close(o);

    records r = consume_all("emb-replay");
    json_t *seen = json_object();
    for (size_t k = 0; k < r.n; k++) {
        const Twn__EmbeddingRecord *e = r.rec[k];
        int i = atoi(e->id + 1);
        char id[16];
        float want[8];
        twn_index_item it;
        replay_item(i, id, sizeof id, want, &it);
        assert_string_equal(r.key[k], id);
        assert_string_equal(e->id, id);
        assert_int_equal(e->vector.len, sizeof want);
        if (memcmp(e->vector.data, want, sizeof want)) fail_msg("%s: vector differs", id);
        assert_int_equal(e->route, i % 2 ? TWN__ROUTE__ROUTE_HARD : TWN__ROUTE__ROUTE_EASY);
        assert_int_equal(e->think_tokens, (uint32_t)(i % 7));
        assert_true(e->p_think == 0.25f);
        assert_int_equal(e->shard, 5);
        assert_int_equal(e->wal_seq, (uint64_t)i + 1);
        json_object_set_new(seen, id,
                            json_integer(json_integer_value(json_object_get(seen, id)) + 1));
    }
    for (uint64_t i = 0; i < acked; i++) {
        char id[32];
        snprintf(id, sizeof id, "r%llu", (unsigned long long)i);
        if (!json_object_get(seen, id)) fail_msg("acked item %s is not in the topic", id);
    }
    assert_int_equal((int)json_object_size(seen), (int)ss.items);
    printf("%zu records for %d ids: %zu produced twice (the child's, then the replay's)\n", r.n,
           (int)ss.items, r.n - (size_t)ss.items);
    assert_true(r.n >= (size_t)ss.items + 200); /* what the child delivered came again */
    json_decref(seen);
    records_free(&r);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_run_produces_every_vector, teardown),
        cmocka_unit_test_teardown(test_broker_down_mid_run, teardown),
        cmocka_unit_test_teardown(test_no_brokers, teardown),
        cmocka_unit_test_teardown(test_replay_produces_again, teardown),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
