/* test_role_lease.c — the lease clock gates and workers keep (gate_service/gate.h):
 * deadline_unix_ms + lease_ms from the coordinator become a local estimate, heartbeats sent
 * while a lease waited in the queue count, and silence past missed_beats means "declared dead".
 * End to end: a gate whose every batch outlasts missed_beats heartbeat intervals (the null
 * engine paced at 60 ms per item, 32 items per batch = 1.9 s, against 5 x 0.2 s) keeps its
 * leases because its pulse thread heartbeats during the batch; without it each attempt would be
 * lost and the items dead-lettered after 3 ("lease expired 3 times"). */
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include "coordinator/service.h"
#include "gate_service/gate.h"
#include "index/service.h"
#include "tests/testutil.h"
#include "util/clock.h"
#include "worker/worker.h"

static twn_role_conn conn(double beat_s, uint32_t missed) {
    twn_role_conn c;
    memset(&c, 0, sizeof c);
    twn_beat_init(&c.beat, beat_s, twn_now());
    c.missed_beats = missed;
    c.last_sent = twn_now();
    return c;
}

static void test_deadline_from_the_wire(void **st) {
    (void)st;
    twn_role_conn c = conn(0.05, 100);
    /* 200 ms left of a 200 ms lease: not overdue until deadline + one beat of grace */
    twn_role_lease_begin(&c, twn_unix_ms() + 200, 200);
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
     * just now: the coordinator renewed it to (then + lease_ms). */
    twn_role_lease_begin(&c, twn_unix_ms() - 5000, 1000);
    double o = twn_role_lease_overdue(&c);
    assert_true(o < -1.0 && o > -1.1);
    /* Without a recent message it is overdue at once. */
    c.last_sent = twn_now() - 10;
    twn_role_lease_begin(&c, twn_unix_ms() - 5000, 1000);
    assert_true(twn_role_lease_overdue(&c) > 0);
}

static void test_declared_dead_after_missed_beats(void **st) {
    (void)st;
    twn_role_conn c = conn(0.05, 2);
    twn_role_lease_begin(&c, twn_unix_ms() + 60000, 60000); /* a long lease */
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
    twn_role_lease_begin(&c, 0, 0);
    assert_true(twn_role_lease_overdue(&c) < -1e8);
}

typedef struct job {
    int kind; /* 0 coordinator, 1 indexer, 2 gate, 3 worker */
    twn_coord_cfg cc;
    twn_coord_summary sum;
    twn_indexer_cfg ic;
    twn_role_cfg rc;
    int status;
    twn_err err;
} job;

static void *job_main(void *arg) {
    job *j = arg;
    if (j->kind == 0)
        j->status = twn_coord_run(&j->cc, &j->sum, &j->err);
    else if (j->kind == 1)
        j->status = twn_indexer_run(&j->ic, &j->err);
    else if (j->kind == 2)
        j->status = twn_gate_run(&j->rc, &j->err);
    else
        j->status = twn_worker_run(&j->rc, &j->err);
    return NULL;
}

static void test_slow_batches_keep_their_leases(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("role-lease");
    char in[1024], out[1100], journal[1200], shard[1200];
    snprintf(in, sizeof in, "%s/items.jsonl", dir);
    snprintf(out, sizeof out, "%s/out", dir);
    snprintf(journal, sizeof journal, "%s/journal", out);
    snprintf(shard, sizeof shard, "%s/shard-00000", out);
    mkdir(out, 0755);
    FILE *f = fopen(in, "w");
    for (int i = 0; i < 64; i++) fprintf(f, "{\"id\": \"s%02d\", \"text\": \"slow %d\"}\n", i, i);
    fclose(f);
    static volatile int stop;
    void *zctx = zmq_ctx_new();
    const char *ep = "inproc://rl-shard-0", *ctl = "inproc://rl-control";
    const char *inputs[1] = {in};
    job j[4];
    memset(j, 0, sizeof j);
    twn_coord_cfg_default(&j[0].cc);
    j[0].cc.zctx = zctx;
    j[0].cc.endpoint = ctl;
    j[0].cc.inputs = inputs;
    j[0].cc.n_inputs = 1;
    j[0].cc.unit_items = 64;
    j[0].cc.journal_path = journal;
    j[0].cc.model_hash = "null";
    j[0].cc.shards = 1;
    j[0].cc.shard_endpoints = &ep;
    j[0].cc.heartbeat_s = 0.2; /* silent for > 1 s: declared dead */
    j[0].cc.missed_beats = 5;
    j[0].cc.stop = &stop;
    j[0].cc.expect_peers = 3;
    j[1].kind = 1;
    twn_indexer_cfg_default(&j[1].ic);
    j[1].ic.zctx = zctx;
    j[1].ic.control = ctl;
    j[1].ic.id = "indexer-0";
    j[1].ic.endpoint = ep;
    j[1].ic.dir = shard;
    j[1].ic.dim = 16;
    j[1].ic.model = j[1].ic.model_hash = "null";
    j[1].ic.stop = &stop;
    for (int k = 2; k < 4; k++) {
        j[k].kind = k;
        twn_role_cfg_default(&j[k].rc);
        j[k].rc.zctx = zctx;
        j[k].rc.control = ctl;
        j[k].rc.id = k == 2 ? "gate-0" : "worker-0";
        j[k].rc.null_dim = 16;
        j[k].rc.null_item_us = 60000;
        j[k].rc.stop = &stop;
    }
    pthread_t th[4];
    pthread_create(&th[1], NULL, job_main, &j[1]);
    pthread_create(&th[0], NULL, job_main, &j[0]);
    for (int k = 2; k < 4; k++) pthread_create(&th[k], NULL, job_main, &j[k]);
    pthread_join(th[0], NULL);
    if (j[0].status) stop = 1;
    pthread_join(th[1], NULL);
    stop = 1;
    for (int k = 2; k < 4; k++) pthread_join(th[k], NULL);
    zmq_ctx_term(zctx);
    for (int k = 0; k < 4; k++)
        if (j[k].status) fail_msg("role %d: %s", k, j[k].err.msg);
    assert_int_equal(j[0].sum.items, 64);
    assert_int_equal(j[0].sum.rejected, 0); /* no lease lost to "declared dead" */
    assert_int_equal(j[0].sum.easy + j[0].sum.hard, 64);
    assert_true(j[0].sum.hard > 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_slow_batches_keep_their_leases),
        cmocka_unit_test(test_deadline_from_the_wire),
        cmocka_unit_test(test_queued_lease_renewed_by_heartbeats),
        cmocka_unit_test(test_declared_dead_after_missed_beats),
        cmocka_unit_test(test_no_deadline_on_the_wire),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
