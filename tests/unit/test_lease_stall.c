/* test_lease_stall.c — exactly-once and liveness when a lease holder fails without dying.
 *
 *  - A gate whose engine call hangs while its pulse thread keeps heartbeating: its heartbeats
 *    list the lease with a progress counter that no longer moves, so the coordinator ends the
 *    lease stall_s after the last move (it used to renew every lease of a peer that beat, and
 *    the job waited for the hang).  The unit completes on another gate, every id is in the
 *    index exactly once, and when the hung gate wakes it finds its lease overdue and drops its
 *    results (Finished with abandoned set).
 *  - A gate that finished a unit and died before the shards' acks came, again and again: the
 *    unit is leased again each time without an attempt counted (it used to be dead-lettered as
 *    "lease expired 3 times" after the third death, though its items were fine).
 *  - 100 gates that die at once: every one of their leases is leased again within one silence
 *    window (the loop used to end the leases of at most 16 dead peers per pass; the others
 *    waited for the lease pool's own silence check, 15 s with the pool's defaults).
 *
 * Every wait has a deadline; a watchdog (tests/unit/pipeline_harness.h) ends the process naming
 * the hang if threads do not return. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include "common/transport.h"
#include "coordinator/cstate.h"
#include "tests/testutil.h"
#include "tests/unit/corpus.h"
#include "tests/unit/pipeline_harness.h"
#include "tests/unit/shard_out.h"
#include "util/clock.h"

#define WATCHDOG_S       60
#define WATCHDOG_GRACE_S 15

// ------------------------------------------------------------------------------------------------
// A gate whose engine call hangs

/* The hung gate's handler: the first lease "runs" until the test releases it, with the pulse
 * beating all along; then it does what gate.c does with a finished pass: results only if the
 * lease is still ours (twn_role_lease_overdue), else give it up.  Then it leaves. */
static struct {
    volatile int entered, release, stop;
    double t_enter, overdue;
    int abandoned, sent;
} H;

static int hung_lease(twn_role_conn *c, const Twn__Envelope *m, twn_err *err) {
    const Twn__UnitLease *l = m->unit_lease;
    if (H.entered) return 0; /* granted after the wake-up, as it leaves: left to expire */
    c->active = l->unit_id;
    twn_role_lease_begin(c, l->lease_id, l->deadline_unix_ms, l->lease_ms, l->stall_ms);
    H.t_enter = twn_now();
    H.entered = 1;
    while (!H.release) usleep(5000); /* the engine call that does not return */
    H.overdue = twn_role_lease_overdue(c);
    int rc;
    if (H.overdue > 0) {
        H.abandoned = 1;
        rc = twn_role_abandon(c, "unit", l->unit_id, l->lease_id, err);
    } else {
        H.sent = 1; /* the lease still looks ours: its results would go out now */
        rc = twn_role_finished(c, l->lease_id, err);
    }
    Twn__Shutdown sd = TWN__SHUTDOWN__INIT; /* leaving: what we hold goes back at once */
    sd.reason = (char *)"test: hung gate leaves";
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_SHUTDOWN;
    env.shutdown = &sd;
    if (!rc) rc = twn_role_send(c, &env, err);
    H.stop = 1;
    return rc;
}

static double unit_expiries(void) {
    return ph_metric("twn_lease_expiries_total", "lease=unit");
}

/* The job's watch (every 10 ms while the coordinator runs): when the hung unit's lease expired
 * (from the hang), and the hung gate woken `wake` s after it hung. */
typedef struct hung_watch {
    double base, wake, t_expired;
} hung_watch;

static int watch_hung(void *user, const char *journal) {
    (void)journal;
    hung_watch *w = user;
    if (w->t_expired < 0 && unit_expiries() > w->base) w->t_expired = twn_now() - H.t_enter;
    if (H.entered && twn_now() - H.t_enter >= w->wake) H.release = 1;
    return 0;
}

/* 16 units of 8 easy items.  The hung gate takes the first unit and hangs; a good gate paced at
 * 40 ms per item does the rest (5 s of work).  Leases last 1 s, heartbeats every 0.1 s, stall
 * after 1 s.  The hung unit must expire about 1 s after the hang began (with the old renewal
 * it was renewed for as long as the pulse beat), the hung gate must find its lease overdue when
 * it wakes at 3 s, and the index must hold every id once. */
