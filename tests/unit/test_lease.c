/* test_lease.c — lease pools against a tiny fake caller: grants, renewals, expiry and re-lease
 * order, attempts -> poison, worker death (reported and by silence), finish + ack timeout, late
 * settlements, lease ids across pools and restarts, release of an abandoned lease. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/lease.h"
#include "tests/testutil.h"

#define NREF 64

/* The caller's side: which refs still need work, which lease slot holds each. */
typedef struct fake {
    int open[NREF];
    uint32_t bound[NREF]; /* slot + 1 */
    uint64_t poisoned[NREF];
    uint32_t poison_attempts[NREF];
    int n_poisoned;
} fake;

static int f_bind(void *ctx, uint64_t ref, uint32_t slot) {
    fake *f = ctx;
    if (!f->open[ref]) return 0;
    assert_int_equal(f->bound[ref], 0); /* never held twice */
    f->bound[ref] = slot + 1;
    return 1;
}

static int f_unbind(void *ctx, uint64_t ref, uint32_t slot) {
    fake *f = ctx;
    if (f->bound[ref] == slot + 1) f->bound[ref] = 0;
    return f->open[ref];
}

static void f_poison(void *ctx, uint64_t ref, uint32_t attempts) {
    fake *f = ctx;
    f->poisoned[f->n_poisoned++] = ref;
    f->poison_attempts[ref] = attempts;
    f->open[ref] = 0;
}

/* The ref finished: settle the lease that holds it, as the coordinator does on an ack. */
static int finish_ref(twn_leases *l, fake *f, uint64_t ref) {
    f->open[ref] = 0;
    uint32_t b = f->bound[ref];
    f->bound[ref] = 0;
    return b ? twn_leases_settle(l, b - 1) : 0;
}

static twn_leases *pool(fake *f, const twn_lease_cfg *cfg, int nref) {
    memset(f, 0, sizeof *f);
    twn_lease_hooks h = {f, f_bind, f_unbind, f_poison};
    twn_lease_cfg def;
    twn_lease_cfg_default(&def);
    twn_leases *l = twn_leases_new("unit", cfg ? cfg : &def, &h, 1);
    for (int i = 0; i < nref; i++) {
        f->open[i] = 1;
        twn_leases_enqueue(l, (uint64_t)i, 0);
    }
    return l;
}

static twn_lease_grant grant(twn_leases *l, uint32_t worker, size_t max, double now) {
    twn_lease_grant g;
    twn_err err = {{0}};
    int r = twn_leases_grant(l, worker, max, now, &g, &err);
    if (r != 1) fail_msg("grant returned %d: %s", r, err.msg);
    return g;
}

// ------------------------------------------------------------------------------------------------

static void test_defaults_and_check(void **state) {
    (void)state;
    twn_lease_cfg c;
    twn_lease_cfg_default(&c);
    assert_true(c.lease_s == 30 && c.heartbeat_s == 5 && c.ack_timeout_s == 60);
    assert_int_equal(c.missed_heartbeats, 3);
    assert_int_equal(c.max_attempts, 3);
    twn_err err = {{0}};
    assert_int_equal(twn_lease_cfg_check(&c, &err), 0);
    c.heartbeat_s = 30;
    assert_int_equal(twn_lease_cfg_check(&c, &err), -1);
    assert_string_equal(err.msg, "lease config: heartbeat_s = 30 is not shorter than lease_s = 30; "
                                 "leases would expire between heartbeats");
    twn_lease_cfg_default(&c);
    c.max_attempts = 0;
    assert_int_equal(twn_lease_cfg_check(&c, &err), -1);
    assert_string_equal(err.msg, "lease config: max_attempts = 0, expected 1..1000");
    twn_lease_cfg_default(&c);
    c.lease_s = NAN;
    assert_int_equal(twn_lease_cfg_check(&c, &err), -1);
    assert_string_equal(err.msg,
                        "lease config: lease_s = nan, expected a positive number of seconds");
}

