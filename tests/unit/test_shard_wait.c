/* test_shard_wait.c — a sender held back by a full shard queue (gate.c wait_shard, the
 * back-pressure of DESIGN.md principle 4) still hears the coordinator's Shutdown.
 *
 * The flake this pins (test_kill_indexer, TWN_TEST_SEED=817857244, "gate-1 KILLED AT
 * DEADLINE"): a unit whose items an indexer lost in its kill -9 is leased again after
 * ack_timeout.  The coordinator closes that lease as soon as the items it lacked are acked
 * (coordinator/units.c pending_resolved), while the new holder is still sending the unit's other
 * items.  When that unit is the job's last, the coordinator sends Shutdown; the indexers stop
 * reading and exit; the holder's PUSH to a shard fills and it waited in wait_shard forever,
 * heartbeating but never reading its DEALER, so neither that Shutdown nor a re-run
 * coordinator's reached it.  A full shard must hold data back, never hold a role past the end.
 *
 * A fake coordinator (a ROUTER) and a PULL that is never read (an indexer finishing, or gone)
 * as the only shard, over inproc:// so the queue is exactly sndhwm + rcvhwm deep (1 + 1), and a
 * real gate thread (the null engine, 64 easy items, 4 per batch: 16 batches):
 *   - Shutdown while the gate waits on the full shard, then the shard goes away: the gate ends
 *     (status 0) within BOUND_S, says its goodbye, and never claims the lease (no Finished);
 *   - Shutdown queued right behind the lease (the gate takes it off the socket while it works,
 *     before the shard fills): the same;
 *   - no Shutdown: the full shard holds the gate back (no Finished while nothing is read), and
 *     once the shard is read every item arrives exactly once, then Finished (not abandoned).
 * Before the fix the first two waited until the test set the stop flag (the failure message
 * says so); a watchdog ends the process if a thread does not return at all. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "common/source.h"
#include "common/source_io.h"
#include "common/transport.h"
#include "gate_service/gate.h"
#include "tests/testutil.h"
#include "tests/unit/corpus.h"
#include "tests/unit/pipeline_harness.h"
#include "util/clock.h"
#include "util/mem.h"

#define N_ITEMS    64
#define BATCH      4
#define LEASE      7
#define BOUND_S    5.0 /* Shutdown to the gate's end (it notices within one 100 ms wait) */
#define WATCHDOG_S 60

static volatile int g_done;

static void *watchdog_main(void *arg) {
    for (int i = 0; i < WATCHDOG_S * 10 && !g_done; i++) usleep(100 * 1000);
    if (g_done) return NULL;
    fprintf(stderr, "%s: hung: a thread did not return within %d s\n", (const char *)arg,
            WATCHDOG_S);
    _exit(1);
}

typedef struct gate_job {
    twn_role_cfg rc;
    volatile int stop, ended;
    int status;
    twn_err err;
} gate_job;

static void *gate_main(void *arg) {
    gate_job *g = arg;
    g->status = twn_gate_run(&g->rc, &g->err);
    g->ended = 1;
    return NULL;
}

/* The fake coordinator and its shard. */
typedef struct fake {
    void *zctx, *router, *pull;
    twn_frame_opts fo;
    twn_peer_id gate;
    twn_src_units plan;
    int finished, abandoned, bye; /* what the gate said */
    int seen[N_ITEMS];            /* items that reached the shard */
    pthread_t th, wd;
    gate_job g;
} fake;

static void fake_send(fake *f, Twn__Envelope *env) {
    twn_err e;
    if (twn_send_msg(f->router, &f->gate, env, &f->fo, &e)) fail_msg("fake coordinator: %s", e.msg);
}

