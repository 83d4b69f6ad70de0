/* test_cstate.c — the coordinator state as the service loop uses it: a whole job, restart from
 * the journal, poison units and items, late acks, worker death, back-pressure, refused reports;
 * then a randomized model-based test: many random interleavings of grants, gate and reasoning
 * work, shard acks (delayed, duplicated, lost), heartbeats, expiries, worker crashes and
 * coordinator crash + replay, checked against a reference model: a unit completes only when
 * every item is in the index or dead-lettered, every item ends exactly once, the final counts
 * survive a restart. */
#define _GNU_SOURCE /* memmem */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "coordinator/cstate.h"
#include "tests/testutil.h"
#include "tests/unit/corpus.h"
#include "util/rng.h"

static const twn_plan_fp FP = {"corpus/a.jsonl", 4, "sha256:abc"};

/* Hook recorder. */
typedef struct rec {
    int dead, done;
    char last_reason[128];
    twn_stage last_stage;
    twn_unit_counts last_counts;
} rec;

static void on_dead(void *ctx, uint64_t unit, uint32_t item, twn_stage stage, const char *reason) {
    rec *r = ctx;
    (void)unit, (void)item;
    r->dead++;
    r->last_stage = stage;
    snprintf(r->last_reason, sizeof r->last_reason, "%s", reason);
}

static void on_done(void *ctx, uint64_t unit, const twn_unit_counts *c) {
    rec *r = ctx;
    (void)unit;
    r->done++;
    r->last_counts = *c;
}

static twn_cstate *open_cs(const char *path, const twn_cstate_cfg *cfg, rec *r,
                           twn_journal_info *info) {
    twn_cstate_cfg def;
    twn_cstate_cfg_default(&def);
    if (!cfg) cfg = &def;
    twn_cstate_hooks h = {r, on_dead, on_done};
    twn_cstate *c;
    twn_err err = {{0}};
    if (twn_cstate_open(path, &FP, cfg, &h, &c, info, &err) != 0) fail_msg("open: %s", err.msg);
    return c;
}

static void add(twn_cstate *c, const twn_unit_spec *u, size_t n) {
    twn_err err = {{0}};
    if (twn_cstate_add_units(c, u, n, &err) != 0) fail_msg("add_units: %s", err.msg);
}

static void ok(int rc, const twn_err *err) {
    if (rc < 0) fail_msg("%s", err->msg);
}

// ------------------------------------------------------------------------------------------------

static void test_unit_key(void **state) {
    (void)state;
    uint64_t a = twn_unit_key("s3://b/x.tar", 0, 1000);
    assert_true(a == twn_unit_key("s3://b/x.tar", 0, 1000));
    assert_true(a != twn_unit_key("s3://b/x.tar", 1000, 1000));
    assert_true(a != twn_unit_key("s3://b/x.ta", 0, 1000));
    char longname[2000];
    memset(longname, 'a', sizeof longname - 1);
    longname[sizeof longname - 1] = 0;
    assert_true(twn_unit_key(longname, 1, 2) != twn_unit_key(longname, 2, 1));
}

static void test_job_flow(void **state) {
    (void)state;
    const char *path = tc_tmp_path("cstate_flow", "journal");
    rec r = {0};
    twn_journal_info info;
    twn_cstate *c = open_cs(path, NULL, &r, &info);
    assert_int_equal(info.created, 1);
    twn_unit_spec u[3] = {{twn_unit_key("a", 0, 100), 4},
                          {twn_unit_key("a", 100, 100), 3},
                          {twn_unit_key("a", 200, 0), 0}};
    add(c, u, 3);
    twn_err err = {{0}};
    twn_unit_grant g;
    assert_int_equal(twn_cstate_grant_unit(c, 1, 0.0, &g, &err), 1);
    assert_true(g.unit == u[0].key);
    assert_int_equal(g.n_items, 4);
    assert_int_equal(g.n_pending, 4);
    assert_int_equal(g.attempt, 1);
    assert_true(g.deadline == 30.0);
    /* Gate pass: item 1 hard, item 3 bad, items 0 2 easy (acked by a shard). */
    uint32_t one = 1;
    ok(twn_cstate_report_hard(c, u[0].key, &one, 1, &err), &err);
    ok(twn_cstate_report_hard(c, u[0].key, &one, 1, &err), &err); /* repeat: ignored */
    ok(twn_cstate_dead_letter(c, u[0].key, 3, TWN_STAGE_READ, "invalid UTF-8", &err), &err);
    assert_int_equal(r.dead, 1);
    assert_string_equal(r.last_reason, "invalid UTF-8");
    assert_int_equal(twn_cstate_finish(c, g.lease, 1.0, &err), 1);
    const uint32_t easy[2] = {0, 2};
    ok(twn_cstate_ack(c, u[0].key, easy, NULL, 2, TWN_ROUTE_EASY, &err), &err);
    twn_cstate_stats s;
    twn_cstate_stats_get(c, &s);
    assert_int_equal(s.unit_leases_live, 0); /* gate part resolved: the unit lease closed */
    assert_int_equal(s.hard_queued, 1);
    assert_int_equal(twn_cstate_item_state(c, u[0].key, 1), TWN_ITEM_HARD_PENDING);
    /* Reasoning. */
    twn_hard_grant h;
    assert_int_equal(twn_cstate_grant_hard(c, 2, 0, 2.0, &h, &err), 1);
    assert_int_equal(h.n, 1);
    assert_true(h.items[0].unit == u[0].key);
    assert_int_equal(h.items[0].item, 1);
    assert_int_equal(h.items[0].attempt, 1);
    uint32_t think = 42;
    ok(twn_cstate_ack(c, u[0].key, &one, &think, 1, TWN_ROUTE_HARD, &err), &err);
    assert_int_equal(r.done, 1);
    assert_int_equal(r.last_counts.easy, 2);
    assert_int_equal(r.last_counts.hard, 1);
    assert_int_equal(r.last_counts.dead, 1);
    assert_int_equal(r.last_counts.think_tokens, 42);
    assert_int_equal(twn_cstate_item_state(c, u[0].key, 1), TWN_ITEM_COMPLETED);
    /* Durable only after the commit: the low-water mark waits for it. */
    assert_int_equal(twn_cstate_low_water(c), 0);
    ok(twn_cstate_tick(c, 2.0, &err), &err);
    assert_int_equal(twn_cstate_low_water(c), 1);
    /* Unit 1 through ack_range. */
    assert_int_equal(twn_cstate_grant_unit(c, 1, 3.0, &g, &err), 1);
    assert_true(g.unit == u[1].key);
    ok(twn_cstate_ack_range(c, u[1].key, 0, 3, TWN_ROUTE_EASY, &err), &err);
    assert_int_equal(twn_cstate_all_done(c), 1);
    assert_int_equal(twn_cstate_low_water(c), 1);
    ok(twn_cstate_sync(c, &err), &err);
    assert_int_equal(twn_cstate_low_water(c), 3);
    assert_int_equal(twn_cstate_grant_unit(c, 1, 4.0, &g, &err), 0);
    twn_cstate_stats_get(c, &s);
    assert_int_equal(s.progress.items_total, 7);
    assert_int_equal(s.progress.items_done, 7);
    assert_int_equal(s.progress.easy, 5);
    assert_int_equal(s.progress.hard, 1);
    assert_int_equal(s.progress.rejected, 1);
    assert_int_equal(s.progress.think_tokens, 42);
    assert_int_equal(s.progress.duplicates, 1);
    assert_int_equal(s.item_bytes, 0);
    assert_int_equal(twn_cstate_close(c, &err), 0);

    /* Reopen: everything done from the journal alone, JOB_FINISHED seen. */
    memset(&r, 0, sizeof r);
    c = open_cs(path, NULL, &r, &info);
    assert_int_equal(info.finished, 1);
    assert_int_equal(info.epoch, 2);
    add(c, u, 3);
    assert_int_equal(twn_cstate_all_done(c), 1);
    assert_int_equal(twn_cstate_low_water(c), 3);
    twn_cstate_stats_get(c, &s);
    assert_int_equal(s.progress.easy, 5);
    assert_int_equal(s.progress.rejected, 1);
    assert_int_equal(s.progress.think_tokens, 42);
    assert_int_equal(r.done + r.dead, 0); /* replay does not re-notify */
    assert_int_equal(twn_cstate_close(c, &err), 0);
}

