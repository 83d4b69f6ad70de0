/* test_stream_mem.c — a kafka.streaming job holds bounded memory however long it streams, and a
 * broker outage does not stall the coordinator loop (coordinator/kplanner.h, twn_cstate_forget,
 * twn_journal_compact, twn_offsets_due/done).
 *
 * Without brokers:
 *  - the unit table releases its done prefix: keys forgotten (a 100,000-unit rolling window keeps
 *    every resident key findable: the map's backward-shift deletion), released units read as
 *    done, reports about them fail naming the unit;
 *  - cstate: a 600-unit stream with dead letters and hard items, released behind a committed
 *    mark, keeps <= 12 units and a journal under 4 KiB (compacted); after a crash the reopened
 *    journal restores exactly the units still held (done ones done with their counts, dead
 *    letters dead, hard items hard) and nothing of the released ones, with the next epoch;
 *  - the offsets tracker's asynchronous requests: one at a time, committed low water only after a
 *    full success, backoff after a failure, forgetting below it.
 * Against librdkafka's mock cluster (3 brokers on 127.0.0.1), null engine:
 *  - bounded: `twn coordinator|indexer|gate|worker` processes stream 6,000 records produced in
 *    bursts (units of 1) with kafka.stream_max_units 24: the coordinator never holds more than
 *    24 units, its journal stays under 8 KiB on disk (compacted at 4 KiB), its RSS grows < 1 MiB
 *    (the code before grew ~270 B a unit); SIGTERM, 200 more, restart: only the 200 are planned
 *    (from the committed offsets); 200 more with a kill -9 mid-way and a restart; every id
 *    exactly once in the index;
 *  - outage: every broker down for 3 s while a stream also works through a local file: a probe's
 *    heartbeats are answered within 0.5 s throughout, the loop's longest pass stays < 0.5 s, no
 *    peer is declared dead and no lease expires, file items keep finishing; then records
 *    produced after the outage are indexed, every id exactly once, offsets committed.
 * Every wait has a deadline. */
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include "common/metrics.h"
#include "common/source_io.h"
#include "common/transport.h"
#include "coordinator/cstate.h"
#include "coordinator/offsets.h"
#include "coordinator/units.h"
#include "tests/testutil.h"
#include "tests/unit/kafka_peer.h"
#include "tests/unit/pipeline_harness.h"
#include "tests/unit/procs.h"
#include "util/clock.h"
#include "util/hash.h"
#include "util/mem.h"

#if defined(__SANITIZE_ADDRESS__)
#define TWN_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TWN_TEST_ASAN 1
#endif
#endif

/* run 0's records (units of 1): 6,000 here, 2,000 under ASan (~4x slower, and no RSS bound) */
#ifdef TWN_TEST_ASAN
#define RUN0_BURSTS 4
#else
#define RUN0_BURSTS 12
#endif

#define GROUP "memgroup"
#define PARTS 3

static kp_cluster g_kc;

static int group_setup(void **state) {
    (void)state;
    return kp_start(&g_kc, 3);
}

static int group_teardown(void **state) {
    (void)state;
    kp_stop(&g_kc);
    return 0;
}

static int test_teardown(void **state) {
    kp_brokers_up(&g_kc);
    ph_teardown(state);
    return tp_teardown(state);
}

// ------------------------------------------------------------------------------------------------
// The unit table

static uint64_t key_of(uint32_t i) {
    uint64_t k = (uint64_t)i * 0x9E3779B97F4A7C15ull + 1;
    return twn_hash64(&k, sizeof k);
}

