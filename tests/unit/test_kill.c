/* test_kill.c — kill -9 of each role at a random point of a job run as separate processes
 * (DESIGN.md §3 principle 3: "any process can be kill -9ed at any moment and the job still
 * finishes correctly"), then a restart the way an operator would do it (same config; the
 * indexer with its shard, so the same id; a gate or worker as a new process).
 *
 * The job: a JSONL file and a WebDataset tar with some bad records among the good ones, the
 * null engine (about 20% of the items routed hard, so the worker has work), 3 shards, 2 gates,
 * 1 reasoning worker, small units so that "a random point" falls inside the job.  Each test
 * waits until a random fraction of the units is done (the coordinator's /metrics), kills one
 * process of its role, restarts it after a random pause, and waits for every process to end by
 * itself.  Then, whatever the kill hit:
 *   - every good id is in exactly one shard output exactly once (tp_shards_read fails on a
 *     duplicate) and the outputs hold exactly the good ids;
 *   - dead_letter.jsonl holds each bad record exactly once;
 *   - every process exited 0, the killed one 137;
 *   - the last coordinator's summary line counts all units and items, easy + hard = good items,
 *     rejected = bad records, and hard = the items the index holds as hard.
 * The seed of the random points is printed ("TWN_TEST_SEED=N"); set TWN_TEST_SEED to replay it,
 * and TWN_TEST_FILTER (a cmocka pattern, "*gate*") to run one scenario.
 * One cmocka test per scenario, so a failure names the role. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/unit/corpus.h"
#include "tests/unit/procs.h"
#include "util/hash.h"

#define N_JSONL      4000 /* good JSONL lines: ids n00000.. */
#define N_TAR        1000 /* good tar items: ids t00000.. */
#define BAD_EVERY    400  /* a bad JSONL line after every this many good ones, a bad tar item too */
#define N_BAD_JSONL  (2 * (N_JSONL / BAD_EVERY))
#define N_BAD_TAR    (N_TAR / (BAD_EVERY / 2))
#define N_GOOD       (N_JSONL + N_TAR)
#define N_BAD        (N_BAD_JSONL + N_BAD_TAR)
#define UNIT_ITEMS   40
#define NULL_ITEM_US 500 /* the null engine's pace: the job takes a few seconds, not 0.2 s */
#define SHARDS       3
#define GATES        2

// ------------------------------------------------------------------------------------------------
// Inputs and config

/* The inputs, once per process: DIR/items.jsonl and DIR/items.tar.  After every BAD_EVERY good
 * JSONL lines come two bad ones (not JSON; no id), after every BAD_EVERY/2 tar items one with a
 * broken .json member (corpus.h). */
static const char *make_inputs(void) {
    static char dir[1024];
    if (!dir[0])
        tc_numbered_inputs("kill-in", N_JSONL, BAD_EVERY, N_TAR, BAD_EVERY / 2, dir, sizeof dir);
    return dir;
}

static const char *write_config(const char *dir, const char *control, char eps[SHARDS][256]) {
    const char *in = make_inputs();
    char yaml[8192];
    snprintf(yaml, sizeof yaml,
             "# written by test_kill.c\n"
             "job:\n"
             "  inputs:\n"
             "    - %s/items.jsonl\n"
             "    - %s/items.tar\n"
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
             "  ack_timeout_ms: 5000\n"
             "  hard_batch: 16\n"
             "  connect_timeout_ms: 60000\n"
             "gate:\n"
             "  credits: 1\n"
             "  batch: 8\n"
             "worker:\n"
             "  credits: 1\n"
             "  batch: 8\n"
             "indexer:\n"
             "  commit_ms: 10\n"
             "  credits: 2\n"
             "  endpoints:\n",
             in, in, dir, NULL_ITEM_US, SHARDS, UNIT_ITEMS, control);
    return tp_job_yaml(dir, yaml, eps[0], sizeof eps[0], SHARDS);
}

// ------------------------------------------------------------------------------------------------
// Randomness (seeded, printed; procs.h)

static void seed_for(const char *test) {
    uint32_t seed = tp_test_seed();
    tp_rng = seed ^ twn_hash64(test, strlen(test)); /* each scenario its own points */
    printf("[   SEED   ] %s: TWN_TEST_SEED=%u\n", test, seed);
    fflush(stdout);
}

// ------------------------------------------------------------------------------------------------
// The fleet

typedef enum { R_COORDINATOR, R_GATE, R_WORKER, R_INDEXER } role;
static const char *const role_name[] = {"coordinator", "gate", "worker", "indexer"};

