/* lease.c — lease pools (see lease.h).
 *
 * Slots are recycled through a free list, and each keeps its ref buffers, so a steady stream of
 * grants allocates nothing.  Expiry scans the live leases, but only once `now` reaches a lower
 * bound of the earliest deadline (renewals only move deadlines later, and reported progress only
 * moves stall deadlines later, so the bound stays valid until the next scan recomputes it).  The
 * queue is a ring buffer with pushes at both ends. */
#include "coordinator/lease.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "util/mem.h"

#define SLOT_BITS 24
#define GEN_BITS  24
#define SLOT_MASK ((1u << SLOT_BITS) - 1)
#define GEN_MASK  ((1u << GEN_BITS) - 1)
#define NONE      UINT32_MAX

typedef struct lease {
    twn_lease_id id; /* 0: free */
    uint32_t gen;
    uint32_t worker;
    uint32_t n, n_open;
    uint8_t finished;
    uint8_t ending;  /* being ended: settles are ignored */
    uint8_t started; /* its holder reported progress > 0 (twn_leases_report) */
    double deadline;
    uint64_t progress; /* the holder's last reported counter */
    double moved;      /* when it last changed (the grant, before any report) */
    uint64_t listed;   /* the report (twn_leases.reports) that last listed it */
    uint64_t *refs;
    uint32_t *att;
    size_t cap;
    uint32_t wprev, wnext; /* the worker's lease list (slots, NONE = end) */
    uint32_t live_pos;
} lease;

typedef struct worker {
    uint32_t head; /* first lease slot, NONE when it holds none */
    uint32_t held;
    double last_seen;
    uint8_t known;
} worker;

typedef struct qent {
    uint64_t ref;
    uint32_t attempts;
} qent;

struct twn_leases {
    char name[32];
    twn_lease_cfg cfg;
    twn_lease_hooks hooks;
    uint32_t prefix;
    lease *s;
    size_t ns, cap_s;
    uint32_t *freel;
    size_t nfree, cap_free;
    uint32_t *live;
    size_t nlive, cap_live;
    qent *q;
    size_t qhead, qn, qcap;
    worker *w;
    size_t nw;
    double earliest;
    uint32_t *scratch; /* expire: slots to end */
    size_t cap_scratch;
    uint64_t reports; /* twn_leases_report calls, to mark the leases one lists */
    twn_lease_stats st;
};

void twn_lease_cfg_default(twn_lease_cfg *cfg) {
    cfg->lease_s = 30;
    cfg->heartbeat_s = 5;
    cfg->missed_heartbeats = 3;
    cfg->ack_timeout_s = 60;
    cfg->max_attempts = 3;
    cfg->stall_s = 300;
}

int twn_lease_cfg_check(const twn_lease_cfg *cfg, twn_err *err) {
    if (!(cfg->lease_s > 0) || !isfinite(cfg->lease_s))
        return twn_err_set(err, "lease config: lease_s = %g, expected a positive number of seconds",
                           cfg->lease_s);
    if (!(cfg->heartbeat_s > 0) || !isfinite(cfg->heartbeat_s))
        return twn_err_set(err,
                           "lease config: heartbeat_s = %g, expected a positive number of seconds",
                           cfg->heartbeat_s);
    if (cfg->heartbeat_s >= cfg->lease_s)
        return twn_err_set(err,
                           "lease config: heartbeat_s = %g is not shorter than lease_s = %g; "
                           "leases would expire between heartbeats",
                           cfg->heartbeat_s, cfg->lease_s);
    if (cfg->missed_heartbeats < 1)
        return twn_err_set(err, "lease config: missed_heartbeats = %" PRIu32 ", expected >= 1",
                           cfg->missed_heartbeats);
    if (!(cfg->ack_timeout_s > 0) || !isfinite(cfg->ack_timeout_s))
        return twn_err_set(
            err, "lease config: ack_timeout_s = %g, expected a positive number of seconds",
            cfg->ack_timeout_s);
    if (cfg->max_attempts < 1 || cfg->max_attempts > 1000)
        return twn_err_set(err, "lease config: max_attempts = %" PRIu32 ", expected 1..1000",
                           cfg->max_attempts);
    if (!(cfg->stall_s >= 0) || !isfinite(cfg->stall_s) ||
        (cfg->stall_s > 0 && cfg->stall_s <= cfg->heartbeat_s))
        return twn_err_set(err,
                           "lease config: stall_s = %g, expected 0 (off) or more than heartbeat_s "
                           "= %g (progress is only seen once per heartbeat)",
                           cfg->stall_s, cfg->heartbeat_s);
    return 0;
}

