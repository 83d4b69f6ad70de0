/* cstate.c — the coordinator's state (see cstate.h).
 *
 * Glue only: the unit table decides what an ack means, the lease pools decide who holds what
 * until when, the journal makes decisions durable.  The two pools' refs are a unit's sequence
 * number (unit pool) and seq << 32 | item (hard pool); the tag words of the unit table hold
 * "lease slot + 1" so an ack finds the lease it settles without any search. */
#include "coordinator/cstate.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/hash.h"
#include "util/log.h"
#include "util/mem.h"

enum { POOL_UNIT = 0, POOL_HARD = 1 };

/* Replayed state waiting for its unit to be added, sorted by (key, file order). */
typedef struct rdone {
    uint64_t key;
    twn_unit_counts c;
    uint64_t order;
} rdone;

typedef struct ritem {
    uint64_t key;
    uint32_t item;
    uint64_t order;
} ritem;

typedef struct replay {
    rdone *done;
    size_t n_done, cap_done;
    ritem *dead, *hard;
    size_t n_dead, cap_dead, n_hard, cap_hard;
    uint64_t order;
} replay;

typedef struct dfifo {
    uint64_t jseq; /* journal record number of the UNIT_DONE */
    uint32_t seq;
} dfifo;

struct twn_cstate {
    twn_cstate_cfg cfg;
    twn_cstate_hooks hooks;
    twn_units *u;
    twn_leases *pool[2];
    twn_journal *j;
    const char *path;
    replay rp;
    /* durability of done units, for the low-water mark: durable[seq - dbase] */
    uint8_t *durable;
    size_t cap_durable;
    uint32_t dbase; /* == the unit table's base: units below it were released */
    uint32_t durable_low;
    /* streams (twn_cstate_forget): keys whose records compaction keeps after their release */
    uint64_t *pinned;
    size_t n_pinned;
    uint64_t released, compactions, compacted_bytes;
    dfifo *fifo;
    size_t fifo_head, fifo_n, fifo_cap;
    /* scratch */
    uint32_t *tags;
    size_t cap_tags;
    twn_item_ref *refs;
    size_t cap_refs;
    int finished_written;
    int failed;
    twn_err fail;
};

void twn_cstate_cfg_default(twn_cstate_cfg *cfg) {
    twn_lease_cfg_default(&cfg->unit_lease);
    twn_lease_cfg_default(&cfg->hard_lease);
    twn_journal_cfg_default(&cfg->journal);
    cfg->hard_batch = 64;
    cfg->max_hard_queued = 65536;
    cfg->journal_compact_bytes = 4u << 20;
}

int twn_cstate_cfg_check(const twn_cstate_cfg *cfg, twn_err *err) {
    if (twn_lease_cfg_check(&cfg->unit_lease, err) != 0) return twn_err_wrap(err, "unit_lease");
    if (twn_lease_cfg_check(&cfg->hard_lease, err) != 0) return twn_err_wrap(err, "hard_lease");
    if (!(cfg->journal.group_commit_s >= 0))
        return twn_err_set(err, "journal: group_commit_s = %g, expected >= 0",
                           cfg->journal.group_commit_s);
    if (cfg->hard_batch < 1 || cfg->hard_batch > 65536)
        return twn_err_set(err, "hard_batch = %" PRIu32 ", expected 1..65536", cfg->hard_batch);
    return 0;
}

uint64_t twn_unit_key(const char *source, uint64_t offset, uint64_t length) {
    size_t n = strlen(source);
    uint8_t stack[512];
    uint8_t *buf = n + 17 <= sizeof stack ? stack : twn_malloc(n + 17);
    memcpy(buf, source, n);
    buf[n] = 0;
    for (int i = 0; i < 8; i++) {
        buf[n + 1 + i] = (uint8_t)(offset >> (8 * i));
        buf[n + 9 + i] = (uint8_t)(length >> (8 * i));
    }
    uint64_t h = twn_hash64(buf, n + 17);
    if (buf != stack) twn_free(buf);
    return h;
}

// ------------------------------------------------------------------------------------------------
// Failure: a journal append inside a lease hook cannot return its error; the next call does.

static void fail(twn_cstate *c, const twn_err *e) {
    if (c->failed) return;
    c->failed = 1;
    if (e)
        c->fail = *e;
    else
        twn_err_set(&c->fail, "coordinator journal failed");
}

