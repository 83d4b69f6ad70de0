/* units.c — the unit table (see units.h).
 *
 * Layout: a dense array of fixed unit records in plan order, an open-addressing map from key to
 * sequence number, and per active unit one uint32 word per item: state in the low 3 bits, the
 * caller's tag above.  A unit with no word array is either untouched (every item PENDING) or
 * done (every item terminal), which `done` tells apart.
 *
 * The array holds the units [base, n): a stream drops its done prefix (twn_units_release), so the
 * record of sequence number s is u[s - base], and the map deletes keys by backward shifting (no
 * tombstones, so a long stream's map stays as small as its resident units). */
#include "coordinator/units.h"

#include <inttypes.h>
#include <string.h>

#include "util/mem.h"

#define STATE_BITS 3u
#define STATE_MASK 7u

typedef struct unit {
    uint64_t key;
    uint32_t *items; /* NULL: untouched or done */
    uint32_t n_items;
    uint32_t n_pending; /* items PENDING */
    uint32_t n_hardp;   /* items HARD_PENDING */
    uint32_t tag;
    twn_unit_counts c;
    uint8_t done;
} unit;

struct twn_units {
    unit *u;       /* units base .. n-1 */
    size_t n;      /* units ever added (the next sequence number) */
    size_t cap;    /* of u */
    uint32_t base; /* units below it were released */
    /* key -> seq + 1 (0 = empty), linear probing, power-of-two capacity, load <= 1/2 */
    uint64_t *mkeys;
    uint32_t *mvals;
    size_t mcap;
    uint32_t low;
    size_t item_bytes;
    twn_progress p;
};

static inline uint64_t mix(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdull;
    k ^= k >> 33;
    return k;
}

static size_t map_slot(const twn_units *t, uint64_t key) {
    size_t mask = t->mcap - 1;
    size_t i = mix(key) & mask;
    while (t->mvals[i] && t->mkeys[i] != key) i = (i + 1) & mask;
    return i;
}

static void map_grow(twn_units *t) {
    uint64_t *ok = t->mkeys;
    uint32_t *ov = t->mvals;
    size_t oc = t->mcap;
    t->mcap = oc ? oc * 2 : 64;
    t->mkeys = twn_calloc(t->mcap, sizeof *t->mkeys);
    t->mvals = twn_calloc(t->mcap, sizeof *t->mvals);
    for (size_t i = 0; i < oc; i++) {
        if (!ov[i]) continue;
        size_t s = map_slot(t, ok[i]);
        t->mkeys[s] = ok[i];
        t->mvals[s] = ov[i];
    }
    twn_free(ok);
    twn_free(ov);
}

twn_units *twn_units_new(void) {
    twn_units *t = twn_calloc(1, sizeof *t);
    map_grow(t);
    return t;
}

void twn_units_free(twn_units *t) {
    if (!t) return;
    for (size_t i = 0; i < t->n - t->base; i++) twn_free(t->u[i].items);
    twn_free(t->u);
    twn_free(t->mkeys);
    twn_free(t->mvals);
    twn_free(t);
}

/* The record of a resident unit. */
static inline unit *U(const twn_units *t, uint32_t seq) {
    return &t->u[seq - t->base];
}

static inline int released(const twn_units *t, uint32_t seq) {
    return seq < t->base;
}

static void advance_low(twn_units *t) {
    while (t->low < t->n && U(t, t->low)->done) t->low++;
}

static void finish_unit(twn_units *t, unit *u, twn_units_result *res) {
    u->done = 1;
    if (u->items) {
        t->item_bytes -= (size_t)u->n_items * sizeof *u->items;
        twn_free(u->items);
        u->items = NULL;
    }
    t->p.units_done++;
    advance_low(t);
    if (res) res->unit_done = 1;
}