static void test_restart_resumes(void **state) {
    (void)state;
    const char *path = tc_tmp_path("cstate_restart", "journal");
    rec r = {0};
    twn_cstate *c = open_cs(path, NULL, &r, NULL);
    twn_unit_spec u[2] = {{11, 5}, {22, 2}};
    add(c, u, 2);
    twn_err err = {{0}};
    twn_unit_grant g;
    assert_int_equal(twn_cstate_grant_unit(c, 1, 0.0, &g, &err), 1);
    const uint32_t hard[2] = {0, 1};
    ok(twn_cstate_report_hard(c, 11, hard, 2, &err), &err);
    ok(twn_cstate_dead_letter(c, 11, 2, TWN_STAGE_GATE, "image too large", &err), &err);
    uint32_t three = 3;
    ok(twn_cstate_ack(c, 11, &three, NULL, 1, TWN_ROUTE_EASY, &err), &err);
    ok(twn_cstate_ack_range(c, 22, 0, 2, TWN_ROUTE_EASY, &err), &err);
    ok(twn_cstate_sync(c, &err), &err);
    /* Buffered, never committed: lost in the crash. */
    ok(twn_cstate_dead_letter(c, 11, 4, TWN_STAGE_GATE, "lost", &err), &err);
    twn_cstate_abandon(c);

    twn_journal_info info;
    c = open_cs(path, NULL, &r, &info);
    assert_int_equal(info.epoch, 2);
    add(c, u, 2);
    twn_unit_counts k;
    int done;
    assert_int_equal(twn_cstate_unit_counts(c, 22, &k, &done), 0);
    assert_int_equal(done, 1);
    assert_int_equal(k.easy, 2);
    assert_int_equal(twn_cstate_unit_counts(c, 11, &k, &done), 0);
    assert_int_equal(done, 0);
    assert_int_equal(k.dead, 1);
    assert_int_equal(twn_cstate_item_state(c, 11, 0), TWN_ITEM_HARD_PENDING);
    assert_int_equal(twn_cstate_item_state(c, 11, 2), TWN_ITEM_DEAD);
    assert_int_equal(twn_cstate_item_state(c, 11, 3),
                     TWN_ITEM_PENDING); /* acks are not journaled */
    assert_int_equal(twn_cstate_item_state(c, 11, 4), TWN_ITEM_PENDING);
    assert_int_equal(twn_cstate_item_state(c, 11, 5), -1);
    assert_int_equal(twn_cstate_item_state(c, 99, 0), -1);
    /* Hard items go straight to reasoning; the unit goes back to a gate for items 3 and 4. */
    twn_hard_grant h;
    assert_int_equal(twn_cstate_grant_hard(c, 5, 10, 0.0, &h, &err), 1);
    assert_int_equal(h.n, 2);
    assert_int_equal(h.items[0].item, 0);
    assert_int_equal(h.items[1].item, 1);
    assert_int_equal(twn_cstate_grant_unit(c, 6, 0.0, &g, &err), 1);
    assert_true(g.unit == 11);
    assert_int_equal(g.n_pending, 2);
    /* A lease id from before the restart is late, not an error. */
    assert_int_equal(twn_cstate_finish(c, (g.lease & ~(0x7fffull << 49)) | (1ull << 49), 0, &err),
                     0);
    assert_int_equal(twn_cstate_low_water(c), 0);
    const uint32_t rest[2] = {3, 4};
    ok(twn_cstate_ack(c, 11, rest, NULL, 2, TWN_ROUTE_EASY, &err), &err);
    ok(twn_cstate_ack(c, 11, hard, NULL, 2, TWN_ROUTE_HARD, &err), &err);
    assert_int_equal(twn_cstate_all_done(c), 1);
    ok(twn_cstate_sync(c, &err), &err);
    assert_int_equal(twn_cstate_low_water(c), 2);
    assert_int_equal(twn_cstate_close(c, &err), 0);
}