static int check_failed(const twn_cstate *c, twn_err *err) {
    if (!c->failed) return 0;
    if (err) *err = c->fail;
    return -1;
}

// ------------------------------------------------------------------------------------------------
// Completion and durability

/* Room for the durability flags of units below n (a sequence number). */
static void reserve_durable(twn_cstate *c, size_t n) {
    n -= c->dbase;
    if (n <= c->cap_durable) return;
    size_t nc = c->cap_durable ? c->cap_durable : 1024;
    while (nc < n) nc *= 2;
    c->durable = twn_realloc(c->durable, nc);
    memset(c->durable + c->cap_durable, 0, nc - c->cap_durable);
    c->cap_durable = nc;
}

static void update_durable(twn_cstate *c) {
    uint64_t d = twn_journal_durable(c->j);
    while (c->fifo_n && c->fifo[c->fifo_head].jseq <= d) {
        c->durable[c->fifo[c->fifo_head].seq - c->dbase] = 1;
        c->fifo_head = (c->fifo_head + 1) % c->fifo_cap;
        c->fifo_n--;
    }
    size_t n = twn_units_count(c->u);
    while (c->durable_low < n && c->durable[c->durable_low - c->dbase]) c->durable_low++;
}

static void push_fifo(twn_cstate *c, uint64_t jseq, uint32_t seq) {
    if (c->fifo_n == c->fifo_cap) {
        size_t nc = c->fifo_cap ? c->fifo_cap * 2 : 256;
        dfifo *f = twn_malloc(nc * sizeof *f);
        for (size_t i = 0; i < c->fifo_n; i++) f[i] = c->fifo[(c->fifo_head + i) % c->fifo_cap];
        twn_free(c->fifo);
        c->fifo = f;
        c->fifo_cap = nc;
        c->fifo_head = 0;
    }
    c->fifo[(c->fifo_head + c->fifo_n++) % c->fifo_cap] = (dfifo){jseq, seq};
}

static void unit_completed(twn_cstate *c, uint32_t seq) {
    twn_unit_counts k = twn_units_counts(c->u, seq);
    uint64_t key = twn_units_key(c->u, seq);
    twn_err e = {{0}};
    if (twn_journal_unit_done(c->j, key, &k, &e) != 0) {
        fail(c, &e);
        return;
    }
    push_fifo(c, twn_journal_appended(c->j), seq);
    if (c->hooks.unit_done) c->hooks.unit_done(c->hooks.ctx, key, &k);
}

/* Settles what a report resolved: leases of items that became terminal, the unit lease when its
 * last PENDING item resolved, and completion. */
static void settle(twn_cstate *c, uint32_t seq, const uint32_t *tags, size_t n_tags,
                   const twn_units_result *r) {
    for (size_t i = 0; i < n_tags; i++) twn_leases_settle(c->pool[POOL_HARD], tags[i] - 1);
    if (r->unit_tag) twn_leases_settle(c->pool[POOL_UNIT], r->unit_tag - 1);
    if (r->unit_done) unit_completed(c, seq);
}

/* journal = 0 when replaying a DEAD_LETTER that is already in the journal. */
static int do_dead(twn_cstate *c, uint32_t seq, uint32_t item, twn_stage stage, const char *reason,
                   int journal, twn_err *err) {
    uint32_t tag = 0;
    twn_units_result r;
    if (twn_units_dead(c->u, seq, item, &tag, &r, err) != 0) return -1;
    if (!r.applied) return 0;
    uint64_t key = twn_units_key(c->u, seq);
    if (journal) {
        twn_err e = {{0}};
        if (twn_journal_dead_letter(c->j, key, item, stage, reason, &e) != 0) {
            fail(c, &e);
            return check_failed(c, err);
        }
        if (c->hooks.dead_letter) c->hooks.dead_letter(c->hooks.ctx, key, item, stage, reason);
    }
    settle(c, seq, &tag, tag ? 1 : 0, &r);
    return check_failed(c, err);
}

// ------------------------------------------------------------------------------------------------
// Lease hooks

static int unit_bind(void *ctx, uint64_t ref, uint32_t slot) {
    twn_cstate *c = ctx;
    uint32_t seq = (uint32_t)ref;
    if (twn_units_is_done(c->u, seq) || !twn_units_pending(c->u, seq)) return 0;
    twn_units_set_tag(c->u, seq, slot + 1);
    return 1;
}