static void test_hung_gate_lease_stalls(void **st) {
    (void)st;
    enum { UNITS = 16, PER = 8, N = UNITS * PER };
    const double STALL = 1.0, WAKE = 3.0;
    const char *dir = tu_tmpdir("lease-stall");
    char in[1024], out[1100], dl[1200];
    snprintf(in, sizeof in, "%s/items.jsonl", dir);
    snprintf(out, sizeof out, "%s/out", dir);
    snprintf(dl, sizeof dl, "%s/dead_letter.jsonl", out);
    tc_routed_jsonl(in, "h", N, 0); /* routed easy: no reasoning worker needed */
    memset((void *)&H, 0, sizeof H);
    const char *inputs[1] = {in};
    ph_pipeline *p = ph_pipeline_new("hung gate", out, inputs, 1, 1, 1, 0, 16);
    twn_coord_cfg *cc = ph_coord(p);
    cc->unit_items = PER;
    cc->heartbeat_s = 0.1;
    cc->missed_beats = 5;
    cc->cs.unit_lease.lease_s = 1.0;
    cc->cs.unit_lease.heartbeat_s = 0.1;
    cc->cs.unit_lease.missed_heartbeats = 5;
    cc->cs.unit_lease.stall_s = STALL;
    cc->cs.unit_lease.ack_timeout_s = 20;
    ph_role *good = &p->roles[2]; /* [0] coordinator, [1] indexer-0, [2] gate-0 */
    good->hold = 1;               /* it joins once unit 0 hangs */
    good->rc.connect_timeout_s = 20;
    good->rc.credits = 2;
    good->rc.batch = PER;
    good->rc.null_item_us = 40000;
    ph_role hung; /* the hung gate: stopped by its handler */
    memset(&hung, 0, sizeof hung);
    hung.kind = PH_SERVE;
    hung.handler = hung_lease;
    hung.serve_role = TWN__ROLE__ROLE_GATE;
    hung.serve_body = TWN__ENVELOPE__BODY_UNIT_LEASE;
    twn_role_cfg_default(&hung.rc);
    hung.rc.zctx = p->zctx;
    hung.rc.control = p->control;
    hung.rc.id = "gate-hung";
    hung.rc.null_dim = 16;
    hung.rc.stop = &H.stop;
    hung.rc.connect_timeout_s = 20;
    hung.rc.credits = 1;
    hung_watch w = {.base = unit_expiries(), .wake = WAKE, .t_expired = -1};
    p->watch = watch_hung;
    p->user = &w;
    p->watch_s = 0.01;
    p->deadline_s = WATCHDOG_S;
    p->grace_s = WATCHDOG_GRACE_S;
    ph_pipeline_start(p);
    ph_role_start(&hung);
    for (double t0 = twn_now(); !H.entered && !p->roles[0].finished && twn_now() - t0 < 20;)
        usleep(2000);
    ph_role_start(good);
    ph_pipeline_wait(p); /* watch_hung wakes the hung gate */
    H.release = 1;
    H.stop = 1;
    ph_role_join(&hung, WATCHDOG_GRACE_S);
    ph_pipeline_check(p);
    if (p->roles[0].status) fail_msg("coordinator: %s", p->roles[0].err.msg);
    const twn_coord_summary sum = *ph_summary(p);
    ph_pipeline_free(p);
    double t_expired = w.t_expired;
    print_message("hung unit expired %.2f s after the hang began (stall %.1f s); the hung gate "
                  "woke %.1f s in, overdue by %.2f s\n",
                  t_expired, STALL, WAKE, H.overdue);
    if (t_expired < 0) fail_msg("the hung gate's lease never expired while it hung");
    assert_true(t_expired >= STALL - 0.05);
    assert_true(t_expired < STALL + 1.0); /* first report + one beat + a tick, with ASan room */
    assert_true(t_expired < WAKE);
    assert_int_equal(H.abandoned, 1); /* its late results are dropped ... */
    assert_int_equal(H.sent, 0);
    assert_true(H.overdue > 0);
    assert_int_equal(sum.units, UNITS);
    assert_int_equal(sum.items, N);
    assert_int_equal(sum.easy, N);
    assert_int_equal(sum.rejected, 0);
    assert_int_equal(sum.duplicates, 0); /* ... and none of them reached a shard */
    struct stat sb;
    assert_true(stat(dl, &sb) != 0 || sb.st_size == 0); /* no dead letters */
    tp_shards s = tp_shards_read(out, 1);               /* fails on an id in the index twice */
    assert_int_equal(json_object_size(s.items), N);
    json_t *sent = tp_jsonl_read(in);
    assert_int_equal(json_array_size(sent), N);
    for (size_t i = 0; i < json_array_size(sent); i++) {
        const char *id = json_string_value(json_object_get(json_array_get(sent, i), "id"));
        if (!json_object_get(s.items, id)) fail_msg("id %s is not in the index", id);
    }
    json_decref(sent);
    tp_shards_free(&s);
}

