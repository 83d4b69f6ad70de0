/* pipeline_harness.h — the pipeline's roles (coordinator, indexers, gates, reasoning workers) as
 * threads of the test process over inproc://, with the null engine, the way `twn run` runs them;
 * for the tests that drive a whole job in process (test_run_sources, test_stream,
 * test_backpressure, test_role_lease, test_lease_expiry) or single roles (test_curve).
 *
 * Header-only (static inline) so a test includes it without a CMake change.  Prefix ph_.
 * The rules it keeps, because a role thread left running poisons every later test:
 *   - every wait has a deadline.  A job gets deadline_s (a watchdog thread then sets every stop
 *     flag and, if the threads have not returned grace_s later, ends the process naming the
 *     hang, so a hang never runs into ctest's timeout); the roles still running drain_s after
 *     the coordinator ended are released by shutting the context down; ph_role_join ends the
 *     process the same way when a thread does not return in time;
 *   - ph_teardown (a cmocka teardown) stops, joins and frees every pipeline a failed assertion
 *     left behind.
 *
 * Typical use:
 *
 *     ph_pipeline *p = ph_pipeline_new("run", out, inputs, 1, 3, 2, 2, 16); // shards, gates,
 *     ph_coord(p)->unit_items = 100;                                      // workers, dim
 *     for (int k = 0; k < p->gates + p->workers; k++) ph_sender(p, k)->io = &io;
 *     ph_pipeline_run(p);   // indexers, coordinator, gates and workers; waits; drains; joins
 *     ph_pipeline_check(p); // fails naming the deadline or a role that failed
 *     assert_int_equal(ph_summary(p)->items, 2300);
 *     ph_pipeline_free(p);
 *
 * Between ph_pipeline_new and the start every config may be changed (ph_coord, ph_indexer,
 * ph_gate, ph_worker, ph_sender); watch/user/watch_s/deadline_s/drain_s before ph_pipeline_wait.
 * ph_journal_counts reads the journal of a running or finished job (for watch callbacks). */
#ifndef TWN_TESTS_UNIT_PIPELINE_HARNESS_H
#define TWN_TESTS_UNIT_PIPELINE_HARNESS_H

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "common/metrics.h"
#include "coordinator/journal.h"
#include "coordinator/service.h"
#include "gate_service/gate.h"
#include "index/service.h"
#include "tests/testutil.h"
#include "util/clock.h"
#include "util/mem.h"
#include "worker/worker.h"

