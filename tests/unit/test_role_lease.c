/* test_role_lease.c — the lease clock gates and workers keep (gate_service/gate.h):
 * deadline_unix_ms + lease_ms from the coordinator become a local estimate, heartbeats sent
 * while a lease waited in the queue count, and silence past missed_beats means "declared dead".
 * End to end: a gate whose every batch outlasts missed_beats heartbeat intervals (the null
 * engine paced at 60 ms per item, 32 items per batch = 1.9 s, against 5 x 0.2 s) keeps its
 * leases because its pulse thread heartbeats during the batch; without it each attempt would be
 * lost and the items dead-lettered after 3 ("lease expired 3 times"). */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "gate_service/gate.h"
#include "tests/testutil.h"
#include "tests/unit/pipeline_harness.h"
#include "util/clock.h"

static twn_role_conn conn(double beat_s, uint32_t missed) {
    twn_role_conn c;
    memset(&c, 0, sizeof c);
    twn_beat_init(&c.beat, beat_s, twn_now());
    c.missed_beats = missed;
    c.last_sent = c.last_renewing = twn_now();
    return c;
}

static void test_deadline_from_the_wire(void **st) {
    (void)st;
    twn_role_conn c = conn(0.05, 100);
    /* 200 ms left of a 200 ms lease: not overdue until deadline + one beat of grace */
    twn_role_lease_begin(&c, 1, twn_unix_ms() + 200, 200, 0);
    double o = twn_role_lease_overdue(&c);
    assert_true(o < -0.2 && o > -0.3);
    usleep(300 * 1000);
    o = twn_role_lease_overdue(&c);
    assert_true(o > 0.0 && o < 1.0);
}

static void test_queued_lease_renewed_by_heartbeats(void **st) {
    (void)st;
    twn_role_conn c = conn(0.05, 100);
    /* The lease's own deadline passed while it waited in our queue, but we sent a heartbeat
     * just now that listed a moving lease: the coordinator renewed it to (then + lease_ms). */
    twn_role_lease_begin(&c, 1, twn_unix_ms() - 5000, 1000, 0);
    double o = twn_role_lease_overdue(&c);
    assert_true(o < -1.0 && o > -1.1);
    /* Our last heartbeats listed nothing that moved (a hung lease, or none): queued leases were
     * not renewed by them (coordinator/lease.h twn_leases_report), so it is overdue at once. */
    c.last_renewing = twn_now() - 10;
    twn_role_lease_begin(&c, 2, twn_unix_ms() - 5000, 1000, 0);
    assert_true(twn_role_lease_overdue(&c) > 0);
    /* Without a recent message at all, the same. */
    c.last_sent = twn_now() - 10;
    twn_role_lease_begin(&c, 3, twn_unix_ms() - 5000, 1000, 0);
    assert_true(twn_role_lease_overdue(&c) > 0);
}

static void test_declared_dead_after_missed_beats(void **st) {
    (void)st;
    twn_role_conn c = conn(0.05, 2);
    twn_role_lease_begin(&c, 1, twn_unix_ms() + 60000, 60000, 0); /* a long lease */
    assert_true(twn_role_lease_overdue(&c) < 0);
    c.last_sent = twn_now() - 0.2; /* silent for 4 beats > 2 missed + 1 of grace */
    assert_true(twn_role_lease_overdue(&c) > 0.0);
    c.last_sent = twn_now();
    c.rejoin = 1; /* joined again: leases from before are stale whatever their deadline */
    assert_true(twn_role_lease_overdue(&c) > 1e8);
}

static void test_no_deadline_on_the_wire(void **st) {
    (void)st;
    twn_role_conn c = conn(0.05, 0); /* an older coordinator: no deadline, no missed_beats */
    twn_role_lease_begin(&c, 1, 0, 0, 0);
    assert_true(twn_role_lease_overdue(&c) < -1e8);
}

/* A lease whose progress stands still for stall_ms is overdue whatever its deadline: the
 * coordinator stops renewing it then (a hung engine call), so late results are dropped. */
static void test_stalled_lease_overdue(void **st) {
    (void)st;
    twn_role_conn c = conn(0.05, 100);
    twn_role_lease_begin(&c, 7, twn_unix_ms() + 60000, 60000, 200);
    assert_int_equal(c.lease_progress, 1);
    double o = twn_role_lease_overdue(&c);
    assert_true(o < -0.2 && o > -0.3); /* 200 ms stall + 50 ms grace */
    usleep(150 * 1000);
    twn_role_lease_progress(&c, 7, 3); /* work done: the stall clock starts again */
    twn_role_lease_progress(&c, 8, 5); /* not ours: ignored */
    assert_int_equal(c.lease_progress, 4);
    usleep(150 * 1000);
    assert_true(twn_role_lease_overdue(&c) < 0);
    usleep(150 * 1000); /* 300 ms without progress */
    assert_true(twn_role_lease_overdue(&c) > 0);
    twn_role_lease_alive(&c);
    assert_int_equal(c.lease_progress, 5);
}

static void test_slow_batches_keep_their_leases(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("role-lease");
    char in[1024], out[1100];
    snprintf(in, sizeof in, "%s/items.jsonl", dir);
    snprintf(out, sizeof out, "%s/out", dir);
    FILE *f = fopen(in, "w");
    for (int i = 0; i < 64; i++) fprintf(f, "{\"id\": \"s%02d\", \"text\": \"slow %d\"}\n", i, i);
    fclose(f);
    const char *inputs[1] = {in};
    ph_pipeline *p = ph_pipeline_new("role-lease", out, inputs, 1, 1, 1, 1, 16);
    twn_coord_cfg *cc = ph_coord(p);
    cc->unit_items = 64;
    cc->dead_letter_path = NULL;
    cc->heartbeat_s = 0.2; /* silent for > 1 s: declared dead */
    cc->missed_beats = 5;
    cc->expect_peers = 3;
    for (int k = 0; k < 2; k++) ph_sender(p, k)->null_item_us = 60000;
    ph_pipeline_run(p);
    ph_pipeline_check(p);
    for (size_t k = 0; k < p->n; k++)
        if (p->roles[k].status) fail_msg("role %zu: %s", k, p->roles[k].err.msg);
    const twn_coord_summary *sum = ph_summary(p);
    assert_int_equal(sum->items, 64);
    assert_int_equal(sum->rejected, 0); /* no lease lost to "declared dead" */
    assert_int_equal(sum->easy + sum->hard, 64);
    assert_true(sum->hard > 0);
    ph_pipeline_free(p);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_slow_batches_keep_their_leases, ph_teardown),
        cmocka_unit_test(test_deadline_from_the_wire),
        cmocka_unit_test(test_queued_lease_renewed_by_heartbeats),
        cmocka_unit_test(test_declared_dead_after_missed_beats),
        cmocka_unit_test(test_no_deadline_on_the_wire),
        cmocka_unit_test(test_stalled_lease_overdue),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
