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

static const char *MAKE_TAR = "import io, json, sys, tarfile\n"
                              "def add(t, name, data):\n"
                              "    ti = tarfile.TarInfo(name); ti.size = len(data); ti.mtime = 0\n"
                              "    t.addfile(ti, io.BytesIO(data))\n"
                              "n, every = int(sys.argv[2]), int(sys.argv[3])\n"
                              "with tarfile.open(sys.argv[1], 'w', format=tarfile.USTAR_FORMAT) "
                              "as t:\n"
                              "    k = 0\n"
                              "    for i in range(n):\n"
                              "        add(t, '%06d.txt' % k, ('tar item %d' % i).encode())\n"
                              "        add(t, '%06d.json' % k, json.dumps({'id': 't%05d' % "
                              "i}).encode())\n"
                              "        k += 1\n"
                              "        if i % every == every - 1:\n"
                              "            add(t, '%06d.txt' % k, b'bad item')\n"
                              "            add(t, '%06d.json' % k, b'{\"id\": broken')\n"
                              "            k += 1\n";

/* The inputs, once per process: DIR/items.jsonl and DIR/items.tar.  After every BAD_EVERY good
 * JSONL lines come two bad ones (not JSON; no id), after every BAD_EVERY/2 tar items one with a
 * broken .json member. */
static const char *make_inputs(void) {
    static char dir[1024];
    if (dir[0]) return dir;
    snprintf(dir, sizeof dir, "%s", tu_tmpdir("kill-in"));
    char p[1200], cmd[4096];
    snprintf(p, sizeof p, "%s/items.jsonl", dir);
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    for (int i = 0; i < N_JSONL; i++) {
        fprintf(f, "{\"id\": \"n%05d\", \"text\": \"item %d\"}\n", i, i);
        if (i % BAD_EVERY == BAD_EVERY - 1) {
            fprintf(f, "{\"id\": \"bad%d\", \"text\": oops}\n", i);
            fprintf(f, "{\"text\": \"no id after %d\"}\n", i);
        }
    }
    fclose(f);
    snprintf(p, sizeof p, "%s/make_tar.py", dir);
    tu_write(p, MAKE_TAR, strlen(MAKE_TAR));
    snprintf(cmd, sizeof cmd, "/usr/bin/python3 %s %s/items.tar %d %d 2>&1", p, dir, N_TAR,
             BAD_EVERY / 2);
    char *log = NULL;
    if (tu_run(cmd, &log)) fail_msg("making the tar: %s", log);
    free(log);
    return dir;
}

static const char *write_config(const char *dir, const char *control, char eps[SHARDS][256]) {
    static char path[1200];
    const char *in = make_inputs();
    char yaml[8192];
    int n = snprintf(yaml, sizeof yaml,
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
    for (int s = 0; s < SHARDS; s++)
        n += snprintf(yaml + n, sizeof yaml - (size_t)n, "    - %s\n", eps[s]);
    snprintf(path, sizeof path, "%s/job.yaml", dir);
    tu_write(path, yaml, strlen(yaml));
    return path;
}

// ------------------------------------------------------------------------------------------------
// Randomness (seeded, printed) and the coordinator's progress

static uint64_t rng_state;

static uint32_t rnd(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (uint32_t)((z ^ (z >> 31)) >> 32);
}

static double rnd_uniform(double lo, double hi) {
    return lo + (hi - lo) * (double)rnd() / 4294967296.0;
}

static void seed_for(const char *test) {
    const char *s = getenv("TWN_TEST_SEED");
    uint32_t seed = s && *s ? (uint32_t)strtoul(s, NULL, 0)
                            : (uint32_t)(time(NULL) ^ ((uint32_t)getpid() << 16));
    rng_state = seed ^ twn_hash64(test, strlen(test)); /* each scenario its own points */
    printf("[   SEED   ] %s: TWN_TEST_SEED=%u\n", test, seed);
    fflush(stdout);
}

/* GET http://127.0.0.1:port/metrics: the value of the sample line starting with `name ` (a
 * metric name with its labels), or -1 when the server does not answer (not up yet, or gone). */
static double metric(int port, const char *name) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) return -1;
    struct timeval tv = {2, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons((uint16_t)port);
    double v = -1;
    static char buf[1 << 18];
    size_t n = 0;
    const char *req = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if (connect(s, (struct sockaddr *)&a, sizeof a) || write(s, req, strlen(req)) < 0) goto out;
    for (ssize_t got; n < sizeof buf - 1 && (got = read(s, buf + n, sizeof buf - 1 - n)) > 0;)
        n += (size_t)got;
    buf[n] = 0;
    char key[256];
    snprintf(key, sizeof key, "\n%s ", name);
    const char *p = strstr(buf, key);
    if (p) v = strtod(p + strlen(key), NULL);
out:
    close(s);
    return v;
}

