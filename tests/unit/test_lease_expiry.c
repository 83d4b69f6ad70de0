/* test_lease_expiry.c — liveness when leases keep being lost: the job always finishes.
 *
 * A unit (or a hard batch) whose every lease is lost is dead-lettered item by item ("lease
 * expired 3 times": each item once in dead_letter.jsonl, counted as rejected), every other unit
 * completes, and every role thread returns.  The roles run with their pulse thread off
 * (twn_role_cfg.no_pulse), so a batch that outlasts missed_beats heartbeat intervals gets the
 * role declared dead, as before the pulse existed.  A lease its holder abandons (Finished with
 * abandoned set) is leased again at once.
 *
 * A watchdog stops the job after WATCHDOG_S (the test then fails naming the hang) and ends the
 * process if the threads do not return WATCHDOG_GRACE_S after that, so a hang never runs into
 * ctest's timeout. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include "common/transport.h"
#include "tests/testutil.h"
#include "tests/unit/corpus.h"
#include "tests/unit/pipeline_harness.h"
#include "util/clock.h"

#define WATCHDOG_S       60
#define WATCHDOG_GRACE_S 15

/* Lines of a dead-letter file with `stage` and `reason`, each (unit, index) at most once (else
 * the test fails); *other counts the rest. */
static int count_dead(const char *path, const char *stage, const char *reason, int *other) {
    size_t n = 0;
    char *s = access(path, F_OK) == 0 ? tu_read(path, &n) : NULL;
    enum { MAX = 256 };
    unsigned long long seen[MAX][2];
    int hits = 0;
    char want[160];
    snprintf(want, sizeof want, "\"stage\":\"%s\",\"reason\":\"%s\"}", stage, reason);
    *other = 0;
    for (char *line = s, *next; line && *line; line = next) {
        next = strchr(line, '\n');
        if (next) *next++ = 0;
        if (!*line) continue;
        if (!strstr(line, want)) {
            (*other)++;
            continue;
        }
        const char *u = strstr(line, "\"unit\":"), *ix = strstr(line, "\"index\":");
        if (!u || !ix) fail_msg("dead letter without unit or index: %s", line);
        unsigned long long key = strtoull(u + 7, NULL, 10), idx = strtoull(ix + 8, NULL, 10);
        for (int i = 0; i < hits; i++)
            if (seen[i][0] == key && seen[i][1] == idx) fail_msg("dead-lettered twice: %s", line);
        assert_true(hits < MAX);
        seen[hits][0] = key;
        seen[hits][1] = idx;
        hits++;
    }
    free(s);
    return hits;
}

// ------------------------------------------------------------------------------------------------
// The whole job in threads

/* Coordinator (peers silent > 1 s are dead), indexer, gate and worker (pulse off, 1 credit each)
 * over inputs; gate_us / worker_us: what each item costs them.  The job gets WATCHDOG_S, its
 * threads WATCHDOG_GRACE_S more after the stop (pipeline_harness.h). */
static void run_job(const char *tag, const char *const *inputs, size_t n_inputs, int gate_us,
                    int worker_us, twn_coord_summary *sum, char *dl_path, size_t dl_cap) {
    const char *dir = tu_tmpdir(tag);
    char out[1100];
    snprintf(out, sizeof out, "%s/out", dir);
    snprintf(dl_path, dl_cap, "%s/dead_letter.jsonl", out);
    assert_int_equal(mkdir(out, 0755), 0);
    ph_pipeline *p = ph_pipeline_new(tag, out, inputs, n_inputs, 1, 1, 1, 16);
    twn_coord_cfg *cc = ph_coord(p);
    cc->unit_items = 64;
    cc->heartbeat_s = 0.2; /* silent for > 1 s: declared dead */
    cc->missed_beats = 5;
    cc->hard_batch = 16;
    cc->expect_peers = 3;
    for (int k = 0; k < 2; k++) {
        twn_role_cfg *rc = ph_sender(p, k); /* the gate, then the worker */
        rc->credits = 1;
        rc->null_item_us = k == 0 ? gate_us : worker_us;
        rc->no_pulse = 1;
    }
    p->deadline_s = WATCHDOG_S;
    p->grace_s = WATCHDOG_GRACE_S;
    /* as twn run: coordinator, then the indexers, then stop for gates and workers */
    ph_pipeline_run(p);
    if (p->timed_out) fail_msg("%s: the job did not finish within %d s", tag, WATCHDOG_S);
    for (size_t k = 0; k < p->n; k++)
        if (p->roles[k].status) fail_msg("role %zu: %s", k, p->roles[k].err.msg);
    *sum = *ph_summary(p);
    ph_pipeline_free(p);
}