static twn_cstate_cfg short_cfg(void) {
    twn_cstate_cfg cfg;
    twn_cstate_cfg_default(&cfg);
    cfg.unit_lease.lease_s = cfg.hard_lease.lease_s = 10;
    cfg.unit_lease.heartbeat_s = cfg.hard_lease.heartbeat_s = 2;
    cfg.unit_lease.ack_timeout_s = cfg.hard_lease.ack_timeout_s = 5;
    cfg.unit_lease.max_attempts = cfg.hard_lease.max_attempts = 2;
    return cfg;
}

static void test_poison_unit_and_item(void **state) {
    (void)state;
    const char *path = tc_tmp_path("cstate_poison", "journal");
    rec r = {0};
    twn_cstate_cfg cfg = short_cfg();
    twn_cstate *c = open_cs(path, &cfg, &r, NULL);
    twn_unit_spec u[2] = {{1, 3}, {2, 1}};
    add(c, u, 2);
    twn_err err = {{0}};
    twn_unit_grant g;
    double now = 0;
    /* Unit 1: item 0 acked, item 2 hard; the gate dies on item 1, twice. */
    assert_int_equal(twn_cstate_grant_unit(c, 1, now, &g, &err), 1);
    uint32_t zero = 0, two = 2;
    ok(twn_cstate_ack(c, 1, &zero, NULL, 1, TWN_ROUTE_EASY, &err), &err);
    ok(twn_cstate_report_hard(c, 1, &two, 1, &err), &err);
    now = 6; /* silent for 3 heartbeats of 2 s */
    ok(twn_cstate_tick(c, now, &err), &err);
    assert_int_equal(twn_cstate_grant_unit(c, 2, now, &g, &err), 1);
    assert_true(g.unit == 1);
    assert_int_equal(g.attempt, 2);
    assert_int_equal(g.n_pending, 1);
    now = 12;
    ok(twn_cstate_tick(c, now, &err), &err);
    assert_int_equal(r.dead, 1);
    assert_string_equal(r.last_reason, "lease expired 2 times");
    assert_int_equal(r.last_stage, TWN_STAGE_GATE);
    assert_int_equal(twn_cstate_item_state(c, 1, 1), TWN_ITEM_DEAD);
    /* The hard item is poison for reasoning workers too. */
    twn_hard_grant h;
    for (uint32_t a = 1; a <= 2; a++) {
        assert_int_equal(twn_cstate_grant_hard(c, 10 + a, 0, now, &h, &err), 1);
        assert_int_equal(h.items[0].attempt, a);
        twn_cstate_worker_dead(c, 10 + a);
    }
    assert_int_equal(r.dead, 2);
    assert_string_equal(r.last_reason, "lease expired 2 times");
    assert_int_equal(r.last_stage, TWN_STAGE_REASON);
    assert_int_equal(r.done, 1);
    assert_int_equal(r.last_counts.easy, 1);
    assert_int_equal(r.last_counts.dead, 2);
    /* Unit 2 is next. */
    assert_int_equal(twn_cstate_grant_unit(c, 3, now, &g, &err), 1);
    assert_true(g.unit == 2);
    twn_cstate_stats s;
    twn_cstate_stats_get(c, &s);
    assert_int_equal(s.unit_leases.poisoned, 1);
    assert_int_equal(s.hard_leases.poisoned, 1);
    assert_int_equal(s.hard_leases.worker_deaths, 2);
    assert_int_equal(twn_cstate_close(c, &err), 0);
    /* The dead letters are in the journal. */
    size_t n;
    char *j = tu_read(path, &n);
    assert_non_null(memmem(j, n, "lease expired 2 times", 21));
    free(j);
}

/* A holder that gives its lease up (Finished.abandoned) hands the work back at once, with no
 * tick and no clock: the unit, then the hard batch, is leased again with the next attempt, and
 * the last release dead-letters what is left, item by item, exactly once. */