static int unit_unbind(void *ctx, uint64_t ref, uint32_t slot) {
    twn_cstate *c = ctx;
    uint32_t seq = (uint32_t)ref;
    if (twn_units_tag(c->u, seq) == slot + 1) twn_units_set_tag(c->u, seq, 0);
    return !twn_units_is_done(c->u, seq) && twn_units_pending(c->u, seq) > 0;
}

static void unit_poison(void *ctx, uint64_t ref, uint32_t attempts) {
    twn_cstate *c = ctx;
    uint32_t seq = (uint32_t)ref, n = twn_units_n_items(c->u, seq);
    char reason[64];
    snprintf(reason, sizeof reason, "lease expired %" PRIu32 " times", attempts);
    twn_err e = {{0}};
    for (uint32_t i = 0; i < n && !twn_units_is_done(c->u, seq); i++) {
        if (twn_units_item(c->u, seq, i) != TWN_ITEM_PENDING) continue;
        if (do_dead(c, seq, i, TWN_STAGE_GATE, reason, 1, &e) != 0) {
            fail(c, &e);
            return;
        }
    }
}

static int hard_bind(void *ctx, uint64_t ref, uint32_t slot) {
    twn_cstate *c = ctx;
    uint32_t seq = (uint32_t)(ref >> 32), item = (uint32_t)ref;
    if (twn_units_item(c->u, seq, item) != TWN_ITEM_HARD_PENDING) return 0;
    if (twn_units_item_tag(c->u, seq, item)) return 0; /* already held: never queued twice */
    twn_units_set_item_tag(c->u, seq, item, slot + 1);
    return 1;
}

static int hard_unbind(void *ctx, uint64_t ref, uint32_t slot) {
    twn_cstate *c = ctx;
    uint32_t seq = (uint32_t)(ref >> 32), item = (uint32_t)ref;
    int st = twn_units_item(c->u, seq, item);
    if (st != TWN_ITEM_HARD_PENDING) return 0;
    if (twn_units_item_tag(c->u, seq, item) == slot + 1) twn_units_set_item_tag(c->u, seq, item, 0);
    return 1;
}

static void hard_poison(void *ctx, uint64_t ref, uint32_t attempts) {
    twn_cstate *c = ctx;
    char reason[64];
    snprintf(reason, sizeof reason, "lease expired %" PRIu32 " times", attempts);
    twn_err e = {{0}};
    if (do_dead(c, (uint32_t)(ref >> 32), (uint32_t)ref, TWN_STAGE_REASON, reason, 1, &e) != 0)
        fail(c, &e);
}

// ------------------------------------------------------------------------------------------------
// Open, replay, add units

static int on_record(void *ctx, const twn_jrec *r, twn_err *err) {
    replay *rp = ctx;
    rp->order++;
    switch (r->type) {
    case TWN_JREC_UNIT_DONE:
        if (rp->n_done == rp->cap_done) {
            rp->cap_done = rp->cap_done ? rp->cap_done * 2 : 256;
            rp->done = twn_realloc(rp->done, rp->cap_done * sizeof *rp->done);
        }
        rp->done[rp->n_done++] = (rdone){r->unit, r->counts, rp->order};
        break;
    case TWN_JREC_DEAD_LETTER:
        if (rp->n_dead == rp->cap_dead) {
            rp->cap_dead = rp->cap_dead ? rp->cap_dead * 2 : 256;
            rp->dead = twn_realloc(rp->dead, rp->cap_dead * sizeof *rp->dead);
        }
        rp->dead[rp->n_dead++] = (ritem){r->unit, r->item, rp->order};
        break;
    case TWN_JREC_HARD_ROUTED:
        if (rp->n_hard + r->n_items > rp->cap_hard) {
            while (rp->n_hard + r->n_items > rp->cap_hard)
                rp->cap_hard = rp->cap_hard ? rp->cap_hard * 2 : 256;
            rp->hard = twn_realloc(rp->hard, rp->cap_hard * sizeof *rp->hard);
        }
        for (size_t i = 0; i < r->n_items; i++)
            rp->hard[rp->n_hard++] = (ritem){r->unit, r->items[i], rp->order};
        break;
    default:
        break;
    }
    (void)err;
    return 0;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int cmp_done(const void *a, const void *b) {
    const rdone *x = a, *y = b;
    if (x->key != y->key) return x->key < y->key ? -1 : 1;
    return x->order < y->order ? -1 : x->order > y->order;
}

static int cmp_item(const void *a, const void *b) {
    const ritem *x = a, *y = b;
    if (x->key != y->key) return x->key < y->key ? -1 : 1;
    return x->order < y->order ? -1 : x->order > y->order;
}

static size_t lower_done(const replay *rp, uint64_t key) {
    size_t lo = 0, hi = rp->n_done;
    while (lo < hi) {
        size_t m = lo + (hi - lo) / 2;
        if (rp->done[m].key < key)
            lo = m + 1;
        else
            hi = m;
    }
    return lo;
}

static size_t lower_item(const ritem *v, size_t n, uint64_t key) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t m = lo + (hi - lo) / 2;
        if (v[m].key < key)
            lo = m + 1;
        else
            hi = m;
    }
    return lo;
}

