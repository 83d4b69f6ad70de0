/* service.c — the coordinator loop: ZeroMQ messages in, cstate calls, leases out (service.h). */
#include "coordinator/service.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "common/source.h"
#include "common/source_io.h"
#include "common/transport.h"
#include "coordinator/cmetrics.h"
#include "coordinator/kplanner.h"
#include "coordinator/offsets.h"
#include "util/clock.h"
#include "util/log.h"
#include "util/mem.h"

void twn_coord_cfg_default(twn_coord_cfg *c) {
    memset(c, 0, sizeof *c);
    c->unit_items = 256;
    c->heartbeat_s = 1.0;
    c->missed_beats = 5;
    c->model_hash = "";
    c->stream_poll_s = 0.5;
    c->stream_max_units = 1024;
    twn_cstate_cfg_default(&c->cs);
    c->hard_batch = c->cs.hard_batch;
}

// ------------------------------------------------------------------------------------------------
// Units and the refs of their hard items

typedef struct hard_ref {
    uint32_t item; /* index in the unit */
    uint64_t offset, length, line;
    float p_think;
    char *id;
} hard_ref;

typedef struct cunit {
    const twn_src_unit *u;
    uint64_t key;
    hard_ref *hard;
    size_t n_hard, cap_hard;
} cunit;

typedef struct keyidx {
    uint64_t key;
    uint32_t idx;
} keyidx;

typedef struct peer_user {
    uint32_t wid;
    int role;
    int shut;         /* Shutdown sent */
    int bye;          /* the peer said Shutdown: it is leaving (or acknowledged ours) */
    uint64_t join_id; /* its Hello's join_id (0: none) */
} peer_user;

typedef struct coord {
    const twn_coord_cfg *cfg;
    twn_src_units plan; /* the units base .. base + n - 1 (a stream drops its released prefix) */
    cunit *units;       /* [n], parallel to plan.v */
    size_t n;
    uint32_t base; /* sequence number of plan.v[0] (units released before it) */
    twn_cstate *cs;
    FILE *dl;
    void *router;
    twn_zap *zap; /* the context's ZAP handler while the ROUTER is CURVE (common/curve.h) */
    twn_frame_opts fo;
    twn_peers *peers;
    uint32_t next_wid;
    const Twn__ItemRef *cur_ref; /* the Reject being dead-lettered (for dead_letter.jsonl) */
    int cur_stage;               /* its Twn__Stage */
    twn_srcio *io;               /* S3 listing and Kafka planning at the start, the final commit */
    twn_offsets *offs;           /* Kafka offsets committed behind the durable low water */
    twn_kplanner *kp;            /* Kafka planning (streams) and commits, off the loop */
    twn_cmetrics metrics;        /* in twn_metrics_default() (cmetrics.h) */
    keyidx *dl_old;              /* (unit, index) of the lines dead_letter.jsonl already has */
    size_t n_dl_old;
    twn_peer **dead; /* the loop's list of peers declared dead in one pass (cap_dead: all) */
    size_t cap_dead;
} coord;

/* The unit with this key, while it is held (cstate's key map knows its sequence number). */
static cunit *unit_of(coord *c, uint64_t key) {
    uint32_t seq;
    if (!c->cs || !twn_cstate_seq_of(c->cs, key, &seq) || seq < c->base || seq - c->base >= c->n)
        return NULL;
    return &c->units[seq - c->base];
}

/* u->hard is kept sorted by item (a gate reports them in order, so inserting is an append): the
 * first index whose item is >= item.  A linear scan here made every HardItems and ReasonLease
 * O(hard items of the unit) per item: 83% of the coordinator's own CPU at 10,000-item units. */
static size_t hard_lower(const cunit *u, uint32_t item) {
    size_t lo = 0, hi = u->n_hard;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (u->hard[mid].item < item)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static hard_ref *hard_find(cunit *u, uint32_t item) {
    size_t i = hard_lower(u, item);
    return i < u->n_hard && u->hard[i].item == item ? &u->hard[i] : NULL;
}

static void hard_clear(cunit *u) {
    for (size_t i = 0; i < u->n_hard; i++) twn_free(u->hard[i].id);
    twn_free(u->hard);
    u->hard = NULL;
    u->n_hard = u->cap_hard = 0;
}

// ------------------------------------------------------------------------------------------------
// Dead letters: one JSON line each

static const char *stage_name(int s) {
    static const char *const names[] = {"unspecified", "read",   "parse", "decode",
                                        "gate",        "reason", "embed", "index"};
    return s >= 0 && s < 8 ? names[s] : "?";
}

static twn_stage journal_stage(int s) {
    switch (s) {
    case TWN__STAGE__STAGE_READ:
    case TWN__STAGE__STAGE_PARSE:
    case TWN__STAGE__STAGE_DECODE:
        return TWN_STAGE_READ;
    case TWN__STAGE__STAGE_REASON:
        return TWN_STAGE_REASON;
    case TWN__STAGE__STAGE_INDEX:
        return TWN_STAGE_INDEX;
    default:
        return TWN_STAGE_GATE;
    }
}

static void json_str(FILE *f, const char *s) {
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)(s ? s : ""); *p; p++) {
        if (*p == '"' || *p == '\\')
            fprintf(f, "\\%c", *p);
        else if (*p == '\n')
            fputs("\\n", f);
        else if (*p < 0x20)
            fprintf(f, "\\u%04x", *p);
        else
            fputc(*p, f);
    }
    fputc('"', f);
}