twn_leases *twn_leases_new(const char *name, const twn_lease_cfg *cfg, const twn_lease_hooks *hooks,
                           uint32_t id_prefix) {
    twn_leases *l = twn_calloc(1, sizeof *l);
    snprintf(l->name, sizeof l->name, "%s", name);
    l->cfg = *cfg;
    l->hooks = *hooks;
    l->prefix = id_prefix & 0xffff;
    l->earliest = INFINITY;
    return l;
}

void twn_leases_free(twn_leases *l) {
    if (!l) return;
    for (size_t i = 0; i < l->ns; i++) {
        twn_free(l->s[i].refs);
        twn_free(l->s[i].att);
    }
    twn_free(l->s);
    twn_free(l->freel);
    twn_free(l->live);
    twn_free(l->q);
    twn_free(l->w);
    twn_free(l->scratch);
    twn_free(l);
}

// ------------------------------------------------------------------------------------------------
// Queue

static void q_grow(twn_leases *l) {
    size_t nc = l->qcap ? l->qcap * 2 : 256;
    qent *q = twn_malloc(nc * sizeof *q);
    for (size_t i = 0; i < l->qn; i++) q[i] = l->q[(l->qhead + i) % l->qcap];
    twn_free(l->q);
    l->q = q;
    l->qcap = nc;
    l->qhead = 0;
}

void twn_leases_enqueue(twn_leases *l, uint64_t ref, uint32_t attempts) {
    if (l->qn == l->qcap) q_grow(l);
    l->q[(l->qhead + l->qn++) % l->qcap] = (qent){ref, attempts};
}

static void push_front(twn_leases *l, uint64_t ref, uint32_t attempts) {
    if (l->qn == l->qcap) q_grow(l);
    l->qhead = (l->qhead + l->qcap - 1) % l->qcap;
    l->q[l->qhead] = (qent){ref, attempts};
    l->qn++;
}

static qent pop_front(twn_leases *l) {
    qent e = l->q[l->qhead];
    l->qhead = (l->qhead + 1) % l->qcap;
    l->qn--;
    return e;
}

size_t twn_leases_queued(const twn_leases *l) {
    return l->qn;
}
size_t twn_leases_live(const twn_leases *l) {
    return l->nlive;
}

// ------------------------------------------------------------------------------------------------
// Slots, workers

static worker *get_worker(twn_leases *l, uint32_t id) {
    if (id >= l->nw) {
        size_t nn = l->nw ? l->nw : 16;
        while (nn <= id) nn *= 2;
        l->w = twn_realloc(l->w, nn * sizeof *l->w);
        for (size_t i = l->nw; i < nn; i++) l->w[i] = (worker){NONE, 0, 0, 0};
        l->nw = nn;
    }
    return &l->w[id];
}

static double silence_deadline(const twn_leases *l, const worker *w) {
    return w->last_seen + l->cfg.heartbeat_s * l->cfg.missed_heartbeats;
}

static uint32_t alloc_slot(twn_leases *l) {
    if (l->nfree) return l->freel[--l->nfree];
    if (l->ns == l->cap_s) {
        l->cap_s = l->cap_s ? l->cap_s * 2 : 64;
        l->s = twn_realloc(l->s, l->cap_s * sizeof *l->s);
    }
    memset(&l->s[l->ns], 0, sizeof l->s[l->ns]);
    return (uint32_t)l->ns++;
}