int twn_units_add(twn_units *t, uint64_t key, uint32_t n_items, uint32_t *seq, int *done_now,
                  twn_err *err) {
    if (n_items > TWN_UNIT_MAX_ITEMS)
        return twn_err_set(err, "unit %016" PRIx64 ": %" PRIu32 " items, more than the %u allowed",
                           key, n_items, TWN_UNIT_MAX_ITEMS);
    if (t->n >= UINT32_MAX - 1)
        return twn_err_set(err, "unit %016" PRIx64 ": the plan already has %zu units", key, t->n);
    size_t s = map_slot(t, key);
    if (t->mvals[s])
        return twn_err_set(
            err, "unit %016" PRIx64 ": duplicate key (unit %" PRIu32 " has the same source range)",
            key, t->mvals[s] - 1);
    if (t->n - t->base == t->cap) {
        t->cap = t->cap ? t->cap * 2 : 64;
        t->u = twn_realloc(t->u, t->cap * sizeof *t->u);
    }
    uint32_t q = (uint32_t)t->n++;
    unit *u = U(t, q);
    memset(u, 0, sizeof *u);
    u->key = key;
    u->n_items = n_items;
    u->n_pending = n_items;
    u->c.n_items = n_items;
    t->mkeys[s] = key;
    t->mvals[s] = q + 1;
    if ((t->n - t->base + 1) * 2 > t->mcap) map_grow(t);
    t->p.units_total++;
    t->p.items_total += n_items;
    int d = 0;
    if (n_items == 0) {
        finish_unit(t, u, NULL);
        d = 1;
    }
    if (seq) *seq = q;
    if (done_now) *done_now = d;
    return 0;
}

size_t twn_units_count(const twn_units *t) {
    return t->n;
}

int twn_units_find(const twn_units *t, uint64_t key, uint32_t *seq) {
    size_t s = map_slot(t, key);
    if (!t->mvals[s]) return 0;
    if (seq) *seq = t->mvals[s] - 1;
    return 1;
}

int twn_units_lookup(twn_units *t, uint64_t key, uint32_t *seq, twn_err *err) {
    if (twn_units_find(t, key, seq)) return 0;
    t->p.bad_reports++;
    return twn_err_set(err, "unknown unit %016" PRIx64 ": not in the plan (%zu units)", key, t->n);
}

/* A released unit reads as done, with no items, key 0 and no tags: refs of it still waiting in a
 * lease queue are dropped at grant like those of any done unit. */
uint64_t twn_units_key(const twn_units *t, uint32_t seq) {
    return released(t, seq) ? 0 : U(t, seq)->key;
}
uint32_t twn_units_n_items(const twn_units *t, uint32_t seq) {
    return released(t, seq) ? 0 : U(t, seq)->n_items;
}
int twn_units_is_done(const twn_units *t, uint32_t seq) {
    return released(t, seq) || U(t, seq)->done;
}
uint32_t twn_units_pending(const twn_units *t, uint32_t seq) {
    return released(t, seq) ? 0 : U(t, seq)->n_pending;
}
twn_unit_counts twn_units_counts(const twn_units *t, uint32_t seq) {
    twn_unit_counts none = {0};
    return released(t, seq) ? none : U(t, seq)->c;
}

twn_item_state twn_units_item(const twn_units *t, uint32_t seq, uint32_t item) {
    if (released(t, seq)) return TWN_ITEM_COMPLETED;
    const unit *u = U(t, seq);
    if (u->done) return TWN_ITEM_COMPLETED;
    if (!u->items) return TWN_ITEM_PENDING;
    return (twn_item_state)(u->items[item] & STATE_MASK);
}

uint32_t twn_units_item_tag(const twn_units *t, uint32_t seq, uint32_t item) {
    if (released(t, seq)) return 0;
    const unit *u = U(t, seq);
    return u->items ? u->items[item] >> STATE_BITS : 0;
}

