/* procs.h — a harness for tests that run the twn roles as real processes (`twn coordinator`,
 * `twn gate`, `twn worker`, `twn indexer`, see cli/cmd_roles.c), and read back what they wrote.
 *
 * Header-only (every function static inline) so a test includes it without a CMake change.
 * The rules it enforces, because a test that leaves a process behind poisons every later test:
 *
 *   - every process is spawned through tp_spawn and recorded in one table;
 *   - every wait has a deadline (tp_wait, tp_wait_all, tp_wait_log); a process still running at
 *     its deadline is killed with SIGKILL and reaped, and the wait reports the timeout;
 *   - tp_kill_all() kills and reaps whatever is still running; register it as the teardown of
 *     every test (cmocka_unit_test_teardown(test, tp_teardown)) so an assertion that fails
 *     mid-test (cmocka longjmps out of it) leaves no orphan; it also runs at exit.
 *
 * Typical use:
 *
 *     tp_proc *ix = tp_spawn("ix0", dir, TWN_BIN, "indexer", "--config", cfg, "--shard", "0",
 * NULL); tp_proc *co = tp_spawn("coord", dir, TWN_BIN, "coordinator", "--config", cfg, NULL); if
 * (tp_wait_all(60)) fail_msg("%s", tp_report());     // every process, one deadline
 *     assert_int_equal(co->status, 0);
 *     char *log = tp_log(co);                                  // its stdout + stderr
 *     tp_shards s = tp_shards_read(out, 3);                    // fails on an id seen twice
 *
 * tp_kill9(p) is the fault-injection primitive (SIGKILL, then reaped, status 128 + 9);
 * tp_wait_log(p, "text", timeout) waits until a process has written something (e.g. a progress
 * line) before killing it.  tp_free_port() picks a free loopback TCP port by binding port 0. */
#ifndef TWN_TESTS_UNIT_PROCS_H
#define TWN_TESTS_UNIT_PROCS_H

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tests/testutil.h"
#include "tests/unit/shard_out.h"
#include "util/mem.h"
#include "util/vec.h"

// ------------------------------------------------------------------------------------------------
// Processes

#define TP_MAX_PROCS 64
#define TP_MAX_ARGS  64

typedef struct tp_proc {
    pid_t pid;
    char name[64];    /* for messages: "gate-0" */
    char log[1024];   /* its stdout + stderr: DIR/NAME.log */
    int running;      /* 1 until reaped */
    int status;       /* once reaped: the exit status, or 128 + signal when killed */
    double started_s; /* CLOCK_MONOTONIC at spawn */
} tp_proc;

static tp_proc tp_procs[TP_MAX_PROCS];
static size_t tp_nprocs;
static int tp_atexit_set;

static inline double tp_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline void tp_sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Reaps p if it has ended (non-blocking).  Returns 1 when p is no longer running. */
static inline int tp_poll(tp_proc *p) {
    if (!p->running) return 1;
    int st;
    pid_t r = waitpid(p->pid, &st, WNOHANG);
    if (r == 0) return 0;
    p->running = 0;
    if (r < 0)
        p->status = -1;
    else
        p->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return 1;
}

/* SIGKILL and reap (no-op for a reaped process).  status becomes 137 unless it had exited. */
static inline void tp_kill9(tp_proc *p) {
    if (!p->running) return;
    kill(p->pid, SIGKILL);
    int st;
    if (waitpid(p->pid, &st, 0) == p->pid)
        p->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    else
        p->status = -1;
    p->running = 0;
}

/* Sends a signal (SIGTERM / SIGINT: the roles' graceful stop); does not wait. */
static inline void tp_signal(tp_proc *p, int sig) {
    if (p->running) kill(p->pid, sig);
}

/* Kills and reaps every process still running. */
static inline void tp_kill_all(void) {
    for (size_t i = 0; i < tp_nprocs; i++) tp_kill9(&tp_procs[i]);
}

/* cmocka teardown: no process outlives its test; the table is emptied for the next one. */
static inline int tp_teardown(void **state) {
    (void)state;
    tp_kill_all();
    tp_nprocs = 0;
    return 0;
}

static inline void tp_atexit(void) {
    tp_kill_all();
}

/* Starts `prog arg...` (NULL-terminated) with stdout and stderr to DIR/NAME.log.  Asserts when it
 * cannot fork; an exec failure shows as exit status 127 with the reason in the log. */
