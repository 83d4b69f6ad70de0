/* test_procs.c — the roles as separate processes (`twn coordinator|gate|worker|indexer`), started
 * from one YAML config the way a fleet would run them, over ipc:// and over tcp://127.0.0.1.
 *
 *  - 5,000 items (a JSONL file and a WebDataset tar), 3 shards, 2 gates, 1 reasoning worker, the
 *    null engine: every id exactly once over the shard outputs, the coordinator's summary line
 *    counts them all, and every process ends by itself with status 0 (gates first, so they wait
 *    for the coordinator; the coordinator last).
 *  - A gate that starts when no coordinator answers ends by itself with status 1 and says why.
 *  - `twn config --check` on a bad config: status 2 and the message naming key, value, origin.
 * Every wait has a deadline and leftovers are killed (procs.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/unit/corpus.h"
#include "tests/unit/procs.h"

#define N_JSONL 4000
#define N_TAR   1000
#define SHARDS  3

/* The inputs, once per process: DIR/items.jsonl (n00000..) and DIR/items.tar (t00000..). */
static const char *make_inputs(void) {
    static char dir[1024];
    if (!dir[0]) tc_numbered_inputs("procs-in", N_JSONL, 0, N_TAR, 0, dir, sizeof dir);
    return dir;
}

/* Writes DIR/job.yaml for a job with the given endpoints; returns its path (static). */
static const char *write_config(const char *dir, const char *control, char eps[SHARDS][256]) {
    const char *in = make_inputs();
    char yaml[8192];
    snprintf(yaml, sizeof yaml,
             "# written by test_procs.c\n"
             "job:\n"
             "  inputs:\n"
             "    - %s/items.jsonl\n"
             "    - %s/items.tar\n"
             "  out: %s/out\n"
             "  engine: null\n"
             "  dim: 16\n"
             "  shards: %d\n"
             "  unit_items: 250\n"
             "coordinator:\n"
             "  listen: %s\n"
             "  heartbeat_ms: 200\n"
             "  connect_timeout_ms: 60000\n"
             "indexer:\n"
             "  endpoints:\n",
             in, in, dir, SHARDS, control);
    return tp_job_yaml(dir, yaml, eps[0], sizeof eps[0], SHARDS);
}

/* Starts the fleet in an awkward order (gates and worker before anything they talk to), waits
 * for everyone, and checks the outputs. */