static void test_units_release(void **state) {
    (void)state;
    twn_units *t = twn_units_new();
    twn_err err = {{0}};
    uint32_t seq;
    int dn;
    twn_units_result r;
    for (uint32_t i = 0; i < 10; i++) {
        assert_int_equal(twn_units_add(t, key_of(i), 2, &seq, &dn, &err), 0);
        assert_int_equal(seq, i);
    }
    for (uint32_t i = 0; i < 7; i++) {
        if (i == 5) continue;
        assert_int_equal(twn_units_ack_range(t, i, 0, 2, TWN_ROUTE_EASY, NULL, NULL, &r, &err), 0);
        assert_true(r.unit_done);
    }
    /* only the done prefix goes: 0..4 (5 is not done) */
    assert_int_equal(twn_units_release(t, 9), 5);
    assert_int_equal(twn_units_base(t), 5);
    assert_int_equal(twn_units_resident(t), 5);
    assert_int_equal(twn_units_count(t), 10);
    assert_false(twn_units_find(t, key_of(3), &seq));
    assert_true(twn_units_find(t, key_of(6), &seq));
    assert_int_equal(seq, 6);
    assert_true(twn_units_is_done(t, 3));
    assert_int_equal(twn_units_pending(t, 3), 0);
    assert_int_equal(twn_units_item(t, 3, 0), TWN_ITEM_COMPLETED);
    assert_int_equal(twn_units_key(t, 3), 0);
    assert_int_equal(twn_units_ack_range(t, 3, 0, 1, TWN_ROUTE_EASY, NULL, NULL, &r, &err), -1);
    assert_string_equal(err.msg, "ack for unit #3: the unit was released (done and committed)");
    assert_int_equal(twn_units_lookup(t, key_of(2), &seq, &err), -1);
    char want[128];
    snprintf(want, sizeof want, "unknown unit %016llx: not in the plan (10 units)",
             (unsigned long long)key_of(2));
    assert_string_equal(err.msg, want);
    assert_int_equal(twn_units_progress(t)->units_done, 6); /* counters keep the released */
    assert_int_equal(twn_units_release(t, 9), 0);           /* 5 still holds the prefix */
    assert_int_equal(twn_units_ack_range(t, 5, 0, 2, TWN_ROUTE_EASY, NULL, NULL, &r, &err), 0);
    assert_int_equal(twn_units_release(t, 9), 2); /* 5, 6 */
    assert_int_equal(twn_units_low_water(t), 7);
    twn_units_free(t);

    /* a long stream: 100,000 units, at most 12 held, every held key found, every released one
     * gone (the map deletes without tombstones) */
    t = twn_units_new();
    for (uint32_t i = 0; i < 100000; i++) {
        assert_int_equal(twn_units_add(t, key_of(i), 1, &seq, &dn, &err), 0);
        assert_int_equal(seq, i);
        assert_int_equal(twn_units_ack_range(t, i, 0, 1, TWN_ROUTE_EASY, NULL, NULL, &r, &err), 0);
        if (i % 8 == 7) twn_units_release(t, i + 1 - 4); /* the last 4 wait for their commit */
        assert_true(twn_units_resident(t) <= 12);
        for (uint32_t b = twn_units_base(t); b <= i; b++) {
            assert_true(twn_units_find(t, key_of(b), &seq));
            assert_int_equal(seq, b);
        }
        if (twn_units_base(t)) assert_false(twn_units_find(t, key_of(twn_units_base(t) - 1), NULL));
    }
    assert_int_equal(twn_units_base(t), 99996);
    assert_int_equal(twn_units_item_bytes(t), 0);
    twn_units_free(t);
}

// ------------------------------------------------------------------------------------------------
// cstate: releases and journal compaction

typedef struct jcount {
    int done, dead, hard, resume, start;
    uint32_t max_epoch;
} jcount;

static int count_rec(void *ctx, const twn_jrec *r, twn_err *err) {
    (void)err;
    jcount *c = ctx;
    c->done += r->type == TWN_JREC_UNIT_DONE;
    c->dead += r->type == TWN_JREC_DEAD_LETTER;
    c->hard += r->type == TWN_JREC_HARD_ROUTED;
    c->start += r->type == TWN_JREC_JOB_START;
    if (r->type == TWN_JREC_RESUME) {
        c->resume++;
        if (r->epoch > c->max_epoch) c->max_epoch = r->epoch;
    }
    return 0;
}

static jcount journal_count(const char *path) {
    jcount c = {0};
    size_t n;
    char *b = tu_read(path, &n);
    twn_err err = {{0}};
    if (twn_journal_replay_mem(b, n, path, NULL, count_rec, &c, NULL, &err))
        fail_msg("%s", err.msg);
    free(b);
    return c;
}

/* Unit i of the stream: 4 items; item 0 of every 10th (i % 10 == 7) dead-lettered, item 1 of
 * every 5th (i % 5 == 3) routed hard (acked hard with 3 think tokens when `finish`), the rest
 * acked easy when `finish`. */
#define DEAD_UNIT(i) ((i) % 10 == 7)
#define HARD_UNIT(i) ((i) % 5 == 3)
static void work_unit(twn_cstate *cs, uint32_t i, int finish) {
    twn_err err = {{0}};
    uint64_t k = key_of(i);
    uint32_t one = 1, tt = 3, easy[4];
    size_t ne = 0;
    if (DEAD_UNIT(i) && twn_cstate_dead_letter(cs, k, 0, TWN_STAGE_READ, "bad record", &err))
        fail_msg("%s", err.msg);
    if (HARD_UNIT(i) && twn_cstate_report_hard(cs, k, &one, 1, &err)) fail_msg("%s", err.msg);
    if (!finish) return;
    if (HARD_UNIT(i) && twn_cstate_ack(cs, k, &one, &tt, 1, TWN_ROUTE_HARD, &err))
        fail_msg("%s", err.msg);
    for (uint32_t it = 0; it < 4; it++)
        if (!(it == 0 && DEAD_UNIT(i)) && !(it == 1 && HARD_UNIT(i))) easy[ne++] = it;
    if (twn_cstate_ack(cs, k, easy, NULL, ne, TWN_ROUTE_EASY, &err)) fail_msg("%s", err.msg);
}