static void test_grant_settle_close(void **state) {
    (void)state;
    fake f;
    twn_leases *l = pool(&f, NULL, 5);
    twn_lease_grant g = grant(l, 3, 2, 100.0);
    assert_int_equal(g.n, 2);
    assert_int_equal(g.refs[0], 0);
    assert_int_equal(g.refs[1], 1);
    assert_int_equal(g.attempts[0], 1);
    assert_true(g.deadline == 130.0);
    assert_int_equal(g.id >> 48, 1);
    assert_int_equal(twn_leases_queued(l), 3);
    assert_int_equal(twn_leases_live(l), 1);
    assert_int_equal(twn_leases_held(l, 3), 1);
    assert_int_equal(twn_leases_worker_of(l, g.slot), 3);
    assert_int_equal(finish_ref(l, &f, 1), 0);
    assert_int_equal(finish_ref(l, &f, 0), 1); /* last ref: the lease closes */
    assert_int_equal(twn_leases_live(l), 0);
    uint32_t slot;
    assert_int_equal(twn_leases_resolve(l, g.id, &slot, NULL), 0); /* ended */
    /* A ref that finished while queued is dropped at grant, not handed out. */
    f.open[2] = 0;
    g = grant(l, 3, 10, 101.0);
    assert_int_equal(g.n, 2);
    assert_int_equal(g.refs[0], 3);
    assert_int_equal(twn_leases_stats(l)->dropped, 1);
    /* Nothing left. */
    twn_lease_grant g2;
    assert_int_equal(twn_leases_grant(l, 3, 10, 101.0, &g2, NULL), 0);
    twn_err err = {{0}};
    assert_int_equal(twn_leases_grant(l, TWN_LEASE_MAX_WORKERS, 1, 0, &g2, &err), -1);
    assert_string_equal(err.msg, "unit lease: worker id 65536 out of range (max 65535)");
    twn_leases_free(l);
}

static void test_heartbeat_renews(void **state) {
    (void)state;
    fake f;
    twn_leases *l = pool(&f, NULL, 2);
    twn_lease_grant g = grant(l, 1, 1, 0.0);
    for (double t = 4; t < 200; t += 4) {
        assert_int_equal(twn_leases_heartbeat(l, 1, t), 1);
        assert_int_equal(twn_leases_expire(l, t + 0.5), 0);
    }
    assert_true(twn_leases_deadline(l, g.slot) == 226.0);
    /* Renewal of one lease by id. */
    assert_int_equal(twn_leases_renew(l, g.id, 210.0, NULL), 1);
    assert_true(twn_leases_deadline(l, g.slot) == 240.0);
    /* Silence: heartbeat_s * missed = 15 s after the last sign of life the worker is dead. */
    assert_int_equal(twn_leases_expire(l, 210.9), 0);
    assert_int_equal(twn_leases_expire(l, 211.0), 1);
    assert_int_equal(twn_leases_stats(l)->worker_deaths, 1);
    assert_int_equal(twn_leases_queued(l), 2);
    twn_leases_free(l);
}

/* Expired work goes back to the front, in its original order, with one more attempt; it is
 * leased again before new work. */
static void test_expiry_relase_order(void **state) {
    (void)state;
    fake f;
    twn_leases *l = pool(&f, NULL, 6);
    twn_lease_grant a = grant(l, 1, 3, 0.0); /* refs 0 1 2 */
    twn_lease_grant b = grant(l, 2, 1, 5.0); /* ref 3 */
    finish_ref(l, &f, 1);
    twn_leases_heartbeat(l, 1, 10.0); /* lease a: deadline 40; worker 1 silent from 25 */
    twn_leases_heartbeat(l, 2, 20.0); /* lease b: deadline 50; worker 2 silent from 35 */
    assert_true(twn_leases_deadline(l, a.slot) == 40.0);
    assert_int_equal(twn_leases_expire(l, 24.9), 0);
    assert_int_equal(twn_leases_expire(l, 25.0), 1); /* worker 1 missed 3 heartbeats */
    assert_int_equal(twn_leases_resolve(l, a.id, NULL, NULL), 0);
    assert_int_equal(twn_leases_resolve(l, b.id, NULL, NULL), 1);
    assert_int_equal(twn_leases_queued(l), 4); /* 0 2 retried + 4 5 new */
    twn_lease_grant c = grant(l, 9, 3, 41.0);
    assert_int_equal(c.n, 3);
    assert_int_equal(c.refs[0], 0);
    assert_int_equal(c.refs[1], 2);
    assert_int_equal(c.refs[2], 4);
    assert_int_equal(c.attempts[0], 2);
    assert_int_equal(c.attempts[1], 2);
    assert_int_equal(c.attempts[2], 1);
    /* A late settlement from worker 1 for ref 0: the ref is now in lease c and settles it. */
    assert_int_equal(f.bound[0], c.slot + 1);
    assert_int_equal(finish_ref(l, &f, 0), 0);
    assert_int_equal(finish_ref(l, &f, 0), 0); /* twice: nothing more */
    assert_int_equal(finish_ref(l, &f, 2), 0);
    assert_int_equal(finish_ref(l, &f, 4), 1);
    const twn_lease_stats *s = twn_leases_stats(l);
    assert_int_equal(s->granted, 3);
    assert_int_equal(s->expired, 1);
    assert_int_equal(s->requeued, 2);
    twn_leases_free(l);
}