/* The journal commits a DEAD_LETTER record a few ms after its line is written here, so a
 * coordinator killed in between finds the item not yet dead after a restart, and it is rejected
 * (and written) again.  The lines already in the file are loaded at start and not repeated. */
static void dl_load(coord *c, const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return;
    char *line = NULL;
    size_t cap = 0, n_cap = 0;
    while (getline(&line, &cap, f) > 0) {
        const char *u = strstr(line, ",\"unit\":"), *i = u ? strstr(u, ",\"index\":") : NULL;
        if (!i) continue;
        if (c->n_dl_old == n_cap) {
            n_cap = n_cap ? 2 * n_cap : 64;
            c->dl_old = twn_realloc(c->dl_old, n_cap * sizeof *c->dl_old);
        }
        c->dl_old[c->n_dl_old++] =
            (keyidx){strtoull(u + 8, NULL, 10), (uint32_t)strtoull(i + 9, NULL, 10)};
    }
    free(line);
    fclose(f);
}

static int dl_keyidx_cmp(const void *a, const void *b) {
    const keyidx *x = a, *y = b;
    if (x->key != y->key) return x->key < y->key ? -1 : 1;
    return x->idx < y->idx ? -1 : x->idx > y->idx;
}

static void on_dead_letter(void *ctx, uint64_t unit, uint32_t item, twn_stage stage,
                           const char *reason) {
    coord *c = ctx;
    twn_cmetrics_dead_letter(&c->metrics, stage);
    if (!c->dl) return;
    cunit *u = unit_of(c, unit);
    keyidx k = {unit, (uint32_t)((u ? u->u->first_index : 0) + item)};
    if (c->n_dl_old && bsearch(&k, c->dl_old, c->n_dl_old, sizeof k, dl_keyidx_cmp)) return;
    const Twn__ItemRef *r = c->cur_ref;
    fputs("{\"ref\":{\"path\":", c->dl);
    json_str(c->dl, u ? u->u->path : "");
    fprintf(c->dl, ",\"unit\":%llu,\"index\":%llu", (unsigned long long)unit,
            (unsigned long long)((u ? u->u->first_index : 0) + item));
    if (r) {
        fprintf(c->dl, ",\"offset\":%llu,\"length\":%llu,\"line\":%llu,\"id\":",
                (unsigned long long)r->offset, (unsigned long long)r->length,
                (unsigned long long)r->line);
        json_str(c->dl, r->item_id);
    }
    fputs("},\"stage\":", c->dl);
    json_str(c->dl, r ? stage_name(c->cur_stage) : twn_stage_name(stage));
    fputs(",\"reason\":", c->dl);
    json_str(c->dl, reason);
    fputs("}\n", c->dl);
    fflush(c->dl);
}

static void on_unit_done(void *ctx, uint64_t unit, const twn_unit_counts *cnt) {
    (void)cnt;
    cunit *u = unit_of(ctx, unit);
    if (u) hard_clear(u);
}

// ------------------------------------------------------------------------------------------------
// Messages in

static void warn(const char *what, const twn_err *err) {
    twn_log(TWN_LOG_WARN, "coordinator: %s: %s", what, err->msg);
}

static int send_env(coord *c, const twn_peer_id *to, Twn__Envelope *env) {
    twn_err e;
    if (twn_send_msg(c->router, to, env, &c->fo, &e)) {
        warn("send", &e);
        return -1;
    }
    return 0;
}

static void send_shutdown(coord *c, twn_peer *p, const char *why) {
    Twn__Shutdown sd = TWN__SHUTDOWN__INIT;
    sd.reason = (char *)why;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_SHUTDOWN;
    env.shutdown = &sd;
    send_env(c, &p->id, &env);
    if (p->user) ((peer_user *)p->user)->shut = 1;
}

/* A message from a peer this coordinator does not know (it was restarted: the peer's DEALER
 * reconnected by itself; or it declared the peer dead): a Welcome that does not accept tells it
 * to say Hello again (gate.c, index/service.c), so it gets a worker id, credits and, at the end,
 * its Shutdown.  Its Acks, Rejects and HardItems are still taken: they are facts, not requests. */
static void ask_hello(coord *c, const twn_peer_id *to) {
    Twn__Welcome w = TWN__WELCOME__INIT;
    w.accepted = 0;
    w.reason = (char *)"unknown peer (the coordinator restarted, or declared it dead): send Hello";
    w.job_id = (char *)"twn";
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_WELCOME;
    env.welcome = &w;
    send_env(c, to, &env);
}