static void test_cstate_forget_compact(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("stream-mem-cstate");
    char path[1100];
    snprintf(path, sizeof path, "%s/journal", dir);
    twn_plan_fp fp = {"kafka://t\n", 4, "null"};
    twn_cstate_cfg cfg;
    twn_cstate_cfg_default(&cfg);
    cfg.journal.fsync = 0;
    cfg.journal_compact_bytes = 2048;
    twn_cstate *cs;
    twn_journal_info info;
    twn_err err = {{0}};
    if (twn_cstate_open(path, &fp, &cfg, NULL, &cs, &info, &err)) fail_msg("%s", err.msg);
    assert_int_equal(info.epoch, 1);
    uint64_t max_bytes = 0, max_resident = 0;
    uint32_t n = 0;
    for (int b = 0; b < 75; b++) { /* 600 units, 8 at a time */
        twn_unit_spec specs[8];
        for (int j = 0; j < 8; j++) specs[j] = (twn_unit_spec){key_of(n + (uint32_t)j), 4};
        if (twn_cstate_add_units(cs, specs, 8, &err)) fail_msg("%s", err.msg);
        for (int j = 0; j < 8; j++) work_unit(cs, n + (uint32_t)j, b < 74 || j < 4);
        n += 8;
        if (twn_cstate_sync(cs, &err)) fail_msg("%s", err.msg);
        /* "committed" up to 4 units behind the durable low water */
        uint32_t low = twn_cstate_low_water(cs);
        size_t k;
        if (twn_cstate_forget(cs, low > 4 ? low - 4 : 0, &k, &err)) fail_msg("%s", err.msg);
        twn_cstate_stats st;
        twn_cstate_stats_get(cs, &st);
        if (st.units_resident > max_resident) max_resident = st.units_resident;
        if (st.journal_bytes > max_bytes) max_bytes = st.journal_bytes;
    }
    twn_cstate_stats st;
    twn_cstate_stats_get(cs, &st);
    printf("cstate: 600 units, at most %llu held, journal at most %llu bytes, %llu compactions\n",
           (unsigned long long)max_resident, (unsigned long long)max_bytes,
           (unsigned long long)st.journal_compactions);
    assert_true(max_resident <= 12);
    assert_true(max_bytes <= 4096);
    assert_true(st.journal_compactions >= 5);
    assert_int_equal(st.progress.units_done, 596);
    assert_int_equal(st.units_released, 592);
    assert_int_equal(st.units_resident, 8); /* 592..595 done, 596..599 not */
    /* a released key is unknown */
    assert_int_equal(twn_cstate_item_state(cs, key_of(10), 0), -1);
    assert_int_equal(twn_cstate_ack_range(cs, key_of(10), 0, 1, TWN_ROUTE_EASY, &err), -1);
    twn_cstate_abandon(cs); /* a crash: everything was committed by the last sync */

    /* the journal holds only what the 8 units held need (+ JOB_START and one RESUME) */
    jcount jc = journal_count(path);
    assert_int_equal(jc.start, 1);
    assert_int_equal(jc.resume, 1);
    assert_int_equal(jc.max_epoch, 1);
    assert_true(jc.done >= 4 && jc.done < 60); /* 596 without compaction */
    size_t jn;
    free(tu_read(path, &jn));
    assert_true(jn <= 4096);

    /* reopened: epoch 2; the 8 units come back as they were; a released one does not */
    if (twn_cstate_open(path, &fp, &cfg, NULL, &cs, &info, &err)) fail_msg("%s", err.msg);
    assert_int_equal(info.epoch, 2);
    twn_unit_spec again[9];
    for (int j = 0; j < 8; j++) again[j] = (twn_unit_spec){key_of(592 + (uint32_t)j), 4};
    again[8] = (twn_unit_spec){key_of(100), 4};
    if (twn_cstate_add_units(cs, again, 9, &err)) fail_msg("%s", err.msg);
    for (uint32_t i = 592; i < 600; i++) {
        twn_unit_counts c;
        int done;
        assert_int_equal(twn_cstate_unit_counts(cs, key_of(i), &c, &done), 0);
        assert_int_equal(done, i < 596);
        if (done) {
            assert_int_equal(c.dead, DEAD_UNIT(i));
            assert_int_equal(c.hard, HARD_UNIT(i));
            assert_int_equal(c.think_tokens, HARD_UNIT(i) ? 3 : 0);
            assert_int_equal(c.easy, 4 - c.dead - c.hard);
        } else {
            assert_int_equal(twn_cstate_item_state(cs, key_of(i), 0),
                             DEAD_UNIT(i) ? TWN_ITEM_DEAD : TWN_ITEM_PENDING);
            assert_int_equal(twn_cstate_item_state(cs, key_of(i), 1),
                             HARD_UNIT(i) ? TWN_ITEM_HARD_PENDING : TWN_ITEM_PENDING);
        }
    }
    int done;
    twn_unit_counts c;
    assert_int_equal(twn_cstate_unit_counts(cs, key_of(100), &c, &done), 0);
    assert_int_equal(done, 0); /* compacted away: it was committed, a restart never plans it */
    twn_cstate_abandon(cs);
}

// ------------------------------------------------------------------------------------------------
// The offsets tracker, asynchronously

