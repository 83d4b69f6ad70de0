/* prefetch.c — the S3 read-ahead pool (prefetch.h). */
#include "common/prefetch.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "common/source_internal.h"
#include "common/source_s3.h"
#include "util/log.h"
#include "util/mem.h"

/* Nothing is queued with less room than this left under max_bytes. */
#define PREFETCH_MIN_WINDOW ((size_t)64 << 10)

enum { JOB_QUEUED, JOB_RUNNING, JOB_DONE };
enum { KIND_WINDOW, KIND_OBJECT };

struct twn_prefetch_job {
    twn_prefetch *p;
    twn_prefetch_job *next; /* in the queue */
    char *uri;
    twn_s3_uri u;
    uint64_t start;  /* the window's first byte in the object */
    size_t reserved; /* bytes held against max_bytes (the window asked for) */
    int state, dropped, ok;
    uint8_t *data; /* [reserved]; len bytes valid */
    size_t len;
    uint64_t size; /* the object's, from the HEAD */
    char etag[128];
    /* KIND_OBJECT: the whole object, at most max_bytes; data/len its bytes, err its failure */
    int kind;
    size_t max_bytes;
    size_t get_reserved; /* bytes reserved while its body is received (under p->mu) */
    twn_err err;
};

struct twn_prefetch {
    twn_s3_config cfg;
    int n, cap; /* reader threads started / at most (they start when jobs wait for one) */
    int idle;   /* threads waiting for a job */
    size_t queued;
    pthread_t *th;
    pthread_mutex_t mu;
    pthread_cond_t work, done;
    pthread_cond_t room; /* held went down */
    twn_prefetch_job *head, *tail;
    twn_prefetch_job *obj_tail; /* the last object GET in the queue (they come first), or NULL */
    int stop, busy;
    int get_holders; /* object GETs holding a reservation */
    size_t get_held; /* the bytes they hold */
    size_t max;
    twn_prefetch_stats st;
};

static void job_free(twn_prefetch_job *j) {
    twn_free(j->uri);
    twn_s3_uri_free(&j->u);
    twn_free(j->data);
    twn_free(j);
}

/* Under p->mu. */
static void release(twn_prefetch *p, size_t n) {
    p->st.held -= n;
    if (n) pthread_cond_broadcast(&p->room);
}

static void note_held(twn_prefetch *p) {
    if (p->st.held > p->st.held_max) p->st.held_max = p->st.held;
}

/* twn_s3_get_admit's hook for an object GET: reserves the body's bytes, waiting while they do not
 * fit under max unless no other object GET holds a reservation. */
static void admit_object(void *user, uint64_t bytes) {
    twn_prefetch_job *j = user;
    twn_prefetch *p = j->p;
    size_t b = bytes > SIZE_MAX / 2 ? SIZE_MAX / 2 : (size_t)bytes;
    pthread_mutex_lock(&p->mu);
    int waited = 0;
    while (p->get_holders > 0 && p->st.held + b > p->max) {
        waited = 1;
        pthread_cond_wait(&p->room, &p->mu);
    }
    p->st.get_waits += (uint64_t)waited;
    p->get_holders++;
    p->get_held += b;
    p->st.held += b;
    j->get_reserved = b;
    note_held(p);
    if (p->get_held > p->st.get_held_max) p->st.get_held_max = p->get_held;
    pthread_mutex_unlock(&p->mu);
}

static void fetch_object(twn_s3 **s, const twn_s3_config *cfg, twn_prefetch_job *j) {
    twn_prefetch *p = j->p;
    if (!*s && twn_s3_open(cfg, s, &j->err)) return;
    int rc = twn_s3_get_admit(*s, j->u.bucket, j->u.key, j->max_bytes, admit_object, j, &j->data,
                              &j->len, &j->err);
    pthread_mutex_lock(&p->mu);
    if (j->get_reserved) {
        p->get_holders--;
        p->get_held -= j->get_reserved;
        release(p, j->get_reserved);
        j->get_reserved = 0;
    }
    pthread_mutex_unlock(&p->mu);
    j->ok = !rc;
}