static void on_hello(coord *c, const twn_peer_id *from, const Twn__Hello *h, double now) {
    twn_peer *p = twn_peers_find(c->peers, from);
    peer_user *pu = p ? p->user : NULL;
    if (p && p->alive && pu && pu->wid && !pu->bye && h->join_id && h->join_id == pu->join_id) {
        /* The same join's Hello again, sent while our Welcome was on its way (a slow start):
         * the peer keeps its worker id, leases and credits; only the Welcome is repeated. */
        twn_peers_touch(c->peers, from, now);
        goto welcome;
    }
    p = twn_peers_add(c->peers, from, now);
    pu = p->user;
    if (!pu) {
        pu = twn_calloc(1, sizeof *pu);
        p->user = pu;
    } else if (pu->wid) {
        twn_cstate_worker_dead(c->cs, pu->wid); /* its predecessor's leases go back */
    }
    pu->wid = c->next_wid++;
    if (c->next_wid >= TWN_LEASE_MAX_WORKERS) c->next_wid = 1;
    pu->role = h->role;
    pu->join_id = h->join_id;
    p->role = h->role;
    twn_credits_grant(&p->credits, h->credits);
welcome:;
    Twn__Welcome w = TWN__WELCOME__INIT;
    w.accepted = 1;
    w.job_id = (char *)"twn";
    w.heartbeat_ms = (uint32_t)(c->cfg->heartbeat_s * 1000.0);
    w.missed_beats = c->cfg->missed_beats;
    w.shards = c->cfg->shards;
    w.n_shard_endpoints = c->cfg->shards;
    w.shard_endpoints = (char **)c->cfg->shard_endpoints;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_WELCOME;
    env.welcome = &w;
    send_env(c, from, &env);
    if (!c->cfg->streaming && twn_cstate_all_done(c->cs)) send_shutdown(c, p, "job finished");
}

static void on_hard(coord *c, const Twn__HardItems *h) {
    cunit *u = unit_of(c, h->unit_id);
    if (!u) {
        twn_log(TWN_LOG_WARN, "coordinator: HardItems for unknown unit %llu",
                (unsigned long long)h->unit_id);
        return;
    }
    uint32_t *items = twn_malloc((h->n_items + 1) * sizeof *items);
    size_t n = 0;
    for (size_t i = 0; i < h->n_items; i++) {
        const Twn__HardItem *hi = h->items[i];
        if (!hi->ref || hi->ref->item_index < u->u->first_index ||
            hi->ref->item_index >= u->u->first_index + u->u->count)
            continue;
        uint32_t item = (uint32_t)(hi->ref->item_index - u->u->first_index);
        items[n++] = item;
        size_t at = hard_lower(u, item);
        if (at < u->n_hard && u->hard[at].item == item) continue;
        if (u->n_hard == u->cap_hard) {
            u->cap_hard = u->cap_hard ? 2 * u->cap_hard : 16;
            u->hard = twn_realloc(u->hard, u->cap_hard * sizeof *u->hard);
        }
        memmove(&u->hard[at + 1], &u->hard[at], (u->n_hard - at) * sizeof *u->hard);
        u->n_hard++;
        hard_ref *r = &u->hard[at];
        r->item = item;
        r->offset = hi->ref->offset;
        r->length = hi->ref->length;
        r->line = hi->ref->line;
        r->p_think = hi->p_think;
        r->id = twn_strdup(hi->ref->item_id ? hi->ref->item_id : "");
    }
    twn_err e;
    if (n && twn_cstate_report_hard(c->cs, u->key, items, n, &e)) warn("HardItems", &e);
    twn_free(items);
}

static void on_rejects(coord *c, const Twn__Rejects *r) {
    for (size_t i = 0; i < r->n_items; i++) {
        const Twn__Reject *j = r->items[i];
        cunit *u = j->ref ? unit_of(c, j->ref->unit_id) : NULL;
        if (!u || j->ref->item_index < u->u->first_index ||
            j->ref->item_index >= u->u->first_index + u->u->count) {
            twn_log(TWN_LOG_WARN, "coordinator: Reject for an unknown unit/item");
            continue;
        }
        c->cur_ref = j->ref;
        c->cur_stage = j->stage;
        twn_err e;
        if (twn_cstate_dead_letter(c->cs, u->key,
                                   (uint32_t)(j->ref->item_index - u->u->first_index),
                                   journal_stage(j->stage), j->reason ? j->reason : "", &e))
            warn("Reject", &e);
        c->cur_ref = NULL;
    }
}

static void on_ack(coord *c, const Twn__Ack *a) {
    for (size_t i = 0; i < a->n_ranges; i++) {
        const Twn__AckRange *r = a->ranges[i];
        cunit *u = unit_of(c, r->unit_id);
        if (!u || r->first_index < u->u->first_index || r->count == 0 ||
            r->first_index + r->count > u->u->first_index + u->u->count) {
            twn_log(TWN_LOG_WARN, "coordinator: Ack for unknown unit %llu or items out of range",
                    (unsigned long long)r->unit_id);
            continue;
        }
        uint32_t lo = (uint32_t)(r->first_index - u->u->first_index);
        twn_err e;
        int rc;
        if (r->route == TWN__ROUTE__ROUTE_HARD) {
            uint32_t *items = twn_malloc(r->count * sizeof *items);
            uint32_t *tt = twn_malloc(r->count * sizeof *tt);
            for (uint32_t k = 0; k < r->count; k++) {
                items[k] = lo + k;
                tt[k] = r->think_tokens;
            }
            rc = twn_cstate_ack(c->cs, u->key, items, tt, r->count, TWN_ROUTE_HARD, &e);
            twn_free(items);
            twn_free(tt);
        } else {
            rc = twn_cstate_ack_range(c->cs, u->key, lo, lo + (uint32_t)r->count, TWN_ROUTE_EASY,
                                      &e);
        }
        if (rc)
            warn("Ack", &e);
        else
            twn_cmetrics_acked(&c->metrics, a->shard, r->count);
    }
}

// ------------------------------------------------------------------------------------------------
// Grants out