static inline void ph_nap(double s) {
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

// ------------------------------------------------------------------------------------------------
// One role as a thread

typedef enum ph_kind { PH_COORDINATOR, PH_INDEXER, PH_GATE, PH_WORKER, PH_SERVE } ph_kind;

typedef struct ph_role {
    ph_kind kind;
    twn_coord_cfg cc;               /* PH_COORDINATOR */
    twn_coord_summary sum;          /* the coordinator's summary, once it returned */
    twn_indexer_cfg ic;             /* PH_INDEXER */
    twn_role_cfg rc;                /* PH_GATE, PH_WORKER, PH_SERVE */
    twn_role_handler handler;       /* PH_SERVE: twn_role_serve(&rc, serve_role, serve_body, */
    int serve_role, serve_body;     /*   handler): a role whose messages the test handles */
    int hold;                       /* 1: ph_pipeline_start leaves it to the test's ph_role_start */
    int status;                     /* what the role's run function returned */
    volatile int finished;          /* 1 once it returned */
    twn_err err;                    /* its error when status != 0 */
    char id[32], ep[64], dir[1100]; /* storage for the configs' strings */
    pthread_t th;
    int started, joined;
} ph_role;

/* The thread function: runs r's role to its end (status, sum, err), then sets finished. */
static inline void *ph_role_main(void *arg) {
    ph_role *r = arg;
    switch (r->kind) {
    case PH_COORDINATOR:
        r->status = twn_coord_run(&r->cc, &r->sum, &r->err);
        break;
    case PH_INDEXER:
        r->status = twn_indexer_run(&r->ic, &r->err);
        break;
    case PH_GATE:
        r->status = twn_gate_run(&r->rc, &r->err);
        break;
    case PH_SERVE:
        r->status = twn_role_serve(&r->rc, r->serve_role, r->serve_body, r->handler, &r->err);
        break;
    default:
        r->status = twn_worker_run(&r->rc, &r->err);
        break;
    }
    r->finished = 1;
    return NULL;
}

/* Starts r's role in a thread of its own. */
static inline void ph_role_start(ph_role *r) {
    r->finished = 0;
    r->joined = 0;
    assert_int_equal(pthread_create(&r->th, NULL, ph_role_main, r), 0);
    r->started = 1;
}

/* Joins r's thread (a no-op when not started or joined); one that has not returned within
 * timeout_s ends the process with a message naming it (a thread cannot be killed). */
static inline void ph_role_join(ph_role *r, double timeout_s) {
    if (!r->started || r->joined) return;
    double end = twn_now() + timeout_s;
    while (!r->finished) {
        if (twn_now() > end) {
            static const char *const kinds[] = {"coordinator", "indexer", "gate", "worker", "role"};
            fprintf(stderr,
                    "pipeline_harness: %s %s did not return within %.0f s; ending the "
                    "process\n",
                    kinds[r->kind], r->id, timeout_s);
            fflush(NULL);
            _exit(1);
        }
        ph_nap(0.005);
    }
    pthread_join(r->th, NULL);
    r->joined = 1;
}

/* r as a coordinator outside any pipeline, for a test that plays its peers: the settings of
 * twn_coord_cfg_default, model hash "null", in zctx at `control`, its journal and dead letters
 * (NULL: none) at the paths given, one shard at *shard_ep, stopped by *stop.  ph_role_start it. */
static inline void ph_coord_alone(ph_role *r, void *zctx, const char *control,
                                  const char *const *inputs, size_t n_inputs, const char *journal,
                                  const char *dead, const char *const *shard_ep,
                                  volatile int *stop) {
    memset(r, 0, sizeof *r);
    r->kind = PH_COORDINATOR;
    snprintf(r->id, sizeof r->id, "coordinator");
    twn_coord_cfg_default(&r->cc);
    r->cc.zctx = zctx;
    r->cc.endpoint = control;
    r->cc.inputs = inputs;
    r->cc.n_inputs = n_inputs;
    r->cc.journal_path = journal;
    r->cc.dead_letter_path = dead;
    r->cc.model_hash = "null";
    r->cc.shards = 1;
    r->cc.shard_endpoints = shard_ep;
    r->cc.stop = stop;
}

// ------------------------------------------------------------------------------------------------
// A watchdog: stop flags set at a deadline, the process ended if that does not help

typedef struct ph_watchdog {
    volatile int *stop[2]; /* set at the deadline (NULL: none) */
    double deadline_s, grace_s;
    char what[128];
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;
    volatile int fired; /* the deadline passed */
    pthread_t th;
    int running;
} ph_watchdog;

static inline int ph_watchdog_sleep(ph_watchdog *w, double s) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    double t = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9 + s;
    ts.tv_sec = (time_t)t;
    ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
    pthread_mutex_lock(&w->mu);
    int rc = 0;
    while (!w->done && rc != ETIMEDOUT) rc = pthread_cond_timedwait(&w->cv, &w->mu, &ts);
    int done = w->done;
    pthread_mutex_unlock(&w->mu);
    return done;
}

static inline void *ph_watchdog_main(void *arg) {
    ph_watchdog *w = arg;
    if (ph_watchdog_sleep(w, w->deadline_s)) return NULL;
    w->fired = 1;
    for (int i = 0; i < 2; i++)
        if (w->stop[i]) *w->stop[i] = 1;
    if (ph_watchdog_sleep(w, w->grace_s)) return NULL;
    fprintf(stderr,
            "%s: hung: the job did not finish within %.0f s, and its threads did not return "
            "%.0f s after stop\n",
            w->what, w->deadline_s, w->grace_s);
    fflush(NULL);
    _exit(1);
}

/* Starts a watchdog: after deadline_s it sets *stop1 and *stop2 (either may be NULL) and
 * `fired`; grace_s later, unless ph_watchdog_end was called, it ends the process naming `what`. */
static inline void ph_watchdog_start(ph_watchdog *w, volatile int *stop1, volatile int *stop2,
                                     const char *what, double deadline_s, double grace_s) {
    memset(w, 0, sizeof *w);
    w->stop[0] = stop1;
    w->stop[1] = stop2;
    w->deadline_s = deadline_s;
    w->grace_s = grace_s;
    snprintf(w->what, sizeof w->what, "%s", what);
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    assert_int_equal(pthread_create(&w->th, NULL, ph_watchdog_main, w), 0);
    w->running = 1;
}