typedef struct fleet {
    const char *dir, *cfg;
    tp_proc *coord;
    int coord_port; /* the current coordinator's /metrics */
    int coord_runs;
    tp_proc *gate[GATES], *worker, *ix[SHARDS];
    int restarts;
} fleet;

static tp_proc *start_coordinator(fleet *f) {
    char name[32];
    snprintf(name, sizeof name, "coordinator-%d", f->coord_runs++);
    return f->coord = tp_spawn_coordinator(name, f->dir, f->cfg, &f->coord_port);
}

static tp_proc *start_role(fleet *f, role r, int k, int run) {
    char name[48], shard[8];
    snprintf(name, sizeof name, "%s-%d%s", role_name[r], k, run ? "-restarted" : "");
    if (run > 1) snprintf(name + strlen(name), sizeof name - strlen(name), "%d", run);
    snprintf(shard, sizeof shard, "%d", k);
    switch (r) {
    case R_GATE:
        return f->gate[k] = tp_spawn(name, f->dir, TWN_BIN, "gate", "--config", f->cfg, NULL);
    case R_WORKER:
        return f->worker = tp_spawn(name, f->dir, TWN_BIN, "worker", "--config", f->cfg, NULL);
    case R_INDEXER:
        return f->ix[k] = tp_spawn(name, f->dir, TWN_BIN, "indexer", "--config", f->cfg, "--shard",
                                   shard, NULL);
    default:
        return start_coordinator(f);
    }
}

/* Waits until the current coordinator reports at least `units` units done.  -1: it ended (or
 * the deadline passed) first. */
static int wait_units(fleet *f, double units, double timeout_s) {
    double last;
    return tp_wait_metric(f->coord, f->coord_port, TP_UNITS_DONE, units, timeout_s, &last);
}

static void expect_units(int *units) {
    /* JSONL lines and tar items, UNIT_ITEMS per unit, per file */
    int jl = N_JSONL + N_BAD_JSONL, tr = N_TAR + N_BAD_TAR;
    *units = (jl + UNIT_ITEMS - 1) / UNIT_ITEMS + (tr + UNIT_ITEMS - 1) / UNIT_ITEMS;
}

/* The end of every scenario, as an operator would see it through: the coordinator ends; a process
 * restarted after it had stopped listening (a gate that joined as the job ended, an indexer
 * killed before its snapshot) still waits for a Welcome, so the coordinator is run again: a
 * re-run of a finished job tells everyone who says Hello to finish (an indexer then writes its
 * snapshot from the WAL). */
static void finish_job(fleet *f) {
    if (tp_wait(f->coord, 300)) fail_msg("the coordinator did not end:%s", tp_report());
    double end = tp_now() + 5;
    int running = 1;
    while (running && tp_now() < end) {
        running = 0;
        for (size_t i = 0; i < tp_nprocs; i++) running |= !tp_poll(&tp_procs[i]);
        if (running) tp_sleep_ms(10);
    }
    if (running) {
        printf("[  RE-RUN  ] a restarted process joined after the end: the coordinator again "
               "(still running:");
        for (size_t i = 0; i < tp_nprocs; i++)
            if (tp_procs[i].running) printf(" %s", tp_procs[i].name);
        printf(")\n");
        fflush(stdout);
        start_coordinator(f);
    }
    if (tp_wait_all(120)) { /* cmocka cuts long messages: the whole report on stdout first */
        printf("processes did not end by themselves:%s\n", tp_report());
        fflush(stdout);
        fail_msg("processes did not end by themselves (the report is above)");
    }
}