int twn_cstate_open(const char *journal_path, const twn_plan_fp *fp, const twn_cstate_cfg *cfg,
                    const twn_cstate_hooks *hooks, twn_cstate **out, twn_journal_info *info,
                    twn_err *err) {
    *out = NULL;
    if (twn_cstate_cfg_check(cfg, err) != 0) return -1;
    twn_cstate *c = twn_calloc(1, sizeof *c);
    c->cfg = *cfg;
    if (hooks) c->hooks = *hooks;
    twn_journal_info inf;
    if (twn_journal_open(journal_path, fp, &cfg->journal, on_record, &c->rp, &c->j, &inf, err) !=
        0) {
        twn_free(c->rp.done);
        twn_free(c->rp.dead);
        twn_free(c->rp.hard);
        twn_free(c);
        return -1;
    }
    if (c->rp.n_done) qsort(c->rp.done, c->rp.n_done, sizeof *c->rp.done, cmp_done);
    if (c->rp.n_dead) qsort(c->rp.dead, c->rp.n_dead, sizeof *c->rp.dead, cmp_item);
    if (c->rp.n_hard) qsort(c->rp.hard, c->rp.n_hard, sizeof *c->rp.hard, cmp_item);
    c->path = twn_journal_path(c->j);
    c->finished_written = inf.finished;
    c->u = twn_units_new();
    twn_lease_hooks uh = {c, unit_bind, unit_unbind, unit_poison};
    twn_lease_hooks hh = {c, hard_bind, hard_unbind, hard_poison};
    c->pool[POOL_UNIT] = twn_leases_new("unit", &cfg->unit_lease, &uh, inf.epoch << 1 | POOL_UNIT);
    c->pool[POOL_HARD] =
        twn_leases_new("hard batch", &cfg->hard_lease, &hh, inf.epoch << 1 | POOL_HARD);
    if (info) *info = inf;
    *out = c;
    return 0;
}

/* Applies the replayed journal to a unit just added. */
static int apply_replay(twn_cstate *c, uint32_t seq, twn_err *err) {
    replay *rp = &c->rp;
    uint64_t key = twn_units_key(c->u, seq);
    uint32_t n = twn_units_n_items(c->u, seq);
    size_t d = lower_done(rp, key);
    if (d < rp->n_done && rp->done[d].key == key) {
        const twn_unit_counts *k = &rp->done[d].c;
        if (k->n_items != n)
            return twn_err_set(err,
                               "%s: UNIT_DONE for unit %016" PRIx64 " says %" PRIu32
                               " items, the plan has %" PRIu32,
                               c->path, key, k->n_items, n);
        twn_units_restore_done(c->u, seq, k);
        c->durable[seq - c->dbase] = 1;
        return 0;
    }
    for (size_t i = lower_item(rp->dead, rp->n_dead, key); i < rp->n_dead && rp->dead[i].key == key;
         i++) {
        if (rp->dead[i].item >= n)
            return twn_err_set(err,
                               "%s: DEAD_LETTER for unit %016" PRIx64 " item %" PRIu32
                               ", but the plan's unit has %" PRIu32 " items",
                               c->path, key, rp->dead[i].item, n);
        if (do_dead(c, seq, rp->dead[i].item, TWN_STAGE_READ, NULL, 0, err) != 0) return -1;
    }
    for (size_t i = lower_item(rp->hard, rp->n_hard, key); i < rp->n_hard && rp->hard[i].key == key;
         i++) {
        uint32_t item = rp->hard[i].item, changed;
        size_t nc;
        twn_units_result r;
        if (item >= n)
            return twn_err_set(err,
                               "%s: HARD_ROUTED for unit %016" PRIx64 " item %" PRIu32
                               ", but the plan's unit has %" PRIu32 " items",
                               c->path, key, item, n);
        if (twn_units_mark_hard(c->u, seq, &item, 1, &changed, &nc, &r, err) != 0) return -1;
        if (nc) twn_leases_enqueue(c->pool[POOL_HARD], (uint64_t)seq << 32 | item, 0);
    }
    return 0;
}