static uint32_t *items_of(twn_units *t, unit *u) {
    if (!u->items && !u->done) {
        /* PENDING is 0 and tags start at 0, so a zeroed array is "untouched". */
        u->items = twn_calloc(u->n_items ? u->n_items : 1, sizeof *u->items);
        t->item_bytes += (size_t)u->n_items * sizeof *u->items;
    }
    return u->items;
}

void twn_units_set_item_tag(twn_units *t, uint32_t seq, uint32_t item, uint32_t tag) {
    if (released(t, seq)) return;
    unit *u = U(t, seq);
    if (u->done) return;
    uint32_t *w = &items_of(t, u)[item];
    *w = (*w & STATE_MASK) | (tag & TWN_UNIT_MAX_TAG) << STATE_BITS;
}

uint32_t twn_units_tag(const twn_units *t, uint32_t seq) {
    return released(t, seq) ? 0 : U(t, seq)->tag;
}
void twn_units_set_tag(twn_units *t, uint32_t seq, uint32_t tag) {
    if (!released(t, seq)) U(t, seq)->tag = tag;
}

static int check_items(const twn_units *t, uint32_t seq, const uint32_t *items, size_t n,
                       const char *what, twn_err *err) {
    if (released(t, seq))
        return twn_err_set(
            err, "%s for unit #%" PRIu32 ": the unit was released (done and committed)", what, seq);
    const unit *u = U(t, seq);
    for (size_t i = 0; i < n; i++)
        if (items[i] >= u->n_items)
            return twn_err_set(err,
                               "%s for unit %016" PRIx64 " item %" PRIu32 ": the unit has %" PRIu32
                               " items (0..%" PRIu32 ")",
                               what, u->key, items[i], u->n_items, u->n_items ? u->n_items - 1 : 0);
    return 0;
}

/* The gate pass of unit u has resolved its last PENDING item: hand back the unit tag. */
static void pending_resolved(unit *u, twn_units_result *res) {
    if (u->n_pending == 0 && u->tag) {
        res->unit_tag = u->tag;
        u->tag = 0;
    }
}

/* One item becomes terminal with state st.  Returns its tag (cleared). */
static uint32_t make_terminal(twn_units *t, unit *u, uint32_t *w, twn_item_state st,
                              uint32_t think) {
    uint32_t old = *w & STATE_MASK, tag = *w >> STATE_BITS;
    if (old == TWN_ITEM_PENDING)
        u->n_pending--;
    else {
        u->n_hardp--;
        t->p.hard_pending--;
    }
    *w = (uint32_t)st;
    switch (st) {
    case TWN_ITEM_EASY:
        u->c.easy++, t->p.easy++;
        break;
    case TWN_ITEM_HARD:
        u->c.hard++, t->p.hard++;
        u->c.think_tokens += think;
        t->p.think_tokens += think;
        break;
    default:
        u->c.dead++, t->p.rejected++;
        break;
    }
    t->p.items_done++;
    return tag;
}

static int terminal(uint32_t w) {
    uint32_t s = w & STATE_MASK;
    return s == TWN_ITEM_EASY || s == TWN_ITEM_HARD || s == TWN_ITEM_DEAD;
}

static void after_report(twn_units *t, unit *u, twn_units_result *res) {
    pending_resolved(u, res);
    if (!u->done && u->c.easy + u->c.hard + u->c.dead == u->n_items) finish_unit(t, u, res);
}