/* The checks every scenario ends with. */
static void check_outputs(fleet *f, tp_proc **killed, size_t n_killed) {
    for (size_t i = 0; i < tp_nprocs; i++) {
        tp_proc *p = &tp_procs[i];
        int was_killed = 0;
        for (size_t k = 0; k < n_killed; k++) was_killed |= killed[k] == p;
        if (p->status != (was_killed ? 137 : 0))
            fail_msg("%s exited with %d (expected %d):%s", p->name, p->status, was_killed ? 137 : 0,
                     tp_report());
    }
    int units;
    expect_units(&units);
    tp_summary sum = tp_summary_of(f->coord, "the last coordinator's log");
    assert_int_equal(sum.units, units);
    assert_int_equal(sum.items, N_GOOD + N_BAD);
    assert_int_equal(sum.easy + sum.hard, N_GOOD);
    assert_int_equal(sum.rejected, N_BAD);

    char out[1200], dl[1300];
    snprintf(out, sizeof out, "%s/out", f->dir);
    tp_shards s = tp_shards_read(out, SHARDS); /* fails on any id seen twice */
    assert_int_equal(s.all.rows, N_GOOD);
    assert_int_equal((int)json_object_size(s.items), N_GOOD);
    int n_hard = 0;
    char id[16];
    for (int i = 0; i < N_GOOD; i++) {
        if (i < N_JSONL)
            snprintf(id, sizeof id, "n%05d", i);
        else
            snprintf(id, sizeof id, "t%05d", i - N_JSONL);
        json_t *it = json_object_get(s.items, id);
        if (!it) fail_msg("%s is missing from the index", id);
        n_hard += !strcmp(json_string_value(json_object_get(it, "route")), "hard");
    }
    assert_int_equal(n_hard, (int)sum.hard);
    tp_shards_free(&s);

    /* dead letters: each bad record once, by (path, index in its file) */
    snprintf(dl, sizeof dl, "%s/out/dead_letter.jsonl", f->dir);
    json_t *seen = tp_dead_letter_refs(dl), *count;
    const char *key;
    int jsonl = 0, tar = 0, lines = 0;
    json_object_foreach(seen, key, count) {
        if (json_integer_value(count) != 1) fail_msg("dead letter %s is in %s twice", key, dl);
        assert_null(strstr(key, "(none)#")); /* every dead letter names its path */
        jsonl += strstr(key, ".jsonl#") != NULL;
        tar += strstr(key, ".tar#") != NULL;
        lines += (int)json_integer_value(count);
    }
    assert_int_equal(jsonl, N_BAD_JSONL);
    assert_int_equal(tar, N_BAD_TAR);
    assert_int_equal(lines, N_BAD);
    json_decref(seen);
}

/* One scenario: start the fleet, kill one process of `victim` (kills times, each at a later
 * random point; a restarted one may be the next victim), restart it, wait for the end, check. */
static void run_kill(const char *test, role victim, int kills, int tcp) {
    seed_for(test);
    char tag[64];
    snprintf(tag, sizeof tag, "kill-%s%s", test + strlen("test_kill_"), tcp ? "-tcp" : "");
    fleet f = {0};
    f.dir = tu_tmpdir(tag);
    char control[256], eps[SHARDS][256];
    tp_endpoints(f.dir, tcp, control, eps[0], sizeof eps[0], SHARDS);
    f.cfg = write_config(f.dir, control, eps);
    for (int s = 0; s < SHARDS; s++) start_role(&f, R_INDEXER, s, 0);
    for (int g = 0; g < GATES; g++) start_role(&f, R_GATE, g, 0);
    start_role(&f, R_WORKER, 0, 0);
    start_coordinator(&f);

    int units;
    expect_units(&units);
    tp_proc *killed[8];
    double at = 0;
    for (int k = 0; k < kills; k++) {
        /* a random point: a fraction of the units done, then a few ms more */
        at = tp_rnd_uniform(at > 0 ? at + 0.05 : 0.05, 0.8 * (k + 1) / kills);
        if (wait_units(&f, at * units, 120))
            fail_msg("the job ended before %.0f%% of the units were done (the kill point):%s",
                     at * 100, tp_report());
        tp_sleep_ms((int)tp_rnd_uniform(0, 20));
        int which = victim == R_GATE      ? (int)(tp_rnd() % GATES)
                    : victim == R_INDEXER ? (int)(tp_rnd() % SHARDS)
                                          : 0;
        tp_proc *v = victim == R_COORDINATOR ? f.coord
                     : victim == R_GATE      ? f.gate[which]
                     : victim == R_WORKER    ? f.worker
                                             : f.ix[which];
        double done = tp_metric(f.coord_port, TP_UNITS_DONE);
        if (tp_poll(v)) fail_msg("%s ended before the kill:%s", v->name, tp_report());
        tp_kill9(v);
        killed[k] = v;
        int pause = (int)tp_rnd_uniform(0, 1500);
        printf("[   KILL   ] %s at %.0f/%d units done; restarted after %d ms\n", v->name, done,
               units, pause);
        fflush(stdout);
        tp_sleep_ms(pause);
        start_role(&f, victim, which, k + 1);
    }
    finish_job(&f);
    check_outputs(&f, killed, (size_t)kills);
}

/* The indexer killed while it finishes: the coordinator has every unit done and has sent
 * Shutdown; the indexers snapshot their shards (and answer only then).  The operator restarts
 * the indexer: the coordinator, still waiting for its answer, tells it to finish, or, when it
 * has ended, is run again (finish_job).  The restarted indexer replays its WAL and writes the
 * snapshot with every acked vector. */