#define UNITS_DONE "twn_job_units{state=\"done\"}"

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
    char name[32], listen[64];
    snprintf(name, sizeof name, "coordinator-%d", f->coord_runs++);
    f->coord_port = tp_free_port();
    snprintf(listen, sizeof listen, "127.0.0.1:%d", f->coord_port);
    return f->coord = tp_spawn(name, f->dir, TWN_BIN, "coordinator", "--config", f->cfg,
                               "--metrics.listen", listen, NULL);
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
    double end = tp_now() + timeout_s;
    while (tp_now() < end) {
        if (tp_poll(f->coord)) return -1;
        double d = metric(f->coord_port, UNITS_DONE);
        if (d >= units) return 0;
        tp_sleep_ms(3);
    }
    return -1;
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
        printf("[  RE-RUN  ] a restarted process joined after the end: the coordinator again\n");
        fflush(stdout);
        start_coordinator(f);
    }
    if (tp_wait_all(120)) fail_msg("processes did not end by themselves:%s", tp_report());
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
    char *log = tp_log(f->coord);
    unsigned long long u, items, easy, hard, rejected;
    const char *line = strstr(log, "units ");
    if (!line) fail_msg("no summary line in the last coordinator's log:%s", tp_report());
    assert_int_equal(sscanf(line, "units %llu items %llu easy %llu hard %llu rejected %llu", &u,
                            &items, &easy, &hard, &rejected),
                     5);
    free(log);
    assert_int_equal(u, units);
    assert_int_equal(items, N_GOOD + N_BAD);
    assert_int_equal(easy + hard, N_GOOD);
    assert_int_equal(rejected, N_BAD);

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
    assert_int_equal(n_hard, (int)hard);
    tp_shards_free(&s);

    /* dead letters: each bad record once, by (path, index in its file) */
    snprintf(dl, sizeof dl, "%s/out/dead_letter.jsonl", f->dir);
    json_t *lines = tp_jsonl_read(dl);
    json_t *seen = json_object();
    size_t i;
    json_t *l;
    int jsonl = 0, tar = 0;
    json_array_foreach(lines, i, l) {
        json_t *ref = json_object_get(l, "ref");
        const char *path = json_string_value(json_object_get(ref, "path"));
        assert_non_null(path);
        char key[1400];
        snprintf(key, sizeof key, "%s#%lld", path,
                 (long long)json_number_value(json_object_get(ref, "index")));
        if (json_object_get(seen, key)) fail_msg("dead letter %s is in %s twice", key, dl);
        json_object_set_new(seen, key, json_true());
        jsonl += strstr(path, ".jsonl") != NULL;
        tar += strstr(path, ".tar") != NULL;
    }
    assert_int_equal(jsonl, N_BAD_JSONL);
    assert_int_equal(tar, N_BAD_TAR);
    assert_int_equal((int)json_array_size(lines), N_BAD);
    json_decref(seen);
    json_decref(lines);
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
    if (tcp) {
        snprintf(control, sizeof control, "tcp://127.0.0.1:%d", tp_free_port());
        for (int s = 0; s < SHARDS; s++)
            snprintf(eps[s], sizeof eps[s], "tcp://127.0.0.1:%d", tp_free_port());
    } else {
        snprintf(control, sizeof control, "ipc://%s/ctl", f.dir);
        for (int s = 0; s < SHARDS; s++)
            snprintf(eps[s], sizeof eps[s], "ipc://%s/shard-%d", f.dir, s);
    }
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
        at = rnd_uniform(at > 0 ? at + 0.05 : 0.05, 0.8 * (k + 1) / kills);
        if (wait_units(&f, at * units, 120))
            fail_msg("the job ended before %.0f%% of the units were done (the kill point):%s",
                     at * 100, tp_report());
        tp_sleep_ms((int)rnd_uniform(0, 20));
        int which = victim == R_GATE      ? (int)(rnd() % GATES)
                    : victim == R_INDEXER ? (int)(rnd() % SHARDS)
                                          : 0;
        tp_proc *v = victim == R_COORDINATOR ? f.coord
                     : victim == R_GATE      ? f.gate[which]
                     : victim == R_WORKER    ? f.worker
                                             : f.ix[which];
        double done = metric(f.coord_port, UNITS_DONE);
        if (tp_poll(v)) fail_msg("%s ended before the kill:%s", v->name, tp_report());
        tp_kill9(v);
        killed[k] = v;
        int pause = (int)rnd_uniform(0, 1500);
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
    snprintf(control, sizeof control, "ipc://%s/ctl", f.dir);
    for (int s = 0; s < SHARDS; s++) snprintf(eps[s], sizeof eps[s], "ipc://%s/shard-%d", f.dir, s);
    f.cfg = write_config(f.dir, control, eps);
    for (int s = 0; s < SHARDS; s++) start_role(&f, R_INDEXER, s, 0);
    for (int g = 0; g < GATES; g++) start_role(&f, R_GATE, g, 0);
    start_role(&f, R_WORKER, 0, 0);
    start_coordinator(&f);
    int which = (int)(rnd() % SHARDS), delay_us = (int)rnd_uniform(0, 4000);
    double end = tp_now() + 120;
    while (metric(f.coord_port, "twn_job_end_time_seconds") <= 0) {
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
    snprintf(control, sizeof control, "ipc://%s/ctl", f.dir);
    for (int s = 0; s < SHARDS; s++) snprintf(eps[s], sizeof eps[s], "ipc://%s/shard-%d", f.dir, s);
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