static void test_released_leases(void **state) {
    (void)state;
    rec r = {0};
    twn_cstate_cfg cfg = short_cfg();
    twn_cstate *c = open_cs(tc_tmp_path("cstate_release", "journal"), &cfg, &r, NULL);
    twn_unit_spec u[2] = {{1, 4}, {2, 2}};
    add(c, u, 2);
    twn_err err = {{0}};
    twn_unit_grant g;
    twn_hard_grant h;
    double now = 0;
    uint32_t zero = 0, hard[2] = {1, 2};
    /* Unit 1: the gate acks item 0 and routes 1, 2 hard, then gives up (item 3 left). */
    assert_int_equal(twn_cstate_grant_unit(c, 1, now, &g, &err), 1);
    ok(twn_cstate_ack(c, 1, &zero, NULL, 1, TWN_ROUTE_EASY, &err), &err);
    ok(twn_cstate_report_hard(c, 1, hard, 2, &err), &err);
    twn_lease_id first = g.lease;
    assert_int_equal(twn_cstate_finish(c, first, now, &err), 1); /* Finished, then... */
    assert_int_equal(twn_cstate_release(c, first, &err), 1);     /* ...abandoned after all */
    assert_int_equal(twn_cstate_release(c, first, &err), 0);     /* a repeat is late */
    assert_int_equal(twn_cstate_grant_unit(c, 1, now, &g, &err), 1);
    assert_true(g.unit == 1);
    assert_int_equal(g.attempt, 2);
    assert_int_equal(g.n_pending, 1);
    assert_int_equal(twn_cstate_release(c, g.lease, &err), 1); /* the last attempt */
    assert_int_equal(r.dead, 1);
    assert_string_equal(r.last_reason, "lease expired 2 times");
    assert_int_equal(r.last_stage, TWN_STAGE_GATE);
    assert_int_equal(twn_cstate_item_state(c, 1, 3), TWN_ITEM_DEAD);
    /* The hard batch: released twice, its two items are dead-lettered at stage reason. */
    for (uint32_t a = 1; a <= 2; a++) {
        assert_int_equal(twn_cstate_grant_hard(c, 7, 0, now, &h, &err), 1);
        assert_int_equal(h.n, 2);
        assert_int_equal(h.items[0].attempt, a);
        assert_int_equal(twn_cstate_release(c, h.lease, &err), 1);
    }
    assert_int_equal(r.dead, 3);
    assert_int_equal(r.last_stage, TWN_STAGE_REASON);
    assert_int_equal(r.done, 1);
    assert_int_equal(r.last_counts.easy, 1);
    assert_int_equal(r.last_counts.dead, 3);
    /* Unit 2 is next; nothing else is queued or live. */
    twn_cstate_stats s;
    twn_cstate_stats_get(c, &s);
    assert_int_equal(s.units_queued, 1);
    assert_int_equal(s.hard_queued, 0);
    assert_int_equal(s.unit_leases_live + s.hard_leases_live, 0);
    assert_int_equal(s.unit_leases.released, 2);
    assert_int_equal(s.hard_leases.released, 2);
    assert_int_equal(s.progress.rejected, 3);
    assert_int_equal(twn_cstate_grant_unit(c, 1, now, &g, &err), 1);
    assert_true(g.unit == 2);
    ok(twn_cstate_ack_range(c, 2, 0, 2, TWN_ROUTE_EASY, &err), &err);
    assert_true(twn_cstate_all_done(c));
    assert_int_equal(twn_cstate_close(c, &err), 0);
}

/* Principle 2 under principle 3: the previous holder's late acks are accepted and count once. */
static void test_late_acks(void **state) {
    (void)state;
    const char *path = tc_tmp_path("cstate_late", "journal");
    rec r = {0};
    twn_cstate_cfg cfg = short_cfg();
    twn_cstate *c = open_cs(path, &cfg, &r, NULL);
    twn_unit_spec u[1] = {{7, 4}};
    add(c, u, 1);
    twn_err err = {{0}};
    twn_unit_grant g1, g2;
    assert_int_equal(twn_cstate_grant_unit(c, 1, 0, &g1, &err), 1);
    ok(twn_cstate_tick(c, 10, &err), &err); /* worker 1 was slow: its lease expired */
    assert_int_equal(twn_cstate_grant_unit(c, 2, 10, &g2, &err), 1);
    assert_int_equal(g2.attempt, 2);
    /* Worker 1 finishes after all: its acks land first and complete the unit. */
    ok(twn_cstate_ack_range(c, 7, 0, 4, TWN_ROUTE_EASY, &err), &err);
    assert_int_equal(twn_cstate_finish(c, g1.lease, 11, &err), 0);
    assert_int_equal(r.done, 1);
    /* Worker 2's duplicates change nothing; its lease was settled by the acks. */
    ok(twn_cstate_ack_range(c, 7, 0, 4, TWN_ROUTE_EASY, &err), &err);
    assert_int_equal(twn_cstate_finish(c, g2.lease, 12, &err), 0);
    twn_cstate_stats s;
    twn_cstate_stats_get(c, &s);
    assert_int_equal(s.progress.easy, 4);
    assert_int_equal(s.progress.items_done, 4);
    assert_int_equal(s.progress.duplicates, 4);
    assert_int_equal(s.unit_leases.late, 2);
    assert_int_equal(s.unit_leases_live, 0);
    assert_int_equal(r.done, 1);
    assert_int_equal(twn_cstate_close(c, &err), 0);
}

static void test_worker_dead_and_backpressure(void **state) {
    (void)state;
    const char *path = tc_tmp_path("cstate_dead", "journal");
    rec r = {0};
    twn_cstate_cfg cfg = short_cfg();
    cfg.max_hard_queued = 2;
    twn_cstate *c = open_cs(path, &cfg, &r, NULL);
    twn_unit_spec u[3] = {{1, 4}, {2, 4}, {3, 4}};
    add(c, u, 3);
    twn_err err = {{0}};
    twn_unit_grant g;
    assert_int_equal(twn_cstate_grant_unit(c, 1, 0, &g, &err), 1);
    const uint32_t hard[3] = {0, 1, 2};
    ok(twn_cstate_report_hard(c, 1, hard, 3, &err), &err);
    /* Three hard items wait, more than max_hard_queued: no new unit for anyone. */
    assert_int_equal(twn_cstate_grant_unit(c, 2, 0, &g, &err), 0);
    twn_hard_grant h;
    assert_int_equal(twn_cstate_grant_hard(c, 1, 2, 0, &h, &err), 1);
    assert_int_equal(twn_cstate_grant_unit(c, 1, 0, &g, &err), 1);
    assert_true(g.unit == 2);
    twn_cstate_stats s;
    twn_cstate_stats_get(c, &s);
    assert_int_equal(s.unit_leases_live, 2);
    assert_int_equal(s.hard_leases_live, 1);
    /* Worker 1 dies: its unit leases and its hard batch all go back at once. */
    twn_cstate_worker_dead(c, 1);
    twn_cstate_stats_get(c, &s);
    assert_int_equal(s.unit_leases_live, 0);
    assert_int_equal(s.hard_leases_live, 0);
    assert_int_equal(s.units_queued, 3);
    assert_int_equal(s.hard_queued, 3);
    assert_int_equal(twn_cstate_grant_hard(c, 3, 10, 1, &h, &err), 1);
    assert_int_equal(h.n, 3);
    assert_int_equal(h.items[0].attempt, 2);
    assert_int_equal(h.items[2].attempt, 1);
    assert_int_equal(twn_cstate_grant_unit(c, 3, 1, &g, &err), 1);
    assert_true(g.unit == 1); /* retried first */
    assert_int_equal(g.attempt, 2);
    assert_int_equal(twn_cstate_close(c, &err), 0);
}