static void fetch(twn_s3 **s, const twn_s3_config *cfg, twn_prefetch_job *j) {
    twn_err e = {{0}};
    if (!*s && twn_s3_open(cfg, s, &e)) goto fail;
    if (twn_s3_head(*s, j->u.bucket, j->u.key, &j->size, j->etag, sizeof j->etag, &e)) goto fail;
    size_t n = j->start >= j->size                ? 0
               : j->size - j->start < j->reserved ? (size_t)(j->size - j->start)
                                                  : j->reserved;
    if (n && twn_s3_get_range(*s, j->u.bucket, j->u.key, j->etag[0] ? j->etag : NULL, j->start, n,
                              j->data, &j->len, &e))
        goto fail;
    j->ok = 1;
    return;
fail:
    twn_log(TWN_LOG_DEBUG, "prefetch %s [%llu, +%zu): %s (read again by the gate)", j->uri,
            (unsigned long long)j->start, j->reserved, e.msg);
}

static void *reader_main(void *arg) {
    twn_prefetch *p = arg;
    twn_s3 *s = NULL; /* this reader's client: its connection is kept alive between jobs */
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stop && !p->head) {
            p->idle++;
            pthread_cond_wait(&p->work, &p->mu);
            p->idle--;
        }
        if (!p->head) break; /* stopping, nothing queued */
        twn_prefetch_job *j = p->head;
        p->queued--;
        p->head = j->next;
        if (!p->head) p->tail = NULL;
        if (p->obj_tail == j) p->obj_tail = NULL;
        j->state = JOB_RUNNING;
        if (++p->busy > p->st.busy_max) p->st.busy_max = p->busy;
        pthread_mutex_unlock(&p->mu);
        if (j->kind == KIND_OBJECT)
            fetch_object(&s, &p->cfg, j);
        else
            fetch(&s, &p->cfg, j);
        pthread_mutex_lock(&p->mu);
        p->busy--;
        j->state = JOB_DONE;
        if (j->kind == KIND_OBJECT) {
            p->st.gets += j->ok;
            p->st.gets_failed += !j->ok;
            p->st.get_bytes += j->ok ? j->len : 0;
        } else if (j->ok) {
            p->st.fetched++;
            p->st.bytes += j->len;
        } else {
            p->st.failed++;
        }
        if (j->dropped) {
            release(p, j->reserved);
            job_free(j);
        }
        pthread_cond_broadcast(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    twn_s3_close(s);
    return NULL;
}

int twn_prefetch_open(const twn_s3_config *cfg, int readers, size_t max_bytes, twn_prefetch **out,
                      twn_err *err) {
    *out = NULL;
    if (readers < 1 || readers > 256)
        return twn_err_set(err, "prefetch: %d readers; expected 1..256 (s3.readers)", readers);
    twn_prefetch *p = twn_calloc(1, sizeof *p);
    p->cfg = cfg ? *cfg : twn_s3_config_default();
    p->max = max_bytes ? max_bytes : TWN_PREFETCH_MAX_BYTES;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->done, NULL);
    pthread_cond_init(&p->room, NULL);
    p->th = twn_calloc((size_t)readers, sizeof *p->th);
    p->cap = readers;
    *out = p;
    return 0;
}

/* Under p->mu, after queuing j: starts a reader when more jobs wait than readers are idle (an
 * idle pool has no threads).  When not even one reader can be started, j fails at once. */
static void enqueued(twn_prefetch *p, twn_prefetch_job *j) {
    p->queued++;
    if (p->queued > (size_t)p->idle && p->n < p->cap &&
        !pthread_create(&p->th[p->n], NULL, reader_main, p))
        p->n++;
    if (p->n) {
        pthread_cond_signal(&p->work);
        return;
    }
    twn_log(TWN_LOG_WARN, "prefetch: cannot start a reader thread for %s", j->uri);
    /* unlink it (it is the only job: nothing ever ran) and fail it */
    p->head = p->tail = p->obj_tail = NULL;
    p->queued = 0;
    j->next = NULL;
    j->state = JOB_DONE;
    twn_err_set(&j->err, "prefetch: cannot start a reader thread for %s", j->uri);
    if (j->kind == KIND_OBJECT)
        p->st.gets_failed++;
    else
        p->st.failed++;
}

void twn_prefetch_close(twn_prefetch *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n; i++) pthread_join(p->th[i], NULL);
    twn_free(p->th);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->work);
    pthread_cond_destroy(&p->done);
    pthread_cond_destroy(&p->room);
    twn_free(p);
}