int twn_units_ack(twn_units *t, uint32_t seq, const uint32_t *items, const uint32_t *think_tokens,
                  size_t n, twn_route route, uint32_t *tags_out, size_t *n_tags,
                  twn_units_result *res, twn_err *err) {
    twn_units_result r = {0};
    size_t nt = 0;
    if (check_items(t, seq, items, n, "ack", err) != 0) {
        t->p.bad_reports++;
        if (res) *res = r;
        if (n_tags) *n_tags = 0;
        return -1;
    }
    unit *u = U(t, seq);
    twn_item_state st = route == TWN_ROUTE_HARD ? TWN_ITEM_HARD : TWN_ITEM_EASY;
    if (u->done) {
        r.duplicates = (uint32_t)n;
    } else {
        uint32_t *w = items_of(t, u);
        for (size_t i = 0; i < n; i++) {
            uint32_t *x = &w[items[i]];
            if (terminal(*x)) {
                r.duplicates++;
                continue;
            }
            uint32_t tag = make_terminal(t, u, x, st, think_tokens ? think_tokens[i] : 0);
            r.applied++;
            if (tag && tags_out) tags_out[nt++] = tag;
        }
        after_report(t, u, &r);
    }
    t->p.duplicates += r.duplicates;
    if (n_tags) *n_tags = nt;
    if (res) *res = r;
    return 0;
}

int twn_units_ack_range(twn_units *t, uint32_t seq, uint32_t lo, uint32_t hi, twn_route route,
                        uint32_t *tags_out, size_t *n_tags, twn_units_result *res, twn_err *err) {
    twn_units_result r = {0};
    size_t nt = 0;
    if (released(t, seq)) {
        t->p.bad_reports++;
        if (res) *res = r;
        if (n_tags) *n_tags = 0;
        return twn_err_set(
            err, "ack for unit #%" PRIu32 ": the unit was released (done and committed)", seq);
    }
    unit *u = U(t, seq);
    if (lo > hi || hi > u->n_items) {
        t->p.bad_reports++;
        if (res) *res = r;
        if (n_tags) *n_tags = 0;
        return twn_err_set(err,
                           "ack for unit %016" PRIx64 " items [%" PRIu32 ", %" PRIu32
                           "): the unit has %" PRIu32 " items",
                           u->key, lo, hi, u->n_items);
    }
    twn_item_state st = route == TWN_ROUTE_HARD ? TWN_ITEM_HARD : TWN_ITEM_EASY;
    if (u->done) {
        r.duplicates = hi - lo;
    } else {
        uint32_t *w = items_of(t, u);
        for (uint32_t i = lo; i < hi; i++) {
            if (terminal(w[i])) {
                r.duplicates++;
                continue;
            }
            uint32_t tag = make_terminal(t, u, &w[i], st, 0);
            r.applied++;
            if (tag && tags_out) tags_out[nt++] = tag;
        }
        after_report(t, u, &r);
    }
    t->p.duplicates += r.duplicates;
    if (n_tags) *n_tags = nt;
    if (res) *res = r;
    return 0;
}

int twn_units_mark_hard(twn_units *t, uint32_t seq, const uint32_t *items, size_t n,
                        uint32_t *changed_out, size_t *n_changed, twn_units_result *res,
                        twn_err *err) {
    twn_units_result r = {0};
    size_t nc = 0;
    if (check_items(t, seq, items, n, "hard route", err) != 0) {
        t->p.bad_reports++;
        if (res) *res = r;
        if (n_changed) *n_changed = 0;
        return -1;
    }
    unit *u = U(t, seq);
    if (u->done) {
        r.duplicates = (uint32_t)n;
    } else {
        uint32_t *w = items_of(t, u);
        for (size_t i = 0; i < n; i++) {
            uint32_t *x = &w[items[i]];
            if ((*x & STATE_MASK) != TWN_ITEM_PENDING) {
                r.duplicates++;
                continue;
            }
            /* An item's tag belongs to its state: a PENDING item is covered by the unit lease. */
            *x = TWN_ITEM_HARD_PENDING;
            u->n_pending--;
            u->n_hardp++;
            t->p.hard_pending++;
            r.applied++;
            if (changed_out) changed_out[nc++] = items[i];
        }
        pending_resolved(u, &r);
    }
    t->p.duplicates += r.duplicates;
    if (n_changed) *n_changed = nc;
    if (res) *res = r;
    return 0;
}