/* Ends the watchdog (at once); returns 1 when its deadline had passed. */
static inline int ph_watchdog_end(ph_watchdog *w) {
    if (!w->running) return w->fired;
    pthread_mutex_lock(&w->mu);
    w->done = 1;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->th, NULL);
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
    w->running = 0;
    return w->fired;
}

// ------------------------------------------------------------------------------------------------
// A job: coordinator + indexers + gates + workers in one ZeroMQ context

typedef struct ph_pipeline {
    int shards, gates, workers;
    size_t n;       /* 1 + shards + gates + workers */
    ph_role *roles; /* [0] coordinator, [1, 1 + shards) indexers, then gates, then workers */
    void *zctx;
    char what[64]; /* names the job in messages */
    char control[64], journal[1100], dead[1100];
    const char **eps;        /* the indexers' endpoints (the coordinator's shard_endpoints) */
    volatile int stop_coord; /* the coordinator's stop flag (cc.stop) */
    volatile int stop_rest;  /* the indexers', gates' and workers' */
    /* ph_pipeline_wait: set before it */
    int (*watch)(void *user, const char *journal); /* every watch_s while the coordinator runs;
                                                        returns 1 to stop it (NULL: none) */
    void *user;
    double watch_s;    /* 0.02 */
    double deadline_s; /* the whole job, from the start: 300 */
    double grace_s;    /* the threads' time to return after the deadline's stop: 15 */
    double drain_s;    /* the others' time to end after the coordinator ended well: 30 */
    /* results */
    int timed_out; /* the deadline stopped the job */
    int forced;    /* the context was shut down under roles still running after drain_s */
    ph_watchdog wd;
    int state; /* 0 new, 1 started, 2 waited */
} ph_pipeline;

#define PH_MAX_LIVE 8
static ph_pipeline *ph_live[PH_MAX_LIVE]; /* created and not freed: ph_teardown's */

/* The coordinator's, indexer s's, gate g's, worker w's config; sender k is gate k for k < gates,
 * else worker k - gates. */
static inline twn_coord_cfg *ph_coord(ph_pipeline *p) {
    return &p->roles[0].cc;
}
static inline twn_indexer_cfg *ph_indexer(ph_pipeline *p, int s) {
    return &p->roles[1 + s].ic;
}
static inline twn_role_cfg *ph_sender(ph_pipeline *p, int k) {
    return &p->roles[1 + p->shards + k].rc;
}
static inline twn_role_cfg *ph_gate(ph_pipeline *p, int g) {
    return ph_sender(p, g);
}
static inline twn_role_cfg *ph_worker(ph_pipeline *p, int w) {
    return ph_sender(p, p->gates + w);
}
/* The coordinator's summary (once the job ran). */
static inline const twn_coord_summary *ph_summary(const ph_pipeline *p) {
    return &p->roles[0].sum;
}

/* A job over inputs writing under `out` (created; journal, dead_letter.jsonl, shard-NNNNN/),
 * every role with the null engine at `dim`: the coordinator with the defaults of
 * twn_coord_cfg_default and model hash "null", indexers "indexer-S", gates "gate-G" and workers
 * "worker-W" with theirs.  Free with ph_pipeline_free. */