static inline tp_proc *tp_spawn(const char *name, const char *dir, const char *prog, ...) {
    assert_true(tp_nprocs < TP_MAX_PROCS);
    if (!tp_atexit_set) {
        atexit(tp_atexit);
        tp_atexit_set = 1;
    }
    tp_proc *p = &tp_procs[tp_nprocs++];
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "%s", name);
    snprintf(p->log, sizeof p->log, "%s/%s.log", dir, name);
    char *argv[TP_MAX_ARGS + 2];
    int argc = 0;
    argv[argc++] = (char *)prog;
    va_list ap;
    va_start(ap, prog);
    for (const char *a; (a = va_arg(ap, const char *)) != NULL;) {
        assert_true(argc < TP_MAX_ARGS);
        argv[argc++] = (char *)a;
    }
    va_end(ap);
    argv[argc] = NULL;
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int fd = open(p->log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        execv(prog, argv);
        fprintf(stderr, "exec %s: %s\n", prog, strerror(errno));
        _exit(127);
    }
    p->pid = pid;
    p->running = 1;
    p->status = -1;
    p->started_s = tp_now();
    return p;
}

/* Waits up to timeout_s for p to end.  0: it ended (p->status); -1: it was still running, and
 * has been killed (SIGKILL) and reaped. */
static inline int tp_wait(tp_proc *p, double timeout_s) {
    double end = tp_now() + timeout_s;
    while (!tp_poll(p)) {
        if (tp_now() > end) {
            tp_kill9(p);
            return -1;
        }
        tp_sleep_ms(10);
    }
    return 0;
}

/* Waits up to timeout_s for every spawned process.  0: all ended by themselves; -1: some were
 * still running at the deadline and have been killed (see tp_report). */
static inline int tp_wait_all(double timeout_s) {
    double end = tp_now() + timeout_s;
    for (;;) {
        int all = 1;
        for (size_t i = 0; i < tp_nprocs; i++) all &= tp_poll(&tp_procs[i]);
        if (all) return 0;
        if (tp_now() > end) break;
        tp_sleep_ms(10);
    }
    for (size_t i = 0; i < tp_nprocs; i++)
        if (tp_procs[i].running) {
            tp_kill9(&tp_procs[i]);
            tp_procs[i].status = -2; /* marks "killed at the deadline" for tp_report */
        }
    return -1;
}

/* The whole log of p (stdout + stderr); free() it. */
static inline char *tp_log(const tp_proc *p) {
    FILE *f = fopen(p->log, "rb");
    if (!f) return strdup("");
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)(n > 0 ? n : 0) + 1);
    size_t got = fread(b, 1, (size_t)(n > 0 ? n : 0), f);
    b[got] = 0;
    fclose(f);
    return b;
}

/* Waits until p's log contains `text` (0), or until timeout_s / p's end (-1; nothing killed). */
static inline int tp_wait_log(tp_proc *p, const char *text, double timeout_s) {
    double end = tp_now() + timeout_s;
    for (;;) {
        char *l = tp_log(p);
        int found = strstr(l, text) != NULL;
        free(l);
        if (found) return 0;
        if (tp_poll(p) || tp_now() > end) return -1;
        tp_sleep_ms(20);
    }
}

/* One line per process: "name pid status (log tail)", for failure messages.  Static buffer. */
static inline const char *tp_report(void) {
    static char buf[16384];
    size_t o = 0;
    buf[0] = 0;
    for (size_t i = 0; i < tp_nprocs && o < sizeof buf - 1; i++) {
        tp_proc *p = &tp_procs[i];
        char *l = tp_log(p);
        size_t n = strlen(l);
        const char *tail = n > 600 ? l + n - 600 : l;
        o += (size_t)snprintf(buf + o, sizeof buf - o, "\n--- %s (pid %d) %s %d:\n%s", p->name,
                              (int)p->pid, p->status == -2 ? "KILLED AT DEADLINE, was" : "status",
                              p->status, tail);
        free(l);
        if (o >= sizeof buf) o = sizeof buf - 1;
    }
    return buf;
}

