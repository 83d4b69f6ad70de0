/* test_coord_stall.c — a process that stops being scheduled for longer than the liveness window
 * (coordinator.heartbeat_ms x missed_beats = 1 s here), the roles as real processes (procs.h),
 * the stall made exact with SIGSTOP / SIGCONT.  A loaded machine (a slow fsync, a starved CPU)
 * does the same by chance; test_kill_sources hung that way once in 31 runs.
 *
 *   - The coordinator stalls 1.8 s mid-job.  Its peers' heartbeats wait unread in its own queue
 *     meanwhile: that silence is the coordinator's, so nobody is declared dead and no lease
 *     expires (no peer logs "joining again", /metrics counts no peer lost and no lease expiry),
 *     and the job ends exactly once.
 *   - A gate stalls past the end of the job: the coordinator declares it dead, finishes with the
 *     other gate and ends.  The Shutdown it sent the dead gate too (it may only be slow) is there
 *     when the gate runs again: it ends with 0 at once, instead of joining a coordinator that is
 *     no more, forever.
 *   - A gate stalls across a coordinator kill -9 and the restart that finishes the job: the new
 *     coordinator never heard of it.  Run again, it joins again, gets no Welcome and ends with 1
 *     ("no Welcome from the coordinator ...") after coordinator.connect_timeout_ms, as a role that
 *     starts after the job ended does: no process waits forever. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/unit/corpus.h"
#include "tests/unit/procs.h"

#define N_ITEMS      3000
#define UNIT_ITEMS   20
#define UNITS        (N_ITEMS / UNIT_ITEMS)
#define NULL_ITEM_US 1000 /* about 1.5 s of gate time per gate: the job outlasts the stalls */
#define SHARDS       2
#define CONNECT_MS   4000 /* coordinator.connect_timeout_ms */
#define PEERS_LOST   "twn_coordinator_peers_lost_total"

typedef struct fleet {
    const char *dir, *cfg;
    tp_proc *coord, *gate[2], *worker, *ix[SHARDS];
    int port; /* the coordinator's /metrics */
} fleet;

static void start(fleet *f, const char *tag) {
    memset(f, 0, sizeof *f);
    f->dir = tu_tmpdir(tag);
    char in[1200], control[256], eps[SHARDS][256];
    snprintf(in, sizeof in, "%s/items.jsonl", f->dir);
    tc_numbered_jsonl(in, N_ITEMS, 0);
    tp_endpoints(f->dir, 1, control, eps[0], sizeof eps[0], SHARDS);
    char yaml[4096];
    snprintf(yaml, sizeof yaml,
             "# written by test_coord_stall.c\n"
             "job:\n"
             "  inputs:\n"
             "    - %s\n"
             "  out: %s/out\n"
             "  engine: null\n"
             "  null_item_us: %d\n"
             "  dim: 16\n"
             "  shards: %d\n"
             "  unit_items: %d\n"
             "coordinator:\n"
             "  listen: %s\n"
             "  heartbeat_ms: 200\n"
             "  missed_beats: 5\n"
             "  lease_ms: 5000\n"
             "  connect_timeout_ms: %d\n"
             "gate:\n"
             "  credits: 1\n"
             "  batch: 8\n"
             "worker:\n"
             "  credits: 1\n"
             "  batch: 8\n"
             "indexer:\n"
             "  commit_ms: 10\n"
             "  endpoints:\n",
             in, f->dir, NULL_ITEM_US, SHARDS, UNIT_ITEMS, control, CONNECT_MS);
    f->cfg = tp_job_yaml(f->dir, yaml, eps[0], sizeof eps[0], SHARDS);
    for (int k = 0; k < SHARDS; k++) {
        char name[16], shard[8];
        snprintf(name, sizeof name, "indexer-%d", k);
        snprintf(shard, sizeof shard, "%d", k);
        f->ix[k] =
            tp_spawn(name, f->dir, TWN_BIN, "indexer", "--config", f->cfg, "--shard", shard, NULL);
    }
    f->gate[0] = tp_spawn("gate-0", f->dir, TWN_BIN, "gate", "--config", f->cfg, NULL);
    f->gate[1] = tp_spawn("gate-1", f->dir, TWN_BIN, "gate", "--config", f->cfg, NULL);
    f->worker = tp_spawn("worker-0", f->dir, TWN_BIN, "worker", "--config", f->cfg, NULL);
    f->coord = tp_spawn_coordinator("coordinator-0", f->dir, f->cfg, &f->port);
    double done;
    if (tp_wait_metric(f->coord, f->port, TP_UNITS_DONE, UNITS / 8, 120, &done))
        fail_msg("the job ended (or never started) before %d units were done:%s", UNITS / 8,
                 tp_report());
}

