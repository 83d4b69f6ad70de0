/* kplanner.c — the coordinator's Kafka thread (kplanner.h).
 *
 * One mutex guards the mailbox (units planned and not yet taken, the commit request, the released
 * base, the stop flag); the condition variable wakes the thread for a request or the stop.  The
 * thread never holds the mutex across a librdkafka call, so the loop's calls return at once. */
#include "coordinator/kplanner.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "util/clock.h"
#include "util/log.h"
#include "util/mem.h"

typedef enum { REQ_IDLE = 0, REQ_POSTED, REQ_RUNNING, REQ_DONE } req_state;

struct twn_kplanner {
    twn_kplanner_cfg cfg;
    twn_srcio *io;        /* the thread's */
    twn_src_units shadow; /* the thread's: the last unit of each path */
    uint64_t n_seed;      /* units in the loop's plan at the start */
    pthread_t th;
    int running;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* under mu */
    int stop;
    twn_src_units out; /* planned, not yet taken */
    uint64_t posted;   /* units planned in all */
    uint64_t base;     /* units released by the loop */
    req_state rs;
    twn_offset_point *req;
    size_t n_req, cap_req;
    twn_kplanner_stats st;
    char last_error[TWN_ERR_MAX];
    int cut; /* the last planning stopped at max_units: more is waiting */
};

/* Units the thread may still plan (SIZE_MAX: no limit). */
static size_t room(const twn_kplanner *kp) {
    uint64_t held = kp->n_seed + kp->posted - kp->base;
    if (!kp->cfg.max_units) return SIZE_MAX;
    return held >= kp->cfg.max_units ? 0 : (size_t)(kp->cfg.max_units - held);
}

static void push(twn_src_units *l, const twn_src_unit *u) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 16;
        l->v = twn_realloc(l->v, l->cap * sizeof *l->v);
    }
    l->v[l->n++] = *u;
}

static twn_src_unit copy_unit(const twn_src_unit *u) {
    twn_src_unit c = *u;
    c.path = twn_strdup(u->path);
    return c;
}

/* Keeps the last unit of each kafka:// path and the last unit overall (ids go on from it), in
 * plan order.  O(units x partitions). */
static void shrink_shadow(twn_src_units *p) {
    if (!p->n) return;
    const char **seen = twn_malloc(p->n * sizeof *seen);
    size_t n_seen = 0, keep = p->n;
    for (size_t i = p->n; i-- > 0;) {
        twn_src_unit *u = &p->v[i];
        int drop = i + 1 < p->n; /* the last unit stays */
        if (twn_srcio_store_of(u->path) == TWN_STORE_KAFKA) {
            int dup = 0;
            for (size_t j = 0; j < n_seen && !dup; j++) dup = !strcmp(seen[j], u->path);
            if (!dup) {
                seen[n_seen++] = u->path;
                drop = 0;
            }
        }
        if (drop) {
            twn_free(u->path);
            continue;
        }
        p->v[--keep] = *u;
    }
    twn_free(seen);
    memmove(p->v, p->v + keep, (p->n - keep) * sizeof *p->v);
    p->n -= keep;
}

static void note_call(twn_kplanner *kp, double t) {
    if (t > kp->st.longest_call_s) kp->st.longest_call_s = t;
}

static void run_commit(twn_kplanner *kp) {
    kp->rs = REQ_RUNNING;
    pthread_mutex_unlock(&kp->mu);
    double t0 = twn_now();
    twn_err e = {{0}};
    twn_kafka *k;
    int rc = twn_srcio_kafka(kp->io, &k, &e);
    if (rc)
        for (size_t i = 0; i < kp->n_req; i++) kp->req[i].committed = -1;
    else
        rc = twn_offsets_apply(k, kp->req, kp->n_req, &e);
    if (rc) twn_log(TWN_LOG_WARN, "coordinator: Kafka commit: %s", e.msg); /* retried later */
    double t = twn_now() - t0;
    pthread_mutex_lock(&kp->mu);
    note_call(kp, t);
    kp->st.commits++;
    kp->st.commit_errors += rc != 0;
    kp->rs = REQ_DONE;
}