static void test_refused(void **state) {
    (void)state;
    const char *path = tc_tmp_path("cstate_refused", "journal");
    rec r = {0};
    twn_cstate *c = open_cs(path, NULL, &r, NULL);
    twn_unit_spec u[1] = {{0xabc, 4}};
    add(c, u, 1);
    twn_err err = {{0}};
    uint32_t nine = 9;
    assert_int_equal(twn_cstate_ack(c, 0xdef, &nine, NULL, 1, TWN_ROUTE_EASY, &err), -1);
    assert_string_equal(err.msg, "unknown unit 0000000000000def: not in the plan (1 units)");
    assert_int_equal(twn_cstate_ack(c, 0xabc, &nine, NULL, 1, TWN_ROUTE_EASY, &err), -1);
    assert_string_equal(err.msg,
                        "ack for unit 0000000000000abc item 9: the unit has 4 items (0..3)");
    assert_int_equal(twn_cstate_report_hard(c, 0xabc, &nine, 1, &err), -1);
    assert_int_equal(twn_cstate_dead_letter(c, 0xabc, 0, (twn_stage)9, "x", &err), -1);
    assert_string_equal(err.msg,
                        "dead letter for unit 0000000000000abc item 0: stage 9, expected 1..4");
    assert_int_equal(twn_cstate_finish(c, 0x00ff000000003039ull, 0, &err), -1);
    assert_string_equal(err.msg, "hard batch lease 00ff000000003039: never granted");
    assert_int_equal(twn_cstate_add_units(c, u, 1, &err), -1);
    assert_string_equal(err.msg, "adding unit 0 of 1: unit 0000000000000abc: duplicate key (unit 0 "
                                 "has the same source range)");
    twn_cstate_stats s;
    twn_cstate_stats_get(c, &s);
    assert_int_equal(s.progress.bad_reports, 3);
    assert_int_equal(s.progress.items_done, 0);
    ok(twn_cstate_ack_range(c, 0xabc, 0, 4, TWN_ROUTE_EASY, &err), &err);
    assert_int_equal(twn_cstate_close(c, &err), 0);
    /* The same journal with a plan whose unit has another size. */
    c = open_cs(path, NULL, &r, NULL);
    twn_unit_spec v[1] = {{0xabc, 5}};
    assert_int_equal(twn_cstate_add_units(c, v, 1, &err), -1);
    char want[1200];
    snprintf(want, sizeof want,
             "%s: UNIT_DONE for unit 0000000000000abc says 4 items, the plan has 5", path);
    assert_string_equal(err.msg, want);
    twn_cstate_abandon(c);
    /* And with another plan fingerprint. */
    twn_cstate_cfg cfg;
    twn_cstate_cfg_default(&cfg);
    twn_plan_fp other = {"corpus/a.jsonl", 8, "sha256:abc"};
    assert_int_equal(twn_cstate_open(path, &other, &cfg, NULL, &c, NULL, &err), -1);
    snprintf(want, sizeof want,
             "%s: journal was written for a different plan (unit size: journal has 4, this run "
             "has 8); restart with the original plan or use a new journal",
             path);
    assert_string_equal(err.msg, want);
    cfg.unit_lease.max_attempts = 0;
    assert_int_equal(twn_cstate_open(path, &FP, &cfg, NULL, &c, NULL, &err), -1);
    assert_string_equal(err.msg, "unit_lease: lease config: max_attempts = 0, expected 1..1000");
}

/* A journal that cannot be written stops the coordinator: the failing call and every later one
 * return the journal's error (nothing may be reported durable that is not). */
static void test_journal_failure_stops(void **state) {
    (void)state;
    const char *path = tc_tmp_path("cstate_journal_failure", "journal");
    rec r = {0};
    twn_cstate *c = open_cs(path, NULL, &r, NULL);
    twn_unit_spec u[2] = {{1, 1}, {2, 1}};
    add(c, u, 2);
    twn_err err = {{0}};
    uint32_t zero = 0;
    ok(twn_cstate_ack(c, 1, &zero, NULL, 1, TWN_ROUTE_EASY, &err), &err);
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    struct rlimit old = tc_fsize_limit((rlim_t)st.st_size + 10);
    int rc = twn_cstate_tick(c, 1.0, &err);
    tc_fsize_limit_end(old);
    char want[1200];
    snprintf(want, sizeof want, "cannot write journal %s: File too large", path);
    assert_int_equal(rc, -1);
    assert_string_equal(err.msg, want);
    assert_int_equal(twn_cstate_low_water(c), 0);
    twn_unit_grant g;
    memset(&err, 0, sizeof err);
    assert_int_equal(twn_cstate_grant_unit(c, 1, 2.0, &g, &err), -1);
    assert_string_equal(err.msg, want);
    assert_int_equal(twn_cstate_ack(c, 2, &zero, NULL, 1, TWN_ROUTE_EASY, &err), -1);
    assert_int_equal(twn_cstate_close(c, &err), -1);
    assert_string_equal(err.msg, want);
}