static void add_unit(twn_src_units *plan, const char *path, uint64_t start, uint64_t end) {
    if (plan->n == plan->cap) {
        plan->cap = plan->cap ? 2 * plan->cap : 8;
        plan->v = twn_realloc(plan->v, plan->cap * sizeof *plan->v);
    }
    plan->v[plan->n] = (twn_src_unit){.id = plan->n,
                                      .format = TWN_SRC_KAFKA_JSON,
                                      .path = twn_strdup(path),
                                      .start = start,
                                      .end = end,
                                      .first_index = start,
                                      .count = end - start};
    plan->n++;
}

static void test_offsets_async(void **state) {
    (void)state;
    /* p0 [0,4) p1 [0,4) p0 [4,8) p1 [4,6) */
    twn_src_units plan = {0};
    add_unit(&plan, "kafka://t/0", 0, 4);
    add_unit(&plan, "kafka://t/1", 0, 4);
    add_unit(&plan, "kafka://t/0", 4, 8);
    add_unit(&plan, "kafka://t/1", 4, 6);
    twn_offsets *o;
    twn_err err = {{0}};
    assert_int_equal(twn_offsets_new(&plan, 0, &o, &err), 0);
    const twn_offset_point *pts;
    /* low water 3: p0 at 8, p1 at 4 */
    assert_int_equal(twn_offsets_due(o, 3, 1.0, 0, &pts), 2);
    assert_string_equal(pts[0].topic, "t");
    assert_int_equal(pts[0].partition, 0);
    assert_int_equal(pts[0].offset, 8);
    assert_int_equal(pts[1].partition, 1);
    assert_int_equal(pts[1].offset, 4);
    twn_offset_point got[2];
    memcpy(got, pts, sizeof got);
    assert_int_equal(twn_offsets_due(o, 4, 1.0, 1, &pts), 0); /* one request at a time */
    assert_int_equal(twn_offsets_committed_low(o), 0);
    got[0].committed = 8;
    got[1].committed = 4;
    twn_offsets_done(o, got, 2);
    assert_int_equal(twn_offsets_committed_low(o), 3);
    assert_int_equal(twn_offsets_committed(o, 0, NULL, NULL), 8);
    /* low water 4: only p1 is behind; it fails: nothing moves, and the next try waits 0.1 s */
    assert_int_equal(twn_offsets_due(o, 4, 2.0, 0, &pts), 1);
    memcpy(got, pts, sizeof got[0]);
    got[0].committed = -1;
    twn_offsets_done(o, got, 1);
    assert_int_equal(twn_offsets_committed_low(o), 3);
    assert_int_equal(twn_offsets_due(o, 4, 2.05, 0, &pts), 0);
    assert_int_equal(twn_offsets_due(o, 4, 2.2, 0, &pts), 1);
    twn_offsets_done(o, NULL, 0); /* dropped (the thread stopped): a failure too */
    assert_int_equal(twn_offsets_committed_low(o), 3);
    assert_int_equal(twn_offsets_due(o, 4, 5.0, 0, &pts), 1);
    assert_int_equal(pts[0].offset, 6);
    memcpy(got, pts, sizeof got[0]);
    got[0].committed = 6;
    twn_offsets_done(o, got, 1);
    assert_int_equal(twn_offsets_committed_low(o), 4);
    /* forget below 4; the stream goes on with units 4, 5 */
    twn_offsets_forget(o, 4);
    twn_src_unit u4 = {.path = (char *)"kafka://t/0", .start = 8, .end = 12};
    twn_src_unit u5 = {.path = (char *)"kafka://t/1", .start = 6, .end = 10};
    assert_int_equal(twn_offsets_add(o, 4, &u4, &err), 0);
    assert_int_equal(twn_offsets_add(o, 5, &u5, &err), 0);
    assert_int_equal(twn_offsets_due(o, 5, 6.0, 0, &pts), 1); /* p0 at 12; p1 waits for unit 5 */
    assert_int_equal(pts[0].partition, 0);
    assert_int_equal(pts[0].offset, 12);
    memcpy(got, pts, sizeof got[0]);
    got[0].committed = 12;
    twn_offsets_done(o, got, 1);
    assert_int_equal(twn_offsets_committed_low(o), 5);
    twn_offsets_free(o);
    twn_src_units_free(&plan);
}

// ------------------------------------------------------------------------------------------------
// Records, watermarks, committed offsets

static json_t *g_good; /* every id produced (or written) so far */

static void produce(rd_kafka_t *p, const char *topic, const char *prefix, int from, int n) {
    for (int i = from; i < from + n; i++) {
        char id[64], v[160];
        snprintf(id, sizeof id, "%s-%05d", prefix, i);
        int len = snprintf(v, sizeof v, "{\"id\": \"%s\", \"text\": \"record %d\"}", id, i);
        kp_produce(p, topic, i % PARTS, id, v, (size_t)len);
        json_object_set_new(g_good, id, json_true());
    }
    kp_flush(p);
}