static void test_kill_indexer_at_finish(void **st) {
    (void)st;
    seed_for(__func__);
    fleet f = {0};
    f.dir = tu_tmpdir("kill-indexer-at-finish");
    char control[256], eps[SHARDS][256];
    tp_endpoints(f.dir, 0, control, eps[0], sizeof eps[0], SHARDS);
    f.cfg = write_config(f.dir, control, eps);
    for (int s = 0; s < SHARDS; s++) start_role(&f, R_INDEXER, s, 0);
    for (int g = 0; g < GATES; g++) start_role(&f, R_GATE, g, 0);
    start_role(&f, R_WORKER, 0, 0);
    start_coordinator(&f);
    int which = (int)(tp_rnd() % SHARDS), delay_us = (int)tp_rnd_uniform(0, 4000);
    double end = tp_now() + 120;
    while (tp_metric(f.coord_port, "twn_job_end_time_seconds") <= 0) {
        if (tp_poll(f.coord) || tp_now() > end)
            fail_msg("the coordinator did not reach the end of the job:%s", tp_report());
        tp_sleep_ms(1);
    }
    struct timespec ts = {0, (long)delay_us * 1000};
    nanosleep(&ts, NULL);
    tp_proc *v = f.ix[which];
    if (tp_poll(v)) fail_msg("%s ended before the kill:%s", v->name, tp_report());
    tp_kill9(v);
    char p[1300];
    snprintf(p, sizeof p, "%s/out/shard-%05d/snap.tmp", f.dir, which);
    int in_snapshot = access(p, F_OK) == 0;
    snprintf(p, sizeof p, "%s/out/shard-%05d/CURRENT", f.dir, which);
    printf("[   KILL   ] %s %d us after the last unit was done (%s)\n", v->name, delay_us,
           in_snapshot       ? "while writing its snapshot"
           : access(p, F_OK) ? "before its snapshot"
                             : "after its snapshot");
    fflush(stdout);
    start_role(&f, R_INDEXER, which, 1);
    finish_job(&f);
    check_outputs(&f, &v, 1);
}

/* The coordinator writes a dead letter's line at once and journals it a few ms later (group
 * commit): killed in between, its restart rejects the item again.  The deterministic form of
 * that window: a finished job run again after its journal was lost.  Everything is redone, the
 * index still holds each id once (the shards replace), and dead_letter.jsonl still holds each
 * bad record once (the coordinator skips the lines the file already has). */
static void test_journal_lost_dead_letters_once(void **st) {
    (void)st;
    fleet f = {0};
    f.dir = tu_tmpdir("kill-journal-lost");
    char control[256], eps[SHARDS][256];
    tp_endpoints(f.dir, 0, control, eps[0], sizeof eps[0], SHARDS);
    f.cfg = write_config(f.dir, control, eps);
    for (int run = 0; run < 2; run++) {
        if (run) {
            char j[1300];
            snprintf(j, sizeof j, "%s/out/journal", f.dir);
            assert_int_equal(unlink(j), 0);
        }
        for (int s = 0; s < SHARDS; s++) start_role(&f, R_INDEXER, s, run);
        for (int g = 0; g < GATES; g++) start_role(&f, R_GATE, g, run);
        start_role(&f, R_WORKER, 0, run);
        start_coordinator(&f);
        finish_job(&f);
        check_outputs(&f, NULL, 0);
    }
}

static void test_kill_coordinator(void **st) {
    (void)st;
    run_kill(__func__, R_COORDINATOR, 1, 0);
}

static void test_kill_coordinator_twice_tcp(void **st) {
    (void)st;
    run_kill(__func__, R_COORDINATOR, 2, 1);
}

static void test_kill_gate(void **st) {
    (void)st;
    run_kill(__func__, R_GATE, 1, 0);
}

static void test_kill_worker(void **st) {
    (void)st;
    run_kill(__func__, R_WORKER, 1, 0);
}

static void test_kill_indexer(void **st) {
    (void)st;
    run_kill(__func__, R_INDEXER, 1, 0);
}

static void test_kill_indexer_tcp(void **st) {
    (void)st;
    run_kill(__func__, R_INDEXER, 1, 1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_kill_gate, tp_teardown),
        cmocka_unit_test_teardown(test_kill_worker, tp_teardown),
        cmocka_unit_test_teardown(test_kill_indexer, tp_teardown),
        cmocka_unit_test_teardown(test_kill_indexer_tcp, tp_teardown),
        cmocka_unit_test_teardown(test_kill_indexer_at_finish, tp_teardown),
        cmocka_unit_test_teardown(test_journal_lost_dead_letters_once, tp_teardown),
        cmocka_unit_test_teardown(test_kill_coordinator, tp_teardown),
        cmocka_unit_test_teardown(test_kill_coordinator_twice_tcp, tp_teardown),
    };
    const char *only = getenv("TWN_TEST_FILTER"); /* e.g. "*indexer*": one scenario */
    if (only && *only) cmocka_set_test_filter(only);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