static void free_slot(twn_leases *l, uint32_t slot) {
    l->s[slot].id = 0;
    if (l->nfree == l->cap_free) {
        l->cap_free = l->cap_free ? l->cap_free * 2 : 64;
        l->freel = twn_realloc(l->freel, l->cap_free * sizeof *l->freel);
    }
    l->freel[l->nfree++] = slot;
}

static void link_lease(twn_leases *l, uint32_t slot) {
    lease *s = &l->s[slot];
    worker *w = get_worker(l, s->worker);
    s->wprev = NONE;
    s->wnext = w->head;
    if (w->head != NONE) l->s[w->head].wprev = slot;
    w->head = slot;
    w->held++;
    if (l->nlive == l->cap_live) {
        l->cap_live = l->cap_live ? l->cap_live * 2 : 64;
        l->live = twn_realloc(l->live, l->cap_live * sizeof *l->live);
    }
    s->live_pos = (uint32_t)l->nlive;
    l->live[l->nlive++] = slot;
}

static void unlink_lease(twn_leases *l, uint32_t slot) {
    lease *s = &l->s[slot];
    worker *w = &l->w[s->worker];
    if (s->wprev != NONE)
        l->s[s->wprev].wnext = s->wnext;
    else
        w->head = s->wnext;
    if (s->wnext != NONE) l->s[s->wnext].wprev = s->wprev;
    w->held--;
    uint32_t last = l->live[--l->nlive];
    l->live[s->live_pos] = last;
    l->s[last].live_pos = s->live_pos;
}

// ------------------------------------------------------------------------------------------------
// Grant, renew, finish, settle

int twn_leases_grant(twn_leases *l, uint32_t worker_id, size_t max_refs, double now,
                     twn_lease_grant *g, twn_err *err) {
    memset(g, 0, sizeof *g);
    if (worker_id >= TWN_LEASE_MAX_WORKERS)
        return twn_err_set(err, "%s lease: worker id %" PRIu32 " out of range (max %u)", l->name,
                           worker_id, TWN_LEASE_MAX_WORKERS - 1);
    worker *w = get_worker(l, worker_id);
    w->known = 1;
    w->last_seen = now;
    if (!l->qn || !max_refs) return 0;
    if (l->ns - l->nfree >= TWN_LEASE_MAX_SLOTS)
        return twn_err_set(err, "%s lease: %u leases are live, the most a pool holds", l->name,
                           TWN_LEASE_MAX_SLOTS);
    uint32_t slot = alloc_slot(l);
    lease *s = &l->s[slot];
    size_t want = max_refs < l->qn ? max_refs : l->qn;
    if (s->cap < want) {
        s->cap = want;
        s->refs = twn_realloc(s->refs, want * sizeof *s->refs);
        s->att = twn_realloc(s->att, want * sizeof *s->att);
    }
    s->n = 0;
    while (s->n < max_refs && l->qn) {
        if (s->n == s->cap) {
            s->cap *= 2;
            s->refs = twn_realloc(s->refs, s->cap * sizeof *s->refs);
            s->att = twn_realloc(s->att, s->cap * sizeof *s->att);
        }
        qent e = pop_front(l);
        if (!l->hooks.bind(l->hooks.ctx, e.ref, slot)) {
            l->st.dropped++;
            continue;
        }
        s->refs[s->n] = e.ref;
        s->att[s->n] = e.attempts + 1;
        s->n++;
    }
    if (!s->n) {
        free_slot(l, slot);
        return 0;
    }
    s->gen = (s->gen + 1) & GEN_MASK;
    if (!s->gen) s->gen = 1;
    s->id = (uint64_t)l->prefix << 48 | (uint64_t)s->gen << SLOT_BITS | slot;
    s->worker = worker_id;
    s->n_open = s->n;
    s->finished = 0;
    s->ending = 0;
    s->started = 0;
    s->progress = 0;
    s->moved = now;
    s->listed = 0;
    s->deadline = now + l->cfg.lease_s;
    link_lease(l, slot);
    double sd = silence_deadline(l, &l->w[worker_id]);
    if (s->deadline < l->earliest) l->earliest = s->deadline;
    if (sd < l->earliest) l->earliest = sd;
    l->st.granted++;
    g->id = s->id;
    g->slot = slot;
    g->deadline = s->deadline;
    g->n = s->n;
    g->refs = s->refs;
    g->attempts = s->att;
    return 1;
}