// ------------------------------------------------------------------------------------------------
// Randomized model-based test

#define MAXU  6
#define MAXI  16
#define NGATE 3
#define NRSN  2
#define QCAP  4096

enum { N_EASY, N_HARD, N_BAD, N_POISON_GATE, N_POISON_REASON };

typedef struct pend {
    int u, i, route;
} pend;

typedef struct gate {
    uint32_t id;
    int busy, u, next;
    twn_lease_id lease;
} gate;

typedef struct rsn {
    uint32_t id;
    int busy, n, next;
    twn_lease_id lease;
    int u[16], i[16];
} rsn;

typedef struct sim {
    twn_rng rng;
    const char *path;
    twn_cstate_cfg cfg;
    twn_cstate *c;
    int nu;
    twn_unit_spec spec[MAXU];
    int nat[MAXU][MAXI];
    /* the model */
    int indexed[MAXU][MAXI]; /* durably in some shard (the index is idempotent: a set) */
    int dead_seen[MAXU][MAXI];
    int done_seen[MAXU];
    /* the world */
    double now;
    gate g[NGATE];
    rsn r[NRSN];
    uint32_t next_id;
    pend q[2][QCAP];
    int qn[2];
    int crashes, torn, worker_deaths, shard_losses;
} sim;

static int unit_of(const sim *s, uint64_t key) {
    for (int u = 0; u < s->nu; u++)
        if (s->spec[u].key == key) return u;
    fail_msg("unknown unit %llx", (unsigned long long)key);
    return -1;
}

static void m_dead(void *ctx, uint64_t unit, uint32_t item, twn_stage stage, const char *reason) {
    sim *s = ctx;
    (void)stage, (void)reason;
    int u = unit_of(s, unit);
    assert_true(item < s->spec[u].n_items);
    s->dead_seen[u][item] = 1;
}

/* Safety: a unit completes only when every item is in the index or dead-lettered. */
static void m_done(void *ctx, uint64_t unit, const twn_unit_counts *c) {
    sim *s = ctx;
    int u = unit_of(s, unit);
    assert_int_equal(c->n_items, s->spec[u].n_items);
    assert_int_equal(c->easy + c->hard + c->dead, c->n_items);
    for (uint32_t i = 0; i < s->spec[u].n_items; i++)
        if (!s->indexed[u][i] && !s->dead_seen[u][i])
            fail_msg("unit %d done but item %u neither indexed nor dead-lettered", u, i);
    s->done_seen[u]++;
}

static int chance(sim *s, double p) {
    return twn_rng_uniform(&s->rng) < p;
}
static int pick(sim *s, int n) {
    return (int)(twn_rng_u64(&s->rng) % (uint64_t)n);
}

static void coord_open(sim *s) {
    twn_cstate_hooks h = {s, m_dead, m_done};
    twn_err err = {{0}};
    twn_journal_info info;
    if (twn_cstate_open(s->path, &FP, &s->cfg, &h, &s->c, &info, &err) != 0)
        fail_msg("open: %s", err.msg);
    if (twn_cstate_add_units(s->c, s->spec, (size_t)s->nu, &err) != 0) fail_msg("add: %s", err.msg);
}

static void to_shard(sim *s, int u, int i, int route) {
    int sh = (u * 31 + i) % 2;
    if (s->qn[sh] < QCAP) s->q[sh][s->qn[sh]++] = (pend){u, i, route};
}

static void gate_step(sim *s, gate *g) {
    twn_err err = {{0}};
    if (!g->busy) {
        if (!chance(s, 0.5)) return;
        twn_unit_grant gr;
        int rc = twn_cstate_grant_unit(s->c, g->id, s->now, &gr, &err);
        ok(rc, &err);
        if (rc == 1) *g = (gate){g->id, 1, unit_of(s, gr.unit), 0, gr.lease};
        return;
    }
    for (int k = 1 + pick(s, 3); k > 0 && g->next < (int)s->spec[g->u].n_items; k--) {
        int u = g->u, i = g->next++;
        uint32_t item = (uint32_t)i;
        uint64_t key = s->spec[u].key;
        switch (s->nat[u][i]) {
        case N_EASY:
            to_shard(s, u, i, TWN_ROUTE_EASY);
            break;
        case N_HARD:
        case N_POISON_REASON:
            ok(twn_cstate_report_hard(s->c, key, &item, 1, &err), &err);
            break;
        case N_BAD:
            ok(twn_cstate_dead_letter(s->c, key, item, TWN_STAGE_READ, "bad", &err), &err);
            break;
        case N_POISON_GATE:
            /* The gate crashes; the transport notices, or it just goes silent. */
            if (chance(s, 0.5)) twn_cstate_worker_dead(s->c, g->id);
            *g = (gate){s->next_id++, 0, 0, 0, 0};
            s->worker_deaths++;
            return;
        }
    }
    if (g->next == (int)s->spec[g->u].n_items) {
        ok(twn_cstate_finish(s->c, g->lease, s->now, &err), &err);
        g->busy = 0;
    }
}

static void rsn_step(sim *s, rsn *r) {
    twn_err err = {{0}};
    if (!r->busy) {
        if (!chance(s, 0.5)) return;
        twn_hard_grant h;
        int rc = twn_cstate_grant_hard(s->c, r->id, 1 + (size_t)pick(s, 4), s->now, &h, &err);
        ok(rc, &err);
        if (rc != 1) return;
        r->busy = 1;
        r->n = (int)h.n;
        r->next = 0;
        r->lease = h.lease;
        for (size_t k = 0; k < h.n; k++) {
            r->u[k] = unit_of(s, h.items[k].unit);
            r->i[k] = (int)h.items[k].item;
        }
        return;
    }
    int u = r->u[r->next], i = r->i[r->next];
    if (s->nat[u][i] == N_POISON_REASON) {
        if (chance(s, 0.5)) twn_cstate_worker_dead(s->c, r->id);
        *r = (rsn){.id = s->next_id++};
        s->worker_deaths++;
        return;
    }
    assert_int_equal(s->nat[u][i], N_HARD); /* only hard items reach reasoning */
    to_shard(s, u, i, TWN_ROUTE_HARD);
    if (++r->next == r->n) {
        ok(twn_cstate_finish(s->c, r->lease, s->now, &err), &err);
        r->busy = 0;
    }
}