/* A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, read it, close). */
static inline int tp_free_port(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(s >= 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    assert_int_equal(bind(s, (struct sockaddr *)&a, sizeof a), 0);
    socklen_t len = sizeof a;
    assert_int_equal(getsockname(s, (struct sockaddr *)&a, &len), 0);
    close(s);
    return ntohs(a.sin_port);
}

// ------------------------------------------------------------------------------------------------
// A fleet's endpoints, its coordinator's progress and summary, seeded random points

/* The job's control endpoint and n shard endpoints (cap bytes each): fresh loopback ports
 * (tcp 1), or ipc:// sockets DIR/ctl and DIR/shard-S (tcp 0). */
static inline void tp_endpoints(const char *dir, int tcp, char *control, char *eps, size_t cap,
                                int n) {
    if (tcp) {
        snprintf(control, cap, "tcp://127.0.0.1:%d", tp_free_port());
        for (int s = 0; s < n; s++)
            snprintf(eps + (size_t)s * cap, cap, "tcp://127.0.0.1:%d", tp_free_port());
    } else {
        snprintf(control, cap, "ipc://%s/ctl", dir);
        for (int s = 0; s < n; s++)
            snprintf(eps + (size_t)s * cap, cap, "ipc://%s/shard-%d", dir, s);
    }
}

/* Writes DIR/job.yaml: `yaml` (the config up to and with indexer's "  endpoints:\n") and a
 * "    - EP" line for each of the n shard endpoints (cap bytes apart); its path (static). */
static inline const char *tp_job_yaml(const char *dir, const char *yaml, const char *eps,
                                      size_t cap, int n) {
    static char path[1200];
    twn_str y = {0};
    twn_str_puts(&y, yaml);
    for (int s = 0; s < n; s++) twn_str_printf(&y, "    - %s\n", eps + (size_t)s * cap);
    snprintf(path, sizeof path, "%s/job.yaml", dir);
    tu_write(path, y.v, y.n);
    twn_str_free(&y);
    return path;
}

/* GET http://127.0.0.1:port/metrics (2 s receive timeout): the value of the sample line
 * starting with `name ` (a metric name with its labels), or -1 when the server does not answer
 * (not up yet, or gone) or has no such line. */
static inline double tp_metric(int port, const char *name) {
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

/* A process's VmRSS and VmHWM in KiB, from /proc/PID/status (-1 each when it is gone). */
static inline void tp_proc_mem(pid_t pid, long *rss_kib, long *hwm_kib) {
    char path[64], line[256];
    *rss_kib = *hwm_kib = -1;
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f) return;
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, "VmRSS:", 6)) *rss_kib = strtol(line + 6, NULL, 10);
        if (!strncmp(line, "VmHWM:", 6)) *hwm_kib = strtol(line + 6, NULL, 10);
    }
    fclose(f);
}

/* The coordinator's /metrics sample of units done. */
#define TP_UNITS_DONE "twn_job_units{state=\"done\"}"

/* Spawns `twn coordinator --config cfg` as `name`, its /metrics on a fresh loopback *port. */
static inline tp_proc *tp_spawn_coordinator(const char *name, const char *dir, const char *cfg,
                                            int *port) {
    char listen[64];
    *port = tp_free_port();
    snprintf(listen, sizeof listen, "127.0.0.1:%d", *port);
    return tp_spawn(name, dir, TWN_BIN, "coordinator", "--config", cfg, "--metrics.listen", listen,
                    NULL);
}

/* Polls (every 3 ms) the /metrics sample `name` on port until it is >= at_least: 0; -1 when p
 * ended or timeout_s passed first.  *last: the last value read (-1: none). */
static inline int tp_wait_metric(tp_proc *p, int port, const char *name, double at_least,
                                 double timeout_s, double *last) {
    double end = tp_now() + timeout_s;
    *last = -1;
    while (tp_now() < end) {
        if (tp_poll(p)) return -1;
        if ((*last = tp_metric(port, name)) >= at_least) return 0;
        tp_sleep_ms(3);
    }
    return -1;
}

/* A coordinator's summary line ("units U items I easy E hard H rejected R"). */
typedef struct tp_summary {
    unsigned long long units, items, easy, hard, rejected;
} tp_summary;

/* The summary line in p's log; fails the test (with `what` and tp_report) when there is none. */
static inline tp_summary tp_summary_of(tp_proc *p, const char *what) {
    tp_summary s = {0};
    char *log = tp_log(p);
    const char *line = strstr(log, "units ");
    if (!line) fail_msg("no summary line in %s:%s", what, tp_report());
    assert_int_equal(sscanf(line, "units %llu items %llu easy %llu hard %llu rejected %llu",
                            &s.units, &s.items, &s.easy, &s.hard, &s.rejected),
                     5);
    free(log);
    return s;
}

/* Seeded random points (splitmix64): tp_test_seed() is $TWN_TEST_SEED, else time ^ pid; a test
 * sets tp_rng from it (and prints it, so a failure can be replayed). */
static uint64_t tp_rng;

static inline uint32_t tp_test_seed(void) {
    const char *s = getenv("TWN_TEST_SEED");
    return s && *s ? (uint32_t)strtoul(s, NULL, 0)
                   : (uint32_t)(time(NULL) ^ ((uint32_t)getpid() << 16));
}

static inline uint32_t tp_rnd(void) {
    uint64_t z = (tp_rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (uint32_t)((z ^ (z >> 31)) >> 32);
}

/* Uniform in [lo, hi). */
static inline double tp_rnd_uniform(double lo, double hi) {
    return lo + (hi - lo) * (double)tp_rnd() / 4294967296.0;
}

#endif