int twn_leases_resolve(const twn_leases *l, twn_lease_id id, uint32_t *slot, twn_err *err) {
    uint32_t sl = (uint32_t)(id & SLOT_MASK);
    uint32_t pre = (uint32_t)(id >> 48);
    if (!id || pre > l->prefix || (pre == l->prefix && sl >= l->ns))
        return twn_err_set(err, "%s lease %016" PRIx64 ": never granted", l->name, id);
    if (pre < l->prefix || l->s[sl].id != id || l->s[sl].ending) return 0;
    if (slot) *slot = sl;
    return 1;
}

int twn_leases_finish(twn_leases *l, twn_lease_id id, double now, twn_err *err) {
    uint32_t slot = 0;
    int r = twn_leases_resolve(l, id, &slot, err);
    if (r == 0) l->st.late++;
    if (r != 1) return r;
    lease *s = &l->s[slot];
    if (!s->finished) {
        s->finished = 1;
        s->deadline = now + l->cfg.ack_timeout_s;
        if (s->deadline < l->earliest) l->earliest = s->deadline;
    }
    return 1;
}

int twn_leases_renew(twn_leases *l, twn_lease_id id, double now, twn_err *err) {
    uint32_t slot = 0;
    int r = twn_leases_resolve(l, id, &slot, err);
    if (r == 0) l->st.late++;
    if (r != 1) return r;
    lease *s = &l->s[slot];
    if (!s->finished && now + l->cfg.lease_s > s->deadline) s->deadline = now + l->cfg.lease_s;
    return 1;
}

size_t twn_leases_heartbeat(twn_leases *l, uint32_t worker_id, double now) {
    if (worker_id >= TWN_LEASE_MAX_WORKERS) return 0;
    worker *w = get_worker(l, worker_id);
    w->known = 1;
    if (now > w->last_seen) w->last_seen = now;
    size_t k = 0;
    for (uint32_t s = w->head; s != NONE; s = l->s[s].wnext) {
        lease *x = &l->s[s];
        if (x->finished) continue;
        if (now + l->cfg.lease_s > x->deadline) x->deadline = now + l->cfg.lease_s;
        k++;
    }
    return k;
}

/* An ACTIVE lease its holder started whose progress has stood still for stall_s. */
static int stalled(const twn_leases *l, const lease *s, double now) {
    return l->cfg.stall_s > 0 && s->started && !s->finished && now >= s->moved + l->cfg.stall_s;
}

static void renew(twn_leases *l, lease *s, double now) {
    if (now + l->cfg.lease_s > s->deadline) s->deadline = now + l->cfg.lease_s;
}