/* A shard fsyncs a few queued embeddings (they are now in the index) and acks them, sometimes
 * twice; or it crashes and loses what it had not fsynced. */
static void shard_step(sim *s, int sh, int chaos) {
    twn_err err = {{0}};
    if (chaos && chance(s, 0.01)) {
        s->qn[sh] = 0;
        s->shard_losses++;
        return;
    }
    int k = s->qn[sh] ? 1 + pick(s, s->qn[sh] < 6 ? s->qn[sh] : 6) : 0;
    for (int j = 0; j < k; j++) {
        pend p = s->q[sh][j];
        s->indexed[p.u][p.i] = 1;
        uint32_t item = (uint32_t)p.i, think = 1;
        int times = chance(s, 0.1) ? 2 : 1;
        while (times--)
            ok(twn_cstate_ack(s->c, s->spec[p.u].key, &item, &think, 1, (twn_route)p.route, &err),
               &err);
    }
    memmove(s->q[sh], s->q[sh] + k, (size_t)(s->qn[sh] - k) * sizeof(pend));
    s->qn[sh] -= k;
}

static void coord_crash(sim *s) {
    twn_cstate_abandon(s->c);
    s->crashes++;
    if (chance(s, 0.5)) { /* a torn write: garbage after the last record */
        FILE *f = fopen(s->path, "ab");
        assert_non_null(f);
        int n = 1 + pick(s, 30);
        for (int k = 0; k < n; k++) fputc(pick(s, 256), f);
        fclose(f);
        s->torn++;
    }
    coord_open(s);
}

/* After every step: the coordinator's view of each item agrees with what happened to it, and the
 * counters agree with the item states. */
static void check_invariants(sim *s) {
    twn_cstate_stats st;
    twn_cstate_stats_get(s->c, &st);
    const twn_progress *p = &st.progress;
    assert_int_equal(p->items_done, p->easy + p->hard + p->rejected);
    assert_int_equal(p->think_tokens, p->hard); /* every hard ack carries 1 think token */
    assert_true(p->items_done <= p->items_total);
    uint64_t hard_pending = 0;
    for (int u = 0; u < s->nu; u++) {
        twn_unit_counts k;
        int done;
        uint64_t key = s->spec[u].key;
        assert_int_equal(twn_cstate_unit_counts(s->c, key, &k, &done), 0);
        uint32_t n = s->spec[u].n_items, idx_easy = 0, idx_hard = 0, must_die = 0;
        uint32_t easy = 0, hard = 0, dead = 0;
        for (uint32_t i = 0; i < n; i++) {
            int nat = s->nat[u][i];
            must_die += nat == N_BAD || nat == N_POISON_GATE || nat == N_POISON_REASON;
            idx_easy += s->indexed[u][i] && nat == N_EASY;
            idx_hard += s->indexed[u][i] && nat == N_HARD;
            if (done) continue;
            switch (twn_cstate_item_state(s->c, key, i)) {
            case TWN_ITEM_EASY:
                assert_true(nat == N_EASY && s->indexed[u][i]);
                easy++;
                break;
            case TWN_ITEM_HARD:
                assert_true(nat == N_HARD && s->indexed[u][i]);
                hard++;
                break;
            case TWN_ITEM_DEAD:
                assert_true(s->dead_seen[u][i]);
                dead++;
                break;
            case TWN_ITEM_HARD_PENDING:
                assert_true(nat == N_HARD || nat == N_POISON_REASON);
                hard_pending++;
                break;
            case TWN_ITEM_PENDING:
                break;
            default:
                fail_msg("unit %d item %u: bad state", u, i);
            }
        }
        if (done) {
            assert_int_equal(k.easy + k.hard + k.dead, n);
            assert_true(k.dead >= must_die && k.easy <= idx_easy && k.hard <= idx_hard);
        } else {
            assert_int_equal(k.easy, easy);
            assert_int_equal(k.hard, hard);
            assert_int_equal(k.dead, dead);
        }
    }
    assert_int_equal(p->hard_pending, hard_pending);
}

static void step(sim *s, int chaos) {
    twn_err err = {{0}};
    s->now += twn_rng_uniform(&s->rng) * 1.5;
    for (int k = 0; k < NGATE; k++) {
        if (!chaos || chance(s, 0.8)) twn_cstate_heartbeat(s->c, s->g[k].id, s->now);
        gate_step(s, &s->g[k]);
    }
    for (int k = 0; k < NRSN; k++) {
        if (!chaos || chance(s, 0.8)) twn_cstate_heartbeat(s->c, s->r[k].id, s->now);
        rsn_step(s, &s->r[k]);
    }
    shard_step(s, pick(s, 2), chaos);
    ok(twn_cstate_tick(s->c, s->now, &err), &err);
    if (chaos && chance(s, 0.02)) coord_crash(s);
    check_invariants(s);
}

