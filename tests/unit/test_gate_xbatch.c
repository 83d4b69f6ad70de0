/* test_gate_xbatch.c — the gate fills each pass across the unit leases it holds
 * (gate_service/gate.h): units smaller than gate.batch do not make part-empty passes.
 *
 *  - A job over 3,000 items in units of 5 (600 units), gate.batch 32, gate.credits 16 (the
 *    coordinator grants 16 leases at the Hello and one more per Finished, so the gate holds up to
 *    80 items), one gate paced like a GPU gate (the null engine at 250 us per item), a reasoning
 *    worker and 2 shards, as threads over ipc:// sockets.  Every id is in the index exactly once,
 *    every item went through one gate pass (twn_gate_batch_items_total), and the passes are at
 *    least 0.8 full: at most 3000 / (0.8 * 32) = 117 passes (ceil(3000 / 32) = 94 is the
 *    floor).  Gating unit by unit, as before, made 600 passes of 5 items.
 *  - A fake coordinator (a ROUTER, and a PULL as the only shard) leases 6 units of 5 items to a
 *    real gate: L0 first, then L1..L5 in one burst while the gate's first pass runs, so they share
 *    the second pass.  L2's lease has a deadline that passes during that pass and lease_ms 0 (no
 *    heartbeat renews it): the gate leaves L2's results out and gives L2 up
 *    (Finished{abandoned}); the other five units' items arrive exactly once (EmbeddingBatches and
 *    HardItems), each of their Finished after their HardItems, none of L2's items at all.
 *
 * A watchdog stops a job that does not finish within WATCHDOG_S (tests/unit/pipeline_harness.h),
 * and ends the process if its threads do not return WATCHDOG_GRACE_S later. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "common/source.h"
#include "common/source_io.h"
#include "common/transport.h"
#include "gate_service/null_engine.h"
#include "tests/testutil.h"
#include "tests/unit/pipeline_harness.h"
#include "tests/unit/shard_out.h"
#include "util/clock.h"
#include "util/mem.h"

#define WATCHDOG_S       120
#define WATCHDOG_GRACE_S 15

// ------------------------------------------------------------------------------------------------
// Small units through a real coordinator

enum { N_ITEMS = 3000, UNIT = 5, BATCH = 32, CREDITS = 16, SHARDS = 2, DIM = 16 };

static void test_small_units_fill_the_passes(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("gate-xbatch");
    char in[1024], out[1100];
    snprintf(in, sizeof in, "%s/items.jsonl", dir);
    snprintf(out, sizeof out, "%s/out", dir);
    FILE *f = fopen(in, "w");
    assert_non_null(f);
    for (int i = 0; i < N_ITEMS; i++)
        fprintf(f, "{\"id\": \"x%05d\", \"text\": \"item %d\"}\n", i, i);
    fclose(f);

    const char *inputs[1] = {in};
    ph_pipeline *p = ph_pipeline_new("small units", out, inputs, 1, SHARDS, 1, 1, DIM);
    ph_coord(p)->unit_items = UNIT;
    ph_coord(p)->expect_peers = SHARDS + 2;
    twn_role_cfg *gate = ph_gate(p, 0);
    gate->credits = CREDITS;
    gate->batch = BATCH;
    gate->null_item_us = 250; /* a pass costs 8 ms: leases come back meanwhile */
    p->deadline_s = WATCHDOG_S;
    p->grace_s = WATCHDOG_GRACE_S;
    double passes0 = ph_metric("twn_gate_batches_total", NULL);
    double items0 = ph_metric("twn_gate_batch_items_total", NULL);
    ph_pipeline_run(p); /* as twn run: coordinator, indexers, then stop the others */
    ph_pipeline_check(p);
    if (p->roles[0].status) fail_msg("coordinator: %s", p->roles[0].err.msg);
    const twn_coord_summary sum = *ph_summary(p);
    ph_pipeline_free(p);

    double passes = ph_metric("twn_gate_batches_total", NULL) - passes0;
    double items = ph_metric("twn_gate_batch_items_total", NULL) - items0;
    print_message("%d items in units of %d: %.0f gate passes, %.1f items per pass (%.0f%% of "
                  "gate.batch %d; %d passes at best)\n",
                  N_ITEMS, UNIT, passes, items / passes, 100.0 * items / passes / BATCH, BATCH,
                  (N_ITEMS + BATCH - 1) / BATCH);
    assert_int_equal((int)items, N_ITEMS); /* each item through exactly one pass */
    assert_true(passes >= (N_ITEMS + BATCH - 1) / BATCH);
    assert_true(items / passes >= 0.8 * BATCH); /* was 5 (one unit per pass) */

    assert_int_equal(sum.units, N_ITEMS / UNIT);
    assert_int_equal(sum.items, N_ITEMS);
    assert_int_equal(sum.easy + sum.hard, N_ITEMS);
    assert_true(sum.hard > 0);
    assert_int_equal(sum.rejected, 0);
    tp_shards s = tp_shards_read(out, SHARDS); /* fails on an id that is there twice */
    assert_int_equal(s.all.rows, N_ITEMS);
    for (int i = 0; i < N_ITEMS; i++) {
        char id[16];
        snprintf(id, sizeof id, "x%05d", i);
        if (!json_object_get(s.items, id)) fail_msg("%s is missing from the index", id);
    }
    tp_shards_free(&s);
}