int twn_cstate_add_units(twn_cstate *c, const twn_unit_spec *units, size_t n, twn_err *err) {
    if (check_failed(c, err)) return -1;
    reserve_durable(c, twn_units_count(c->u) + n);
    for (size_t i = 0; i < n; i++) {
        uint32_t seq;
        int done_now;
        if (twn_units_add(c->u, units[i].key, units[i].n_items, &seq, &done_now, err) != 0)
            return twn_err_wrap(err, "adding unit %zu of %zu", i, n);
        if (done_now) {
            c->durable[seq - c->dbase] = 1; /* empty: done by definition, nothing to journal */
            continue;
        }
        if (apply_replay(c, seq, err) != 0) return -1;
        if (!twn_units_is_done(c->u, seq) && twn_units_pending(c->u, seq))
            twn_leases_enqueue(c->pool[POOL_UNIT], seq, 0);
    }
    update_durable(c);
    return check_failed(c, err);
}

// ------------------------------------------------------------------------------------------------
// Grants and reports

int twn_cstate_grant_unit(twn_cstate *c, uint32_t worker, double now, twn_unit_grant *g,
                          twn_err *err) {
    memset(g, 0, sizeof *g);
    if (check_failed(c, err)) return -1;
    if (twn_leases_queued(c->pool[POOL_HARD]) > c->cfg.max_hard_queued) {
        /* a sign of life, as a grant would be; it renews nothing (a gate with a hung lease and a
         * spare credit must not keep that lease through back-pressure) */
        twn_leases_report(c->pool[POOL_UNIT], worker, now, NULL, 0);
        return 0;
    }
    twn_lease_grant lg;
    int r = twn_leases_grant(c->pool[POOL_UNIT], worker, 1, now, &lg, err);
    if (r != 1) return r;
    uint32_t seq = (uint32_t)lg.refs[0];
    g->lease = lg.id;
    g->unit = twn_units_key(c->u, seq);
    g->n_items = twn_units_n_items(c->u, seq);
    g->n_pending = twn_units_pending(c->u, seq);
    g->attempt = lg.attempts[0];
    g->deadline = lg.deadline;
    return 1;
}

int twn_cstate_grant_hard(twn_cstate *c, uint32_t worker, size_t max, double now, twn_hard_grant *g,
                          twn_err *err) {
    memset(g, 0, sizeof *g);
    if (check_failed(c, err)) return -1;
    if (!max) max = c->cfg.hard_batch;
    twn_lease_grant lg;
    int r = twn_leases_grant(c->pool[POOL_HARD], worker, max, now, &lg, err);
    if (r != 1) return r;
    if (c->cap_refs < lg.n) {
        c->cap_refs = lg.n;
        c->refs = twn_realloc(c->refs, lg.n * sizeof *c->refs);
    }
    for (size_t i = 0; i < lg.n; i++)
        c->refs[i] = (twn_item_ref){twn_units_key(c->u, (uint32_t)(lg.refs[i] >> 32)),
                                    (uint32_t)lg.refs[i], lg.attempts[i]};
    g->lease = lg.id;
    g->deadline = lg.deadline;
    g->n = lg.n;
    g->items = c->refs;
    return 1;
}

static uint32_t *tags(twn_cstate *c, size_t n) {
    if (c->cap_tags < n) {
        c->cap_tags = n;
        c->tags = twn_realloc(c->tags, n * sizeof *c->tags);
    }
    return c->tags;
}