static void test_attempts_poison(void **state) {
    (void)state;
    fake f;
    twn_lease_cfg cfg;
    twn_lease_cfg_default(&cfg);
    cfg.max_attempts = 3;
    twn_leases *l = pool(&f, &cfg, 2);
    double now = 0;
    for (uint32_t attempt = 1; attempt <= 3; attempt++) {
        twn_lease_grant g = grant(l, attempt, 1, now);
        assert_int_equal(g.refs[0], 0);
        assert_int_equal(g.attempts[0], attempt);
        now += 30;
        assert_int_equal(twn_leases_expire(l, now), 1);
    }
    assert_int_equal(f.n_poisoned, 1);
    assert_int_equal(f.poisoned[0], 0);
    assert_int_equal(f.poison_attempts[0], 3);
    /* Only ref 1 is left, on its first attempt. */
    twn_lease_grant g = grant(l, 7, 5, now);
    assert_int_equal(g.n, 1);
    assert_int_equal(g.refs[0], 1);
    assert_int_equal(g.attempts[0], 1);
    assert_int_equal(twn_leases_stats(l)->poisoned, 1);
    twn_leases_free(l);
}

static void test_worker_death_releases_all(void **state) {
    (void)state;
    fake f;
    twn_leases *l = pool(&f, NULL, 10);
    twn_lease_grant a = grant(l, 4, 2, 0.0);
    grant(l, 5, 2, 0.0);
    twn_lease_grant c = grant(l, 4, 3, 0.0);
    twn_leases_finish(l, c.id, 1.0, NULL); /* finished leases go too */
    assert_int_equal(twn_leases_held(l, 4), 2);
    assert_int_equal(twn_leases_worker_dead(l, 4), 2);
    assert_int_equal(twn_leases_held(l, 4), 0);
    assert_int_equal(twn_leases_live(l), 1);
    assert_int_equal(twn_leases_resolve(l, a.id, NULL, NULL), 0);
    /* Both leases' refs are at the front: 0 1 (lease a) and 4 5 6 (lease c), then new 7 8 9. */
    twn_lease_grant g = grant(l, 6, 10, 2.0);
    assert_int_equal(g.n, 8);
    const uint64_t want[8] = {0, 1, 4, 5, 6, 7, 8, 9};
    uint32_t order_ok = 1;
    /* Which lease was ended first is an implementation detail; within each, order is kept. */
    if (g.refs[0] == 4) {
        const uint64_t alt[8] = {4, 5, 6, 0, 1, 7, 8, 9};
        for (int i = 0; i < 8; i++) order_ok &= g.refs[i] == alt[i];
    } else {
        for (int i = 0; i < 8; i++) order_ok &= g.refs[i] == want[i];
    }
    assert_true(order_ok);
    /* Lease a's refs had an attempt counted; finished lease c's did not (it waited for acks). */
    for (int i = 0; i < 5; i++) assert_int_equal(g.attempts[i], g.refs[i] < 2 ? 2 : 1);
    assert_int_equal(g.attempts[5], 1);
    assert_int_equal(twn_leases_stats(l)->uncounted, 3);
    twn_leases_free(l);
}

/* A holder that finished its part and then died puts the unsettled refs back without counting
 * an attempt: dying max_attempts + 2 times after finishing poisons nothing, while a holder dying
 * before finishing counts every time.  A finished lease whose acks do not come within
 * ack_timeout_s (its holder alive) counts: such an item reaches the dead letters. */