size_t twn_leases_report(twn_leases *l, uint32_t worker_id, double now, const twn_lease_beat *b,
                         size_t n) {
    if (worker_id >= TWN_LEASE_MAX_WORKERS) return 0;
    worker *w = get_worker(l, worker_id);
    w->known = 1;
    if (now > w->last_seen) w->last_seen = now;
    uint64_t mark = ++l->reports;
    for (size_t i = 0; i < n; i++) {
        uint32_t slot;
        if (twn_leases_resolve(l, b[i].id, &slot, NULL) != 1) continue; /* ended, other pool */
        lease *s = &l->s[slot];
        if (s->worker != worker_id || s->finished) continue;
        s->listed = mark;
        if (!b[i].progress) continue; /* queued inside the worker */
        if (!s->started || b[i].progress != s->progress) {
            s->started = 1;
            s->progress = b[i].progress;
            s->moved = now;
            if (l->cfg.stall_s > 0 && now + l->cfg.stall_s < l->earliest)
                l->earliest = now + l->cfg.stall_s;
        }
    }
    int moving = 0;
    for (uint32_t x = w->head; x != NONE; x = l->s[x].wnext) {
        const lease *s = &l->s[x];
        moving |= s->started && s->listed == mark && !s->finished && !stalled(l, s, now);
    }
    size_t k = 0;
    for (uint32_t x = w->head; x != NONE; x = l->s[x].wnext) {
        lease *s = &l->s[x];
        if (s->finished) continue;
        if (s->started ? s->listed == mark && !stalled(l, s, now) : moving) {
            renew(l, s, now);
            k++;
        }
    }
    return k;
}

static void close_lease(twn_leases *l, uint32_t slot) {
    unlink_lease(l, slot);
    free_slot(l, slot);
    l->st.closed++;
}

int twn_leases_settle(twn_leases *l, uint32_t slot) {
    if (slot >= l->ns) return 0;
    lease *s = &l->s[slot];
    if (!s->id || s->ending || !s->n_open) return 0;
    if (--s->n_open) return 0;
    close_lease(l, slot);
    return 1;
}

// ------------------------------------------------------------------------------------------------
// Expiry

/* Ends a live lease without its refs all settled: unbind every ref, then queue (front, original
 * order) the ones that still need work, or hand them to poison after max_attempts.  `counted`:
 * this lease is one of the refs' attempts; 0 for a lease whose holder had finished its part (it
 * only waited for acks): the refs go back with the attempts they had before it, and are never
 * poisoned by it. */
static void end_lease(twn_leases *l, uint32_t slot, int counted) {
    lease *s = &l->s[slot];
    s->ending = 1;
    if (!counted) {
        for (size_t i = 0; i < s->n; i++) s->att[i]--;
    }
    unlink_lease(l, slot);
    size_t keep = 0;
    for (size_t i = 0; i < s->n; i++) {
        if (!l->hooks.unbind(l->hooks.ctx, s->refs[i], slot)) continue;
        s->refs[keep] = s->refs[i];
        s->att[keep] = s->att[i];
        keep++;
    }
    /* Queue retries in reverse so they come out in their original order, ahead of new work. */
    for (size_t i = keep; i-- > 0;) {
        if (counted && s->att[i] >= l->cfg.max_attempts) continue;
        push_front(l, s->refs[i], s->att[i]);
        l->st.requeued++;
        if (!counted) l->st.uncounted++;
    }
    for (size_t i = 0; i < keep && counted; i++) {
        if (s->att[i] < l->cfg.max_attempts) continue;
        l->st.poisoned++;
        l->hooks.poison(l->hooks.ctx, s->refs[i], s->att[i]);
    }
    s->ending = 0;
    free_slot(l, slot);
}

/* Ends the leases in scratch.  `holder_dead`: their holder died; a lease it had finished (only
 * waiting for acks) is then not one of its refs' attempts.  A finished lease whose ack deadline
 * passed with the holder alive is: an item that takes its indexer down every time must end in
 * the dead letters after max_attempts, not go round forever. */
static size_t end_slots(twn_leases *l, size_t n, int holder_dead) {
    size_t ended = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t slot = l->scratch[2 * i];
        /* scratch holds (slot, generation); a slot closed and reused meanwhile is skipped. */
        if (!l->s[slot].id || l->s[slot].gen != l->scratch[2 * i + 1]) continue;
        end_lease(l, slot, !holder_dead || !l->s[slot].finished);
        ended++;
    }
    return ended;
}

