/* test_hello_again.c — a Hello sent again while its Welcome is on the way (gate.c says Hello
 * again each second until a Welcome comes; a coordinator slow to start, planning a large S3
 * input, answers the first one late) must not end the leases granted for the first one.
 *
 * Before Hello.join_id, the coordinator took every Hello for a restarted peer: it ended the
 * leases it had just granted and leased their units again (an expiry, attempts counted), so the
 * gate read 4 units twice on a loaded machine (test_run_sources test_s3_prefetch_pipeline).  A
 * Hello of a new join (a restart: another join_id) still ends them. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "common/transport.h"
#include "tests/testutil.h"
#include "tests/unit/corpus.h"
#include "tests/unit/pipeline_harness.h"
#include "util/clock.h"

static void fg_hello(ph_fake_gate *g, uint64_t join_id) {
    Twn__Hello h = TWN__HELLO__INIT;
    h.role = TWN__ROLE__ROLE_GATE;
    h.id = (char *)"fake-gate";
    h.credits = 1;
    h.dim = 16;
    h.join_id = join_id;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_HELLO;
    env.hello = &h;
    ph_fg_send(g, &env);
}

/* A unit lease: its id, unit and attempt (fails the test when none comes within 5 s). */
static void fg_lease(ph_fake_gate *g, const char *what, uint64_t *lease, uint64_t *unit,
                     uint32_t *attempt) {
    Twn__Envelope *m = ph_fg_recv(g, TWN__ENVELOPE__BODY_UNIT_LEASE, 5.0);
    if (!m) fail_msg("%s: no UnitLease within 5 s", what);
    *lease = m->unit_lease->lease_id;
    *unit = m->unit_lease->unit_id;
    *attempt = m->unit_lease->attempt;
    twn_msg_free(m);
}

/* Leases wait long (1000 s) and the peer counts as alive for 50 s: only a Hello can end the
 * lease.  The same join's Hello gets a Welcome and nothing else; another join's gets the unit
 * leased again (attempt 2). */
static void test_hello_again(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("hello-again");
    char in[1024], journal[1100], dl[1100];
    snprintf(in, sizeof in, "%s/items.jsonl", dir);
    snprintf(journal, sizeof journal, "%s/journal", dir);
    snprintf(dl, sizeof dl, "%s/dead_letter.jsonl", dir);
    tc_routed_jsonl(in, "h", 6, 0);
    static volatile int stop;
    stop = 0;
    void *zctx = zmq_ctx_new();
    const char *ep = "inproc://ha-shard-0", *ctl = "inproc://ha-control";
    const char *inputs[1] = {in};
    ph_role c;
    ph_coord_alone(&c, zctx, ctl, inputs, 1, journal, dl, &ep, &stop);
    c.cc.unit_items = 2; /* 3 units */
    c.cc.heartbeat_s = 10;
    c.cc.missed_beats = 5;
    c.cc.cs.unit_lease.lease_s = c.cc.cs.unit_lease.ack_timeout_s = 1000;
    c.cc.cs.unit_lease.heartbeat_s = 10;
    ph_role_start(&c);

    ph_fake_gate g = ph_fake_gate_open(zctx, ctl);
    Twn__Envelope *m = NULL;
    for (int tries = 0; tries < 50 && !m; tries++) { /* the ROUTER may not be bound yet */
        fg_hello(&g, 0x1234);
        m = ph_fg_recv(&g, TWN__ENVELOPE__BODY_WELCOME, 0.2);
    }
    assert_non_null(m);
    assert_true(m->welcome->accepted);
    twn_msg_free(m);
    uint64_t lease, unit, lease2, unit2;
    uint32_t attempt, attempt2;
    fg_lease(&g, "first join", &lease, &unit, &attempt);
    assert_int_equal(attempt, 1);
    double expired0 = ph_metric("twn_lease_expiries_total", "lease=unit");

    /* the same join's Hello again: a Welcome, no lease (its credit is in use), nothing ended */
    fg_hello(&g, 0x1234);
    m = ph_fg_recv(&g, TWN__ENVELOPE__BODY_WELCOME, 5.0);
    assert_non_null(m);
    assert_true(m->welcome->accepted);
    twn_msg_free(m);
    m = ph_fg_recv(&g, TWN__ENVELOPE__BODY_UNIT_LEASE, 0.5);
    if (m)
        fail_msg("the same join's Hello got unit %llu leased again (attempt %u)",
                 (unsigned long long)m->unit_lease->unit_id, m->unit_lease->attempt);
    assert_true(ph_metric("twn_lease_expiries_total", "lease=unit") - expired0 == 0);

    /* a new join (a restart): the lease of the previous one ends and its unit comes again */
    fg_hello(&g, 0x5678);
    m = ph_fg_recv(&g, TWN__ENVELOPE__BODY_WELCOME, 5.0);
    assert_non_null(m);
    twn_msg_free(m);
    fg_lease(&g, "new join", &lease2, &unit2, &attempt2);
    assert_true(lease2 != lease);
    assert_true(unit2 == unit);
    assert_int_equal(attempt2, 2);
    double expired = 0; /* the metrics follow the leases within 0.1 s */
    for (int i = 0; i < 100 && expired < 1; i++, ph_nap(0.01))
        expired = ph_metric("twn_lease_expiries_total", "lease=unit") - expired0;
    assert_true(expired == 1);

    stop = 1; /* the coordinator returns "stopped" */
    ph_role_join(&c, 30);
    ph_fake_gate_close(&g);
    zmq_ctx_term(zctx);
    assert_non_null(strstr(c.err.msg, "stopped"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_hello_again, ph_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