int twn_cstate_report_hard(twn_cstate *c, uint64_t unit, const uint32_t *items, size_t n,
                           twn_err *err) {
    uint32_t seq;
    if (check_failed(c, err) || twn_units_lookup(c->u, unit, &seq, err) != 0) return -1;
    uint32_t *changed = tags(c, n);
    size_t nc;
    twn_units_result r;
    if (twn_units_mark_hard(c->u, seq, items, n, changed, &nc, &r, err) != 0) return -1;
    twn_err e = {{0}};
    if (nc && twn_journal_hard_routed(c->j, unit, changed, nc, &e) != 0) {
        fail(c, &e);
        return check_failed(c, err);
    }
    for (size_t i = 0; i < nc; i++)
        twn_leases_enqueue(c->pool[POOL_HARD], (uint64_t)seq << 32 | changed[i], 0);
    settle(c, seq, NULL, 0, &r);
    return check_failed(c, err);
}

int twn_cstate_dead_letter(twn_cstate *c, uint64_t unit, uint32_t item, twn_stage stage,
                           const char *reason, twn_err *err) {
    uint32_t seq;
    if (check_failed(c, err) || twn_units_lookup(c->u, unit, &seq, err) != 0) return -1;
    if (stage < 1 || stage > TWN_STAGE_MAX)
        return twn_err_set(
            err, "dead letter for unit %016" PRIx64 " item %" PRIu32 ": stage %d, expected 1..%d",
            unit, item, (int)stage, TWN_STAGE_MAX);
    return do_dead(c, seq, item, stage, reason ? reason : "", 1, err);
}

int twn_cstate_ack(twn_cstate *c, uint64_t unit, const uint32_t *items,
                   const uint32_t *think_tokens, size_t n, twn_route route, twn_err *err) {
    uint32_t seq;
    if (check_failed(c, err) || twn_units_lookup(c->u, unit, &seq, err) != 0) return -1;
    uint32_t *t = tags(c, n);
    size_t nt;
    twn_units_result r;
    if (twn_units_ack(c->u, seq, items, think_tokens, n, route, t, &nt, &r, err) != 0) return -1;
    settle(c, seq, t, nt, &r);
    return check_failed(c, err);
}

int twn_cstate_ack_range(twn_cstate *c, uint64_t unit, uint32_t lo, uint32_t hi, twn_route route,
                         twn_err *err) {
    uint32_t seq;
    if (check_failed(c, err) || twn_units_lookup(c->u, unit, &seq, err) != 0) return -1;
    uint32_t *t = tags(c, hi > lo ? hi - lo : 0);
    size_t nt;
    twn_units_result r;
    if (twn_units_ack_range(c->u, seq, lo, hi, route, t, &nt, &r, err) != 0) return -1;
    settle(c, seq, t, nt, &r);
    return check_failed(c, err);
}

static twn_leases *pool_of(twn_cstate *c, twn_lease_id id) {
    return c->pool[(id >> 48) & 1];
}

int twn_cstate_finish(twn_cstate *c, twn_lease_id lease, double now, twn_err *err) {
    if (check_failed(c, err)) return -1;
    return twn_leases_finish(pool_of(c, lease), lease, now, err);
}

int twn_cstate_release(twn_cstate *c, twn_lease_id lease, twn_err *err) {
    if (check_failed(c, err)) return -1;
    int r = twn_leases_release(pool_of(c, lease), lease, err);
    if (r == 1 && check_failed(c, err)) return -1; /* a poisoned ref's journal record failed */
    return r;
}

int twn_cstate_renew(twn_cstate *c, twn_lease_id lease, double now, twn_err *err) {
    if (check_failed(c, err)) return -1;
    return twn_leases_renew(pool_of(c, lease), lease, now, err);
}

void twn_cstate_heartbeat(twn_cstate *c, uint32_t worker, double now) {
    twn_leases_heartbeat(c->pool[POOL_UNIT], worker, now);
    twn_leases_heartbeat(c->pool[POOL_HARD], worker, now);
}

void twn_cstate_report(twn_cstate *c, uint32_t worker, double now, const twn_lease_beat *b,
                       size_t n) {
    /* each pool ignores the other's ids (twn_leases_resolve does not take them) */
    twn_leases_report(c->pool[POOL_UNIT], worker, now, b, n);
    twn_leases_report(c->pool[POOL_HARD], worker, now, b, n);
}