/* Waits for every process but `skip` (NULL: all) to end by itself; each must have exited 0. */
static void wait_rest(const tp_proc *skip) {
    for (size_t i = 0; i < tp_nprocs; i++) {
        tp_proc *p = &tp_procs[i];
        if (p == skip || !strcmp(p->name, "coordinator-0-killed")) continue;
        if (tp_wait(p, 120)) fail_msg("%s did not end by itself:%s", p->name, tp_report());
        if (p->status) fail_msg("%s exited with %d:%s", p->name, p->status, tp_report());
    }
}

/* The index holds the N_ITEMS ids, each once (tp_shards_read fails on a duplicate). */
static void check_index(const fleet *f) {
    char out[1200];
    snprintf(out, sizeof out, "%s/out", f->dir);
    tp_shards sh = tp_shards_read(out, SHARDS);
    assert_int_equal((int)json_object_size(sh.items), N_ITEMS);
    for (int i = 0; i < N_ITEMS; i += 97) {
        char id[16];
        snprintf(id, sizeof id, "n%05d", i);
        if (!json_object_get(sh.items, id)) fail_msg("%s is missing from the index", id);
    }
    tp_shards_free(&sh);
}

static int log_has(const tp_proc *p, const char *text) {
    char *l = tp_log(p);
    int has = strstr(l, text) != NULL;
    free(l);
    return has;
}

static void test_coordinator_stalled(void **state) {
    (void)state;
    fleet f;
    start(&f, "stall-coordinator");
    kill(f.coord->pid, SIGSTOP);
    tp_sleep_ms(1800);
    kill(f.coord->pid, SIGCONT);
    tp_sleep_ms(300); /* its queue read, the window it would have expired peers in is past */
    double lost = tp_metric(f.port, PEERS_LOST);
    double expired = tp_metric(f.port, "twn_lease_expiries_total{lease=\"unit\"}") +
                     tp_metric(f.port, "twn_lease_expiries_total{lease=\"hard\"}");
    int running = !tp_poll(f.coord);
    wait_rest(NULL);
    if (running) { /* else the logs below tell */
        assert_true(lost == 0);
        assert_true(expired == 0); /* no lease blamed on its holder either */
    }
    for (size_t i = 0; i < tp_nprocs; i++)
        if (log_has(&tp_procs[i], "joining again"))
            fail_msg("%s was declared dead by a stalled coordinator:%s", tp_procs[i].name,
                     tp_report());
    tp_summary s = tp_summary_of(f.coord, "the coordinator's log");
    assert_int_equal(s.items, N_ITEMS);
    assert_int_equal(s.units, UNITS);
    check_index(&f);
}

static void test_gate_stalled_past_the_end(void **state) {
    (void)state;
    fleet f;
    start(&f, "stall-gate");
    tp_proc *g = f.gate[1];
    kill(g->pid, SIGSTOP);
    double lost;
    if (tp_wait_metric(f.coord, f.port, PEERS_LOST, 1, 30, &lost))
        fail_msg("the stopped gate was not declared dead (lost %.0f):%s", lost, tp_report());
    wait_rest(g); /* the job ends without it */
    kill(g->pid, SIGCONT);
    if (tp_wait(g, 10)) fail_msg("the gate stalled past the end never ended:%s", tp_report());
    if (g->status) fail_msg("the gate stalled past the end exited %d:%s", g->status, tp_report());
    tp_summary s = tp_summary_of(f.coord, "the coordinator's log");
    assert_int_equal(s.items, N_ITEMS);
    check_index(&f);
}

static void test_gate_stalled_across_a_restart(void **state) {
    (void)state;
    fleet f;
    start(&f, "stall-restart");
    tp_proc *g = f.gate[1];
    kill(g->pid, SIGSTOP);
    tp_kill9(f.coord);
    snprintf(f.coord->name, sizeof f.coord->name, "coordinator-0-killed");
    f.coord = tp_spawn_coordinator("coordinator-1", f.dir, f.cfg, &f.port);
    wait_rest(g); /* the new coordinator finishes the job with gate-0 */
    kill(g->pid, SIGCONT);
    double t0 = tp_now();
    if (tp_wait(g, CONNECT_MS / 1000.0 + 10))
        fail_msg("the gate that lost its coordinator never ended:%s", tp_report());
    double took = tp_now() - t0;
    assert_int_equal(g->status, 1);
    if (!log_has(g, "no Welcome from the coordinator"))
        fail_msg("the gate's log does not say why it ended:%s", tp_report());
    assert_true(took >= CONNECT_MS / 1000.0 - 0.5); /* it gave the coordinator its time */
    tp_summary s = tp_summary_of(f.coord, "the last coordinator's log");
    assert_int_equal(s.items, N_ITEMS);
    check_index(&f);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_coordinator_stalled, tp_teardown),
        cmocka_unit_test_teardown(test_gate_stalled_past_the_end, tp_teardown),
        cmocka_unit_test_teardown(test_gate_stalled_across_a_restart, tp_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