static inline ph_pipeline *ph_pipeline_new(const char *what, const char *out,
                                           const char *const *inputs, size_t n_inputs, int shards,
                                           int gates, int workers, int dim) {
    static int seq;
    int tag = ++seq;
    ph_pipeline *p = twn_calloc(1, sizeof *p);
    snprintf(p->what, sizeof p->what, "%s", what);
    p->shards = shards;
    p->gates = gates;
    p->workers = workers;
    p->n = 1 + (size_t)shards + (size_t)gates + (size_t)workers;
    p->roles = twn_calloc(p->n, sizeof *p->roles);
    p->eps = twn_calloc((size_t)(shards ? shards : 1), sizeof *p->eps);
    p->watch_s = 0.02;
    p->deadline_s = 300;
    p->grace_s = 15;
    p->drain_s = 30;
    snprintf(p->control, sizeof p->control, "inproc://ph-control-%d", tag);
    if (snprintf(p->journal, sizeof p->journal, "%s/journal", out) >= (int)sizeof p->journal ||
        snprintf(p->dead, sizeof p->dead, "%s/dead_letter.jsonl", out) >= (int)sizeof p->dead)
        fail_msg("%s: the output path %s is too long", what, out);
    mkdir(out, 0755);
    p->zctx = zmq_ctx_new();
    ph_role *c = &p->roles[0];
    c->kind = PH_COORDINATOR;
    snprintf(c->id, sizeof c->id, "coordinator");
    twn_coord_cfg_default(&c->cc);
    c->cc.zctx = p->zctx;
    c->cc.endpoint = p->control;
    c->cc.inputs = inputs;
    c->cc.n_inputs = n_inputs;
    c->cc.journal_path = p->journal;
    c->cc.dead_letter_path = p->dead;
    c->cc.model_hash = "null";
    c->cc.shards = (uint32_t)shards;
    c->cc.shard_endpoints = p->eps;
    c->cc.stop = &p->stop_coord;
    for (int s = 0; s < shards; s++) {
        ph_role *r = &p->roles[1 + s];
        r->kind = PH_INDEXER;
        snprintf(r->ep, sizeof r->ep, "inproc://ph-shard-%d-%d", tag, s);
        if (snprintf(r->dir, sizeof r->dir, "%s/shard-%05d", out, s) >= (int)sizeof r->dir)
            fail_msg("%s: the output path %s is too long", what, out);
        snprintf(r->id, sizeof r->id, "indexer-%d", s);
        p->eps[s] = r->ep;
        twn_indexer_cfg_default(&r->ic);
        r->ic.zctx = p->zctx;
        r->ic.control = p->control;
        r->ic.id = r->id;
        r->ic.endpoint = r->ep;
        r->ic.dir = r->dir;
        r->ic.shard = s;
        r->ic.n_shards = shards;
        r->ic.dim = dim;
        r->ic.model = "null";
        r->ic.model_hash = "null";
        r->ic.stop = &p->stop_rest;
    }
    for (int k = 0; k < gates + workers; k++) {
        ph_role *r = &p->roles[1 + shards + k];
        r->kind = k < gates ? PH_GATE : PH_WORKER;
        snprintf(r->id, sizeof r->id, k < gates ? "gate-%d" : "worker-%d",
                 k < gates ? k : k - gates);
        twn_role_cfg_default(&r->rc);
        r->rc.zctx = p->zctx;
        r->rc.control = p->control;
        r->rc.id = r->id;
        r->rc.null_dim = dim;
        r->rc.stop = &p->stop_rest;
    }
    for (int i = 0; i < PH_MAX_LIVE; i++)
        if (!ph_live[i]) {
            ph_live[i] = p;
            break;
        }
    return p;
}

/* Starts the watchdog (deadline_s), then the indexers, the coordinator, gates and workers (those
 * not on hold: the test starts those with ph_role_start(&p->roles[i]) later). */
static inline void ph_pipeline_start(ph_pipeline *p) {
    ph_watchdog_start(&p->wd, &p->stop_coord, &p->stop_rest, p->what, p->deadline_s, p->grace_s);
    p->state = 1;
    for (int s = 0; s < p->shards; s++)
        if (!p->roles[1 + s].hold) ph_role_start(&p->roles[1 + s]);
    ph_role_start(&p->roles[0]);
    for (size_t i = 1 + (size_t)p->shards; i < p->n; i++)
        if (!p->roles[i].hold) ph_role_start(&p->roles[i]);
}

/* Waits for the coordinator (calling watch every watch_s; 1 stops it), then for the indexers
 * (they got Shutdown and write their snapshots) and then stops gates and workers, as twn run
 * does.  A coordinator that failed takes the rest down at once, as if its process died; a role
 * still running drain_s after a good end (1 s after a failed one) is released by shutting the
 * context down (`forced`; said so).  Joins every thread; never fails the test itself. */