// ------------------------------------------------------------------------------------------------
// One lease of a mixed pass runs out: a fake coordinator and shard

enum { F_UNITS = 6, F_ITEMS = F_UNITS * UNIT, F_SHORT = 2 /* L2 */, F_ITEM_US = 40000 };

typedef struct fake {
    void *router, *pull;
    twn_frame_opts fo;
    twn_peer_id gate;
    twn_src_units plan;
    int seen[F_ITEMS]; /* times each item arrived (EmbeddingItem or HardItem) */
    int hard_seen[F_ITEMS];
    int finished[F_UNITS]; /* 1 done, 2 abandoned */
    int hard_before_finish_ok;
    uint64_t lease_of[F_UNITS];
} fake;

static void fake_send(fake *f, Twn__Envelope *env) {
    twn_err e;
    if (twn_send_msg(f->router, &f->gate, env, &f->fo, &e)) fail_msg("fake coordinator: %s", e.msg);
}

static void fake_lease(fake *f, int k, uint64_t deadline_unix_ms, uint32_t lease_ms) {
    const twn_src_unit *u = &f->plan.v[k];
    Twn__SourceRef s = TWN__SOURCE_REF__INIT;
    twn_srcio_buf sb;
    twn_err e;
    if (twn_srcio_unit_to_proto(u, &s, &sb, &e)) fail_msg("%s", e.msg);
    Twn__UnitLease l = TWN__UNIT_LEASE__INIT;
    l.unit_id = u->id;
    l.source = &s;
    l.attempt = 1;
    l.lease_id = f->lease_of[k] = 100 + (uint64_t)k;
    l.deadline_unix_ms = deadline_unix_ms;
    l.lease_ms = lease_ms;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_UNIT_LEASE;
    env.unit_lease = &l;
    fake_send(f, &env);
}

/* Item `index` of the source (unit index / UNIT), seen once more. */
static void fake_item(fake *f, uint64_t unit, uint64_t index, int hard) {
    if (unit >= F_UNITS || index >= F_ITEMS || index / UNIT != unit)
        fail_msg("item %llu of unit %llu: not one the fake leased", (unsigned long long)index,
                 (unsigned long long)unit);
    f->seen[index]++;
    f->hard_seen[index] += hard;
}

/* Takes what the gate sent (control messages and the shard's batches) for up to timeout_s, or
 * until every lease is finished. */