/* What the gate sent the coordinator (and, with read_shard, the shard) for timeout_s. */
static void fake_pump(fake *f, double timeout_s, int read_shard) {
    double end = twn_now() + timeout_s;
    while (twn_now() < end) {
        zmq_pollitem_t pi[2] = {{f->router, 0, ZMQ_POLLIN, 0}, {f->pull, 0, ZMQ_POLLIN, 0}};
        if (zmq_poll(pi, read_shard && f->pull ? 2 : 1, 10) <= 0) continue;
        twn_err e;
        Twn__Envelope *m = NULL;
        if (read_shard && f->pull && (pi[1].revents & ZMQ_POLLIN)) {
            if (twn_recv_msg(f->pull, 0, &f->fo, NULL, &m, &e) != TWN_RECV_MSG)
                fail_msg("fake shard: %s", e.msg);
            assert_int_equal(m->body_case, TWN__ENVELOPE__BODY_EMBEDDING_BATCH);
            for (size_t i = 0; i < m->embedding_batch->n_items; i++) {
                uint64_t k = m->embedding_batch->items[i]->item_index;
                assert_true(k < N_ITEMS);
                f->seen[k]++;
            }
            twn_msg_free(m);
        }
        if (!(pi[0].revents & ZMQ_POLLIN)) continue;
        if (twn_recv_msg(f->router, 0, &f->fo, NULL, &m, &e) != TWN_RECV_MSG)
            fail_msg("fake coordinator: %s", e.msg);
        if (m->body_case == TWN__ENVELOPE__BODY_FINISHED) {
            assert_int_equal(m->finished->lease_id, LEASE);
            f->finished++;
            f->abandoned += m->finished->abandoned;
        }
        if (m->body_case == TWN__ENVELOPE__BODY_SHUTDOWN) f->bye++;
        if (m->body_case == TWN__ENVELOPE__BODY_REJECTS ||
            m->body_case == TWN__ENVELOPE__BODY_HARD_ITEMS)
            fail_msg("unexpected %s: the items are all easy and good", twn_msg_name(m));
        twn_msg_free(m);
    }
}

/* A gate thread joined to a fake coordinator (heartbeats every 100 ms, declared dead only after
 * 10 s of silence), with one lease of the unit of N_ITEMS easy items sent. */
static fake *fake_start(const char *tag) {
    fake *f = twn_calloc(1, sizeof *f);
    const char *dir = tu_tmpdir(tag);
    static char in[1100], ctl[128], shard[128];
    snprintf(in, sizeof in, "%s/items.jsonl", dir);
    snprintf(ctl, sizeof ctl, "inproc://%s-control", tag);
    snprintf(shard, sizeof shard, "inproc://%s-shard-0", tag);
    tc_routed_jsonl(in, "w", N_ITEMS, 0);
    f->fo = twn_frame_opts_default();
    twn_err e;
    const char *paths[1] = {in};
    if (twn_src_plan_files(paths, 1, TWN_SRC_JSONL, N_ITEMS, &f->plan, &e)) fail_msg("%s", e.msg);
    assert_int_equal(f->plan.n, 1);
    f->zctx = zmq_ctx_new();
    twn_sock_opts so = twn_sock_opts_default();
    so.linger_ms = 0;
    so.rcvhwm = 1;
    assert_non_null(f->router = twn_sock_new(f->zctx, ZMQ_ROUTER, &so, &e));
    assert_non_null(f->pull = twn_sock_new(f->zctx, ZMQ_PULL, &so, &e));
    assert_int_equal(twn_sock_bind(f->router, ctl, NULL, 0, &e), 0);
    assert_int_equal(twn_sock_bind(f->pull, shard, NULL, 0, &e), 0);

    gate_job *g = &f->g;
    twn_role_cfg_default(&g->rc);
    g->rc.zctx = f->zctx;
    g->rc.control = ctl;
    g->rc.id = "gate-w";
    g->rc.credits = 1;
    g->rc.batch = BATCH;
    g->rc.null_dim = 8;
    g->rc.shard_credits = 1;
    g->rc.connect_timeout_s = 10;
    g->rc.stop = &g->stop;
    g_done = 0;
    pthread_create(&f->wd, NULL, watchdog_main, (void *)tag);
    pthread_create(&f->th, NULL, gate_main, g);

    ph_fake_coord_welcome(f->router, &f->fo, &f->gate, shard, 100);

    Twn__SourceRef s = TWN__SOURCE_REF__INIT;
    twn_srcio_buf sb;
    if (twn_srcio_unit_to_proto(&f->plan.v[0], &s, &sb, &e)) fail_msg("%s", e.msg);
    Twn__UnitLease l = TWN__UNIT_LEASE__INIT;
    l.unit_id = f->plan.v[0].id;
    l.source = &s;
    l.attempt = 2;
    l.lease_id = LEASE;
    l.deadline_unix_ms = twn_unix_ms() + 60000;
    l.lease_ms = 60000;
    Twn__Envelope le = TWN__ENVELOPE__INIT;
    le.body_case = TWN__ENVELOPE__BODY_UNIT_LEASE;
    le.unit_lease = &l;
    fake_send(f, &le);
    return f;
}