/* A 48-item unit costs the gate 48 x 60 ms: its first batch of 32 (1.9 s) outlasts
 * missed_beats (5 x 0.2 s), so the gate loses every lease of it.  After 3 the unit is
 * dead-lettered and the 8-item unit behind it (0.5 s) completes. */
static void test_unit_lost_three_times(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("lease-expiry-in");
    char small[1024], big[1024], dl[1300];
    snprintf(small, sizeof small, "%s/small.jsonl", dir);
    snprintf(big, sizeof big, "%s/big.jsonl", dir);
    tc_routed_jsonl(big, "b", 48, 0);
    tc_routed_jsonl(small, "q", 8, 0);
    /* big first: the gate holds one unit at a time, so the small one waits for its turn */
    const char *inputs[2] = {big, small};
    twn_coord_summary sum;
    run_job("lease-expiry-unit", inputs, 2, 60000, 1000, &sum, dl, sizeof dl);
    int other = 0;
    assert_int_equal(sum.units, 2);
    assert_int_equal(sum.items, 56);
    assert_int_equal(count_dead(dl, "gate", "lease expired 3 times", &other), 48);
    assert_int_equal(other, 0);
    assert_int_equal(sum.rejected, 48);
    assert_int_equal(sum.easy, 8);
    assert_int_equal(sum.hard, 0);
}

/* 16 hard items come to the worker as one batch of 16 x 200 ms = 3.2 s, past missed_beats: the
 * batch is lost 3 times and its items are dead-lettered at stage "reason"; the easy unit
 * completes.  The job ends while the worker is still inside its third batch, counted as gone:
 * its late Finished then goes to a coordinator that has closed its ROUTER, and every thread
 * still returns (that send used to block forever, past the stop flag: twn run never ended). */
static void test_hard_batch_lost_three_times(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("lease-expiry-in");
    char easy[1024], hard[1024], dl[1300];
    snprintf(easy, sizeof easy, "%s/easy.jsonl", dir);
    snprintf(hard, sizeof hard, "%s/hard.jsonl", dir);
    tc_routed_jsonl(easy, "e", 8, 0);
    tc_routed_jsonl(hard, "h", 16, 1);
    const char *inputs[2] = {easy, hard};
    twn_coord_summary sum;
    run_job("lease-expiry-hard", inputs, 2, 1000, 200000, &sum, dl, sizeof dl);
    int other = 0;
    assert_int_equal(sum.units, 2);
    assert_int_equal(sum.items, 24);
    assert_int_equal(count_dead(dl, "reason", "lease expired 3 times", &other), 16);
    assert_int_equal(other, 0);
    assert_int_equal(sum.rejected, 16);
    assert_int_equal(sum.easy, 8);
    assert_int_equal(sum.hard, 0);
}

// ------------------------------------------------------------------------------------------------
// A lease given up by its holder

static void fg_finished(ph_fake_gate *g, uint64_t lease, int abandoned) {
    Twn__Finished f = TWN__FINISHED__INIT;
    f.lease_id = lease;
    f.abandoned = abandoned;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_FINISHED;
    env.finished = &f;
    ph_fg_send(g, &env);
    Twn__WorkRequest w = TWN__WORK_REQUEST__INIT;
    w.credits = 1;
    Twn__Envelope env2 = TWN__ENVELOPE__INIT;
    env2.body_case = TWN__ENVELOPE__BODY_WORK_REQUEST;
    env2.work_request = &w;
    ph_fg_send(g, &env2);
}

/* Leases and acks wait long here (1000 s) and the peer counts as alive for 50 s: only the
 * holder's word ends a lease.  Each abandoned lease is leased again at once with the next
 * attempt; the third is the last, and the unit is dead-lettered ("lease expired 3 times"). */