twn_prefetch_job *twn_prefetch_start(twn_prefetch *p, const twn_src_unit *u) {
    if (!p || !u->path || !twn_s3_is_uri(u->path) || u->end <= u->start) return NULL;
    twn_s3_uri su;
    twn_err e;
    if (twn_s3_uri_parse(u->path, &su, &e)) return NULL;
    if (!su.key[0]) {
        twn_s3_uri_free(&su);
        return NULL;
    }
    /* the unit's range, and what the reader's cursor looks at past its end (source_internal.h:
     * its window is the unit's length clamped to 4 KiB..TWN_SRC_CURSOR_BYTES) */
    uint64_t len = u->end - u->start;
    len += len < 4096 ? 4096 : len > TWN_SRC_CURSOR_BYTES ? TWN_SRC_CURSOR_BYTES : len;
    pthread_mutex_lock(&p->mu);
    size_t room = p->max - p->st.held;
    size_t want = len < room ? (size_t)len : room;
    if (want < PREFETCH_MIN_WINDOW && want < len) {
        p->st.refused++;
        pthread_mutex_unlock(&p->mu);
        twn_s3_uri_free(&su);
        return NULL;
    }
    p->st.held += want;
    note_held(p);
    p->st.started++;
    pthread_mutex_unlock(&p->mu);
    twn_prefetch_job *j = twn_calloc(1, sizeof *j);
    j->p = p;
    j->uri = twn_strdup(u->path);
    j->u = su;
    j->start = u->start;
    j->reserved = want;
    j->data = twn_malloc(want ? want : 1);
    pthread_mutex_lock(&p->mu);
    if (p->tail)
        p->tail->next = j;
    else
        p->head = j;
    p->tail = j;
    enqueued(p, j);
    pthread_mutex_unlock(&p->mu);
    return j;
}

void twn_prefetch_drop(twn_prefetch_job *j) {
    if (!j) return;
    twn_prefetch *p = j->p;
    pthread_mutex_lock(&p->mu);
    if (j->state == JOB_RUNNING) { /* the reader frees it when done */
        j->dropped = 1;
        pthread_mutex_unlock(&p->mu);
        return;
    }
    if (j->state == JOB_QUEUED) { /* unlink */
        twn_prefetch_job **pp = &p->head, *prev = NULL;
        while (*pp && *pp != j) {
            prev = *pp;
            pp = &(*pp)->next;
        }
        if (*pp) {
            *pp = j->next;
            p->queued--;
        }
        if (p->tail == j) p->tail = prev;
        if (p->obj_tail == j) p->obj_tail = prev; /* object GETs come first: prev is one or NULL */
    }
    release(p, j->reserved);
    pthread_mutex_unlock(&p->mu);
    job_free(j);
}

// ------------------------------------------------------------------------------------------------
// The blob over a fetched window

typedef struct {
    twn_blob b;
    twn_prefetch *p;
    size_t reserved;
    twn_s3 *s;
    char *uri, *bucket, *key, *etag;
    uint8_t *data;
    uint64_t w_off;
    size_t w_len;
    twn_blob *fb; /* the object through s, for reads outside the window (opened on first use) */
    uint64_t hint_off, hint_n;
    int hinted;
} win_blob;

static int win_read_at(twn_blob *b, uint64_t off, void *buf, size_t n, size_t *got, twn_err *err) {
    win_blob *w = (win_blob *)b;
    *got = 0;
    if (off >= b->size || !n) return 0;
    if (n > b->size - off) n = (size_t)(b->size - off);
    size_t k = 0;
    if (off >= w->w_off && off < w->w_off + w->w_len) {
        uint64_t avail = w->w_off + w->w_len - off;
        k = avail < n ? (size_t)avail : n;
        memcpy(buf, w->data + (off - w->w_off), k);
    }
    if (k == n) {
        *got = n;
        return 0;
    }
    if (!w->fb) {
        if (!w->s)
            return twn_err_set(err,
                               "%s: bytes at %llu are outside the prefetched range and no S3 "
                               "client was given",
                               w->uri, (unsigned long long)(off + k));
        if (twn_blob_open_s3(w->s, w->bucket, w->key, b->size, w->etag ? w->etag : "", &w->fb, err))
            return -1;
        if (w->hinted && w->fb->will_read) w->fb->will_read(w->fb, w->hint_off, w->hint_n);
    }
    size_t g = 0;
    if (w->fb->read_at(w->fb, off + k, (uint8_t *)buf + k, n - k, &g, err)) return -1;
    *got = k + g;
    return 0;
}