static void run_fleet(const char *dir, const char *cfg) {
    char shard[SHARDS][8];
    tp_proc *gate0 = tp_spawn("gate-0", dir, TWN_BIN, "gate", "--config", cfg, NULL);
    tp_proc *gate1 = tp_spawn("gate-1", dir, TWN_BIN, "gate", "--config", cfg, NULL);
    tp_proc *worker = tp_spawn("worker-0", dir, TWN_BIN, "worker", "--config", cfg, NULL);
    tp_proc *ix[SHARDS];
    for (int s = 0; s < SHARDS; s++) {
        char name[32];
        snprintf(shard[s], sizeof shard[s], "%d", s);
        snprintf(name, sizeof name, "indexer-%d", s);
        ix[s] = tp_spawn(name, dir, TWN_BIN, "indexer", "--config", cfg, "--shard", shard[s], NULL);
    }
    tp_proc *coord = tp_spawn("coordinator", dir, TWN_BIN, "coordinator", "--config", cfg, NULL);
    if (tp_wait_all(240)) fail_msg("processes did not end by themselves:%s", tp_report());
    tp_proc *all[] = {gate0, gate1, worker, ix[0], ix[1], ix[2], coord};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        if (all[i]->status)
            fail_msg("%s exited with %d:%s", all[i]->name, all[i]->status, tp_report());

    tp_summary sum = tp_summary_of(coord, "the coordinator's log");
    assert_int_equal(sum.units, N_JSONL / 250 + N_TAR / 250);
    assert_int_equal(sum.items, N_JSONL + N_TAR);
    assert_int_equal(sum.easy + sum.hard, N_JSONL + N_TAR);
    assert_int_equal(sum.rejected, 0);
    assert_true(sum.hard > 0 && sum.easy > 0); /* both the gates' and the worker's paths ran */

    char out[1200];
    snprintf(out, sizeof out, "%s/out", dir);
    tp_shards s = tp_shards_read(out, SHARDS); /* fails on any id seen twice */
    assert_int_equal(s.all.rows, N_JSONL + N_TAR);
    assert_int_equal(s.all.dim, 16);
    for (int k = 0; k < SHARDS; k++) assert_true(s.per_shard[k] > 0);
    char id[16];
    int n_hard = 0;
    for (int i = 0; i < N_JSONL + N_TAR; i++) {
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
}

static void test_fleet_over_ipc(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("procs-ipc");
    char control[256], eps[SHARDS][256];
    tp_endpoints(dir, 0, control, eps[0], sizeof eps[0], SHARDS);
    run_fleet(dir, write_config(dir, control, eps));
}

static void test_fleet_over_tcp(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("procs-tcp");
    char control[256], eps[SHARDS][256];
    tp_endpoints(dir, 1, control, eps[0], sizeof eps[0], SHARDS);
    run_fleet(dir, write_config(dir, control, eps));
}

/* Nobody answers at the control endpoint: the gate gives up after connect_timeout_ms. */
static void test_gate_without_coordinator_ends(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("procs-alone");
    char control[256], eps[SHARDS][256];
    tp_endpoints(dir, 0, control, eps[0], sizeof eps[0], SHARDS);
    const char *cfg = write_config(dir, control, eps);
    tp_proc *g = tp_spawn("gate", dir, TWN_BIN, "gate", "--config", cfg,
                          "--coordinator.connect_timeout_ms", "700", NULL);
    tp_proc *ix = tp_spawn("indexer", dir, TWN_BIN, "indexer", "--config", cfg, "--shard", "1",
                           "--coordinator.connect_timeout_ms", "700", NULL);
    if (tp_wait_all(30)) fail_msg("did not end by itself:%s", tp_report());
    assert_int_equal(g->status, 1);
    assert_int_equal(ix->status, 1);
    char *log = tp_log(g), want[600];
    snprintf(want, sizeof want,
             " no Welcome from the coordinator at %s within 700 ms (the job is over, or the "
             "coordinator is not running)\n",
             control);
    if (!strstr(log, want)) fail_msg("gate log: %s", log);
    free(log);
    log = tp_log(ix);
    snprintf(want, sizeof want, "twn indexer: indexer-1: no Welcome from the coordinator at %s",
             control);
    if (!strstr(log, want)) fail_msg("indexer log: %s", log);
    free(log);
    /* SIGTERM is the graceful stop: the role ends its loop, status 128 + 15 */
    g = tp_spawn("gate-term", dir, TWN_BIN, "gate", "--config", cfg, NULL);
    tp_sleep_ms(300);
    tp_signal(g, SIGTERM);
    assert_int_equal(tp_wait(g, 30), 0);
    assert_int_equal(g->status, 143);
}

static void test_config_command(void **st) {
    (void)st;
    const char *dir = tu_tmpdir("procs-config");
    char path[1200], cmd[4096];
    snprintf(path, sizeof path, "%s/bad.yaml", dir);
    const char *bad = "job:\n  out: /o\n  shards: many\n";
    tu_write(path, bad, strlen(bad));
    char *out = NULL;
    snprintf(cmd, sizeof cmd, "%s config --check %s 2>&1", TWN_BIN, path);
    assert_int_equal(tu_run(cmd, &out), 2);
    char want[1600];
    snprintf(want, sizeof want,
             "twn config: config: job.shards = \"many\" (from %s line 3): expected an integer "
             "1..65536\n",
             path);
    assert_string_equal(out, want);
    free(out);
    /* the flag wins over the file, secrets are redacted */
    snprintf(path, sizeof path, "%s/good.yaml", dir);
    const char *good = "job:\n  out: /o\n  shards: 5\n";
    tu_write(path, good, strlen(good));
    snprintf(cmd, sizeof cmd,
             "TWN_S3_SECRET_ACCESS_KEY=hunter2 %s config --check %s --shards 2 2>&1", TWN_BIN,
             path);
    assert_int_equal(tu_run(cmd, &out), 0);
    assert_non_null(strstr(out, "  shards: 2 "));
    assert_non_null(strstr(out, "# from flag --shards\n"));
    assert_non_null(strstr(out, "  secret_access_key: \"<redacted>\""));
    assert_null(strstr(out, "hunter2"));
    free(out);
    snprintf(cmd, sizeof cmd, "%s config --defaults", TWN_BIN);
    assert_int_equal(tu_run(cmd, &out), 0);
    assert_non_null(strstr(out, "\ncoordinator:\n"));
    assert_non_null(strstr(out, "  connect_timeout_ms: 60000\n"));
    free(out);
    /* a role refuses an inproc:// endpoint: it cannot reach another process */
    snprintf(cmd, sizeof cmd, "%s gate --coordinator.listen inproc://x 2>&1", TWN_BIN);
    assert_int_equal(tu_run(cmd, &out), 2);
    assert_string_equal(out, "twn gate: config: coordinator.listen = \"inproc://x\" (from flag "
                             "--coordinator.listen): a separate process needs an ipc:// or "
                             "tcp:// endpoint\n");
    free(out);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_config_command, tp_teardown),
        cmocka_unit_test_teardown(test_gate_without_coordinator_ends, tp_teardown),
        cmocka_unit_test_teardown(test_fleet_over_ipc, tp_teardown),
        cmocka_unit_test_teardown(test_fleet_over_tcp, tp_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