// ------------------------------------------------------------------------------------------------
// Holder deaths after finishing

static int n_dead;
static char last_reason[128];

static void count_dead(void *ctx, uint64_t unit, uint32_t item, twn_stage stage,
                       const char *reason) {
    (void)ctx, (void)unit, (void)item, (void)stage;
    n_dead++;
    snprintf(last_reason, sizeof last_reason, "%s", reason);
}

/* The real cstate and lease pools: unit A is leased, finished by its gate, and the gate dies
 * before the shards' acks come, five times over (max_attempts is 3): every new lease is still
 * attempt 1 and nothing is dead-lettered; the acks then complete it.  Unit B's gates die before
 * finishing: the third death dead-letters its items ("lease expired 3 times"). */
static void test_finished_holder_deaths_uncounted(void **st) {
    (void)st;
    char path[1100];
    snprintf(path, sizeof path, "%s/journal", tu_tmpdir("lease-stall-cs"));
    twn_cstate_cfg cfg;
    twn_cstate_cfg_default(&cfg);
    twn_plan_fp fp = {"corpus/x.jsonl", 4, "null"};
    twn_cstate_hooks h = {NULL, count_dead, NULL};
    twn_cstate *c = NULL;
    twn_err err = {{0}};
    n_dead = 0;
    if (twn_cstate_open(path, &fp, &cfg, &h, &c, NULL, &err)) fail_msg("open: %s", err.msg);
    uint64_t ka = twn_unit_key("corpus/x.jsonl", 0, 100),
             kb = twn_unit_key("corpus/x.jsonl", 100, 100);
    twn_unit_spec units[2] = {{ka, 4}, {kb, 4}};
    assert_int_equal(twn_cstate_add_units(c, units, 2, &err), 0);
    double now = 1000;
    twn_unit_grant g;
    for (uint32_t w = 1; w <= 5; w++, now += 1) {
        assert_int_equal(twn_cstate_grant_unit(c, w, now, &g, &err), 1);
        assert_true(g.unit == ka);
        assert_int_equal(g.attempt, 1);
        assert_int_equal(twn_cstate_finish(c, g.lease, now, &err), 1);
        twn_cstate_worker_dead(c, w); /* acks still on their way */
        assert_int_equal(twn_cstate_tick(c, now, &err), 0);
    }
    assert_int_equal(n_dead, 0);
    assert_int_equal(twn_cstate_grant_unit(c, 9, now, &g, &err), 1);
    assert_true(g.unit == ka);
    assert_int_equal(g.attempt, 1);
    assert_int_equal(twn_cstate_ack_range(c, ka, 0, 4, TWN_ROUTE_EASY, &err), 0);
    twn_unit_counts uc;
    int done = 0;
    assert_int_equal(twn_cstate_unit_counts(c, ka, &uc, &done), 0);
    assert_int_equal(done, 1);
    assert_int_equal(uc.easy, 4);
    for (uint32_t w = 11; w <= 13; w++, now += 1) { /* unit B: deaths before finishing count */
        assert_int_equal(twn_cstate_grant_unit(c, w, now, &g, &err), 1);
        assert_true(g.unit == kb);
        assert_int_equal(g.attempt, w - 10);
        twn_cstate_worker_dead(c, w);
        assert_int_equal(twn_cstate_tick(c, now, &err), 0);
    }
    assert_int_equal(n_dead, 4);
    assert_string_equal(last_reason, "lease expired 3 times");
    assert_int_equal(twn_cstate_all_done(c), 1);
    twn_cstate_stats s;
    twn_cstate_stats_get(c, &s);
    assert_int_equal(s.unit_leases.uncounted, 5);
    assert_int_equal(s.unit_leases.poisoned, 1);
    assert_int_equal(twn_cstate_close(c, &err), 0);
}