int twn_units_dead(twn_units *t, uint32_t seq, uint32_t item, uint32_t *tag, twn_units_result *res,
                   twn_err *err) {
    twn_units_result r = {0};
    if (tag) *tag = 0;
    if (check_items(t, seq, &item, 1, "dead letter", err) != 0) {
        t->p.bad_reports++;
        if (res) *res = r;
        return -1;
    }
    unit *u = U(t, seq);
    if (u->done) {
        r.duplicates = 1;
    } else {
        uint32_t *x = &items_of(t, u)[item];
        if (terminal(*x)) {
            r.duplicates = 1;
        } else {
            uint32_t tg = make_terminal(t, u, x, TWN_ITEM_DEAD, 0);
            if (tag) *tag = tg;
            r.applied = 1;
            after_report(t, u, &r);
        }
    }
    t->p.duplicates += r.duplicates;
    if (res) *res = r;
    return 0;
}

void twn_units_restore_done(twn_units *t, uint32_t seq, const twn_unit_counts *c) {
    if (released(t, seq)) return;
    unit *u = U(t, seq);
    if (u->done) return;
    /* Undo whatever this run had counted for the unit, then take the journal's counts. */
    t->p.easy -= u->c.easy;
    t->p.hard -= u->c.hard;
    t->p.rejected -= u->c.dead;
    t->p.think_tokens -= u->c.think_tokens;
    t->p.items_done -= u->c.easy + u->c.hard + u->c.dead;
    t->p.hard_pending -= u->n_hardp;
    u->c = *c;
    u->c.n_items = u->n_items;
    u->n_pending = u->n_hardp = 0;
    u->tag = 0;
    t->p.easy += c->easy;
    t->p.hard += c->hard;
    t->p.rejected += c->dead;
    t->p.think_tokens += c->think_tokens;
    t->p.items_done += u->n_items;
    finish_unit(t, u, NULL);
}

uint32_t twn_units_low_water(const twn_units *t) {
    return t->low;
}
const twn_progress *twn_units_progress(const twn_units *t) {
    return &t->p;
}
size_t twn_units_item_bytes(const twn_units *t) {
    return t->item_bytes;
}

/* Deletes key from the map (linear probing: the entries after it that would no longer be found
 * from their home slot are shifted back into the hole). */
static void map_del(twn_units *t, uint64_t key) {
    size_t mask = t->mcap - 1, i = map_slot(t, key);
    if (!t->mvals[i]) return;
    for (size_t j = i;;) {
        j = (j + 1) & mask;
        if (!t->mvals[j]) break;
        size_t home = mix(t->mkeys[j]) & mask;
        /* j stays when its home lies cyclically in (i, j] */
        if (i <= j ? (i < home && home <= j) : (i < home || home <= j)) continue;
        t->mkeys[i] = t->mkeys[j];
        t->mvals[i] = t->mvals[j];
        i = j;
    }
    t->mvals[i] = 0;
    t->mkeys[i] = 0;
}

size_t twn_units_release(twn_units *t, uint32_t below) {
    if (below > t->low) below = t->low; /* only done units, and only a prefix */
    if (below <= t->base) return 0;
    size_t k = below - t->base;
    for (size_t i = 0; i < k; i++) {
        map_del(t, t->u[i].key);
        twn_free(t->u[i].items); /* NULL: a done unit's words were freed when it completed */
    }
    memmove(t->u, t->u + k, (t->n - below) * sizeof *t->u);
    t->base = below;
    /* a long burst may have grown the array: give most of it back once the stream settles */
    if (t->cap > 1024 && (t->n - t->base) * 8 < t->cap) {
        t->cap /= 4;
        t->u = twn_realloc(t->u, t->cap * sizeof *t->u);
    }
    return k;
}

uint32_t twn_units_base(const twn_units *t) {
    return t->base;
}

size_t twn_units_resident(const twn_units *t) {
    return t->n - t->base;
}
