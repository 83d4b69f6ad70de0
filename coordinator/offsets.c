/* offsets.c — Kafka commits behind the durable low-water mark (offsets.h).
 *
 * Each partition keeps its units as (plan position, start, end) in plan order, from the first one
 * the last commit point has not passed: what lies behind that is committed and forgotten
 * (twn_offsets_forget), so a stream's tracker holds only its resident units. */
#include "coordinator/offsets.h"

#include <stdio.h>
#include <string.h>

#include "util/log.h"
#include "util/mem.h"

typedef struct ent {
    uint32_t seq;
    int64_t start, end;
} ent;

typedef struct part {
    char topic[256];
    int32_t partition;
    ent *e; /* units of the partition, plan order (offsets ascending with it) */
    size_t n, cap;
    size_t k;          /* first index with e[k].seq >= the last low-water mark (it only grows) */
    int64_t last_end;  /* end of its last unit */
    int64_t committed; /* last commit point sent successfully (-1: none) */
} part;

struct twn_offsets {
    const twn_src_units *plan;
    size_t seen; /* plan units indexed so far (twn_offsets_extend) */
    part *p;
    size_t n, cap;
    double min_interval, last_try;
    double backoff; /* after a failed commit: doubled per failure, up to 10 s */
    /* the request twn_offsets_due handed out, until twn_offsets_done */
    twn_offset_point *req;
    size_t n_req, cap_req;
    int in_flight;
    uint32_t req_low, committed_low;
};

static part *part_of(twn_offsets *o, const char *topic, int32_t partition) {
    for (size_t i = 0; i < o->n; i++)
        if (o->p[i].partition == partition && !strcmp(o->p[i].topic, topic)) return &o->p[i];
    if (o->n == o->cap) {
        o->cap = o->cap ? 2 * o->cap : 8;
        o->p = twn_realloc(o->p, o->cap * sizeof *o->p);
    }
    part *p = &o->p[o->n++];
    memset(p, 0, sizeof *p);
    snprintf(p->topic, sizeof p->topic, "%s", topic);
    p->partition = partition;
    p->committed = -1;
    return p;
}

int twn_offsets_new(const twn_src_units *plan, double min_interval_s, twn_offsets **out,
                    twn_err *err) {
    twn_offsets *o = twn_calloc(1, sizeof *o);
    o->plan = plan;
    o->min_interval = min_interval_s;
    o->last_try = -1e30;
    if (twn_offsets_extend(o, err)) {
        twn_offsets_free(o);
        return -1;
    }
    *out = o;
    return 0;
}

int twn_offsets_add(twn_offsets *o, uint32_t seq, const twn_src_unit *u, twn_err *err) {
    if (twn_srcio_store_of(u->path) != TWN_STORE_KAFKA) return 0;
    char topic[256];
    int32_t partition;
    if (twn_srcio_kafka_path(u->path, topic, sizeof topic, &partition, err)) return -1;
    part *p = part_of(o, topic, partition);
    if (p->n == p->cap) {
        p->cap = p->cap ? 2 * p->cap : 16;
        p->e = twn_realloc(p->e, p->cap * sizeof *p->e);
    }
    p->e[p->n++] = (ent){seq, (int64_t)u->start, (int64_t)u->end};
    p->last_end = (int64_t)u->end;
    return 0;
}

int twn_offsets_extend(twn_offsets *o, twn_err *err) {
    const twn_src_units *plan = o->plan;
    for (size_t i = o->seen; plan && i < plan->n; i++)
        if (twn_offsets_add(o, (uint32_t)i, &plan->v[i], err)) return -1;
    o->seen = plan ? plan->n : 0;
    return 0;
}

void twn_offsets_free(twn_offsets *o) {
    if (!o) return;
    for (size_t i = 0; i < o->n; i++) twn_free(o->p[i].e);
    twn_free(o->p);
    twn_free(o->req);
    twn_free(o);
}

/* The commit point of p for a low-water mark (which never goes down between calls). */
static int64_t point(part *p, uint32_t low) {
    while (p->k < p->n && p->e[p->k].seq < low) p->k++;
    return p->k < p->n ? p->e[p->k].start : p->last_end;
}