/* Every partition's committed offset is at its high watermark. */
static int caught_up(rd_kafka_t *h, const char *topic) {
    int64_t hw[PARTS], c[PARTS];
    kp_high_water(h, topic, PARTS, hw, 5000);
    kp_committed(&g_kc, topic, GROUP, PARTS, c);
    for (int p = 0; p < PARTS; p++)
        if (c[p] != hw[p]) return 0;
    return 1;
}

static void assert_index_exact(const char *out, int shards) {
    tp_index_exact(out, shards, g_good);
}

// ------------------------------------------------------------------------------------------------
// Bounded: the roles as processes

/* VmRSS of a process in KiB (-1 when gone). */
static long rss_kib(pid_t pid) {
    long rss, hwm;
    tp_proc_mem(pid, &rss, &hwm);
    return rss;
}

#define MAX_UNITS     24
#define UNIT_ITEMS    1
#define SHARDS        2
#define RESIDENT      "twn_coordinator_units_resident"
#define JOURNAL       "twn_coordinator_journal_bytes"
#define ITEMS_PLANNED "twn_job_items"

static const char *write_config(const char *dir, const char *control, char eps[SHARDS][256]) {
    char yaml[4096];
    snprintf(yaml, sizeof yaml,
             "# written by test_stream_mem.c\n"
             "job:\n"
             "  inputs:\n"
             "    - kafka://mem\n"
             "  out: %s/out\n"
             "  engine: null\n"
             "  null_item_us: 300\n"
             "  dim: 16\n"
             "  shards: %d\n"
             "  unit_items: %d\n"
             "coordinator:\n"
             "  listen: %s\n"
             "  heartbeat_ms: 200\n"
             "  missed_beats: 10\n"
             "  lease_ms: 10000\n"
             "  connect_timeout_ms: 60000\n"
             "  journal_compact_bytes: 4096\n"
             "gate:\n"
             "  credits: 2\n"
             "  batch: 8\n"
             "worker:\n"
             "  credits: 1\n"
             "  batch: 8\n"
             "kafka:\n"
             "  brokers: %s\n"
             "  group: " GROUP "\n"
             "  streaming: true\n"
             "  stream_max_units: %d\n"
             "indexer:\n"
             "  commit_ms: 10\n"
             "  endpoints:\n",
             dir, SHARDS, UNIT_ITEMS, control, g_kc.brokers, MAX_UNITS);
    return tp_job_yaml(dir, yaml, eps[0], sizeof eps[0], SHARDS);
}

typedef struct fleet {
    const char *dir, *cfg;
    tp_proc *co;
    int port, run;
    /* samples */
    double max_resident, max_journal, done;
    long max_journal_file; /* bytes on disk */
    long rss_warm;         /* the coordinator's VmRSS once 500 units were done (KiB) */
    double done_warm;
} fleet;

static void start_coordinator(fleet *f) {
    char name[32];
    snprintf(name, sizeof name, "coordinator-%d", f->run);
    f->co = tp_spawn_coordinator(name, f->dir, f->cfg, &f->port);
}

static void start_fleet(fleet *f) {
    for (int k = 0; k < SHARDS; k++) {
        char name[32], shard[8];
        snprintf(name, sizeof name, "indexer-%d-%d", k, f->run);
        snprintf(shard, sizeof shard, "%d", k);
        tp_spawn(name, f->dir, TWN_BIN, "indexer", "--config", f->cfg, "--shard", shard, NULL);
    }
    char name[32];
    snprintf(name, sizeof name, "gate-%d", f->run);
    tp_spawn(name, f->dir, TWN_BIN, "gate", "--config", f->cfg, NULL);
    snprintf(name, sizeof name, "worker-%d", f->run);
    tp_spawn(name, f->dir, TWN_BIN, "worker", "--config", f->cfg, NULL);
    start_coordinator(f);
}

/* Samples the coordinator's gauges (every 10 ms) for s seconds. */
static void sample(fleet *f, double s) {
    double end = tp_now() + s;
    do {
        double r = tp_metric(f->port, RESIDENT), j = tp_metric(f->port, JOURNAL),
               d = tp_metric(f->port, TP_UNITS_DONE);
        if (r > f->max_resident) f->max_resident = r;
        if (j > f->max_journal) f->max_journal = j;
        if (d > f->done) f->done = d;
        char path[1300];
        struct stat st;
        snprintf(path, sizeof path, "%s/out/journal", f->dir);
        if (!stat(path, &st) && st.st_size > f->max_journal_file) f->max_journal_file = st.st_size;
        if (!f->rss_warm && d >= 500) {
            f->rss_warm = rss_kib(f->co->pid);
            f->done_warm = d;
        }
        tp_sleep_ms(10);
    } while (tp_now() < end);
}

static void wait_caught_up(fleet *f, rd_kafka_t *h, double timeout_s) {
    double end = tp_now() + timeout_s;
    while (!caught_up(h, "mem")) {
        if (tp_now() > end || tp_poll(f->co))
            fail_msg("run %d: the stream did not catch up within %.0f s:%s", f->run, timeout_s,
                     tp_report());
        sample(f, 0.1);
    }
}

