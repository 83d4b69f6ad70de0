/* offsets.c — Kafka commits behind the durable low-water mark (offsets.h). */
#include "coordinator/offsets.h"

#include <stdio.h>
#include <string.h>

#include "util/log.h"
#include "util/mem.h"

typedef struct part {
    char topic[256];
    int32_t partition;
    uint32_t *seqs; /* plan positions of its units, ascending (offsets ascending with them) */
    size_t n, cap;
    size_t k;          /* first index with seqs[k] >= the last low-water mark (it only grows) */
    int64_t committed; /* last commit point sent successfully (-1: none) */
} part;

struct twn_offsets {
    const twn_src_units *plan;
    size_t seen; /* plan units indexed so far (twn_offsets_extend) */
    part *p;
    size_t n, cap;
    double min_interval, last_try;
    double backoff; /* after a failed commit: doubled per failure, up to 10 s */
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

int twn_offsets_extend(twn_offsets *o, twn_err *err) {
    const twn_src_units *plan = o->plan;
    for (size_t i = o->seen; i < plan->n; i++) {
        const twn_src_unit *u = &plan->v[i];
        if (twn_srcio_store_of(u->path) != TWN_STORE_KAFKA) continue;
        char topic[256];
        int32_t partition;
        if (twn_srcio_kafka_path(u->path, topic, sizeof topic, &partition, err)) return -1;
        part *p = part_of(o, topic, partition);
        if (p->n == p->cap) {
            p->cap = p->cap ? 2 * p->cap : 16;
            p->seqs = twn_realloc(p->seqs, p->cap * sizeof *p->seqs);
        }
        p->seqs[p->n++] = (uint32_t)i;
    }
    o->seen = plan->n;
    return 0;
}

void twn_offsets_free(twn_offsets *o) {
    if (!o) return;
    for (size_t i = 0; i < o->n; i++) twn_free(o->p[i].seqs);
    twn_free(o->p);
    twn_free(o);
}

/* The commit point of p for a low-water mark (which never goes down between calls). */
static int64_t point(const twn_offsets *o, part *p, uint32_t low) {
    while (p->k < p->n && p->seqs[p->k] < low) p->k++;
    if (p->k < p->n) return (int64_t)o->plan->v[p->seqs[p->k]].start;
    return (int64_t)o->plan->v[p->seqs[p->n - 1]].end;
}

int twn_offsets_commit(twn_offsets *o, twn_srcio *io, uint32_t low_water, double now, int force,
                       twn_err *err) {
    if (!o || !o->n) return 0;
    if (!force && now - o->last_try < o->min_interval + o->backoff) return 0;
    int due = 0;
    for (size_t i = 0; i < o->n && !due; i++)
        due = point(o, &o->p[i], low_water) > o->p[i].committed;
    if (!due) return 0;
    o->last_try = now;
    twn_kafka *k;
    if (twn_srcio_kafka(io, &k, err)) return -1;
    for (size_t i = 0; i < o->n; i++) {
        part *p = &o->p[i];
        int64_t at = point(o, p, low_water), got = -1;
        if (at <= p->committed) continue;
        if (twn_kafka_commit(k, p->topic, p->partition, at, &got, err)) {
            /* the group coordinator is likely unreachable: do not wait out the same timeout for
             * every partition, and wait longer before the next try */
            double b = o->backoff ? 2 * o->backoff : (o->min_interval > 0 ? o->min_interval : 0.1);
            o->backoff = b > 10 ? 10 : b;
            return -1;
        }
        o->backoff = 0;
        p->committed = got >= at ? got : at;
        twn_debug("coordinator: committed %s[%d] at %lld", p->topic, p->partition, (long long)at);
    }
    return 0;
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