static void grant_gate(coord *c, twn_peer *p, double now) {
    peer_user *pu = p->user;
    while (p->credits.avail > 0) {
        twn_unit_grant g;
        twn_err e;
        int rc = twn_cstate_grant_unit(c->cs, pu->wid, now, &g, &e);
        if (rc < 0) warn("grant unit", &e);
        if (rc != 1) return;
        cunit *u = unit_of(c, g.unit);
        Twn__SourceRef s = TWN__SOURCE_REF__INIT;
        twn_srcio_buf sb;
        if (twn_srcio_unit_to_proto(u->u, &s, &sb, &e)) warn("UnitLease", &e);
        Twn__UnitLease l = TWN__UNIT_LEASE__INIT;
        l.unit_id = g.unit;
        l.source = &s;
        l.attempt = g.attempt;
        l.lease_id = g.lease;
        l.deadline_unix_ms = twn_unix_ms_at(g.deadline);
        l.lease_ms = (uint32_t)(c->cfg->cs.unit_lease.lease_s * 1000.0);
        l.stall_ms = (uint32_t)(c->cfg->cs.unit_lease.stall_s * 1000.0);
        Twn__Envelope env = TWN__ENVELOPE__INIT;
        env.body_case = TWN__ENVELOPE__BODY_UNIT_LEASE;
        env.unit_lease = &l;
        if (twn_send_credited(c->router, p, &env, &c->fo, &e)) {
            warn("UnitLease", &e);
            return; /* the lease expires and the unit goes back */
        }
    }
}