static void scratch_reserve(twn_leases *l, size_t n) {
    if (l->cap_scratch < 2 * n) {
        l->cap_scratch = 2 * n;
        l->scratch = twn_realloc(l->scratch, l->cap_scratch * sizeof *l->scratch);
    }
}

size_t twn_leases_worker_dead(twn_leases *l, uint32_t worker_id) {
    if (worker_id >= l->nw || !l->w[worker_id].known) return 0;
    worker *w = &l->w[worker_id];
    scratch_reserve(l, w->held);
    size_t n = 0;
    for (uint32_t s = w->head; s != NONE; s = l->s[s].wnext) {
        l->scratch[2 * n] = s;
        l->scratch[2 * n + 1] = l->s[s].gen;
        n++;
    }
    size_t ended = end_slots(l, n, 1);
    l->st.expired += ended;
    l->st.worker_deaths++;
    l->w[worker_id] = (worker){NONE, 0, 0, 0};
    return ended;
}

int twn_leases_release(twn_leases *l, twn_lease_id id, twn_err *err) {
    uint32_t slot = 0;
    int r = twn_leases_resolve(l, id, &slot, err);
    if (r == 0) l->st.late++;
    if (r != 1) return r;
    end_lease(l, slot, 1); /* the holder says its work was not done, whatever it said before */
    l->st.expired++;
    l->st.released++;
    return 1;
}

size_t twn_leases_expire(twn_leases *l, double now) {
    if (now < l->earliest) return 0;
    size_t ended = 0;
    /* Dead workers first: all their leases go at once. */
    for (size_t i = 0; i < l->nlive;) {
        lease *s = &l->s[l->live[i]];
        worker *w = &l->w[s->worker];
        if (!s->finished && silence_deadline(l, w) <= now) {
            ended += twn_leases_worker_dead(l, s->worker);
            i = 0; /* the live array was reshuffled */
            continue;
        }
        i++;
    }
    scratch_reserve(l, l->nlive);
    size_t n = 0;
    for (size_t i = 0; i < l->nlive; i++) {
        lease *s = &l->s[l->live[i]];
        int stall = s->deadline > now && stalled(l, s, now);
        if (s->deadline <= now || stall) {
            l->scratch[2 * n] = l->live[i];
            l->scratch[2 * n + 1] = s->gen;
            n++;
            l->st.stalled += stall;
        }
    }
    size_t e = end_slots(l, n, 0);
    l->st.expired += e;
    ended += e;
    double earliest = INFINITY;
    for (size_t i = 0; i < l->nlive; i++) {
        lease *s = &l->s[l->live[i]];
        if (s->deadline < earliest) earliest = s->deadline;
        if (s->finished) continue;
        double sd = silence_deadline(l, &l->w[s->worker]);
        if (sd < earliest) earliest = sd;
        if (l->cfg.stall_s > 0 && s->started && s->moved + l->cfg.stall_s < earliest)
            earliest = s->moved + l->cfg.stall_s;
    }
    l->earliest = earliest;
    return ended;
}

void twn_leases_pause(twn_leases *l, double dt) {
    if (!(dt > 0)) return;
    for (size_t i = 0; i < l->nw; i++) l->w[i].last_seen += dt;
    for (size_t i = 0; i < l->nlive; i++) {
        lease *s = &l->s[l->live[i]];
        s->deadline += dt;
        s->moved += dt;
    }
    l->earliest += dt;
}

uint32_t twn_leases_worker_of(const twn_leases *l, uint32_t slot) {
    return l->s[slot].worker;
}
double twn_leases_deadline(const twn_leases *l, uint32_t slot) {
    return l->s[slot].deadline;
}
size_t twn_leases_held(const twn_leases *l, uint32_t worker_id) {
    return worker_id < l->nw ? l->w[worker_id].held : 0;
}
const twn_lease_stats *twn_leases_stats(const twn_leases *l) {
    return &l->st;
}