/* SIGTERM to the coordinator: it drains, commits what is durable, stops every role and prints
 * its summary; it exits 128 + 15 (cli/cmd_roles.c), the others 0 (the killed one 137). */
static void stop_fleet(fleet *f) {
    tp_signal(f->co, SIGTERM);
    if (tp_wait_all(60)) fail_msg("processes did not end by themselves:%s", tp_report());
    for (size_t i = 0; i < tp_nprocs; i++) {
        tp_proc *p = &tp_procs[i];
        int want = strstr(p->name, "coordinator-k") ? 137
                   : strstr(p->name, "coordinator") ? 143
                                                    : 0;
        if (p->status != want) fail_msg("%s exited with %d:%s", p->name, p->status, tp_report());
    }
    char *log = tp_log(f->co);
    if (!strstr(log, "\nunits ")) fail_msg("no summary line in %s's log:%s", f->co->name, log);
    free(log);
}

static void test_stream_bounded(void **state) {
    (void)state;
    g_good = json_object();
    assert_int_equal(rd_kafka_mock_topic_create(g_kc.mcl, "mem", PARTS, 3), 0);
    rd_kafka_t *prod = kp_producer(&g_kc, NULL);
    const char *dir = tu_tmpdir("stream-mem");
    char control[256], eps[SHARDS][256], out[1200];
    tp_endpoints(dir, 1, control, eps[0], sizeof eps[0], SHARDS);
    snprintf(out, sizeof out, "%s/out", dir);
    fleet f = {.dir = dir, .cfg = write_config(dir, control, eps)};

    /* run 0: 6,000 records (units of 1) in 12 bursts of 500, each 20x MAX_UNITS */
    start_fleet(&f);
    int produced = 0;
    for (int b = 0; b < RUN0_BURSTS; b++) {
        produce(prod, "mem", "m", produced, 500);
        produced += 500;
        sample(&f, 0.25);
    }
    wait_caught_up(&f, prod, 180);
    long rss_warm = f.rss_warm;
    double done_warm = f.done_warm;
    sample(&f, 0.2);
    long rss_end = rss_kib(f.co->pid);
    double done0 = tp_metric(f.port, TP_UNITS_DONE);
    printf("bounded: run 0: %.0f units done, at most %.0f held (limit %d), journal at most %ld "
           "bytes on disk (gauge %.0f), coordinator RSS %ld KiB after %.0f units, %ld KiB after "
           "%.0f\n",
           done0, f.max_resident, MAX_UNITS, f.max_journal_file, f.max_journal, rss_warm, done_warm,
           rss_end, done0);
    fflush(stdout);
    assert_true(done0 >= 500 * RUN0_BURSTS);
    /* the journal compacts at 4 KiB: without compaction it would hold ~6,000 UNIT_DONEs */
    if (f.max_journal_file > 8192)
        fail_msg("the journal grew to %ld bytes over %.0f units", f.max_journal_file, done0);
    if (!(f.max_resident >= 1 && f.max_resident <= MAX_UNITS))
        fail_msg("the coordinator held up to %.0f units (twn_coordinator_units_resident), "
                 "expected 1..%d",
                 f.max_resident, MAX_UNITS);
    assert_true(f.max_journal > 0 && f.max_journal <= 8192);
    assert_true(rss_warm > 0 && rss_end > 0);
#ifndef TWN_TEST_ASAN /* ASan's quarantine keeps freed memory resident: no RSS bound there */
    /* what grew with units before (plan, keys, records, journal replay) was ~270 B a unit: this
     * would be ~1.4 MiB over these ~5,500 */
    if (rss_end - rss_warm >= 1024)
        fail_msg("the coordinator's RSS grew %ld KiB over %.0f units", rss_end - rss_warm,
                 done0 - done_warm);
#endif
    stop_fleet(&f);
    assert_index_exact(out, SHARDS);

    /* run 1: 200 more while nothing runs; restarted, it plans only them (from the committed
     * offsets) */
    produce(prod, "mem", "m", produced, 200);
    produced += 200;
    f.run = 1;
    f.max_resident = f.max_journal = f.done = 0;
    start_fleet(&f);
    wait_caught_up(&f, prod, 120);
    assert_int_equal((int)tp_metric(f.port, ITEMS_PLANNED), 200);
    assert_true(f.max_resident <= MAX_UNITS);
    stop_fleet(&f);
    assert_index_exact(out, SHARDS);

    /* run 2: 200 more; the coordinator is killed (kill -9) once 10 units are done and restarted;
     * the journal it left (compacted or not) and the committed offsets resume the stream */
    produce(prod, "mem", "m", produced, 200);
    produced += 200;
    f.run = 2;
    f.done = 0;
    start_fleet(&f);
    double end = tp_now() + 60;
    while (f.done < 10 && tp_now() < end && !tp_poll(f.co)) sample(&f, 0.005);
    if (f.done < 10) fail_msg("run 2: not 10 units done within 60 s:%s", tp_report());
    snprintf(f.co->name, sizeof f.co->name, "coordinator-killed");
    tp_kill9(f.co);
    f.run = 3;
    start_coordinator(&f);
    wait_caught_up(&f, prod, 120);
    stop_fleet(&f);
    assert_index_exact(out, SHARDS);
    assert_int_equal((int)json_object_size(g_good), 500 * RUN0_BURSTS + 400);
    rd_kafka_destroy(prod);
    json_decref(g_good);
}