static void test_finished_lease_death_uncounted(void **state) {
    (void)state;
    fake f;
    twn_leases *l = pool(&f, NULL, 2);
    double now = 0;
    for (uint32_t round = 1; round <= 5; round++) {
        twn_lease_grant g = grant(l, round, 2, now);
        assert_int_equal(g.n, 2);
        assert_int_equal(g.attempts[0], 1); /* never counted up */
        assert_int_equal(g.attempts[1], 1);
        assert_int_equal(twn_leases_finish(l, g.id, now + 1, NULL), 1);
        assert_int_equal(twn_leases_worker_dead(l, round), 1);
        now += 100;
    }
    assert_int_equal(f.n_poisoned, 0);
    assert_int_equal(twn_leases_stats(l)->uncounted, 10);
    for (uint32_t attempt = 1; attempt <= 3; attempt++) {
        twn_lease_grant g = grant(l, 10 + attempt, 2, now);
        assert_int_equal(g.attempts[0], attempt);
        assert_int_equal(twn_leases_worker_dead(l, 10 + attempt), 1); /* not finished */
    }
    assert_int_equal(f.n_poisoned, 2);
    assert_int_equal(f.poison_attempts[0], 3);
    twn_leases_free(l);

    /* Acks that never come (an item that takes its shard down every time): counted. */
    fake f2;
    l = pool(&f2, NULL, 2);
    now = 0;
    for (uint32_t attempt = 1; attempt <= 3; attempt++) {
        twn_lease_grant g = grant(l, attempt, 2, now);
        assert_int_equal(g.n, 2);
        assert_int_equal(g.attempts[0], attempt);
        assert_int_equal(twn_leases_finish(l, g.id, now + 1, NULL), 1);
        assert_int_equal(twn_leases_expire(l, now + 1 + 60), 1);
        now += 100;
    }
    assert_int_equal(f2.n_poisoned, 2);
    assert_int_equal(f2.poison_attempts[0], 3);
    assert_int_equal(twn_leases_stats(l)->uncounted, 0);
    twn_leases_free(l);
}

/* Per-lease renewal (twn_leases_report): a started lease is renewed while its progress moves and
 * ends stall_s after it last moved although its holder keeps beating; the holder's unlisted
 * (queued) lease is renewed while a listed one moves and runs out lease_s after that. */
static void test_report_stall(void **state) {
    (void)state;
    fake f;
    twn_lease_cfg cfg;
    twn_lease_cfg_default(&cfg);
    cfg.stall_s = 100;
    twn_leases *l = pool(&f, &cfg, 4);
    twn_lease_grant a = grant(l, 1, 1, 0.0);       /* worked on */
    twn_lease_grant q = grant(l, 1, 1, 0.0);       /* queued behind a inside worker 1 */
    uint64_t ref_a = a.refs[0], ref_q = q.refs[0]; /* .refs point into slots reused later */
    twn_lease_beat b = {a.id, 1};
    /* a moves every 5 s up to t = 50, then stands still; worker 1 beats every 5 s throughout */
    double t;
    for (t = 5; t < 150; t += 5) {
        if (t <= 50) b.progress++;
        assert_int_equal(twn_leases_report(l, 1, t, &b, 1), 2);
        assert_int_equal(twn_leases_expire(l, t + 0.1), 0);
    }
    assert_true(twn_leases_deadline(l, a.slot) == 175.0);
    assert_true(twn_leases_deadline(l, q.slot) == 175.0);
    assert_int_equal(twn_leases_expire(l, 149.9), 0);
    /* a moved last at 50: stalled from 150, so neither it nor q is renewed any more */
    assert_int_equal(twn_leases_report(l, 1, 150.0, &b, 1), 0);
    assert_int_equal(twn_leases_expire(l, 150.0), 1);
    assert_int_equal(twn_leases_resolve(l, a.id, NULL, NULL), 0);
    assert_int_equal(twn_leases_stats(l)->stalled, 1);
    for (t = 155; t < 175; t += 5) {
        assert_int_equal(twn_leases_report(l, 1, t, NULL, 0), 0); /* alive, renews nothing */
        assert_int_equal(twn_leases_expire(l, t), 0);
    }
    assert_int_equal(twn_leases_expire(l, 175.0), 1);
    const twn_lease_stats *st = twn_leases_stats(l);
    assert_int_equal(st->expired, 2);
    assert_int_equal(st->stalled, 1);
    assert_int_equal(st->worker_deaths, 0);
    /* Both refs are queued again with an attempt counted (neither lease had finished). */
    twn_lease_grant g = grant(l, 2, 4, 176.0);
    assert_int_equal(g.n, 4);
    assert_int_equal(g.refs[0], ref_q); /* ended last: in front */
    assert_int_equal(g.refs[1], ref_a);
    assert_int_equal(g.attempts[0], 2);
    assert_int_equal(g.attempts[1], 2);
    /* Listed with progress 0 (taken but not started) is queued too; a started lease that is no
     * longer listed is not renewed; ids of other pools, workers or ended leases are ignored. */
    twn_lease_beat two[4] = {{g.id, 0}, {a.id, 7}, {g.id + (1ull << 48), 3}, {q.id, 9}};
    assert_int_equal(twn_leases_report(l, 2, 180.0, two, 4), 0); /* nothing moves */
    assert_true(twn_leases_deadline(l, g.slot) == 206.0);
    twn_lease_beat go = {g.id, 1};
    assert_int_equal(twn_leases_report(l, 3, 181.0, &go, 1), 0); /* not worker 3's */
    assert_int_equal(twn_leases_report(l, 2, 181.0, &go, 1), 1);
    assert_true(twn_leases_deadline(l, g.slot) == 211.0);
    assert_int_equal(twn_leases_report(l, 2, 182.0, NULL, 0), 0);
    assert_true(twn_leases_deadline(l, g.slot) == 211.0);
    twn_leases_free(l);
}