static void run_plan(twn_kplanner *kp) {
    size_t max_new = room(kp);
    if (!max_new) return; /* the loop holds enough: no broker call at all */
    pthread_mutex_unlock(&kp->mu);
    double t0 = twn_now();
    size_t n0 = kp->shadow.n, n_new = 0;
    int cut = 0;
    twn_err e = {{0}};
    int rc = twn_srcio_plan_more_max(kp->io, kp->cfg.inputs, kp->cfg.n_inputs, kp->cfg.unit_items,
                                     max_new, &kp->shadow, &n_new, &cut, &e);
    n_new = kp->shadow.n - n0; /* on a failure: what one topic appended before another failed */
    twn_src_units got = {0};
    for (size_t i = n0; i < kp->shadow.n; i++) {
        twn_src_unit c = copy_unit(&kp->shadow.v[i]);
        push(&got, &c);
    }
    shrink_shadow(&kp->shadow);
    double t = twn_now() - t0;
    pthread_mutex_lock(&kp->mu);
    note_call(kp, t);
    kp->st.plans++;
    if (rc) {
        kp->st.plan_errors++;
        /* a broker outage repeats the same error every poll: say it once */
        if (strcmp(kp->last_error, e.msg))
            twn_log(TWN_LOG_WARN, "coordinator: streaming: planning new offsets: %s", e.msg);
        snprintf(kp->last_error, sizeof kp->last_error, "%s", e.msg);
    } else {
        if (kp->last_error[0]) twn_log(TWN_LOG_INFO, "coordinator: streaming: planning again");
        kp->last_error[0] = 0;
        if (!cut) kp->st.caught_up = 1;
    }
    kp->cut = !rc && cut;
    for (size_t i = 0; i < got.n; i++) push(&kp->out, &got.v[i]);
    twn_free(got.v);
    kp->posted += n_new;
    kp->st.planned += n_new;
    if (n_new) twn_debug("coordinator: streaming: %zu new unit(s) planned", n_new);
}

static void *kplanner_main(void *arg) {
    twn_kplanner *kp = arg;
    pthread_mutex_lock(&kp->mu);
    double next_plan = kp->cfg.streaming ? twn_now() : INFINITY, last_plan = -1e30;
    while (!kp->stop) {
        if (kp->rs == REQ_POSTED) {
            run_commit(kp);
            continue;
        }
        /* A backlog cut at max_units goes on as soon as the loop has released a quarter of it
         * (set_base wakes the thread), not a poll later: small units would otherwise stream at
         * max_units per poll at most. */
        double now = twn_now();
        int wanted = kp->cut && room(kp) >= (kp->cfg.max_units + 3) / 4;
        if (now >= next_plan || (wanted && now >= last_plan + 0.02)) {
            last_plan = now;
            run_plan(kp);
            next_plan = twn_now() + kp->cfg.poll_s;
            continue;
        }
        double wait = isfinite(next_plan) ? next_plan - now : 1.0;
        if (wanted && last_plan + 0.02 - now < wait) wait = last_plan + 0.02 - now;
        if (wait > 1.0) wait = 1.0;
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        double ns = (double)ts.tv_nsec + (wait > 0 ? wait : 0) * 1e9;
        ts.tv_sec += (time_t)(ns / 1e9);
        ts.tv_nsec = (long)fmod(ns, 1e9);
        pthread_cond_timedwait(&kp->cv, &kp->mu, &ts);
    }
    pthread_mutex_unlock(&kp->mu);
    return NULL;
}