void twn_cstate_worker_dead(twn_cstate *c, uint32_t worker) {
    twn_leases_worker_dead(c->pool[POOL_UNIT], worker);
    twn_leases_worker_dead(c->pool[POOL_HARD], worker);
}

void twn_cstate_pause(twn_cstate *c, double dt) {
    twn_leases_pause(c->pool[POOL_UNIT], dt);
    twn_leases_pause(c->pool[POOL_HARD], dt);
}

int twn_cstate_tick(twn_cstate *c, double now, twn_err *err) {
    if (check_failed(c, err)) return -1;
    twn_leases_expire(c->pool[POOL_UNIT], now);
    twn_leases_expire(c->pool[POOL_HARD], now);
    if (check_failed(c, err)) return -1;
    twn_err e = {{0}};
    if (twn_journal_maybe_commit(c->j, now, NULL, &e) != 0) {
        fail(c, &e);
        return check_failed(c, err);
    }
    update_durable(c);
    return 0;
}

int twn_cstate_sync(twn_cstate *c, twn_err *err) {
    if (check_failed(c, err)) return -1;
    twn_err e = {{0}};
    if (twn_journal_commit(c->j, &e) != 0) {
        fail(c, &e);
        return check_failed(c, err);
    }
    update_durable(c);
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Queries, close

int twn_cstate_all_done(const twn_cstate *c) {
    const twn_progress *p = twn_units_progress(c->u);
    return p->units_done == p->units_total;
}

uint32_t twn_cstate_low_water(twn_cstate *c) {
    update_durable(c);
    return c->durable_low;
}

int twn_cstate_seq_of(const twn_cstate *c, uint64_t unit, uint32_t *seq) {
    return twn_units_find(c->u, unit, seq);
}

uint32_t twn_cstate_base(const twn_cstate *c) {
    return c->dbase;
}

// ------------------------------------------------------------------------------------------------
// Streams: releasing the committed prefix, compacting the journal

void twn_cstate_keep_keys(twn_cstate *c, const uint64_t *keys, size_t n) {
    c->pinned = twn_realloc(c->pinned, (c->n_pinned + n + 1) * sizeof *c->pinned);
    memcpy(c->pinned + c->n_pinned, keys, n * sizeof *keys);
    c->n_pinned += n;
    qsort(c->pinned, c->n_pinned, sizeof *c->pinned, cmp_u64);
}

void twn_cstate_replay_drop(twn_cstate *c) {
    replay *rp = &c->rp;
    twn_free(rp->done);
    twn_free(rp->dead);
    twn_free(rp->hard);
    memset(rp, 0, sizeof *rp);
}

/* Compaction keeps the records of units still in the table, of pinned units, and of replayed
 * units not yet planned again (their records are what a restart needs). */
static int keep_rec(void *ctx, const twn_jrec *r) {
    twn_cstate *c = ctx;
    const replay *rp = &c->rp;
    if (r->type == TWN_JREC_JOB_FINISHED || twn_units_find(c->u, r->unit, NULL)) return 1;
    if (c->n_pinned && bsearch(&r->unit, c->pinned, c->n_pinned, sizeof *c->pinned, cmp_u64))
        return 1;
    size_t i = lower_done(rp, r->unit);
    if (i < rp->n_done && rp->done[i].key == r->unit) return 1;
    i = lower_item(rp->dead, rp->n_dead, r->unit);
    if (i < rp->n_dead && rp->dead[i].key == r->unit) return 1;
    i = lower_item(rp->hard, rp->n_hard, r->unit);
    return i < rp->n_hard && rp->hard[i].key == r->unit;
}

static int maybe_compact(twn_cstate *c, twn_err *err) {
    uint64_t b = twn_journal_bytes(c->j);
    if (!c->cfg.journal_compact_bytes || b < c->cfg.journal_compact_bytes ||
        b < 2 * c->compacted_bytes)
        return 0;
    twn_err e = {{0}};
    uint64_t kept = 0;
    if (twn_journal_compact(c->j, keep_rec, c, &kept, &e) != 0) {
        twn_err e2 = {{0}};
        if (twn_journal_commit(c->j, &e2) != 0) { /* poisoned: the old file is gone */
            fail(c, &e2);
            return check_failed(c, err);
        }
        /* the old journal is still in use: try again once it has doubled */
        twn_log(TWN_LOG_WARN,
                "coordinator: journal compaction failed (the journal stays as it "
                "is): %s",
                e.msg);
        c->compacted_bytes = b;
        return 0;
    }
    c->compacted_bytes = twn_journal_bytes(c->j);
    c->compactions++;
    twn_debug("coordinator: journal compacted from %llu to %llu bytes (%llu records kept)",
              (unsigned long long)b, (unsigned long long)c->compacted_bytes,
              (unsigned long long)kept);
    update_durable(c);
    return 0;
}

int twn_cstate_forget(twn_cstate *c, uint32_t below, size_t *released, twn_err *err) {
    if (released) *released = 0;
    if (check_failed(c, err)) return -1;
    update_durable(c);
    if (below > c->durable_low) below = c->durable_low;
    size_t k = twn_units_release(c->u, below);
    if (k) {
        uint32_t nb = twn_units_base(c->u);
        size_t shift = nb - c->dbase;
        memmove(c->durable, c->durable + shift, c->cap_durable - shift);
        memset(c->durable + c->cap_durable - shift, 0, shift);
        c->dbase = nb;
        c->released += k;
    }
    if (released) *released = k;
    return maybe_compact(c, err);
}

int twn_cstate_item_state(const twn_cstate *c, uint64_t unit, uint32_t item) {
    uint32_t seq;
    if (!twn_units_find(c->u, unit, &seq) || item >= twn_units_n_items(c->u, seq)) return -1;
    return (int)twn_units_item(c->u, seq, item);
}

int twn_cstate_unit_counts(const twn_cstate *c, uint64_t unit, twn_unit_counts *counts, int *done) {
    uint32_t seq;
    if (!twn_units_find(c->u, unit, &seq)) return -1;
    if (counts) *counts = twn_units_counts(c->u, seq);
    if (done) *done = twn_units_is_done(c->u, seq);
    return 0;
}

void twn_cstate_stats_get(twn_cstate *c, twn_cstate_stats *s) {
    memset(s, 0, sizeof *s);
    s->progress = *twn_units_progress(c->u);
    s->unit_leases = *twn_leases_stats(c->pool[POOL_UNIT]);
    s->hard_leases = *twn_leases_stats(c->pool[POOL_HARD]);
    s->units_queued = twn_leases_queued(c->pool[POOL_UNIT]);
    s->hard_queued = twn_leases_queued(c->pool[POOL_HARD]);
    s->unit_leases_live = twn_leases_live(c->pool[POOL_UNIT]);
    s->hard_leases_live = twn_leases_live(c->pool[POOL_HARD]);
    s->journal_records = twn_journal_appended(c->j);
    s->journal_commits = twn_journal_commits(c->j);
    s->low_water = twn_cstate_low_water(c);
    s->item_bytes = twn_units_item_bytes(c->u);
    s->units_resident = twn_units_resident(c->u);
    s->units_released = c->released;
    s->journal_bytes = twn_journal_bytes(c->j);
    s->journal_compactions = c->compactions;
}

static void free_state(twn_cstate *c) {
    twn_units_free(c->u);
    twn_leases_free(c->pool[0]);
    twn_leases_free(c->pool[1]);
    twn_free(c->rp.done);
    twn_free(c->rp.dead);
    twn_free(c->rp.hard);
    twn_free(c->durable);
    twn_free(c->pinned);
    twn_free(c->fifo);
    twn_free(c->tags);
    twn_free(c->refs);
    twn_free(c);
}

int twn_cstate_close(twn_cstate *c, twn_err *err) {
    if (!c) return 0;
    int rc = check_failed(c, err);
    if (rc == 0 && twn_cstate_all_done(c) && twn_units_count(c->u) && !c->finished_written) {
        const twn_progress *p = twn_units_progress(c->u);
        twn_job_counts k = {p->units_total, p->items_total, p->easy,
                            p->hard,        p->rejected,    p->think_tokens};
        rc = twn_journal_job_finished(c->j, &k, err);
    }
    if (rc == 0)
        rc = twn_journal_close(c->j, err);
    else
        twn_journal_abandon(c->j);
    free_state(c);
    return rc;
}

void twn_cstate_abandon(twn_cstate *c) {
    if (!c) return;
    twn_journal_abandon(c->j);
    free_state(c);
}