static void test_abandoned_lease_leased_again(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("lease-expiry-abandon");
    char in[1024], journal[1100], dl[1100];
    snprintf(in, sizeof in, "%s/items.jsonl", dir);
    snprintf(journal, sizeof journal, "%s/journal", dir);
    snprintf(dl, sizeof dl, "%s/dead_letter.jsonl", dir);
    tc_routed_jsonl(in, "a", 5, 0);
    static volatile int stop;
    stop = 0;
    void *zctx = zmq_ctx_new();
    const char *ep = "inproc://la-shard-0", *ctl = "inproc://la-control";
    const char *inputs[1] = {in};
    ph_role c;
    ph_coord_alone(&c, zctx, ctl, inputs, 1, journal, dl, &ep, &stop);
    c.cc.heartbeat_s = 10;
    c.cc.missed_beats = 5;
    c.cc.cs.unit_lease.lease_s = c.cc.cs.unit_lease.ack_timeout_s = 1000;
    c.cc.cs.unit_lease.heartbeat_s = 10;
    ph_watchdog wd;
    ph_watchdog_start(&wd, &stop, NULL, "abandon", WATCHDOG_S, WATCHDOG_GRACE_S);
    ph_role_start(&c);

    ph_fake_gate g = ph_fake_gate_open(zctx, ctl);
    Twn__Hello h = TWN__HELLO__INIT;
    h.role = TWN__ROLE__ROLE_GATE;
    h.id = (char *)"fake-gate";
    h.credits = 1;
    h.dim = 16;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_HELLO;
    env.hello = &h;
    Twn__Envelope *m = NULL;
    for (int tries = 0; tries < 50 && !m; tries++) { /* the ROUTER may not be bound yet */
        ph_fg_send(&g, &env);
        m = ph_fg_recv(&g, TWN__ENVELOPE__BODY_WELCOME, 0.2);
    }
    assert_non_null(m);
    assert_true(m->welcome->accepted);
    twn_msg_free(m);
    uint64_t unit = 0;
    char failure[256] = "";
    for (uint32_t attempt = 1; attempt <= 3 && !*failure; attempt++) {
        m = ph_fg_recv(&g, TWN__ENVELOPE__BODY_UNIT_LEASE, 5.0);
        if (!m) {
            snprintf(failure, sizeof failure,
                     "attempt %u: no UnitLease within 5 s of the abandoned one", attempt);
            break;
        }
        if (m->unit_lease->attempt != attempt || (attempt > 1 && m->unit_lease->unit_id != unit))
            snprintf(failure, sizeof failure, "lease %u: attempt %u of unit %llu", attempt,
                     m->unit_lease->attempt, (unsigned long long)m->unit_lease->unit_id);
        unit = m->unit_lease->unit_id;
        fg_finished(&g, m->unit_lease->lease_id, 1);
        twn_msg_free(m);
    }
    m = *failure ? NULL : ph_fg_recv(&g, TWN__ENVELOPE__BODY_SHUTDOWN, 5.0); /* the job is over */
    if (!*failure && !m)
        snprintf(failure, sizeof failure, "no Shutdown within 5 s of the third abandoned lease");
    if (m) {
        if (strcmp(m->shutdown->reason, "job finished"))
            snprintf(failure, sizeof failure, "Shutdown: %s", m->shutdown->reason);
        twn_msg_free(m);
        Twn__Shutdown sd = TWN__SHUTDOWN__INIT;
        sd.reason = (char *)"shutdown";
        Twn__Envelope be = TWN__ENVELOPE__INIT;
        be.body_case = TWN__ENVELOPE__BODY_SHUTDOWN;
        be.shutdown = &sd;
        ph_fg_send(&g, &be);
    } else {
        stop = 1; /* the coordinator returns "stopped" */
    }
    ph_role_join(&c, WATCHDOG_S + WATCHDOG_GRACE_S); /* the watchdog ends a hang first */
    ph_fake_gate_close(&g);
    zmq_ctx_term(zctx);
    if (ph_watchdog_end(&wd)) fail_msg("abandon: the job did not finish within %d s", WATCHDOG_S);
    if (*failure) fail_msg("%s", failure);
    if (c.status) fail_msg("coordinator: %s", c.err.msg);
    assert_int_equal(c.sum.items, 5);
    assert_int_equal(c.sum.rejected, 5);
    int other = 0;
    assert_int_equal(count_dead(dl, "gate", "lease expired 3 times", &other), 5);
    assert_int_equal(other, 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_abandoned_lease_leased_again),
        cmocka_unit_test_teardown(test_unit_lost_three_times, ph_teardown),
        cmocka_unit_test_teardown(test_hard_batch_lost_three_times, ph_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