int twn_kplanner_start(const twn_kplanner_cfg *cfg, const twn_src_units *plan, twn_kplanner **out,
                       twn_err *err) {
    *out = NULL;
    twn_kplanner *kp = twn_calloc(1, sizeof *kp);
    kp->cfg = *cfg;
    if (!(kp->cfg.poll_s > 0)) kp->cfg.poll_s = 0.5;
    kp->n_seed = plan->n;
    for (size_t i = 0; cfg->streaming && i < plan->n; i++) { /* a batch job only commits */
        twn_src_unit c = copy_unit(&plan->v[i]);
        push(&kp->shadow, &c);
    }
    shrink_shadow(&kp->shadow);
    if (twn_srcio_open(cfg->io, &kp->io, err)) {
        twn_src_units_free(&kp->shadow);
        twn_free(kp);
        return -1;
    }
    pthread_mutex_init(&kp->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&kp->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (pthread_create(&kp->th, NULL, kplanner_main, kp)) {
        twn_err_set(err, "coordinator: cannot start the Kafka planning thread");
        twn_kplanner_free(kp);
        return -1;
    }
    kp->running = 1;
    *out = kp;
    return 0;
}

size_t twn_kplanner_take(twn_kplanner *kp, twn_src_units *plan) {
    pthread_mutex_lock(&kp->mu);
    size_t n = kp->out.n;
    for (size_t i = 0; i < n; i++) push(plan, &kp->out.v[i]);
    kp->out.n = 0;
    pthread_mutex_unlock(&kp->mu);
    return n;
}

void twn_kplanner_set_base(twn_kplanner *kp, uint64_t base) {
    pthread_mutex_lock(&kp->mu);
    if (base > kp->base) {
        kp->base = base;
        if (kp->cut) pthread_cond_signal(&kp->cv);
    }
    pthread_mutex_unlock(&kp->mu);
}

int twn_kplanner_commit(twn_kplanner *kp, const twn_offset_point *pts, size_t n) {
    pthread_mutex_lock(&kp->mu);
    int rc = -1;
    if (kp->rs == REQ_IDLE || kp->rs == REQ_DONE) {
        if (n > kp->cap_req) {
            kp->cap_req = n;
            kp->req = twn_realloc(kp->req, n * sizeof *kp->req);
        }
        memcpy(kp->req, pts, n * sizeof *pts);
        kp->n_req = n;
        kp->rs = REQ_POSTED;
        pthread_cond_signal(&kp->cv);
        rc = 0;
    }
    pthread_mutex_unlock(&kp->mu);
    return rc;
}

const twn_offset_point *twn_kplanner_commit_result(twn_kplanner *kp, size_t *n) {
    pthread_mutex_lock(&kp->mu);
    const twn_offset_point *r = NULL;
    *n = 0;
    if (kp->rs == REQ_DONE) {
        kp->rs = REQ_IDLE;
        r = kp->req;
        *n = kp->n_req;
    }
    pthread_mutex_unlock(&kp->mu);
    return r;
}

void twn_kplanner_stats_get(twn_kplanner *kp, twn_kplanner_stats *s) {
    pthread_mutex_lock(&kp->mu);
    *s = kp->st;
    pthread_mutex_unlock(&kp->mu);
}

void twn_kplanner_stop(twn_kplanner *kp) {
    if (!kp || !kp->running) return;
    pthread_mutex_lock(&kp->mu);
    kp->stop = 1;
    pthread_cond_signal(&kp->cv);
    pthread_mutex_unlock(&kp->mu);
    pthread_join(kp->th, NULL);
    kp->running = 0;
}

void twn_kplanner_free(twn_kplanner *kp) {
    if (!kp) return;
    twn_kplanner_stop(kp);
    pthread_cond_destroy(&kp->cv);
    pthread_mutex_destroy(&kp->mu);
    twn_srcio_close(kp->io);
    twn_src_units_free(&kp->shadow);
    twn_src_units_free(&kp->out);
    twn_free(kp->req);
    twn_free(kp);
}