static void win_will_read(twn_blob *b, uint64_t off, uint64_t n) {
    win_blob *w = (win_blob *)b;
    w->hinted = 1;
    w->hint_off = off;
    w->hint_n = n;
    if (w->fb && w->fb->will_read) w->fb->will_read(w->fb, off, n);
}

static void win_close(twn_blob *b) {
    win_blob *w = (win_blob *)b;
    pthread_mutex_lock(&w->p->mu);
    release(w->p, w->reserved);
    pthread_mutex_unlock(&w->p->mu);
    twn_blob_close(w->fb);
    twn_free(w->uri);
    twn_free(w->bucket);
    twn_free(w->key);
    twn_free(w->etag);
    twn_free(w->data);
    twn_free(w);
}

int twn_prefetch_wait(twn_prefetch_job *j, double seconds) {
    twn_prefetch *p = j->p;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    long long ns = (long long)until.tv_nsec + (long long)(seconds * 1e9);
    until.tv_sec += (time_t)(ns / 1000000000LL);
    until.tv_nsec = (long)(ns % 1000000000LL);
    pthread_mutex_lock(&p->mu);
    while (j->state != JOB_DONE && !pthread_cond_timedwait(&p->done, &p->mu, &until)) {
    }
    int done = j->state == JOB_DONE;
    pthread_mutex_unlock(&p->mu);
    return done;
}

twn_blob *twn_prefetch_take(twn_prefetch_job *j, twn_s3 *s) {
    if (!j) return NULL;
    twn_prefetch *p = j->p;
    pthread_mutex_lock(&p->mu);
    while (j->state != JOB_DONE) pthread_cond_wait(&p->done, &p->mu);
    if (!j->ok) {
        release(p, j->reserved);
        pthread_mutex_unlock(&p->mu);
        job_free(j);
        return NULL;
    }
    pthread_mutex_unlock(&p->mu);
    win_blob *w = twn_calloc(1, sizeof *w);
    w->p = p;
    w->reserved = j->reserved;
    w->s = s;
    w->uri = j->uri;
    w->bucket = j->u.bucket;
    w->key = j->u.key;
    w->etag = j->etag[0] ? twn_strdup(j->etag) : NULL;
    w->data = j->data;
    w->w_off = j->start;
    w->w_len = j->len;
    w->b.name = w->uri;
    w->b.size = j->size;
    w->b.read_at = win_read_at;
    w->b.will_read = win_will_read;
    w->b.close = win_close;
    twn_free(j); /* its strings and data now belong to the blob */
    return &w->b;
}

// ------------------------------------------------------------------------------------------------
// Whole objects

twn_prefetch_job *twn_prefetch_get(twn_prefetch *p, const char *bucket, const char *key,
                                   size_t max_bytes) {
    twn_prefetch_job *j = twn_calloc(1, sizeof *j);
    j->p = p;
    j->kind = KIND_OBJECT;
    j->max_bytes = max_bytes;
    j->u.bucket = twn_strdup(bucket);
    j->u.key = twn_strdup(key);
    size_t n = strlen(bucket) + strlen(key) + 8;
    j->uri = twn_malloc(n);
    snprintf(j->uri, n, "s3://%s/%s", bucket, key);
    pthread_mutex_lock(&p->mu);
    /* after the object GETs already queued, before any unit window */
    if (p->obj_tail) {
        j->next = p->obj_tail->next;
        p->obj_tail->next = j;
    } else {
        j->next = p->head;
        p->head = j;
    }
    if (!j->next) p->tail = j;
    p->obj_tail = j;
    enqueued(p, j);
    pthread_mutex_unlock(&p->mu);
    return j;
}

int twn_prefetch_take_object(twn_prefetch_job *j, uint8_t **data, size_t *n, twn_err *err) {
    *data = NULL;
    *n = 0;
    twn_prefetch *p = j->p;
    pthread_mutex_lock(&p->mu);
    while (j->state != JOB_DONE) pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
    int rc = 0;
    if (j->ok) {
        *data = j->data;
        *n = j->len;
        j->data = NULL;
    } else {
        rc = twn_err_set(err, "%s", j->err.msg);
    }
    job_free(j);
    return rc;
}

twn_prefetch_stats twn_prefetch_get_stats(twn_prefetch *p) {
    pthread_mutex_lock(&p->mu);
    twn_prefetch_stats st = p->st;
    st.threads = p->n;
    pthread_mutex_unlock(&p->mu);
    return st;
}