static void fake_shutdown(fake *f) {
    Twn__Shutdown sd = TWN__SHUTDOWN__INIT;
    sd.reason = (char *)"job finished";
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_SHUTDOWN;
    env.shutdown = &sd;
    fake_send(f, &env);
}

/* Waits up to BOUND_S for the gate thread to end by itself; if it does not, stops it (cfg.stop)
 * and fails.  Then it must have said goodbye and returned 0. */
static void expect_end(fake *f, const char *what) {
    double t0 = twn_now();
    while (!f->g.ended && twn_now() - t0 < BOUND_S) fake_pump(f, 0.02, 0);
    double took = twn_now() - t0;
    int ended = f->g.ended;
    if (!ended) f->g.stop = 1;
    pthread_join(f->th, NULL);
    g_done = 1;
    pthread_join(f->wd, NULL);
    if (!ended)
        fail_msg("%s: the gate did not end within %.0f s of the Shutdown (it waited on the full "
                 "shard without reading its DEALER); stopped by the flag: %s",
                 what, BOUND_S, f->g.status ? f->g.err.msg : "status 0");
    if (f->g.status) fail_msg("%s: the gate failed: %s", what, f->g.err.msg);
    fake_pump(f, 0.2, 0); /* its goodbye */
    print_message("%s: the gate ended %.0f ms after the Shutdown\n", what, took * 1000);
    assert_int_equal(f->bye, 1);
    assert_int_equal(f->finished, 0); /* the lease was not claimed done */
}

static void fake_free(fake *f) {
    twn_sock_close(f->router);
    if (f->pull) twn_sock_close(f->pull);
    zmq_ctx_term(f->zctx);
    twn_src_units_free(&f->plan);
    twn_free(f);
}

/* The gate waits on the full shard (nothing read for 300 ms: no Finished), the coordinator says
 * Shutdown, the indexer exits (its PULL closes: no peer will ever take the queue). */
static void test_shutdown_while_shard_full(void **st) {
    (void)st;
    fake *f = fake_start("shard-wait-full");
    fake_pump(f, 0.3, 0);
    assert_int_equal(f->finished, 0);
    assert_false(f->g.ended);
    fake_shutdown(f);
    twn_sock_close(f->pull);
    f->pull = NULL;
    expect_end(f, "Shutdown while waiting");
    fake_free(f);
}

/* The Shutdown is on the socket before the shard fills: the gate drains it into its stash
 * while it reads the unit (gate.c take_queued), then waits on the full shard. */
static void test_shutdown_taken_before_the_wait(void **st) {
    (void)st;
    fake *f = fake_start("shard-wait-early");
    fake_shutdown(f);
    expect_end(f, "Shutdown before the wait");
    fake_free(f);
}

/* No Shutdown: the full shard holds the gate back, and nothing is dropped. */
static void test_full_shard_holds_back(void **st) {
    (void)st;
    fake *f = fake_start("shard-wait-backpressure");
    fake_pump(f, 0.5, 0);
    assert_int_equal(f->finished, 0); /* held back: 16 batches, room for 2 */
    assert_false(f->g.ended);
    double end = twn_now() + 10;
    while (!f->finished && twn_now() < end) fake_pump(f, 0.05, 1);
    fake_pump(f, 0.1, 1); /* anything late */
    assert_int_equal(f->finished, 1);
    assert_int_equal(f->abandoned, 0);
    for (int i = 0; i < N_ITEMS; i++)
        if (f->seen[i] != 1) fail_msg("item %d reached the shard %d times", i, f->seen[i]);
    fake_shutdown(f);
    double t0 = twn_now();
    while (!f->g.ended && twn_now() - t0 < BOUND_S) fake_pump(f, 0.02, 1);
    if (!f->g.ended) f->g.stop = 1;
    pthread_join(f->th, NULL);
    g_done = 1;
    pthread_join(f->wd, NULL);
    assert_int_equal(f->g.status, 0);
    fake_pump(f, 0.2, 0);
    assert_int_equal(f->bye, 1);
    fake_free(f);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shutdown_while_shard_full),
        cmocka_unit_test(test_shutdown_taken_before_the_wait),
        cmocka_unit_test(test_full_shard_holds_back),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