static void fake_pump(fake *f, double timeout_s) {
    double end = twn_now() + timeout_s;
    for (;;) {
        int all = 1;
        for (int k = 0; k < F_UNITS; k++) all &= f->finished[k] != 0;
        if (all || twn_now() > end) return;
        zmq_pollitem_t pi[2] = {{f->router, 0, ZMQ_POLLIN, 0}, {f->pull, 0, ZMQ_POLLIN, 0}};
        if (zmq_poll(pi, 2, 20) <= 0) continue;
        twn_err e;
        Twn__Envelope *m = NULL;
        if (pi[1].revents & ZMQ_POLLIN) {
            if (twn_recv_msg(f->pull, 0, &f->fo, NULL, &m, &e) != TWN_RECV_MSG)
                fail_msg("fake shard: %s", e.msg);
            assert_int_equal(m->body_case, TWN__ENVELOPE__BODY_EMBEDDING_BATCH);
            const Twn__EmbeddingBatch *b = m->embedding_batch;
            for (size_t i = 0; i < b->n_items; i++)
                fake_item(f, b->items[i]->unit_id, b->items[i]->item_index, 0);
            twn_msg_free(m);
        }
        if (!(pi[0].revents & ZMQ_POLLIN)) continue;
        twn_peer_id from;
        if (twn_recv_msg(f->router, 0, &f->fo, &from, &m, &e) != TWN_RECV_MSG)
            fail_msg("fake coordinator: %s", e.msg);
        if (m->body_case == TWN__ENVELOPE__BODY_HARD_ITEMS) {
            const Twn__HardItems *h = m->hard_items;
            for (size_t i = 0; i < h->n_items; i++) {
                assert_int_equal(h->items[i]->ref->unit_id, h->unit_id); /* one unit per message */
                fake_item(f, h->unit_id, h->items[i]->ref->item_index, 1);
            }
        } else if (m->body_case == TWN__ENVELOPE__BODY_REJECTS) {
            fail_msg("unexpected Rejects (%zu)", m->rejects->n_items);
        } else if (m->body_case == TWN__ENVELOPE__BODY_FINISHED) {
            int k = (int)(m->finished->lease_id - 100);
            assert_true(k >= 0 && k < F_UNITS);
            if (f->finished[k]) fail_msg("lease L%d finished twice", k);
            f->finished[k] = m->finished->abandoned ? 2 : 1;
            /* the hard items of a finished unit came before its Finished (same socket) */
            for (int i = k * UNIT; i < (k + 1) * UNIT && !m->finished->abandoned; i++) {
                char id[16];
                snprintf(id, sizeof id, "f%02d", i);
                if (twn_null_hard(id) && !f->hard_seen[i]) f->hard_before_finish_ok = 0;
            }
        }
        twn_msg_free(m);
    }
}