// ------------------------------------------------------------------------------------------------
// Outage: the roles as threads, a probe timing the coordinator's answers

typedef struct probe {
    const char *endpoint;
    void *zctx;
    volatile int stop, outage;
    int answered_outage;   /* heartbeats answered while the brokers were down */
    double max_rtt_outage; /* the slowest answer meanwhile */
    double max_rtt;        /* over the whole run */
    double t0, max_rtt_at; /* when the slowest answer came (from t0) */
    pthread_t th;
} probe;

/* Sends a Heartbeat as an unknown peer every 50 ms: the coordinator answers each with a Welcome
 * that asks for a Hello (service.c ask_hello), without making the probe a peer. */
static void *probe_main(void *arg) {
    probe *pr = arg;
    twn_err err = {{0}};
    twn_sock_opts so = twn_sock_opts_default();
    so.linger_ms = 0;
    so.routing_id = "probe";
    void *s = twn_sock_new(pr->zctx, ZMQ_DEALER, &so, &err);
    if (!s || twn_sock_connect(s, pr->endpoint, &err)) {
        fprintf(stderr, "probe: %s\n", err.msg);
        if (s) twn_sock_close(s);
        return NULL;
    }
    twn_frame_opts fo = twn_frame_opts_for(pr->endpoint, NULL);
    while (!pr->stop) {
        Twn__Heartbeat hb = TWN__HEARTBEAT__INIT;
        Twn__Envelope env = TWN__ENVELOPE__INIT;
        env.body_case = TWN__ENVELOPE__BODY_HEARTBEAT;
        env.heartbeat = &hb;
        int during = pr->outage;
        double t0 = twn_now();
        if (twn_send_msg(s, NULL, &env, &fo, &err) == 0) {
            for (;;) {
                Twn__Envelope *m = NULL;
                twn_recv_status st = twn_recv_msg(s, 100, &fo, NULL, &m, &err);
                if (st == TWN_RECV_MSG) {
                    int welcome = m->body_case == TWN__ENVELOPE__BODY_WELCOME;
                    twn_msg_free(m);
                    if (!welcome) continue;
                    double rtt = twn_now() - t0;
                    if (during && pr->outage) {
                        pr->answered_outage++;
                        if (rtt > pr->max_rtt_outage) pr->max_rtt_outage = rtt;
                    }
                    break;
                }
                if (st == TWN_RECV_FAIL || pr->stop) break;
                if (twn_now() - t0 > 10) break; /* counted as a 10 s answer below */
            }
            double rtt = twn_now() - t0;
            if (rtt > pr->max_rtt) {
                pr->max_rtt = rtt;
                pr->max_rtt_at = t0 - pr->t0;
            }
            if (during && rtt > pr->max_rtt_outage) pr->max_rtt_outage = rtt;
        }
        ph_nap(0.05);
    }
    twn_sock_close(s);
    return NULL;
}

typedef struct outage {
    probe pr;
    rd_kafka_t *prod;
    double t0, t_down, t_check;
    int phase;
    double items_at_down, items_during, loop_max_after, expiries0, lost0;
    int file_items;
} outage;

static double msum(const char *name) {
    return twn_metrics_sum(twn_metrics_default(), name);
}

/* The job's script, called every 20 ms: 0.5 s in, every broker goes down for 3 s; then 60 more
 * records; stop once every file item is finished and the topic is committed. */
static int outage_watch(void *user, const char *journal) {
    (void)journal;
    outage *o = user;
    double now = twn_now();
    switch (o->phase) {
    case 0:
        if (now - o->t0 < 0.5) return 0;
        o->items_at_down = msum("twn_items_total");
        for (int b = 1; b <= 3; b++) rd_kafka_mock_broker_set_down(g_kc.mcl, b);
        o->t_down = now;
        o->pr.outage = 1;
        o->phase = 1;
        return 0;
    case 1:
        if (now - o->t_down < 3.0) return 0;
        o->pr.outage = 0;
        o->items_during = msum("twn_items_total") - o->items_at_down;
        twn_metrics_get(twn_metrics_default(), "twn_coordinator_loop_pass_max_seconds", NULL,
                        &o->loop_max_after);
        kp_brokers_up(&g_kc);
        o->phase = 2;
        return 0;
    case 2:
        produce(o->prod, "outage", "o", 90, 60);
        o->phase = 3;
        return 0;
    default:
        /* committed at the high watermarks: every Kafka unit is durable, and so is every file
         * unit (planned first, below them in the low water).  Checked every 0.2 s. */
        if (now - o->t_down > 60) return 1; /* the checks below say what is missing */
        if (now - o->t_check < 0.2) return 0;
        o->t_check = now;
        if (!caught_up(o->prod, "outage")) return 0;
        o->pr.stop = 1; /* the probe times the stream, not its stop */
        return 1;
    }
}