static inline void ph_pipeline_wait(ph_pipeline *p) {
    ph_role *c = &p->roles[0];
    while (!c->finished) {
        ph_nap(p->watch_s);
        if (p->watch && !p->stop_coord && !c->finished && p->watch(p->user, p->journal))
            p->stop_coord = 1;
    }
    ph_role_join(c, p->grace_s);
    if (c->status) p->stop_rest = 1;
    double until = twn_now() + (c->status ? 1.0 : p->drain_s);
    for (;;) {
        size_t left = 0, ix_left = 0;
        for (size_t i = 1; i < p->n; i++) left += !p->roles[i].finished;
        for (size_t i = 1; i <= (size_t)p->shards; i++) ix_left += !p->roles[i].finished;
        if (!left) break;
        if (twn_now() > until) {
            if (!c->status)
                printf("%s: %zu role(s) still running %.0f s after the coordinator ended; "
                       "shutting the context down\n",
                       p->what, left, p->drain_s);
            p->stop_rest = 1;
            ph_nap(0.5);
            zmq_ctx_shutdown(p->zctx);
            p->forced = 1;
            break;
        }
        if (!ix_left) p->stop_rest = 1; /* indexers first; then gates and workers stop */
        ph_nap(0.01);
    }
    for (size_t i = 1; i < p->n; i++) ph_role_join(&p->roles[i], p->grace_s);
    p->timed_out = ph_watchdog_end(&p->wd);
    p->state = 2;
}

/* ph_pipeline_start, then ph_pipeline_wait. */
static inline void ph_pipeline_run(ph_pipeline *p) {
    ph_pipeline_start(p);
    ph_pipeline_wait(p);
}

/* Fails the test when the deadline stopped the job, or when the coordinator succeeded and
 * another role failed (other than by the context shut down under it, see ph_pipeline_wait). */
static inline void ph_pipeline_check(const ph_pipeline *p) {
    if (p->timed_out) fail_msg("%s: the job did not finish within %.0f s", p->what, p->deadline_s);
    if (p->roles[0].status) return;
    for (size_t i = 1; i < p->n; i++) {
        const ph_role *r = &p->roles[i];
        if (r->status && !(p->forced && strstr(r->err.msg, "Context was terminated")))
            fail_msg("%s failed: %s", r->id, r->err.msg);
    }
}

/* Terminates the context and frees p (its threads must have been joined: ph_pipeline_wait). */
static inline void ph_pipeline_free(ph_pipeline *p) {
    if (!p) return;
    for (int i = 0; i < PH_MAX_LIVE; i++)
        if (ph_live[i] == p) ph_live[i] = NULL;
    zmq_ctx_term(p->zctx);
    twn_free(p->roles);
    twn_free(p->eps);
    twn_free(p);
}

/* Stops a pipeline at once (every stop flag, then the context shut down after 2 s), joins its
 * threads (ending the process after grace_s, see ph_role_join) and frees it. */
static inline void ph_pipeline_abort(ph_pipeline *p) {
    if (p->state == 1) {
        p->stop_coord = p->stop_rest = 1;
        double end = twn_now() + 2;
        for (;;) {
            size_t left = 0;
            for (size_t i = 0; i < p->n; i++) left += p->roles[i].started && !p->roles[i].finished;
            if (!left) break;
            if (twn_now() > end) {
                zmq_ctx_shutdown(p->zctx);
                break;
            }
            ph_nap(0.01);
        }
        for (size_t i = 0; i < p->n; i++) ph_role_join(&p->roles[i], p->grace_s);
        ph_watchdog_end(&p->wd);
    }
    ph_pipeline_free(p);
}

/* cmocka teardown: aborts and frees every pipeline still alive (a test that failed mid-job). */
static inline int ph_teardown(void **state) {
    (void)state;
    for (int i = 0; i < PH_MAX_LIVE; i++)
        if (ph_live[i]) ph_pipeline_abort(ph_live[i]);
    return 0;
}

// ------------------------------------------------------------------------------------------------
// The process's metrics (the roles as threads count into twn_metrics_default())

/* The sample of `name` with `labels` ("k=v,k2=v2"; NULL: none); 0 while it does not exist. */
static inline double ph_metric(const char *name, const char *labels) {
    double v = 0;
    if (twn_metrics_get(twn_metrics_default(), name, labels, &v)) return 0;
    return v;
}

// ------------------------------------------------------------------------------------------------
// The journal

static inline int ph_journal_count_rec(void *ctx, const twn_jrec *r, twn_err *err) {
    (void)err;
    int *c = ctx;
    if (r->type == TWN_JREC_UNIT_DONE) c[0]++;
    if (r->type == TWN_JREC_JOB_FINISHED) c[1]++;
    return 0;
}

/* The UNIT_DONE and JOB_FINISHED records of the journal at path so far (0 and 0 when it does
 * not exist yet).  0, or -1 with err (replay error) and the counts up to there. */