static void test_abandoned_lease_in_a_mixed_pass(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("gate-xbatch-abandon");
    char in[1024], ctl[1200], shard[1200];
    snprintf(in, sizeof in, "%s/items.jsonl", dir);
    snprintf(ctl, sizeof ctl, "ipc://%s/control", dir);
    snprintf(shard, sizeof shard, "ipc://%s/shard-0", dir);
    FILE *fp = fopen(in, "w");
    assert_non_null(fp);
    int n_hard = 0;
    for (int i = 0; i < F_ITEMS; i++) {
        char id[16];
        snprintf(id, sizeof id, "f%02d", i);
        n_hard += twn_null_hard(id);
        fprintf(fp, "{\"id\": \"%s\", \"text\": \"fake %d\"}\n", id, i);
    }
    fclose(fp);
    assert_true(n_hard > 0 && n_hard < F_ITEMS); /* both kinds of output are exercised */

    fake *f = twn_calloc(1, sizeof *f);
    f->fo = twn_frame_opts_default();
    f->hard_before_finish_ok = 1;
    twn_err e;
    const char *paths[1] = {in};
    if (twn_src_plan_files(paths, 1, TWN_SRC_JSONL, UNIT, &f->plan, &e)) fail_msg("%s", e.msg);
    assert_int_equal(f->plan.n, F_UNITS);
    void *zctx = zmq_ctx_new();
    twn_sock_opts so = twn_sock_opts_default();
    so.linger_ms = 0;
    assert_non_null(f->router = twn_sock_new(zctx, ZMQ_ROUTER, &so, &e));
    assert_non_null(f->pull = twn_sock_new(zctx, ZMQ_PULL, &so, &e));
    assert_int_equal(twn_sock_bind(f->router, ctl, NULL, 0, &e), 0);
    assert_int_equal(twn_sock_bind(f->pull, shard, NULL, 0, &e), 0);

    static volatile int stop;
    stop = 0;
    ph_role g;
    memset(&g, 0, sizeof g);
    g.kind = PH_GATE;
    twn_role_cfg_default(&g.rc);
    g.rc.zctx = zctx;
    g.rc.control = ctl;
    g.rc.id = "gate-x";
    g.rc.credits = 8;
    g.rc.batch = BATCH;
    g.rc.null_dim = DIM;
    g.rc.null_item_us = F_ITEM_US;
    g.rc.stop = &stop;
    double passes0 = ph_metric("twn_gate_batches_total", NULL);
    double items0 = ph_metric("twn_gate_batch_items_total", NULL);
    ph_watchdog wd;
    ph_watchdog_start(&wd, &stop, NULL, "abandoned lease", WATCHDOG_S, WATCHDOG_GRACE_S);
    ph_role_start(&g);

    /* Hello -> Welcome (heartbeats every 50 ms; declared dead only after 5 s of silence) */
    assert_int_equal(ph_fake_coord_welcome(f->router, &f->fo, &f->gate, shard, 50), 8);

    /* L0 alone: the gate's first pass (5 x 40 ms).  L1..L5 come during it, so they share the
     * next pass (25 x 40 ms = 1 s).  L2 runs out 700 ms after it was sent (+ one heartbeat of
     * grace): after the gate took it (~150 ms), long before that pass ends (~1.15 s). */
    uint64_t far = twn_unix_ms() + 60000;
    fake_lease(f, 0, far, 60000);
    usleep(50 * 1000);
    for (int k = 1; k < F_UNITS; k++) {
        if (k == F_SHORT)
            fake_lease(f, k, twn_unix_ms() + 700, 0);
        else
            fake_lease(f, k, far, 60000);
    }
    fake_pump(f, 30);
    for (int k = 0; k < F_UNITS; k++)
        if (!f->finished[k]) fail_msg("no Finished for lease L%d", k);
    /* late outputs (a bug) would come within a moment */
    double late = twn_now() + 0.2;
    while (twn_now() < late) {
        Twn__Envelope *x = NULL;
        if (twn_recv_msg(f->pull, 20, &f->fo, NULL, &x, &e) == TWN_RECV_MSG) {
            for (size_t i = 0; i < x->embedding_batch->n_items; i++)
                fake_item(f, x->embedding_batch->items[i]->unit_id,
                          x->embedding_batch->items[i]->item_index, 0);
            twn_msg_free(x);
        }
    }
    Twn__Shutdown sd = TWN__SHUTDOWN__INIT;
    sd.reason = (char *)"job finished";
    Twn__Envelope env2 = TWN__ENVELOPE__INIT;
    env2.body_case = TWN__ENVELOPE__BODY_SHUTDOWN;
    env2.shutdown = &sd;
    fake_send(f, &env2);
    ph_role_join(&g, WATCHDOG_S + WATCHDOG_GRACE_S); /* the watchdog ends a hang first */
    if (ph_watchdog_end(&wd)) fail_msg("abandoned lease: not finished within %d s", WATCHDOG_S);
    if (g.status) fail_msg("gate: %s", g.err.msg);

    double passes = ph_metric("twn_gate_batches_total", NULL) - passes0;
    double items = ph_metric("twn_gate_batch_items_total", NULL) - items0;
    print_message("%.0f gate passes of %.0f items; finished:", passes, items);
    for (int k = 0; k < F_UNITS; k++)
        print_message(" L%d %s", k, f->finished[k] == 2 ? "abandoned" : "done");
    print_message("\n");
    assert_int_equal((int)items, F_ITEMS); /* L2's items were gated too, then left out */
    assert_true(passes <= 2);              /* so L2 shared its pass with others */
    for (int k = 0; k < F_UNITS; k++) assert_int_equal(f->finished[k], k == F_SHORT ? 2 : 1);
    for (int i = 0; i < F_ITEMS; i++) {
        int want = i / UNIT == F_SHORT ? 0 : 1;
        if (f->seen[i] != want)
            fail_msg("item f%02d (unit %d) arrived %d times; expected %d", i, i / UNIT, f->seen[i],
                     want);
    }
    assert_true(f->hard_before_finish_ok);

    twn_sock_close(f->router);
    twn_sock_close(f->pull);
    zmq_ctx_term(zctx);
    twn_src_units_free(&f->plan);
    twn_free(f);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_small_units_fill_the_passes, ph_teardown),
        cmocka_unit_test(test_abandoned_lease_in_a_mixed_pass),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
