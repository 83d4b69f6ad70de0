/* committer.c — group commits on their own thread (committer.h). */
#include "index/committer.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "util/clock.h"
#include "util/mem.h"

struct twn_committer {
    twn_shard *s;
    double interval; /* seconds */
    twn_histogram *hist;
    int fd; /* eventfd */
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv; /* CLOCK_MONOTONIC */
    /* guarded by mu */
    int dirty, quit, failed;
    twn_err err;
    double last_start;
    twn_committer_stats st;
    uint64_t durable; /* atomic */
};

static void wait_until(twn_committer *c, double t) {
    struct timespec ts;
    ts.tv_sec = (time_t)t;
    ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(&c->cv, &c->mu, &ts);
}

static void *run(void *p) {
    twn_committer *c = p;
    pthread_mutex_lock(&c->mu);
    while (!c->quit) {
        if (!c->dirty) {
            pthread_cond_wait(&c->cv, &c->mu);
            continue;
        }
        double t0 = twn_now();
        if (t0 < c->last_start + c->interval) {
            wait_until(c, c->last_start + c->interval);
            continue;
        }
        c->dirty = 0;
        c->last_start = t0;
        pthread_mutex_unlock(&c->mu);
        twn_err e = {{0}};
        uint64_t durable = 0;
        int rc = twn_shard_commit(c->s, &durable, &e);
        double dt = twn_now() - t0;
        if (!rc && c->hist) twn_histogram_observe(c->hist, dt);
        pthread_mutex_lock(&c->mu);
        if (rc) {
            c->failed = 1;
            c->err = e;
        } else {
            c->st.commits++;
            c->st.commit_seconds += dt;
            if (dt > c->st.max_seconds) c->st.max_seconds = dt;
            __atomic_store_n(&c->durable, durable, __ATOMIC_RELEASE);
        }
        uint64_t one = 1;
        if (write(c->fd, &one, sizeof one) < 0) { /* EAGAIN: the counter is already set */
        }
        if (rc) break;
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

int twn_committer_start(twn_shard *s, double commit_ms, twn_histogram *fsync_hist,
                        twn_committer **out, twn_err *err) {
    *out = NULL;
    twn_committer *c = twn_calloc(1, sizeof *c);
    c->s = s;
    c->interval = commit_ms > 0 ? commit_ms / 1000.0 : 0;
    c->hist = fsync_hist;
    c->last_start = twn_now();
    twn_shard_stats st;
    twn_shard_get_stats(s, &st);
    c->durable = st.wal.durable_seq;
    c->fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (c->fd < 0) {
        twn_free(c);
        return twn_err_errno(err, "cannot create the committer's eventfd");
    }
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&c->mu, NULL);
    int e = pthread_create(&c->th, NULL, run, c);
    if (e) {
        close(c->fd);
        pthread_cond_destroy(&c->cv);
        pthread_mutex_destroy(&c->mu);
        twn_free(c);
        return twn_err_set(err, "cannot start the committer thread: %s", strerror(e));
    }
    *out = c;
    return 0;
}

void twn_committer_kick(twn_committer *c) {
    pthread_mutex_lock(&c->mu);
    if (!c->dirty) {
        c->dirty = 1;
        pthread_cond_signal(&c->cv);
    }
    pthread_mutex_unlock(&c->mu);
}

int twn_committer_fd(const twn_committer *c) {
    return c->fd;
}

int twn_committer_poll(twn_committer *c, uint64_t *durable, twn_err *err) {
    uint64_t v;
    int rc = read(c->fd, &v, sizeof v) == (ssize_t)sizeof v; /* else EAGAIN: no commit since */
    *durable = __atomic_load_n(&c->durable, __ATOMIC_ACQUIRE);
    pthread_mutex_lock(&c->mu);
    if (c->failed) {
        if (err) *err = c->err;
        rc = -1;
    }
    pthread_mutex_unlock(&c->mu);
    return rc;
}

void twn_committer_get_stats(twn_committer *c, twn_committer_stats *st) {
    pthread_mutex_lock(&c->mu);
    *st = c->st;
    pthread_mutex_unlock(&c->mu);
}

int twn_committer_stop(twn_committer *c, twn_err *err) {
    if (!c) return 0;
    pthread_mutex_lock(&c->mu);
    c->quit = 1;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
    pthread_join(c->th, NULL);
    int rc = 0;
    if (c->failed) {
        if (err) *err = c->err;
        rc = -1;
    }
    close(c->fd);
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
    twn_free(c);
    return rc;
}