static void test_stream_outage(void **state) {
    (void)state;
    g_good = json_object();
    assert_int_equal(rd_kafka_mock_topic_create(g_kc.mcl, "outage", PARTS, 3), 0);
    outage o = {0};
    o.prod = kp_producer(&g_kc, NULL);
    produce(o.prod, "outage", "o", 0, 90);
    const char *dir = tu_tmpdir("stream-outage");
    char file[1100], out[1100];
    snprintf(file, sizeof file, "%s/local.jsonl", dir);
    snprintf(out, sizeof out, "%s/out", dir);
    twn_str b = {0};
    o.file_items = 600;
    for (int i = 0; i < o.file_items; i++) {
        char id[32];
        snprintf(id, sizeof id, "f-%04d", i);
        twn_str_printf(&b, "{\"id\": \"%s\", \"text\": \"file item %d\"}\n", id, i);
        json_object_set_new(g_good, id, json_true());
    }
    tu_write(file, b.v, b.n);
    twn_str_free(&b);

    twn_srcio_cfg io;
    kp_srcio_cfg(&io, &g_kc, GROUP, 1500, 30000);
    const char *inputs[] = {"kafka://outage", file};
    ph_pipeline *p = ph_pipeline_new("outage", out, inputs, 2, SHARDS, 1, 1, 16);
    twn_coord_cfg *cc = ph_coord(p);
    cc->io = &io;
    cc->streaming = 1;
    cc->stream_poll_s = 0.1;
    cc->unit_items = 8;
    /* a peer silent for 1.5 s is dead: the old loop, blocked op_timeout_ms per broker call, lost
     * its peers */
    cc->heartbeat_s = 0.25;
    cc->missed_beats = 6;
    cc->cs.unit_lease.heartbeat_s = cc->cs.hard_lease.heartbeat_s = 0.25;
    cc->cs.unit_lease.missed_heartbeats = cc->cs.hard_lease.missed_heartbeats = 6;
    ph_gate(p, 0)->io = &io;
    ph_gate(p, 0)->null_item_us = 5000; /* the file takes ~3 s: it spans the outage */
    ph_worker(p, 0)->io = &io;
    p->user = &o;
    p->watch = outage_watch;
    p->deadline_s = 120;
    o.expiries0 = msum("twn_lease_expiries_total");
    o.lost0 = msum("twn_coordinator_peers_lost_total");
    o.pr.endpoint = p->control;
    o.pr.zctx = p->zctx;
    o.t0 = o.pr.t0 = twn_now();
    ph_pipeline_start(p);
    pthread_create(&o.pr.th, NULL, probe_main, &o.pr);
    ph_pipeline_wait(p);
    o.pr.stop = 1;
    pthread_join(o.pr.th, NULL);
    ph_pipeline_check(p);
    printf(
        "outage: probe answered %d heartbeats during the 3 s outage, slowest %.3f s (%.3f s over "
        "the run, at %.2f s; outage from %.2f s); loop's longest pass %.3f s; %.0f items "
        "finished during the outage; %.0f lease expiries, %.0f peers lost\n",
        o.pr.answered_outage, o.pr.max_rtt_outage, o.pr.max_rtt, o.pr.max_rtt_at, o.t_down - o.t0,
        o.loop_max_after, o.items_during, msum("twn_lease_expiries_total") - o.expiries0,
        msum("twn_coordinator_peers_lost_total") - o.lost0);
    fflush(stdout);
    if (p->roles[0].status) fail_msg("coordinator: %s", p->roles[0].err.msg);
    assert_true(o.phase == 3);
    assert_true(o.pr.answered_outage >= 20);
    assert_true(o.pr.max_rtt_outage < 0.5);
    assert_true(o.pr.max_rtt < 0.5);
    assert_true(o.loop_max_after > 0 && o.loop_max_after < 0.5);
    assert_true(o.items_during > 0);
    assert_true(msum("twn_lease_expiries_total") - o.expiries0 == 0);
    assert_true(msum("twn_coordinator_peers_lost_total") - o.lost0 == 0);
    assert_int_equal(ph_summary(p)->duplicates, 0);
    ph_pipeline_free(p);
    assert_true(caught_up(o.prod, "outage"));
    assert_index_exact(out, SHARDS);
    assert_int_equal((int)json_object_size(g_good), 600 + 150);
    rd_kafka_destroy(o.prod);
    json_decref(g_good);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_units_release),
        cmocka_unit_test(test_cstate_forget_compact),
        cmocka_unit_test(test_offsets_async),
        cmocka_unit_test_teardown(test_stream_outage, test_teardown),
        cmocka_unit_test_teardown(test_stream_bounded, test_teardown),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