static inline int ph_journal_counts(const char *path, int *done, int *finished, twn_err *err) {
    int c[2] = {0, 0}, rc = 0;
    FILE *f = fopen(path, "rb");
    if (f) {
        fseek(f, 0, SEEK_END);
        long n = ftell(f);
        fseek(f, 0, SEEK_SET);
        char *b = malloc((size_t)(n > 0 ? n : 0) + 1);
        if (n >= 0 && fread(b, 1, (size_t)n, f) == (size_t)n)
            rc = twn_journal_replay_mem(b, (size_t)n, path, NULL, ph_journal_count_rec, c, NULL,
                                        err);
        free(b);
        fclose(f);
    }
    *done = c[0];
    *finished = c[1];
    return rc ? -1 : 0;
}

// ------------------------------------------------------------------------------------------------
// A fake gate: a bare DEALER speaking the control protocol by hand, for tests that drive the
// coordinator message by message

typedef struct ph_fake_gate {
    void *dealer;
    twn_frame_opts fo;
} ph_fake_gate;

/* A DEALER with routing id "fake-gate" connected to the coordinator's control endpoint ctl. */
static inline ph_fake_gate ph_fake_gate_open(void *zctx, const char *ctl) {
    ph_fake_gate g = {0};
    g.fo = twn_frame_opts_default();
    twn_sock_opts so = twn_sock_opts_default();
    so.linger_ms = 0;
    so.routing_id = "fake-gate";
    twn_err e;
    g.dealer = twn_sock_new(zctx, ZMQ_DEALER, &so, &e);
    if (!g.dealer) fail_msg("fake gate: %s", e.msg);
    if (twn_sock_connect(g.dealer, ctl, &e)) fail_msg("fake gate: %s", e.msg);
    return g;
}

static inline void ph_fake_gate_close(ph_fake_gate *g) {
    twn_sock_close(g->dealer);
    g->dealer = NULL;
}

/* Sends env to the coordinator (fails the test when it cannot). */
static inline void ph_fg_send(ph_fake_gate *g, Twn__Envelope *env) {
    twn_err e;
    if (twn_send_msg(g->dealer, NULL, env, &g->fo, &e)) fail_msg("fake gate: %s", e.msg);
}

/* The next message of kind body within timeout_s (others are skipped), or NULL. */
static inline Twn__Envelope *ph_fg_recv(ph_fake_gate *g, int body, double timeout_s) {
    double end = twn_now() + timeout_s;
    while (twn_now() < end) {
        Twn__Envelope *m = NULL;
        twn_err e;
        twn_recv_status s = twn_recv_msg(g->dealer, 20, &g->fo, NULL, &m, &e);
        if (s == TWN_RECV_FAIL) fail_msg("fake gate: %s", e.msg);
        if (s != TWN_RECV_MSG) continue;
        if ((int)m->body_case == body) return m;
        twn_msg_free(m);
    }
    return NULL;
}

/* A fake coordinator's side of the join: waits (5 s) on ROUTER router for a gate's Hello,
 * storing its peer id in *gate, and answers a Welcome with one shard at shard_endpoint and
 * heartbeats every heartbeat_ms (declared dead only after 100 of them).  Returns the Hello's
 * credits. */
static inline uint32_t ph_fake_coord_welcome(void *router, twn_frame_opts *fo, twn_peer_id *gate,
                                             const char *shard_endpoint, uint32_t heartbeat_ms) {
    Twn__Envelope *m = NULL;
    twn_err e;
    for (;;) {
        twn_recv_status s = twn_recv_msg(router, 5000, fo, gate, &m, &e);
        if (s != TWN_RECV_MSG) fail_msg("no Hello from the gate: %s", e.msg);
        if (m->body_case == TWN__ENVELOPE__BODY_HELLO) break;
        twn_msg_free(m);
    }
    uint32_t credits = m->hello->credits;
    twn_msg_free(m);
    Twn__Welcome w = TWN__WELCOME__INIT;
    w.accepted = 1;
    w.job_id = (char *)"twn";
    w.heartbeat_ms = heartbeat_ms;
    w.missed_beats = 100;
    w.shards = 1;
    w.n_shard_endpoints = 1;
    char *sep[1] = {(char *)shard_endpoint};
    w.shard_endpoints = sep;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_WELCOME;
    env.welcome = &w;
    if (twn_send_msg(router, gate, &env, fo, &e)) fail_msg("fake coordinator: %s", e.msg);
    return credits;
}

#endif