/* stall_s = 0 turns stall expiry off; a stall_s not above heartbeat_s is refused. */
static void test_stall_cfg(void **state) {
    (void)state;
    twn_lease_cfg c;
    twn_lease_cfg_default(&c);
    assert_true(c.stall_s == 300);
    twn_err err = {{0}};
    c.stall_s = 5;
    assert_int_equal(twn_lease_cfg_check(&c, &err), -1);
    assert_string_equal(err.msg, "lease config: stall_s = 5, expected 0 (off) or more than "
                                 "heartbeat_s = 5 (progress is only seen once per heartbeat)");
    c.stall_s = -1;
    assert_int_equal(twn_lease_cfg_check(&c, &err), -1);
    c.stall_s = 0;
    assert_int_equal(twn_lease_cfg_check(&c, &err), 0);
    fake f;
    twn_leases *l = pool(&f, &c, 1);
    twn_lease_grant a = grant(l, 1, 1, 0.0);
    twn_lease_beat b = {a.id, 1};
    for (double t = 5; t < 1000; t += 5) {
        assert_int_equal(twn_leases_report(l, 1, t, &b, 1), 1);
        assert_int_equal(twn_leases_expire(l, t), 0);
    }
    twn_leases_free(l);
}

/* After finish, heartbeats no longer extend a lease: the acks have ack_timeout_s. */
static void test_finish_ack_timeout(void **state) {
    (void)state;
    fake f;
    twn_leases *l = pool(&f, NULL, 2);
    twn_lease_grant g = grant(l, 1, 2, 0.0);
    assert_int_equal(twn_leases_finish(l, g.id, 10.0, NULL), 1);
    assert_true(twn_leases_deadline(l, g.slot) == 70.0);
    for (double t = 11; t < 70; t += 4) {
        assert_int_equal(twn_leases_heartbeat(l, 1, t), 0);
        assert_int_equal(twn_leases_expire(l, t), 0);
    }
    /* The worker went quiet after finishing: that alone is not death. */
    assert_int_equal(twn_leases_expire(l, 69.0), 0);
    finish_ref(l, &f, 0);
    assert_int_equal(twn_leases_expire(l, 70.0), 1);
    assert_int_equal(twn_leases_queued(l), 1); /* only the unacked ref */
    assert_int_equal(twn_leases_finish(l, g.id, 71.0, NULL), 0);
    assert_int_equal(twn_leases_stats(l)->late, 1);
    twn_leases_free(l);
}

static void test_lease_ids(void **state) {
    (void)state;
    fake f;
    twn_leases *l = pool(&f, NULL, 3);
    twn_lease_grant g = grant(l, 1, 1, 0.0);
    twn_err err = {{0}};
    /* Never issued: a later prefix, or a slot beyond the table. */
    assert_int_equal(twn_leases_resolve(l, g.id + (1ull << 48), NULL, &err), -1);
    char want[128];
    snprintf(want, sizeof want, "unit lease %016llx: never granted",
             (unsigned long long)(g.id + (1ull << 48)));
    assert_string_equal(err.msg, want);
    assert_int_equal(twn_leases_resolve(l, 0, NULL, &err), -1);
    assert_int_equal(twn_leases_finish(l, g.id | 0xfff, 1.0, &err), -1);
    /* From an earlier run (smaller prefix): late. */
    assert_int_equal(twn_leases_resolve(l, g.id & ((1ull << 48) - 1), NULL, &err), 0);
    /* A recycled slot gets a new generation: the old id is late, the new one live. */
    finish_ref(l, &f, 0);
    twn_lease_grant h = grant(l, 1, 1, 1.0);
    assert_int_equal(h.slot, g.slot);
    assert_true(h.id != g.id);
    assert_int_equal(twn_leases_resolve(l, g.id, NULL, NULL), 0);
    assert_int_equal(twn_leases_resolve(l, h.id, NULL, NULL), 1);
    twn_leases_free(l);
}