static void run_seed(uint64_t seed, int *totals) {
    sim *s = calloc(1, sizeof *s);
    twn_rng_seed(&s->rng, seed);
    char tag[64];
    snprintf(tag, sizeof tag, "cstate_model_%llu", (unsigned long long)seed % 4);
    s->path = tc_tmp_path(tag, "journal");
    twn_cstate_cfg_default(&s->cfg);
    twn_lease_cfg *lc[2] = {&s->cfg.unit_lease, &s->cfg.hard_lease};
    for (int k = 0; k < 2; k++) {
        lc[k]->lease_s = 8;
        lc[k]->heartbeat_s = 1;
        lc[k]->missed_heartbeats = 3;
        lc[k]->ack_timeout_s = 6;
        lc[k]->max_attempts = 3;
    }
    s->cfg.journal.fsync = 0; /* crashes are simulated by abandon, not by the kernel */
    s->cfg.journal.group_commit_s = 0.5;
    s->cfg.hard_batch = 4;
    s->nu = 1 + pick(s, MAXU);
    for (int u = 0; u < s->nu; u++) {
        s->spec[u].key = twn_unit_key("model.jsonl", (uint64_t)u * 1000, 1000);
        s->spec[u].n_items = (uint32_t)pick(s, MAXI + 1);
        for (uint32_t i = 0; i < s->spec[u].n_items; i++) {
            int x = pick(s, 100);
            s->nat[u][i] = x < 55   ? N_EASY
                           : x < 80 ? N_HARD
                           : x < 90 ? N_BAD
                           : x < 95 ? N_POISON_GATE
                                    : N_POISON_REASON;
        }
    }
    s->next_id = 1;
    for (int k = 0; k < NGATE; k++) s->g[k].id = s->next_id++;
    for (int k = 0; k < NRSN; k++) s->r[k].id = s->next_id++;
    coord_open(s);
    /* Chaos for a random while (the job often outlives it), then calm until done. */
    for (int t = pick(s, 300); t > 0; t--) step(s, 1);
    int calm = 0;
    while (!twn_cstate_all_done(s->c)) {
        step(s, 0);
        if (++calm > 20000) fail_msg("seed %llu: no progress", (unsigned long long)seed);
    }
    twn_err err = {{0}};
    ok(twn_cstate_sync(s->c, &err), &err);
    assert_int_equal(twn_cstate_low_water(s->c), s->nu);

    /* Every item ended exactly once, consistently with what happened to it. */
    twn_cstate_stats st;
    twn_cstate_stats_get(s->c, &st);
    uint64_t total = 0;
    for (int u = 0; u < s->nu; u++) {
        twn_unit_counts k;
        int done;
        assert_int_equal(twn_cstate_unit_counts(s->c, s->spec[u].key, &k, &done), 0);
        assert_int_equal(done, 1);
        assert_int_equal(k.easy + k.hard + k.dead, s->spec[u].n_items);
        uint32_t must_die = 0, idx_easy = 0, idx_hard = 0;
        for (uint32_t i = 0; i < s->spec[u].n_items; i++) {
            int n = s->nat[u][i];
            if (n == N_BAD || n == N_POISON_GATE || n == N_POISON_REASON) {
                must_die++;
                assert_false(s->indexed[u][i]);
            }
            idx_easy += s->indexed[u][i] && n == N_EASY;
            idx_hard += s->indexed[u][i] && n == N_HARD;
        }
        assert_true(k.dead >= must_die);
        assert_true(k.easy <= idx_easy);
        assert_true(k.hard <= idx_hard);
        if (s->spec[u].n_items) assert_true(s->done_seen[u] >= 1);
        total += s->spec[u].n_items;
    }
    assert_int_equal(st.progress.items_total, total);
    assert_int_equal(st.progress.items_done, total);
    assert_int_equal(st.progress.easy + st.progress.hard + st.progress.rejected, total);
    assert_int_equal(st.progress.think_tokens, st.progress.hard); /* each hard item once */
    assert_int_equal(st.progress.hard_pending, 0);
    assert_int_equal(st.item_bytes, 0);

    /* The final counts come back from the journal alone. */
    ok(twn_cstate_close(s->c, &err), &err);
    coord_open(s);
    twn_cstate_stats st2;
    twn_cstate_stats_get(s->c, &st2);
    assert_int_equal(twn_cstate_all_done(s->c), 1);
    assert_int_equal(st2.progress.easy, st.progress.easy);
    assert_int_equal(st2.progress.hard, st.progress.hard);
    assert_int_equal(st2.progress.rejected, st.progress.rejected);
    assert_int_equal(st2.progress.think_tokens, st.progress.think_tokens);
    twn_cstate_abandon(s->c);
    totals[0] += s->crashes;
    totals[1] += s->torn;
    totals[2] += s->worker_deaths;
    totals[3] += s->shard_losses;
    totals[4] += (int)total;
    totals[5] += (int)st.progress.rejected;
    free(s);
}

static void test_model_random(void **state) {
    (void)state;
    int totals[6] = {0};
    const int seeds = 300;
    for (uint64_t seed = 1; seed <= (uint64_t)seeds; seed++) run_seed(seed, totals);
    printf("model test: %d seeds, %d items, %d rejected, %d coordinator crashes (%d torn), "
           "%d worker deaths, %d shard losses\n",
           seeds, totals[4], totals[5], totals[0], totals[1], totals[2], totals[3]);
    /* The interleavings really exercised the failure paths. */
    assert_true(totals[0] > 100);
    assert_true(totals[1] > 50);
    assert_true(totals[2] > 100);
    assert_true(totals[3] > 50);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_released_leases),
        cmocka_unit_test(test_unit_key),
        cmocka_unit_test(test_job_flow),
        cmocka_unit_test(test_restart_resumes),
        cmocka_unit_test(test_poison_unit_and_item),
        cmocka_unit_test(test_late_acks),
        cmocka_unit_test(test_worker_dead_and_backpressure),
        cmocka_unit_test(test_refused),
        cmocka_unit_test(test_journal_failure_stops),
        cmocka_unit_test(test_model_random),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