// ------------------------------------------------------------------------------------------------
// 100 gates die at once

typedef struct fake_peer {
    void *dealer;
    uint64_t lease, progress;
} fake_peer;

static void fp_send(void *dealer, Twn__Envelope *env, const twn_frame_opts *fo) {
    twn_err e;
    if (twn_send_msg(dealer, NULL, env, fo, &e)) fail_msg("fake gate: %s", e.msg);
}

static void fp_hello(void *dealer, uint32_t credits, const twn_frame_opts *fo) {
    Twn__Hello h = TWN__HELLO__INIT;
    h.role = TWN__ROLE__ROLE_GATE;
    h.id = (char *)"fake";
    h.credits = credits;
    h.dim = 16;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_HELLO;
    env.hello = &h;
    fp_send(dealer, &env, fo);
}

/* A heartbeat listing the peer's leases, each moving (a healthy gate). */
static void fp_beat(void *dealer, const uint64_t *leases, uint64_t *progress, size_t n,
                    const twn_frame_opts *fo) {
    for (size_t i = 0; i < n; i++) progress[i]++;
    Twn__Heartbeat hb = TWN__HEARTBEAT__INIT;
    hb.n_lease_ids = hb.n_lease_progress = n;
    hb.lease_ids = (uint64_t *)leases;
    hb.lease_progress = progress;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_HEARTBEAT;
    env.heartbeat = &hb;
    fp_send(dealer, &env, fo);
}

static void *fp_dealer(void *zctx, const char *ctl, const char *id) {
    twn_sock_opts so = twn_sock_opts_default();
    so.linger_ms = 0;
    so.routing_id = id;
    twn_err e;
    void *d = twn_sock_new(zctx, ZMQ_DEALER, &so, &e);
    if (!d || twn_sock_connect(d, ctl, &e)) fail_msg("fake gate %s: %s", id, e.msg);
    return d;
}

/* 100 fake gates take one unit each and heartbeat as healthy gates do; then all 100 vanish at
 * once (sockets closed, no goodbye).  The coordinator declares a peer dead after 5 x 0.1 s of
 * silence and its lease pools keep their defaults (a silent holder after 15 s, leases of 30 s),
 * so only the loop's handling of dead peers can bring the work back sooner.  A live gate with
 * 100 credits must receive all 100 units again (attempt 2) within that 0.5 s window plus one
 * heartbeat (and some room for ASan). */