size_t twn_offsets_due(twn_offsets *o, uint32_t low_water, double now, int force,
                       const twn_offset_point **pts) {
    *pts = NULL;
    if (!o || o->in_flight) return 0;
    if (!o->n) {
        if (low_water > o->committed_low) o->committed_low = low_water;
        return 0;
    }
    if (!force && now - o->last_try < o->min_interval + o->backoff) return 0;
    o->n_req = 0;
    for (size_t i = 0; i < o->n; i++) {
        part *p = &o->p[i];
        int64_t at = point(p, low_water);
        if (at <= p->committed) continue;
        if (o->n_req == o->cap_req) {
            o->cap_req = o->cap_req ? 2 * o->cap_req : 8;
            o->req = twn_realloc(o->req, o->cap_req * sizeof *o->req);
        }
        twn_offset_point *q = &o->req[o->n_req++];
        memcpy(q->topic, p->topic, sizeof q->topic);
        q->partition = p->partition;
        q->offset = at;
        q->committed = -1;
        q->part = (uint32_t)i;
    }
    if (!o->n_req) {
        /* every partition is committed at least as far as this low water allows */
        if (low_water > o->committed_low) o->committed_low = low_water;
        return 0;
    }
    o->last_try = now;
    o->in_flight = 1;
    o->req_low = low_water;
    *pts = o->req;
    return o->n_req;
}

void twn_offsets_done(twn_offsets *o, const twn_offset_point *pts, size_t n) {
    if (!o || !o->in_flight) return;
    o->in_flight = 0;
    int failed = !pts; /* dropped: the thread stopped before it ran */
    for (size_t i = 0; i < n; i++) {
        if (pts[i].committed < 0) {
            failed = 1;
            continue;
        }
        part *p = &o->p[pts[i].part];
        if (pts[i].committed > p->committed) p->committed = pts[i].committed;
        twn_debug("coordinator: committed %s[%d] at %lld", p->topic, p->partition,
                  (long long)pts[i].offset);
    }
    if (failed) {
        /* the group coordinator is likely unreachable: wait longer before the next try */
        double b = o->backoff ? 2 * o->backoff : (o->min_interval > 0 ? o->min_interval : 0.1);
        o->backoff = b > 10 ? 10 : b;
        return;
    }
    o->backoff = 0;
    if (o->req_low > o->committed_low) o->committed_low = o->req_low;
}

int twn_offsets_apply(twn_kafka *k, twn_offset_point *pts, size_t n, twn_err *err) {
    for (size_t i = 0; i < n; i++) pts[i].committed = -1;
    for (size_t i = 0; i < n; i++) {
        int64_t got = -1;
        /* a failure ends the pass: one timeout, not one per partition */
        if (twn_kafka_commit(k, pts[i].topic, pts[i].partition, pts[i].offset, &got, err))
            return -1;
        pts[i].committed = got >= pts[i].offset ? got : pts[i].offset;
    }
    return 0;
}

int twn_offsets_commit(twn_offsets *o, twn_srcio *io, uint32_t low_water, double now, int force,
                       twn_err *err) {
    const twn_offset_point *due;
    size_t n = twn_offsets_due(o, low_water, now, force, &due);
    if (!n) return 0;
    twn_kafka *k;
    int rc = twn_srcio_kafka(io, &k, err);
    if (!rc) rc = twn_offsets_apply(k, o->req, n, err);
    twn_offsets_done(o, o->req, n);
    return rc;
}

uint32_t twn_offsets_committed_low(const twn_offsets *o) {
    return o ? o->committed_low : 0;
}

void twn_offsets_forget(twn_offsets *o, uint32_t below) {
    if (!o) return;
    if (below > o->committed_low) below = o->committed_low;
    for (size_t i = 0; i < o->n; i++) {
        part *p = &o->p[i];
        size_t d = 0;
        while (d < p->k && p->e[d].seq < below) d++;
        if (!d) continue;
        memmove(p->e, p->e + d, (p->n - d) * sizeof *p->e);
        p->n -= d;
        p->k -= d;
    }
}

size_t twn_offsets_count(const twn_offsets *o) {
    return o ? o->n : 0;
}

int64_t twn_offsets_committed(const twn_offsets *o, size_t i, const char **topic,
                              int32_t *partition) {
    if (topic) *topic = o->p[i].topic;
    if (partition) *partition = o->p[i].partition;
    return o->p[i].committed;
}