static void grant_worker(coord *c, twn_peer *p, double now) {
    peer_user *pu = p->user;
    while (p->credits.avail > 0) {
        twn_hard_grant g;
        twn_err e;
        int rc = twn_cstate_grant_hard(c->cs, pu->wid, c->cfg->hard_batch, now, &g, &e);
        if (rc < 0) warn("grant hard", &e);
        if (rc != 1) return;
        Twn__HardItem *his = twn_calloc(g.n, sizeof *his);
        Twn__HardItem **hp = twn_calloc(g.n, sizeof *hp);
        Twn__ItemRef *refs = twn_calloc(g.n, sizeof *refs);
        Twn__SourceRef *srcs = twn_calloc(g.n, sizeof *srcs);
        twn_srcio_buf *bufs = twn_calloc(g.n, sizeof *bufs);
        size_t n = 0;
        for (size_t i = 0; i < g.n; i++) {
            cunit *u = unit_of(c, g.items[i].unit);
            if (!u) continue;
            hard_ref *hr = hard_find(u, g.items[i].item);
            twn__source_ref__init(&srcs[n]);
            if (twn_srcio_unit_to_proto(u->u, &srcs[n], &bufs[n], &e)) warn("ReasonLease", &e);
            twn__item_ref__init(&refs[n]);
            refs[n].unit_id = u->key;
            refs[n].item_index = u->u->first_index + g.items[i].item;
            refs[n].source = &srcs[n];
            if (hr) {
                refs[n].offset = hr->offset;
                refs[n].length = hr->length;
                refs[n].line = hr->line;
                refs[n].item_id = hr->id;
            }
            twn__hard_item__init(&his[n]);
            his[n].ref = &refs[n];
            his[n].p_think = hr ? hr->p_think : NAN;
            hp[n] = &his[n];
            n++;
        }
        Twn__ReasonLease l = TWN__REASON_LEASE__INIT;
        l.batch_id = g.lease;
        l.lease_id = g.lease;
        l.deadline_unix_ms = twn_unix_ms_at(g.deadline);
        l.lease_ms = (uint32_t)(c->cfg->cs.hard_lease.lease_s * 1000.0);
        l.stall_ms = (uint32_t)(c->cfg->cs.hard_lease.stall_s * 1000.0);
        l.n_items = n;
        l.items = hp;
        l.attempt = g.n ? g.items[0].attempt : 1;
        Twn__Envelope env = TWN__ENVELOPE__INIT;
        env.body_case = TWN__ENVELOPE__BODY_REASON_LEASE;
        env.reason_lease = &l;
        int bad = twn_send_credited(c->router, p, &env, &c->fo, &e);
        twn_free(his);
        twn_free(hp);
        twn_free(refs);
        twn_free(srcs);
        twn_free(bufs);
        if (bad) {
            warn("ReasonLease", &e);
            return;
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The loop

/* Renewal is per lease (cstate.h twn_cstate_report): a peer's pulse thread outlives a hung
 * engine call, so "it heartbeats" must not keep the work it no longer does. */
static void on_heartbeat(coord *c, const peer_user *pu, const Twn__Heartbeat *h, double now) {
    twn_lease_beat one[8], *b = h->n_lease_ids <= 8 ? one : twn_malloc(h->n_lease_ids * sizeof *b);
    for (size_t i = 0; i < h->n_lease_ids; i++)
        b[i] =
            (twn_lease_beat){h->lease_ids[i], i < h->n_lease_progress ? h->lease_progress[i] : 0};
    twn_cstate_report(c->cs, pu->wid, now, b, h->n_lease_ids);
    if (b != one) twn_free(b);
}

static void handle(coord *c, const twn_peer_id *from, Twn__Envelope *m, double now) {
    if (m->body_case == TWN__ENVELOPE__BODY_HELLO) {
        on_hello(c, from, m->hello, now);
        return;
    }
    twn_peer *p = twn_peers_touch(c->peers, from, now);
    peer_user *pu = p && p->alive ? p->user : NULL;
    if (!pu && m->body_case != TWN__ENVELOPE__BODY_SHUTDOWN) ask_hello(c, from);
    switch (m->body_case) {
    case TWN__ENVELOPE__BODY_HEARTBEAT:
        if (pu) on_heartbeat(c, pu, m->heartbeat, now);
        break;
    case TWN__ENVELOPE__BODY_WORK_REQUEST:
        if (pu) twn_credits_grant(&p->credits, m->work_request->credits);
        break;
    case TWN__ENVELOPE__BODY_HARD_ITEMS:
        on_hard(c, m->hard_items);
        break;
    case TWN__ENVELOPE__BODY_REJECTS:
        on_rejects(c, m->rejects);
        break;
    case TWN__ENVELOPE__BODY_ACK:
        on_ack(c, m->ack);
        break;
    case TWN__ENVELOPE__BODY_FINISHED: {
        twn_err e;
        /* An abandoned lease's results were dropped: waiting ack_timeout for them would leave the
         * work with no holder; it is leased again now (an expiry: attempts count). */
        int rc = m->finished->abandoned ? twn_cstate_release(c->cs, m->finished->lease_id, &e)
                                        : twn_cstate_finish(c->cs, m->finished->lease_id, now, &e);
        if (rc < 0) warn("Finished", &e);
        break;
    }
    case TWN__ENVELOPE__BODY_SHUTDOWN:
        /* A peer leaving on its own: its leases go back now rather than after missed beats. */
        if (pu) {
            twn_cstate_worker_dead(c->cs, pu->wid);
            pu->bye = 1;
            p->alive = 0;
        }
        break;
    default:
        break; /* Progress, UnitDone: informational */
    }
}

static void coord_free(coord *c) {
    twn_kplanner_free(c->kp);
    for (size_t i = 0; i < c->n; i++) hard_clear(&c->units[i]);
    twn_free(c->units);
    twn_free(c->dl_old);
    twn_free(c->dead);
    twn_src_units_free(&c->plan);
    if (c->peers) {
        for (size_t i = 0; i < twn_peers_count(c->peers); i++)
            twn_free(twn_peers_at(c->peers, i)->user);
        twn_peers_free(c->peers);
    }
    if (c->router) twn_sock_close(c->router);
    twn_zap_release(c->zap); /* after the socket: no handshake may find the handler gone */
    twn_cmetrics_free(&c->metrics);
    if (c->dl) fclose(c->dl);
    twn_offsets_free(c->offs);
    twn_srcio_close(c->io);
}

/* Streaming: the units the Kafka thread planned since the last pass go onto the plan, the
 * cstate and the offsets tracker.  -1 only for a bookkeeping failure. */
static int stream_take(coord *c, twn_err *err) {
    size_t n0 = c->plan.n, n_new = twn_kplanner_take(c->kp, &c->plan);
    if (!n_new) return 0;
    c->units = twn_realloc(c->units, (c->plan.n + 1) * sizeof *c->units);
    memset(&c->units[n0], 0, n_new * sizeof *c->units);
    twn_unit_spec *specs = twn_calloc(n_new, sizeof *specs);
    for (size_t i = 0; i < c->plan.n; i++) c->units[i].u = &c->plan.v[i]; /* v moved */
    int rc = 0;
    for (size_t i = n0; i < c->plan.n; i++) {
        const twn_src_unit *u = &c->plan.v[i];
        c->units[i].key = twn_unit_key(u->path, u->start, u->end - u->start);
        specs[i - n0] = (twn_unit_spec){c->units[i].key, (uint32_t)u->count};
        if (!rc) rc = twn_offsets_add(c->offs, c->base + (uint32_t)i, u, err);
    }
    c->n = c->plan.n;
    if (!rc) rc = twn_cstate_add_units(c->cs, specs, n_new, err);
    twn_free(specs);
    if (!rc) twn_debug("coordinator: streaming: %zu new unit(s), %zu held", n_new, c->n);
    return rc ? -1 : 0;
}

/* Streaming: the units below the committed low water are done, in the journal, and their
 * offsets are committed; nothing will ask for them again.  They leave the plan, the cstate
 * (which may compact the journal) and the offsets tracker. */
static int stream_release(coord *c, twn_err *err) {
    uint32_t below = twn_offsets_committed_low(c->offs), low = twn_cstate_low_water(c->cs);
    if (below > low) below = low;
    if (below <= c->base) return 0;
    size_t k;
    if (twn_cstate_forget(c->cs, below, &k, err)) return -1;
    below = twn_cstate_base(c->cs);
    if (below <= c->base) return 0;
    k = below - c->base;
    twn_offsets_forget(c->offs, below);
    for (size_t i = 0; i < k; i++) {
        hard_clear(&c->units[i]);
        twn_free(c->plan.v[i].path);
    }
    memmove(c->plan.v, c->plan.v + k, (c->plan.n - k) * sizeof *c->plan.v);
    memmove(c->units, c->units + k, (c->n - k) * sizeof *c->units);
    c->plan.n -= k;
    c->n -= k;
    for (size_t i = 0; i < c->n; i++) c->units[i].u = &c->plan.v[i];
    c->base = below;
    twn_kplanner_set_base(c->kp, below);
    return 0;
}

/* Offset commits run on the Kafka thread: collect the last request's outcome, hand out the next
 * one the durable low water allows. */
static void commit_async(coord *c, double now) {
    size_t n;
    const twn_offset_point *res = twn_kplanner_commit_result(c->kp, &n);
    if (res) twn_offsets_done(c->offs, res, n);
    const twn_offset_point *due;
    n = twn_offsets_due(c->offs, twn_cstate_low_water(c->cs), now, 0, &due);
    if (n) twn_kplanner_commit(c->kp, due, n);
}

int twn_coord_run(const twn_coord_cfg *cfg, twn_coord_summary *sum, twn_err *err) {
    coord c = {0};
    c.cfg = cfg;
    c.fo = twn_frame_opts_for(cfg->endpoint, cfg->compress);
    if (cfg->max_message_bytes) c.fo.max_size = cfg->max_message_bytes;
    c.next_wid = 1;
    twn_cmetrics_init(&c.metrics, twn_metrics_default(), cfg->shards);
    double t0 = twn_now();
    char *sources = NULL;
    int rc = -1;

    /* A stream plans its kafka:// inputs on the Kafka thread (from the group's committed offsets,
     * at most stream_max_units ahead); everything else is planned here, once. */
    const char **first = twn_calloc(cfg->n_inputs + 1, sizeof *first);
    size_t n_first = 0, n_kafka = 0;
    for (size_t i = 0; i < cfg->n_inputs; i++) {
        int k = twn_srcio_store_of(cfg->inputs[i]) == TWN_STORE_KAFKA;
        n_kafka += k;
        if (!cfg->streaming || !k) first[n_first++] = cfg->inputs[i];
    }
    if (cfg->streaming && !n_kafka) {
        twn_free(first);
        twn_err_set(err, "config: kafka.streaming = true but job.inputs has no kafka:// "
                         "input; expected at least one kafka://topic (or kafka.streaming = "
                         "false)");
        goto out;
    }
    int planned = twn_srcio_open(cfg->io, &c.io, err) ||
                  twn_srcio_plan(c.io, first, n_first, cfg->unit_items, &c.plan, NULL, err) ||
                  twn_offsets_new(&c.plan, 0.2, &c.offs, err);
    twn_free(first);
    if (planned) goto out;
    c.n = c.plan.n;
    c.units = twn_calloc(c.n + 1, sizeof *c.units);
    twn_unit_spec *specs = twn_calloc(c.n + 1, sizeof *specs);
    uint64_t *keys = twn_calloc(c.n + 1, sizeof *keys);
    for (size_t i = 0; i < c.n; i++) {
        const twn_src_unit *u = &c.plan.v[i];
        c.units[i].u = u;
        c.units[i].key = twn_unit_key(u->path, u->start, u->end - u->start);
        keys[i] = c.units[i].key;
        specs[i] = (twn_unit_spec){c.units[i].key, (uint32_t)u->count};
    }

    size_t len = 1;
    for (size_t i = 0; i < cfg->n_inputs; i++) len += strlen(cfg->inputs[i]) + 1;
    sources = twn_calloc(len, 1);
    for (size_t i = 0; i < cfg->n_inputs; i++) {
        strcat(sources, cfg->inputs[i]);
        strcat(sources, "\n");
    }
    twn_plan_fp fp = {sources, cfg->unit_items, cfg->model_hash ? cfg->model_hash : ""};
    twn_cstate_hooks hooks = {&c, on_dead_letter, on_unit_done};
    if (cfg->dead_letter_path) dl_load(&c, cfg->dead_letter_path);
    if (c.n_dl_old) qsort(c.dl_old, c.n_dl_old, sizeof *c.dl_old, dl_keyidx_cmp);
    if (cfg->dead_letter_path && !(c.dl = fopen(cfg->dead_letter_path, "a"))) {
        twn_err_errno(err, "cannot open dead-letter file %s", cfg->dead_letter_path);
        twn_free(specs);
        twn_free(keys);
        goto out;
    }
    if (twn_cstate_open(cfg->journal_path, &fp, &cfg->cs, &hooks, &c.cs, NULL, err) ||
        twn_cstate_add_units(c.cs, specs, c.n, err)) {
        twn_free(specs);
        twn_free(keys);
        goto out;
    }
    /* a stream releases these too, but a restart plans them again: their records stay */
    if (cfg->streaming) twn_cstate_keep_keys(c.cs, keys, c.n);
    twn_free(specs);
    twn_free(keys);
    if (cfg->streaming || twn_offsets_count(c.offs)) {
        twn_kplanner_cfg kc = {
            cfg->io,        cfg->inputs,        cfg->n_inputs,        cfg->unit_items,
            cfg->streaming, cfg->stream_poll_s, cfg->stream_max_units};
        if (twn_kplanner_start(&kc, &c.plan, &c.kp, err)) goto out;
    }

    twn_sock_opts so = twn_sock_opts_default();
    so.linger_ms = 0;
    so.max_msg_bytes = twn_wire_limit(&c.fo);
    if (!(c.router = twn_sock_new(cfg->zctx, ZMQ_ROUTER, &so, err)) ||
        twn_curve_server(cfg->zctx, c.router, cfg->endpoint, cfg->curve, &c.zap, err) ||
        twn_sock_bind(c.router, cfg->endpoint, NULL, 0, err))
        goto out;
    c.peers = twn_peers_new(cfg->heartbeat_s, (int)cfg->missed_beats);

    /* The journal had every unit done: a re-run after the end (twn run's threads say Hello at
     * once: expect_peers).  Peers of the previous incarnation, and processes restarted after it
     * ended (an indexer killed while finishing its snapshot), may still be waiting for their
     * Shutdown: listen for them as long as a peer may be silent before it counts as dead. */
    double t_rerun = !cfg->streaming && twn_cstate_all_done(c.cs) && !cfg->expect_peers
                         ? cfg->heartbeat_s * (cfg->missed_beats > 0 ? cfg->missed_beats : 1)
                         : 0;
    double drain_until = 0;
    double t_listened = twn_now(); /* the last peer expiry: the socket was read up to then */
    int draining = 0, replay_dropped = 0;
    while (cfg->streaming || !twn_cstate_all_done(c.cs)) {
        double t_pass = twn_now();
        if (cfg->stop && *cfg->stop && !cfg->streaming) {
            twn_err_set(err, "coordinator: stopped before the job finished");
            goto out;
        }
        if (cfg->stop && *cfg->stop && !draining) {
            draining = 1; /* streaming: no new leases; the ones in flight may still finish */
            drain_until = twn_now() + cfg->cs.unit_lease.lease_s;
        }
        if (draining) {
            twn_cstate_stats st;
            twn_cstate_stats_get(c.cs, &st);
            if ((!st.unit_leases_live && !st.hard_leases_live) || twn_now() > drain_until) break;
        } else if (cfg->streaming) {
            /* Once the thread has planned up to a high watermark read after the open, and those
             * units are taken, every unit the journal's replay can still apply to is added again.
             * (The flag is read first: it is set with the units of that planning.) */
            twn_kplanner_stats ks = {0};
            if (!replay_dropped) twn_kplanner_stats_get(c.kp, &ks);
            if (stream_take(&c, err)) goto out;
            if (ks.caught_up) {
                twn_cstate_replay_drop(c.cs);
                replay_dropped = 1;
            }
        }
        twn_peer_id from;
        Twn__Envelope *m = NULL;
        twn_err e;
        double now = twn_now();
        switch (twn_recv_msg(c.router, 5, &c.fo, &from, &m, &e)) {
        case TWN_RECV_MSG:
            handle(&c, &from, m, now);
            twn_msg_free(m);
            break;
        case TWN_RECV_BAD:
            warn("bad message", &e);
            break;
        case TWN_RECV_TIMEOUT:
            break;
        case TWN_RECV_FAIL:
            twn_err_set(err, "coordinator: control socket failed: %s", e.msg);
            goto out;
        }
        now = twn_now();
        /* A pass longer than a heartbeat interval (a slow fsync; this process starved or
         * stopped) left the peers' messages unread in our own queue: that silence is ours, not
         * theirs.  All of it but one interval is taken off every live peer's silence and its
         * leases' deadlines, so a stalled coordinator does not declare its fleet dead (every
         * lease re-leased, good items dead-lettered as "lease expired 3 times" after three
         * stalls, and at the end of a job every peer left without its Shutdown). */
        double stall = now - t_listened - cfg->heartbeat_s;
        if (cfg->heartbeat_s > 0 && stall > 0) {
            for (size_t i = 0; i < twn_peers_count(c.peers); i++) {
                twn_peer *p = twn_peers_at(c.peers, i);
                if (p->alive) p->last_seen = fmin(p->last_seen + stall, now);
            }
            twn_cstate_pause(c.cs, stall);
        }
        t_listened = now;
        /* Every peer declared dead now gets its leases ended now (twn_peers_expire marks them
         * all; a fixed-size list here once left all but the first 16 holding their work). */
        if (c.cap_dead < twn_peers_count(c.peers)) {
            c.cap_dead = twn_peers_count(c.peers);
            c.dead = twn_realloc(c.dead, c.cap_dead * sizeof *c.dead);
        }
        size_t nd = twn_peers_expire(c.peers, now, c.dead, c.cap_dead);
        twn_cmetrics_peers_lost(&c.metrics, nd);
        for (size_t i = 0; i < nd; i++) {
            peer_user *pu = c.dead[i]->user;
            if (pu) twn_cstate_worker_dead(c.cs, pu->wid);
        }
        if (twn_cstate_tick(c.cs, now, err)) goto out;
        twn_cmetrics_update(&c.metrics, c.cs, now, 0);
        if (c.kp) commit_async(&c, now); /* the thread owns the broker round trips */
        if (cfg->streaming && stream_release(&c, err)) goto out;
        for (size_t i = 0; i < twn_peers_count(c.peers) && !draining; i++) {
            twn_peer *p = twn_peers_at(c.peers, i);
            if (!p->alive || !p->user) continue;
            if (p->role == TWN__ROLE__ROLE_GATE)
                grant_gate(&c, p, now);
            else if (p->role == TWN__ROLE__ROLE_WORKER)
                grant_worker(&c, p, now);
        }
        now = twn_now();
        twn_cmetrics_loop_pass(&c.metrics, now - t_pass, now);
    }
    if (c.kp) {
        /* the thread's last commit (if any) is taken before the final one below */
        twn_kplanner_stop(c.kp);
        size_t n;
        const twn_offset_point *res = twn_kplanner_commit_result(c.kp, &n);
        twn_offsets_done(c.offs, res, n);
    }
    twn_cmetrics_update(&c.metrics, c.cs, twn_now(), 1);
    twn_cstate_stats st;
    twn_cstate_stats_get(c.cs, &st);
    uint32_t final_low = c.base + (uint32_t)c.n;
    if (cfg->streaming) {
        /* no JOB_FINISHED: a stream is never finished; what is done is made durable */
        if (twn_cstate_sync(c.cs, err)) goto out;
        final_low = twn_cstate_low_water(c.cs);
        st.low_water = final_low;
        twn_cstate_abandon(c.cs); /* nothing left unwritten after the sync */
    } else if (twn_cstate_close(c.cs, err)) {
        c.cs = NULL;
        goto out;
    }
    c.cs = NULL;
    /* Everything is in the journal now: the group's offsets go to the end of the plan.  A
     * failure leaves them behind; a re-run then replans from there and the journal finds those
     * units done. */
    for (int tries = 0; tries < 3; tries++) {
        twn_err e;
        if (!twn_offsets_commit(c.offs, c.io, final_low, twn_now(), 1, &e)) break;
        warn("final Kafka commit", &e);
    }
    for (size_t i = 0; i < twn_peers_count(c.peers); i++) {
        twn_peer *p = twn_peers_at(c.peers, i);
        if (p->alive) {
            send_shutdown(&c, p, cfg->streaming ? "stream stopped" : "job finished");
            continue;
        }
        /* Declared dead, but perhaps only slow (stopped, starved): when it runs again it finds
         * its Shutdown and ends, instead of joining a coordinator that is gone (test_coord_stall).
         * One gone for good has no pipe (EHOSTUNREACH): nothing to tell, nothing to wait for. */
        Twn__Shutdown sd = TWN__SHUTDOWN__INIT;
        sd.reason = (char *)(cfg->streaming ? "stream stopped" : "job finished");
        Twn__Envelope env = TWN__ENVELOPE__INIT;
        env.body_case = TWN__ENVELOPE__BODY_SHUTDOWN;
        env.shutdown = &sd;
        twn_err e;
        if (!twn_send_msg(c.router, &p->id, &env, &c.fo, &e) && p->user)
            ((peer_user *)p->user)->shut = 1;
    }
    /* What was sent leaves before the ROUTER closes (its linger is 0 for the job's sake), also
     * when no peer is left to answer and the wait below ends at once. */
    int linger_ms = 1000;
    zmq_setsockopt(c.router, ZMQ_LINGER, &linger_ms, sizeof linger_ms);
    /* Every peer answers Shutdown with a Shutdown of its own once it has it (the ROUTER must stay
     * open until then, or the message dies in its queue).  End as soon as each peer has answered
     * or is gone (silent for missed_beats heartbeats); a late Hello meanwhile is told to stop too
     * and then waited for like the rest.  The bound is the time after which a silent peer counts
     * as dead anyway. */
    double until = twn_now() + cfg->heartbeat_s * (cfg->missed_beats > 0 ? cfg->missed_beats : 1);
    double t_min = twn_now() + t_rerun;
    while (twn_now() < until) {
        twn_peer *dead[16];
        twn_peers_expire(c.peers, twn_now(), dead, 16);
        size_t waiting = 0;
        for (size_t i = 0; i < twn_peers_count(c.peers); i++) {
            twn_peer *p = twn_peers_at(c.peers, i);
            waiting += p->alive && !(p->user && ((peer_user *)p->user)->bye);
        }
        if (!waiting && twn_peers_count(c.peers) >= cfg->expect_peers && twn_now() >= t_min) break;
        twn_peer_id from;
        Twn__Envelope *m = NULL;
        twn_err e;
        twn_recv_status s = twn_recv_msg(c.router, 10, &c.fo, &from, &m, &e);
        if (s == TWN_RECV_FAIL) break;
        if (s != TWN_RECV_MSG) continue;
        twn_peer *p = m->body_case == TWN__ENVELOPE__BODY_HELLO
                          ? twn_peers_add(c.peers, &from, twn_now())
                          : twn_peers_touch(c.peers, &from, twn_now());
        if (!p && m->body_case != TWN__ENVELOPE__BODY_SHUTDOWN) /* a peer of an earlier run */
            p = twn_peers_add(c.peers, &from, twn_now());
        if (p && !p->user) p->user = twn_calloc(1, sizeof(peer_user));
        if (p && m->body_case == TWN__ENVELOPE__BODY_HELLO)
            ((peer_user *)p->user)->shut = ((peer_user *)p->user)->bye = 0; /* a new incarnation */
        if (p && m->body_case == TWN__ENVELOPE__BODY_SHUTDOWN)
            ((peer_user *)p->user)->bye = 1;
        else if (p && !((peer_user *)p->user)->shut)
            send_shutdown(&c, p, "job finished");
        twn_msg_free(m);
    }
    memset(sum, 0, sizeof *sum);
    sum->units = st.progress.units_done;
    sum->items = st.progress.items_total;
    sum->easy = st.progress.easy;
    sum->hard = st.progress.hard;
    sum->rejected = st.progress.rejected;
    sum->think_tokens = st.progress.think_tokens;
    sum->duplicates = st.progress.duplicates;
    sum->seconds = twn_now() - t0;
    rc = 0;
out:
    if (c.cs) twn_cstate_abandon(c.cs);
    twn_free(sources);
    coord_free(&c);
    return rc;
}
