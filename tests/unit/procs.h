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
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tests/testutil.h"
#include "tests/unit/shard_out.h"
#include "util/mem.h"

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

#endif