static void test_hundred_dead_peers(void **st) {
    (void)st;
    enum { PEERS = 100 };
    const double BEAT = 0.1, WINDOW = 0.5;
    const char *dir = tu_tmpdir("lease-stall-100");
    char in[1024], journal[1100];
    snprintf(in, sizeof in, "%s/items.jsonl", dir);
    snprintf(journal, sizeof journal, "%s/journal", dir);
    tc_routed_jsonl(in, "p", PEERS, 0);
    static volatile int stop;
    stop = 0;
    void *zctx = zmq_ctx_new();
    const char *ep = "inproc://l100-shard-0", *ctl = "inproc://l100-control";
    const char *inputs[1] = {in};
    static ph_role c;
    ph_coord_alone(&c, zctx, ctl, inputs, 1, journal, NULL, &ep, &stop);
    c.cc.unit_items = 1;
    c.cc.heartbeat_s = BEAT;
    c.cc.missed_beats = 5;
    ph_watchdog wd;
    ph_watchdog_start(&wd, &stop, NULL, "100 dead peers", WATCHDOG_S, WATCHDOG_GRACE_S);
    ph_role_start(&c);
    twn_frame_opts fo = twn_frame_opts_default();
    static fake_peer p[PEERS];
    memset(p, 0, sizeof p);
    char failure[256] = "";
    int leased = 0;
    double t_start = twn_now(), next_beat = 0;
    for (int i = 0; i < PEERS; i++) {
        char id[32];
        snprintf(id, sizeof id, "dead-%03d", i);
        p[i].dealer = fp_dealer(zctx, ctl, id);
        fp_hello(p[i].dealer, 1, &fo);
    }
    /* Every fake gate gets its unit, beating meanwhile (a Hello lost to a ROUTER not bound yet
     * is said again). */
    while (leased < PEERS && twn_now() - t_start < 20) {
        int beat = twn_now() >= next_beat;
        if (beat) next_beat = twn_now() + BEAT;
        for (int i = 0; i < PEERS; i++) {
            Twn__Envelope *m = NULL;
            twn_err e;
            while (twn_recv_msg(p[i].dealer, 0, &fo, NULL, &m, &e) == TWN_RECV_MSG) {
                if (m->body_case == TWN__ENVELOPE__BODY_UNIT_LEASE && !p[i].lease) {
                    p[i].lease = m->unit_lease->lease_id;
                    leased++;
                }
                twn_msg_free(m);
            }
            if (!beat) continue;
            if (p[i].lease)
                fp_beat(p[i].dealer, &p[i].lease, &p[i].progress, 1, &fo);
            else if (twn_now() - t_start > 1.0)
                fp_hello(p[i].dealer, 1, &fo);
        }
        usleep(2000);
    }
    if (leased < PEERS)
        snprintf(failure, sizeof failure, "only %d of %d peers got a unit", leased, PEERS);
    /* The rescuer: alive throughout, with room for every unit. */
    void *r = fp_dealer(zctx, ctl, "rescuer");
    fp_hello(r, PEERS, &fo);
    usleep((useconds_t)(BEAT * 1e6));
    for (int i = 0; i < PEERS; i++) fp_beat(p[i].dealer, &p[i].lease, &p[i].progress, 1, &fo);
    double t_dead = twn_now(); /* their last heartbeat */
    for (int i = 0; i < PEERS; i++) twn_sock_close(p[i].dealer);
    static uint64_t got[PEERS], prog[PEERS];
    int n_got = 0, retried = 0;
    double t_last = -1;
    next_beat = 0;
    while (!*failure && n_got < PEERS && twn_now() - t_dead < 20) {
        if (twn_now() >= next_beat) {
            next_beat = twn_now() + BEAT;
            fp_beat(r, got, prog, (size_t)n_got, &fo);
        }
        Twn__Envelope *m = NULL;
        twn_err e;
        if (twn_recv_msg(r, 5, &fo, NULL, &m, &e) != TWN_RECV_MSG) continue;
        if (m->body_case == TWN__ENVELOPE__BODY_UNIT_LEASE) {
            got[n_got++] = m->unit_lease->lease_id;
            retried += m->unit_lease->attempt == 2;
            t_last = twn_now() - t_dead;
        }
        twn_msg_free(m);
    }
    stop = 1;
    ph_role_join(&c, WATCHDOG_S + WATCHDOG_GRACE_S); /* the watchdog ends a hang first */
    twn_sock_close(r);
    zmq_ctx_term(zctx);
    if (ph_watchdog_end(&wd)) fail_msg("100 dead peers: not done within %d s", WATCHDOG_S);
    if (*failure) fail_msg("%s", failure);
    print_message("%d of %d dead peers' units leased again, the last %.2f s after their last "
                  "heartbeat (silence window %.1f s)\n",
                  n_got, PEERS, t_last, WINDOW);
    assert_int_equal(n_got, PEERS);
    assert_int_equal(retried, PEERS);
    assert_true(t_last >= WINDOW - 0.05);
    assert_true(t_last < WINDOW + BEAT + 0.5);
    assert_int_equal(c.status, -1); /* stopped by the test */
    assert_string_equal(c.err.msg, "coordinator: stopped before the job finished");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_finished_holder_deaths_uncounted),
        cmocka_unit_test_teardown(test_hung_gate_lease_stalls, ph_teardown),
        cmocka_unit_test(test_hundred_dead_peers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