/* Memory stays flat: a long stream of grants and settlements reuses slots and buffers. */
static void test_slots_recycled(void **state) {
    (void)state;
    fake f;
    twn_leases *l = pool(&f, NULL, 0);
    for (int round = 0; round < 10000; round++) {
        for (int i = 0; i < 8; i++) {
            f.open[i] = 1;
            twn_leases_enqueue(l, (uint64_t)i, 0);
        }
        twn_lease_grant a = grant(l, 1, 4, round);
        twn_lease_grant b = grant(l, 2, 4, round);
        assert_true(a.slot < 2 && b.slot < 2);
        for (int i = 0; i < 8; i++) finish_ref(l, &f, (uint64_t)i);
        assert_int_equal(twn_leases_live(l), 0);
    }
    assert_int_equal(twn_leases_stats(l)->closed, 20000);
    twn_leases_free(l);
}

/* A holder that gives a lease up (Finished.abandoned) ends it at once, as an expiry: the refs it
 * did not finish go back to the front, a finished ref is dropped, the third release poisons,
 * and a release of an ended lease is late.  Before release existed, an abandoned lease waited
 * ack_timeout_s (or, still ACTIVE, was renewed by its holder's heartbeats) with nobody on it. */
static void test_release_requeues_at_once(void **state) {
    (void)state;
    fake f;
    twn_leases *l = pool(&f, NULL, 3);
    twn_err err = {{0}};
    twn_lease_grant g = grant(l, 7, 2, 100.0);
    assert_int_equal(finish_ref(l, &f, 1), 0); /* ref 1 is done; ref 0 is not */
    assert_int_equal(twn_leases_finish(l, g.id, 101.0, &err), 1);
    assert_int_equal(twn_leases_release(l, g.id, &err), 1);
    assert_int_equal(twn_leases_live(l), 0);
    assert_int_equal(twn_leases_queued(l), 2); /* 0 (retry, in front), then 2 */
    assert_int_equal(twn_leases_held(l, 7), 0);
    assert_int_equal(f.bound[0], 0);
    assert_int_equal(twn_leases_release(l, g.id, &err), 0); /* ended: a late message */
    for (uint32_t attempt = 2; attempt <= 3; attempt++) {
        g = grant(l, 7, 1, 102.0);
        assert_int_equal(g.refs[0], 0);
        assert_int_equal(g.attempts[0], attempt);
        assert_int_equal(twn_leases_release(l, g.id, &err), 1); /* ACTIVE: released all the same */
    }
    assert_int_equal(f.n_poisoned, 1);
    assert_int_equal(f.poisoned[0], 0);
    assert_int_equal(f.poison_attempts[0], 3);
    assert_int_equal(twn_leases_queued(l), 1);
    const twn_lease_stats *st = twn_leases_stats(l);
    assert_int_equal(st->released, 3);
    assert_int_equal(st->expired, 3);
    assert_int_equal(st->requeued, 2);
    assert_int_equal(st->poisoned, 1);
    assert_int_equal(st->late, 1);
    /* nothing expires later: nothing is left live */
    assert_int_equal(twn_leases_expire(l, 1e9), 0);
    assert_int_equal(twn_leases_release(l, (uint64_t)2 << 48 | 1, &err), -1);
    assert_string_equal(err.msg, "unit lease 0002000000000001: never granted");
    twn_leases_free(l);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_release_requeues_at_once),
        cmocka_unit_test(test_finished_lease_death_uncounted),
        cmocka_unit_test(test_report_stall),
        cmocka_unit_test(test_stall_cfg),
        cmocka_unit_test(test_defaults_and_check),
        cmocka_unit_test(test_grant_settle_close),
        cmocka_unit_test(test_heartbeat_renews),
        cmocka_unit_test(test_expiry_relase_order),
        cmocka_unit_test(test_attempts_poison),
        cmocka_unit_test(test_worker_death_releases_all),
        cmocka_unit_test(test_finish_ack_timeout),
        cmocka_unit_test(test_lease_ids),
        cmocka_unit_test(test_slots_recycled),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
