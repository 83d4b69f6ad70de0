/* gate.c — the gate service loop and the client plumbing it shares with the worker (gate.h). */
#include "gate_service/gate.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "common/prefetch.h"
#include "gate_service/null_engine.h"
#include "gate_service/role_metrics.h"
#include "util/clock.h"
#include "util/hash.h"
#include "util/log.h"
#include "util/mem.h"

void twn_role_cfg_default(twn_role_cfg *c) {
    memset(c, 0, sizeof *c);
    c->credits = 2;
    c->null_dim = 64;
    twn_opts_default(&c->opts);
    c->batch = 32;
    c->src = twn_src_opts_default();
    c->shard_credits = 4;
}

// ------------------------------------------------------------------------------------------------
// Connection

static void lock(const twn_role_conn *c) {
    if (c->mu_init) pthread_mutex_lock(&((twn_role_conn *)c)->mu);
}

static void unlock(const twn_role_conn *c) {
    if (c->mu_init) pthread_mutex_unlock(&((twn_role_conn *)c)->mu);
}

/* Sends to the coordinator wait at most this long per try (the DEALER's ZMQ_SNDTIMEO) and are
 * retried until they go or cfg->stop: a DEALER with no coordinator behind it (its ROUTER closed
 * at the end of the job while this role was busy and so counted as gone, or a coordinator being
 * restarted) would otherwise hold this thread in zmq_msg_send forever, past the stop flag. */
#define ROLE_SEND_TRY_MS 100

int twn_role_send(twn_role_conn *c, Twn__Envelope *env, twn_err *err) {
    lock(c);
    int rc;
    for (;;) {
        errno = 0;
        rc = twn_send_msg(c->dealer, NULL, env, &c->fo, err);
        if (!rc || errno != EAGAIN) break;
        if (c->cfg->stop && *c->cfg->stop) {
            rc = twn_err_set(err, "%s: stopped while the coordinator at %s took no %s", c->cfg->id,
                             c->cfg->control, twn_msg_name(env));
            break;
        }
    }
    if (!rc) c->last_sent = twn_now();
    unlock(c);
    return rc;
}

/* See twn_role_conn.pulse. */
static void *pulse_main(void *arg) {
    twn_role_conn *c = arg;
    while (!c->pulse_stop) {
        struct timespec ts = {0, 10 * 1000 * 1000}; /* also how long closing waits for it */
        nanosleep(&ts, NULL);
        twn_err e;
        if (!c->pulse_stop && twn_role_beat(c, &e))
            twn_log(TWN_LOG_DEBUG, "%s: heartbeat: %s", c->cfg->id, e.msg);
    }
    return NULL;
}

/* A new join: the Hellos until its Welcome carry a new Hello.join_id (never 0). */
static void new_join(twn_role_conn *c) {
    static _Atomic uint64_t seq;
    double now = twn_now();
    uint64_t k[5] = {0, (uint64_t)twn_unix_ms(), ++seq, (uint64_t)(uintptr_t)c, (uint64_t)getpid()};
    memcpy(&k[0], &now, sizeof now);
    c->join_id = twn_hash64(k, sizeof k);
    if (!c->join_id) c->join_id = 1;
}

static int send_hello(twn_role_conn *c, twn_err *err) {
    Twn__Hello h = TWN__HELLO__INIT;
    h.role = c->role;
    h.join_id = c->join_id;
    h.id = (char *)c->cfg->id;
    h.credits = c->cfg->credits;
    h.dim = (uint32_t)c->dim;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_HELLO;
    env.hello = &h;
    c->last_hello = twn_now();
    return twn_role_send(c, &env, err);
}

/* The local estimate of a lease's deadline at its receipt (0: none); called under mu. */
static double lease_estimate(const twn_role_conn *c, uint64_t deadline_unix_ms, uint32_t lease_ms) {
    double now = twn_now(), len = lease_ms / 1000.0, end = 0;
    if (deadline_unix_ms) end = now + ((double)deadline_unix_ms - (double)twn_unix_ms()) / 1000.0;
    /* A lease that waited in our queue was renewed by the heartbeats sent meanwhile that listed
     * a moving lease (lease.h twn_leases_report). */
    if (lease_ms && end && c->last_renewing + len > end) end = c->last_renewing + len;
    return end;
}

void twn_role_lease_begin(twn_role_conn *c, uint64_t lease_id, uint64_t deadline_unix_ms,
                          uint32_t lease_ms, uint32_t stall_ms) {
    lock(c);
    c->abandoned = 0;
    c->lease_len = lease_ms / 1000.0;
    c->lease_end = lease_estimate(c, deadline_unix_ms, lease_ms);
    c->lease_id = lease_id;
    c->lease_progress = 1; /* started */
    c->lease_moved = twn_now();
    c->lease_stall = stall_ms / 1000.0;
    unlock(c);
}

/* A lease's deadline as the coordinator may see it: no later than stall seconds after its
 * progress last moved (heartbeats do not renew it past that). */
static double stall_end(double end, double moved, double stall) {
    return end && stall > 0 && moved + stall < end ? moved + stall : end;
}

static int stalled_at(double now, double moved, double stall) {
    return stall > 0 && now - moved >= stall;
}

void twn_role_lease_progress(twn_role_conn *c, uint64_t lease, uint64_t n) {
    if (!n || !lease) return;
    lock(c);
    double now = twn_now();
    for (size_t i = 0; i < c->n_clocks; i++)
        if (c->clocks[i].lease == lease) {
            c->clocks[i].progress += n;
            c->clocks[i].moved = now;
        }
    if (c->lease_id == lease) {
        c->lease_progress += n;
        c->lease_moved = now;
    }
    unlock(c);
}

void twn_role_lease_alive(twn_role_conn *c) {
    lock(c);
    double now = twn_now();
    for (size_t i = 0; i < c->n_clocks; i++) {
        c->clocks[i].progress++;
        c->clocks[i].moved = now;
    }
    if (c->lease_id) {
        c->lease_progress++;
        c->lease_moved = now;
    }
    unlock(c);
}

/* twn_role_lease_overdue for a lease whose clock says `lease_end`; called under mu. */
static double overdue_at(const twn_role_conn *c, double lease_end) {
    double now = twn_now(), grace = c->beat.interval_s;
    double late = c->missed_beats
                      ? now - (c->last_sent + c->beat.interval_s * c->missed_beats + grace)
                      : -1e9;
    if (lease_end && now - (lease_end + grace) > late) late = now - (lease_end + grace);
    if (c->rejoin) late = 1e9;
    return late;
}

/* Why a lease is given up, for the log: how late it is, or that this process is joining again
 * (declared dead: overdue_at's 1e9). */
static void overdue_why(const twn_role_conn *c, double late, char *buf, size_t cap) {
    if (c->rejoin || late >= 1e8)
        snprintf(buf, cap, "was ended: this process was declared dead and is joining again");
    else
        snprintf(buf, cap, "is %.1f s past its deadline", late);
}

double twn_role_lease_overdue(const twn_role_conn *c) {
    lock(c);
    double late = overdue_at(c, stall_end(c->lease_end, c->lease_moved, c->lease_stall));
    unlock(c);
    return late;
}

// The clocks of several held leases (twn_role_conn.clocks; the gate's)

static void clock_add(twn_role_conn *c, const Twn__UnitLease *l) {
    lock(c);
    if (c->n_clocks == c->cap_clocks) {
        c->cap_clocks = c->cap_clocks ? 2 * c->cap_clocks : 8;
        c->clocks = twn_realloc(c->clocks, c->cap_clocks * sizeof *c->clocks);
    }
    c->clocks[c->n_clocks++] = (twn_role_clock){
        .lease = l->lease_id,
        .unit = l->unit_id,
        .end = lease_estimate(c, l->deadline_unix_ms, l->lease_ms),
        .len = l->lease_ms / 1000.0,
        .progress = 1, /* taken off the socket: started */
        .moved = twn_now(),
        .stall = l->stall_ms / 1000.0,
    };
    unlock(c);
}

/* twn_role_lease_overdue for one held lease (one not held: as a lease without a deadline). */
static double clock_overdue(const twn_role_conn *c, uint64_t lease) {
    lock(c);
    double end = 0;
    for (size_t i = 0; i < c->n_clocks; i++)
        if (c->clocks[i].lease == lease)
            end = stall_end(c->clocks[i].end, c->clocks[i].moved, c->clocks[i].stall);
    double late = overdue_at(c, end);
    unlock(c);
    return late;
}

static void clock_remove(twn_role_conn *c, uint64_t lease) {
    lock(c);
    for (size_t i = 0; i < c->n_clocks; i++) {
        if (c->clocks[i].lease != lease) continue;
        memmove(&c->clocks[i], &c->clocks[i + 1], (c->n_clocks - i - 1) * sizeof *c->clocks);
        c->n_clocks--;
        break;
    }
    unlock(c);
}

/* The answer to the coordinator's Shutdown (and a graceful goodbye): it may close its ROUTER
 * once every peer has said this, instead of waiting a fixed grace for its messages to land. */
static void role_bye(twn_role_conn *c, const char *why) {
    Twn__Shutdown sd = TWN__SHUTDOWN__INIT;
    sd.reason = (char *)why;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_SHUTDOWN;
    env.shutdown = &sd;
    twn_err e;
    if (c->dealer && twn_role_send(c, &env, &e))
        twn_log(TWN_LOG_DEBUG, "%s: goodbye not sent: %s", c->cfg->id, e.msg);
}

int twn_role_connect(twn_role_conn *c, const twn_role_cfg *cfg, int role, int dim, twn_err *err) {
    memset(c, 0, sizeof *c);
    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&c->mu, &ma);
    pthread_mutexattr_destroy(&ma);
    c->mu_init = 1;
    c->cfg = cfg;
    c->dim = dim;
    c->fo = twn_frame_opts_for(cfg->control, cfg->compress);
    if (cfg->max_message_bytes) c->fo.max_size = cfg->max_message_bytes;
    c->fo_push = c->fo;
    twn_sock_opts so = twn_sock_opts_default();
    so.linger_ms = 0;
    so.routing_id = cfg->id;
    so.sndtimeo_ms = ROLE_SEND_TRY_MS;
    so.max_msg_bytes = twn_wire_limit(&c->fo);
    if (!(c->dealer = twn_sock_new(cfg->zctx, ZMQ_DEALER, &so, err)) ||
        twn_curve_client(c->dealer, cfg->control, cfg->curve, err) ||
        twn_curve_watch(cfg->zctx, c->dealer, cfg->control, cfg->curve, err) ||
        twn_sock_connect(c->dealer, cfg->control, err))
        return -1;
    c->role = role;
    new_join(c);
    if (send_hello(c, err)) return -1;
    double t_hello = twn_now();
    for (;;) {
        if (cfg->stop && *cfg->stop) return twn_err_set(err, "%s: stopped before Welcome", cfg->id);
        if (twn_curve_refused(c->dealer, err)) /* our CURVE key is not on the allow-list */
            return twn_err_wrap(err, "%s", cfg->id);
        if (cfg->connect_timeout_s > 0 && twn_now() - t_hello > cfg->connect_timeout_s)
            return twn_err_set(err,
                               "%s: no Welcome from the coordinator at %s within %.0f ms (the job "
                               "is over, or the coordinator is not running)",
                               cfg->id, cfg->control, cfg->connect_timeout_s * 1000.0);
        /* A Hello that reached a coordinator which died before its Welcome is lost; the next
         * incarnation hears nothing else from us while we wait here: say it again. */
        if (twn_now() - c->last_hello > 1.0 && send_hello(c, err)) return -1;
        Twn__Envelope *m = NULL;
        twn_recv_status s = twn_recv_msg(c->dealer, 100, &c->fo, NULL, &m, err);
        if (s == TWN_RECV_FAIL) return -1;
        if (s != TWN_RECV_MSG) continue;
        if (m->body_case == TWN__ENVELOPE__BODY_WELCOME && !m->welcome->accepted &&
            m->welcome->reason && !strncmp(m->welcome->reason, "unknown peer", 12)) {
            twn_msg_free(m); /* a "say Hello" to a message sent before: our Hello is on its way */
            continue;
        }
        if (m->body_case == TWN__ENVELOPE__BODY_SHUTDOWN) { /* the job ended before we joined */
            twn_msg_free(m);
            role_bye(c, "shutdown");
            c->shut = 1;
            return twn_err_set(err, "%s: shut down before Welcome", cfg->id);
        }
        if (m->body_case != TWN__ENVELOPE__BODY_WELCOME) {
            twn_msg_free(m);
            continue;
        }
        Twn__Welcome *w = m->welcome;
        if (!w->accepted || w->n_shard_endpoints != w->shards || !w->shards) {
            twn_err_set(err, "%s: coordinator refused: %s (shards %u, endpoints %zu)", cfg->id,
                        w->reason ? w->reason : "", w->shards, w->n_shard_endpoints);
            twn_msg_free(m);
            return -1;
        }
        c->shards = w->shards;
        twn_beat_init(&c->beat, w->heartbeat_ms / 1000.0, twn_now());
        c->missed_beats = w->missed_beats;
        c->last_sent = twn_now();
        c->push = twn_calloc(c->shards, sizeof *c->push);
        twn_sock_opts po = twn_sock_opts_default();
        po.linger_ms = 1000;
        po.sndtimeo_ms = -1;
        po.sndhwm = cfg->shard_credits > 0 ? cfg->shard_credits : 4;
        po.max_msg_bytes = twn_wire_limit(&c->fo);
        c->fo_push.zstd_threshold = 0;
        for (uint32_t i = 0; i < c->shards; i++) {
            twn_frame_opts f = twn_frame_opts_for(w->shard_endpoints[i], cfg->compress);
            if (f.zstd_threshold) c->fo_push.zstd_threshold = f.zstd_threshold;
        }
        for (uint32_t i = 0; i < c->shards; i++)
            if (!(c->push[i] = twn_sock_new(cfg->zctx, ZMQ_PUSH, &po, err)) ||
                twn_curve_client(c->push[i], w->shard_endpoints[i], cfg->curve, err) ||
                twn_sock_connect(c->push[i], w->shard_endpoints[i], err)) {
                twn_msg_free(m);
                return -1;
            }
        twn_msg_free(m);
        twn_curve_unwatch(c->dealer);
        break;
    }
    c->cap = (size_t)(cfg->batch > 0 ? cfg->batch : 32);
    c->n_emb = twn_calloc(c->shards, sizeof *c->n_emb);
    c->emb = twn_calloc(c->shards, sizeof *c->emb);
    c->vec = twn_calloc(c->shards, sizeof *c->vec);
    for (uint32_t i = 0; i < c->shards; i++) {
        c->emb[i] = twn_calloc(c->cap, sizeof **c->emb);
        c->vec[i] = twn_calloc(c->cap * (size_t)dim, sizeof **c->vec);
    }
    c->hard = twn_calloc(c->cap, sizeof *c->hard);
    c->rej = twn_calloc(c->cap, sizeof *c->rej);
    c->refs = twn_calloc(2 * c->cap, sizeof *c->refs);
    c->srcs = twn_calloc(2 * c->cap, sizeof *c->srcs);
    c->pulse_on = !cfg->no_pulse && !pthread_create(&c->pulse, NULL, pulse_main, c);
    return 0;
}

void twn_role_close(twn_role_conn *c) {
    if (c->pulse_on) {
        c->pulse_stop = 1;
        pthread_join(c->pulse, NULL);
    }
    for (uint32_t i = 0; c->push && i < c->shards; i++) {
        if (c->push[i]) twn_sock_close(c->push[i]);
        if (c->emb) twn_free(c->emb[i]);
        if (c->vec) twn_free(c->vec[i]);
    }
    twn_free(c->push);
    twn_free(c->n_emb);
    twn_free(c->emb);
    twn_free(c->vec);
    twn_free(c->hard);
    twn_free(c->rej);
    twn_free(c->refs);
    twn_free(c->srcs);
    for (size_t i = 0; i < c->n_stash; i++) twn_msg_free(c->stash[i]);
    twn_free(c->stash);
    for (size_t i = 0; i < c->n_pf; i++) twn_prefetch_drop(c->pf[i]);
    twn_free(c->pf);
    twn_free(c->pf_lease);
    twn_free(c->clocks);
    twn_srcio_close(c->io);
    if (c->dealer) twn_sock_close(c->dealer);
    if (c->mu_init) pthread_mutex_destroy(&c->mu);
    memset(c, 0, sizeof *c);
}

static int beat_locked(twn_role_conn *c, twn_err *err);

int twn_role_beat(twn_role_conn *c, twn_err *err) {
    lock(c);
    int rc = beat_locked(c, err);
    unlock(c);
    return rc;
}

static int beat_locked(twn_role_conn *c, twn_err *err) {
    double now = twn_now();
    /* Joining again, and no coordinator has answered since our last Hello (a live one answers
     * every message, "say Hello" if nothing else): it is gone, the job over or the coordinator
     * not running.  Given up like a first join, so no process waits forever (test_coord_stall:
     * a gate stopped across a coordinator restart that then finished the job). */
    if (c->rejoin && c->cfg->connect_timeout_s > 0 &&
        now - c->last_hello > c->cfg->connect_timeout_s)
        return twn_err_set(err,
                           "%s: no Welcome from the coordinator at %s within %.0f ms of joining "
                           "again (the job is over, or the coordinator is not running)",
                           c->cfg->id, c->cfg->control, c->cfg->connect_timeout_s * 1000.0);
    if (!twn_beat_due(&c->beat, now)) return 0;
    if (!c->rejoin && c->missed_beats &&
        now > c->last_sent + c->beat.interval_s * c->missed_beats) {
        /* Silent too long (a slow batch): the coordinator has declared us dead and ended our
         * leases, and it ignores a dead peer until it says Hello again. */
        twn_log(TWN_LOG_WARN, "%s: %.1f s without a message to the coordinator: joining again",
                c->cfg->id, now - c->last_sent);
        c->rejoin = 1;
        new_join(c);
        return send_hello(c, err);
    }
    /* The heartbeat lists every lease taken off the socket with its progress; the coordinator
     * renews those that moved within their stall time (and, while one did, the leases still
     * queued for us), so the local clocks move the same way. */
    size_t nl = c->n_clocks + 1, k = 0;
    uint64_t one[2][4], *ids = nl <= 4 ? one[0] : twn_malloc(2 * nl * sizeof *ids);
    uint64_t *prog = nl <= 4 ? one[1] : ids + nl;
    int moving = 0, single = c->lease_id != 0;
    for (size_t i = 0; i < c->n_clocks; i++) { /* the same for each lease the gate holds */
        twn_role_clock *x = &c->clocks[i];
        int live = !stalled_at(now, x->moved, x->stall);
        if (live && x->end && now < x->end && now + x->len > x->end) x->end = now + x->len;
        if (!live) x->end = stall_end(x->end, x->moved, x->stall); /* for good: it ended there */
        moving |= live;
        single &= x->lease != c->lease_id;
        ids[k] = x->lease;
        prog[k++] = x->progress;
    }
    if (c->lease_id && !stalled_at(now, c->lease_moved, c->lease_stall)) {
        if (c->lease_end && now < c->lease_end && now + c->lease_len > c->lease_end)
            c->lease_end = now + c->lease_len;
        moving = 1;
    } else if (c->lease_id) {
        c->lease_end = stall_end(c->lease_end, c->lease_moved, c->lease_stall);
    }
    if (single) {
        ids[k] = c->lease_id;
        prog[k++] = c->lease_progress;
    }
    Twn__Heartbeat hb = TWN__HEARTBEAT__INIT;
    hb.seq = ++c->hb_seq;
    hb.n_lease_ids = hb.n_lease_progress = k;
    hb.lease_ids = ids;
    hb.lease_progress = prog;
    uint64_t act = c->active, *units = NULL;
    if (c->n_clocks) {
        units = twn_malloc(c->n_clocks * sizeof *units);
        for (size_t i = 0; i < c->n_clocks; i++) units[i] = c->clocks[i].unit;
        hb.n_active_units = c->n_clocks;
        hb.active_units = units;
    } else if (act) {
        hb.n_active_units = 1;
        hb.active_units = &act;
    }
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_HEARTBEAT;
    env.heartbeat = &hb;
    int rc = twn_role_send(c, &env, err);
    if (!rc && moving) c->last_renewing = now;
    twn_free(units);
    if (ids != one[0]) twn_free(ids);
    return rc;
}

// ------------------------------------------------------------------------------------------------
// Outputs

static int full(twn_role_conn *c) {
    if (c->n_hard + c->n_rej >= c->cap) return 1;
    for (uint32_t i = 0; i < c->shards; i++)
        if (c->n_emb[i] >= c->cap) return 1;
    return 0;
}

int twn_role_emb(twn_role_conn *c, uint64_t unit, uint64_t index, const char *id, const float *v,
                 int route, float p_think, uint32_t think_tokens, twn_err *err) {
    if (full(c) && twn_role_flush(c, unit, err)) return -1;
    uint64_t h = twn_hash64(id, strlen(id));
    uint32_t s = (uint32_t)(h % c->shards);
    Twn__EmbeddingItem *e = &c->emb[s][c->n_emb[s]];
    twn__embedding_item__init(e);
    e->id = (char *)id;
    e->faiss_id = h;
    e->route = route;
    e->p_think = p_think;
    e->think_tokens = think_tokens;
    e->unit_id = unit;
    e->item_index = index;
    memcpy(c->vec[s] + c->n_emb[s] * (size_t)c->dim, v, (size_t)c->dim * sizeof *v);
    c->n_emb[s]++;
    return 0;
}

static Twn__ItemRef *ref_copy(twn_role_conn *c, const Twn__ItemRef *ref) {
    Twn__ItemRef *r = &c->refs[c->n_refs];
    Twn__SourceRef *s = &c->srcs[c->n_refs];
    c->n_refs++;
    *r = *ref;
    if (ref->source) {
        *s = *ref->source;
        r->source = s;
    }
    return r;
}

int twn_role_hard(twn_role_conn *c, const Twn__ItemRef *ref, float p_think, twn_err *err) {
    if (full(c) && twn_role_flush(c, ref->unit_id, err)) return -1;
    Twn__HardItem *h = &c->hard[c->n_hard++];
    twn__hard_item__init(h);
    h->ref = ref_copy(c, ref);
    h->p_think = p_think;
    return 0;
}

int twn_role_reject(twn_role_conn *c, const Twn__ItemRef *ref, int stage, const char *reason,
                    twn_err *err) {
    if (full(c) && twn_role_flush(c, ref->unit_id, err)) return -1;
    Twn__Reject *r = &c->rej[c->n_rej++];
    twn__reject__init(r);
    r->ref = ref_copy(c, ref);
    r->stage = stage;
    r->reason = (char *)reason;
    return 0;
}

static void drain(twn_role_conn *c);

/* A Shutdown waits for this role (on the DEALER, moved to the stash, or there already). */
static int shutdown_queued(twn_role_conn *c) {
    drain(c);
    for (size_t k = 0; k < c->n_stash; k++)
        if (c->stash[k]->body_case == TWN__ENVELOPE__BODY_SHUTDOWN) return 1;
    return 0;
}

/* Flow control to the shards.  A PUSH socket holds at most shard_credits batches for its shard
 * and the indexer's PULL at most its credits (ZMQ_RCVHWM) per sender; a shard that falls behind
 * fills both, and then the sender waits here: it stops reading and gating, its units finish
 * later, it asks for fewer, and memory stays flat however slow a shard is.  The HWM is ZeroMQ's
 * own credit scheme (the receiver returns credit as it reads), so no CreditGrant round trips are
 * needed on the data path.  Heartbeats go on while waiting: a sender held back by a slow shard is
 * alive and keeps its leases.
 * A Shutdown ends the wait (only a blocked sender looks for one; others read it in order once
 * their work is done): the job is over, the indexers stop reading and exit, and the queue may
 * never drain.  What waits is not needed then: the coordinator ends a unit's lease once the
 * items it lacked are acked, so a unit leased again after an indexer lost some of its items is
 * done while its holder still sends the rest (test_shard_wait.c; it used to hang here forever,
 * deaf to that Shutdown and to a re-run coordinator's). */
static int wait_shard(twn_role_conn *c, uint32_t s, twn_err *err) {
    for (;;) {
        zmq_pollitem_t pi = {c->push[s], 0, ZMQ_POLLOUT, 0};
        int n = zmq_poll(&pi, 1, 100);
        if (n < 0 && zmq_errno() != EINTR)
            return twn_err_set(err, "%s: waiting for shard %u: %s", c->cfg->id, s,
                               zmq_strerror(zmq_errno()));
        if (n > 0 && (pi.revents & ZMQ_POLLOUT)) return 0;
        c->shard_waits++;
        twn_role_lease_alive(c); /* held back by a shard, not hung: the leases move */
        if (c->cfg->stop && *c->cfg->stop)
            return twn_err_set(err, "%s: stopped while shard %u was full", c->cfg->id, s);
        if (shutdown_queued(c)) { /* twn_role_serve says goodbye and ends: not a failure */
            c->shut = 1;
            return twn_err_set(err, "%s: Shutdown from the coordinator while shard %u was full",
                               c->cfg->id, s);
        }
        if (twn_role_beat(c, err)) return -1;
    }
}

int twn_role_flush(twn_role_conn *c, uint64_t unit, twn_err *err) {
    int rc = 0;
    double t_send = twn_now();
    int any = c->n_hard || c->n_rej;
    for (uint32_t s = 0; s < c->shards; s++) any |= c->n_emb[s] != 0;
    for (uint32_t s = 0; s < c->shards && !rc; s++) {
        if (!c->n_emb[s]) continue;
        Twn__EmbeddingItem **ptrs = twn_malloc(c->n_emb[s] * sizeof *ptrs);
        for (size_t i = 0; i < c->n_emb[s]; i++) ptrs[i] = &c->emb[s][i];
        Twn__EmbeddingBatch b = TWN__EMBEDDING_BATCH__INIT;
        b.batch_id = ++c->batch_seq;
        b.sender = (char *)c->cfg->id;
        b.shard = s;
        b.dim = (uint32_t)c->dim;
        b.n_items = c->n_emb[s];
        b.items = ptrs;
        twn_batch_set_vectors(&b, c->vec[s]);
        Twn__Envelope env = TWN__ENVELOPE__INIT;
        env.body_case = TWN__ENVELOPE__BODY_EMBEDDING_BATCH;
        env.embedding_batch = &b;
        rc = wait_shard(c, s, err) || twn_send_msg(c->push[s], NULL, &env, &c->fo_push, err);
        twn_free(ptrs);
        c->n_emb[s] = 0;
    }
    if (!rc && c->n_hard) { /* one HardItems per unit: a gate pass spans several units */
        Twn__HardItem **ptrs = twn_malloc(c->n_hard * sizeof *ptrs);
        unsigned char *sent = twn_calloc(c->n_hard, 1);
        for (size_t i = 0; i < c->n_hard && !rc; i++) {
            if (sent[i]) continue;
            uint64_t u = c->hard[i].ref ? c->hard[i].ref->unit_id : unit;
            size_t k = 0;
            for (size_t j = i; j < c->n_hard; j++) {
                if (sent[j] || (c->hard[j].ref ? c->hard[j].ref->unit_id : unit) != u) continue;
                sent[j] = 1;
                ptrs[k++] = &c->hard[j];
            }
            Twn__HardItems h = TWN__HARD_ITEMS__INIT;
            h.unit_id = u;
            h.n_items = k;
            h.items = ptrs;
            Twn__Envelope env = TWN__ENVELOPE__INIT;
            env.body_case = TWN__ENVELOPE__BODY_HARD_ITEMS;
            env.hard_items = &h;
            rc = twn_role_send(c, &env, err);
        }
        twn_free(sent);
        twn_free(ptrs);
    }
    if (!rc && c->n_rej) {
        Twn__Reject **ptrs = twn_malloc(c->n_rej * sizeof *ptrs);
        for (size_t i = 0; i < c->n_rej; i++) ptrs[i] = &c->rej[i];
        Twn__Rejects r = TWN__REJECTS__INIT;
        r.n_items = c->n_rej;
        r.items = ptrs;
        Twn__Envelope env = TWN__ENVELOPE__INIT;
        env.body_case = TWN__ENVELOPE__BODY_REJECTS;
        env.rejects = &r;
        rc = twn_role_send(c, &env, err);
        twn_free(ptrs);
    }
    c->n_hard = c->n_rej = c->n_refs = 0;
    if (any) twn_histogram_observe(twn_role_metrics_get()->send, twn_now() - t_send);
    if (!rc) rc = twn_role_beat(c, err);
    return rc;
}

static int send_finished(twn_role_conn *c, uint64_t lease, int abandoned, twn_err *err) {
    Twn__Finished f = TWN__FINISHED__INIT;
    f.lease_id = lease;
    f.abandoned = abandoned != 0;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_FINISHED;
    env.finished = &f;
    if (twn_role_send(c, &env, err)) return -1;
    c->active = 0;
    lock(c);
    if (c->lease_id == lease) c->lease_id = 0; /* no longer listed in heartbeats */
    unlock(c);
    if (c->rejoin) return 0; /* the Hello asked for fresh credits */
    Twn__WorkRequest w = TWN__WORK_REQUEST__INIT;
    w.credits = 1;
    Twn__Envelope env2 = TWN__ENVELOPE__INIT;
    env2.body_case = TWN__ENVELOPE__BODY_WORK_REQUEST;
    env2.work_request = &w;
    c->active = 0;
    return twn_role_send(c, &env2, err);
}

int twn_role_finished(twn_role_conn *c, uint64_t lease, twn_err *err) {
    return send_finished(c, lease, 0, err);
}

// ------------------------------------------------------------------------------------------------
// The unit leases a gate holds: each batch is filled across them (gate_leases)

enum { H_QUEUED, H_READING, H_READ, H_DONE };

/* One held unit lease. */
typedef struct held {
    Twn__Envelope *own; /* its envelope, taken from the stash (NULL: twn_role_serve's) */
    const Twn__UnitLease *l;
    twn_src_unit u;      /* u.path owned */
    twn_srcio_buf buf;   /* the unit's SourceRef strings: queued refs point here */
    twn_srcio_reader *r; /* open while H_READING (one at a time) */
    uint64_t next;       /* the first item not read yet */
    int state;           /* H_QUEUED (not read yet) .. H_DONE (its Finished is sent) */
    int pending;         /* its items in the batch being filled */
    int abandoned;       /* overdue after a gate pass: given up once the pass is flushed */
    int window;          /* its reader reads a prefetched window (counted while H_READING) */
} held;

/* The held leases in lease order (each allocated apart: queued refs point into them). */
typedef struct gate_set {
    held **v;
    size_t n, cap;
} gate_set;

// ------------------------------------------------------------------------------------------------
// The gate pass over one batch of read items (of one or more held leases: items[i] is of lease
// gs->v[owner[i]])

static int gate_batch(twn_role_conn *c, gate_set *gs, twn_src_item *items, const size_t *owner,
                      int n, twn_err *err) {
    const twn_role_cfg *cfg = c->cfg;
    twn_item *in = twn_calloc((size_t)n + 1, sizeof *in);
    twn_result *res = twn_calloc((size_t)n + 1, sizeof *res);
    const char ***paths = twn_calloc((size_t)n + 1, sizeof *paths);
    const void ***datas = twn_calloc((size_t)n + 1, sizeof *datas);
    size_t **sizes = twn_calloc((size_t)n + 1, sizeof *sizes);
    float *v = twn_malloc((size_t)c->dim * sizeof *v);
    int rc = 0;
    for (int i = 0; i < n; i++) {
        twn_src_item *it = &items[i];
        in[i].id = it->id;
        in[i].text = it->text;
        in[i].instruction = it->instruction;
        in[i].n_images = (int)it->n_images;
        if (it->n_images) {
            paths[i] = twn_calloc(it->n_images, sizeof **paths);
            int mem = it->images[0].data != NULL;
            if (mem) {
                datas[i] = twn_calloc(it->n_images, sizeof **datas);
                sizes[i] = twn_calloc(it->n_images, sizeof **sizes);
            }
            for (size_t k = 0; k < it->n_images; k++) {
                paths[i][k] = it->images[k].path ? it->images[k].path : it->images[k].member;
                if (mem) {
                    datas[i][k] = it->images[k].data;
                    sizes[i][k] = it->images[k].size;
                }
            }
            in[i].images = paths[i];
            in[i].image_data = mem ? datas[i] : NULL;
            in[i].image_size = mem ? sizes[i] : NULL;
        }
    }
    const twn_role_metrics *rm = twn_role_metrics_get();
    double t_gate = twn_now();
    if (cfg->model) {
        twn_opts o = cfg->opts;
        o.pass = TWN_PASS_GATE;
        rc = twn_embed_items(cfg->model, in, n, &o, res, err);
    } else {
        twn_null_pace(cfg->null_item_us, n);
    }
    twn_histogram_observe(rm->gate, twn_now() - t_gate);
    twn_histogram_observe(rm->batch_gate, n);
    twn_counter_inc(rm->gate_batches);
    twn_counter_add(rm->gate_batch_items, (uint64_t)n);
    for (int i = 0; i < n && !rc; i++) {
        int rej = cfg->model && res[i].error;
        int hard = cfg->model ? res[i].hard : twn_null_hard(items[i].id);
        float p = cfg->model ? res[i].p_think : twn_null_p_think(items[i].id);
        if (!rej && isfinite(p)) twn_histogram_observe(rm->p_think, p);
        twn_counter_inc(rm->routed[rej ? 2 : hard ? 1 : 0]);
    }
    /* The results of a lease overdue now would be late: its items are left out, and it is given
     * up once the others' outputs are flushed (gate_leases). */
    for (size_t k = 0; k < gs->n && !rc; k++) {
        held *h = gs->v[k];
        if (h->pending && !h->abandoned && clock_overdue(c, h->l->lease_id) > 0) h->abandoned = 1;
    }
    twn_role_lease_alive(c); /* back from the engine (after the check above): the leases moved */
    for (int i = 0; i < n && !rc; i++) {
        held *h = gs->v[owner[i]];
        if (h->abandoned) continue;
        const twn_src_unit *u = &h->u;
        twn_src_item *it = &items[i];
        Twn__ItemRef r;
        Twn__SourceRef s;
        twn__item_ref__init(&r);
        twn__source_ref__init(&s);
        if ((rc = twn_srcio_ref_to_proto(u, it, &r, &s, &h->buf, err))) break;
        if (!cfg->model) {
            if (twn_null_hard(it->id)) {
                rc = twn_role_hard(c, &r, twn_null_p_think(it->id), err);
            } else {
                twn_null_vec(it->id, c->dim, v);
                rc = twn_role_emb(c, u->id, it->index, it->id, v, TWN__ROUTE__ROUTE_EASY,
                                  twn_null_p_think(it->id), 0, err);
            }
        } else if (res[i].error) {
            /* engine/twn.c labels image decode / resize failures "image: ..." */
            int st = strncmp(res[i].error, "image: ", 7) ? TWN__STAGE__STAGE_GATE
                                                         : TWN__STAGE__STAGE_DECODE;
            rc = twn_role_reject(c, &r, st, res[i].error, err);
        } else if (res[i].hard && res[i].deferred) {
            rc = twn_role_hard(c, &r, res[i].p_think, err);
        } else {
            rc = twn_role_emb(c, u->id, it->index, it->id, res[i].embedding,
                              res[i].hard ? TWN__ROUTE__ROUTE_HARD : TWN__ROUTE__ROUTE_EASY,
                              res[i].p_think, (uint32_t)res[i].think_tokens, err);
        }
        if (!rc && full(c)) rc = twn_role_flush(c, u->id, err);
    }
    /* Flush while the items' strings (ids, refs) and results' messages are still alive. */
    if (!rc) rc = twn_role_flush(c, n ? gs->v[owner[0]]->u.id : 0, err);
    for (int i = 0; i < n; i++) {
        if (cfg->model) twn_result_free(&res[i]);
        twn_free(paths[i]);
        twn_free(datas[i]);
        twn_free(sizes[i]);
    }
    twn_free(in);
    twn_free(res);
    twn_free(paths);
    twn_free(datas);
    twn_free(sizes);
    twn_free(v);
    return rc;
}

/* Gives up an overdue lease: its buffered outputs are dropped, and Finished with abandoned set
 * returns the credit and tells the coordinator to lease the work again now (a lease it still
 * held would otherwise wait ack_timeout for acks that never come; for one it has ended already
 * the message is late and harmless). */
int twn_role_abandon(twn_role_conn *c, const char *what, uint64_t id, uint64_t lease,
                     twn_err *err) {
    char why[96];
    overdue_why(c, twn_role_lease_overdue(c), why, sizeof why);
    twn_log(TWN_LOG_WARN, "%s: %s %llu: lease %llu %s; its results are left to the next holder",
            c->cfg->id, what, (unsigned long long)id, (unsigned long long)lease, why);
    for (uint32_t s = 0; s < c->shards; s++) c->n_emb[s] = 0;
    c->n_hard = c->n_rej = c->n_refs = 0;
    c->abandoned = 0;
    return send_finished(c, lease, 1, err);
}

static void beat_while_waiting(void *user) {
    twn_role_conn *c = user;
    twn_err e;
    twn_role_lease_alive(c); /* waiting on a store, not hung: the leases move */
    if (twn_role_beat(c, &e)) twn_log(TWN_LOG_WARN, "%s: heartbeat: %s", c->cfg->id, e.msg);
}

int twn_role_io(twn_role_conn *c, twn_err *err) {
    if (c->io) return 0;
    if (twn_srcio_open(c->cfg->io, &c->io, err)) return -1;
    twn_srcio_set_wait_hook(c->io, beat_while_waiting, c);
    return 0;
}

/* Rejects items [from, first_index + count) of a held lease's unit that could not be read any
 * further. */
static int reject_rest(twn_role_conn *c, held *h, uint64_t from, const char *why, twn_err *err) {
    const twn_src_unit *u = &h->u;
    Twn__SourceRef s = TWN__SOURCE_REF__INIT;
    if (twn_srcio_unit_to_proto(u, &s, &h->buf, err)) return -1;
    for (uint64_t i = from; i < u->first_index + u->count; i++) {
        Twn__ItemRef r = TWN__ITEM_REF__INIT;
        r.unit_id = u->id;
        r.item_index = i;
        r.source = &s;
        if (twn_role_reject(c, &r, TWN__STAGE__STAGE_READ, why, err)) return -1;
    }
    return twn_role_flush(c, u->id, err);
}

// ------------------------------------------------------------------------------------------------
// Read-ahead (twn_role_cfg.prefetch): the units of the leases queued behind the one being read
// (held and not started, or still in the stash) are fetched by the process's pool meanwhile

/* The fetch of lease `lease`'s unit, taken out of c->pf (NULL: none). */
static twn_prefetch_job *pf_take(twn_role_conn *c, uint64_t lease) {
    for (size_t i = 0; i < c->n_pf; i++) {
        if (c->pf_lease[i] != lease) continue;
        twn_prefetch_job *j = c->pf[i];
        c->n_pf--;
        c->pf[i] = c->pf[c->n_pf];
        c->pf_lease[i] = c->pf_lease[c->n_pf];
        return j;
    }
    return NULL;
}

static int pf_has(const twn_role_conn *c, uint64_t lease) {
    for (size_t i = 0; i < c->n_pf; i++)
        if (c->pf_lease[i] == lease) return 1;
    return 0;
}

/* Starts fetching unit u of lease `lease` (not an S3 unit, or the pool's byte bound reached:
 * nothing). */
static void pf_start(twn_role_conn *c, uint64_t lease, const twn_src_unit *u) {
    twn_prefetch_job *j = twn_prefetch_start(c->cfg->prefetch, u);
    if (!j) return;
    c->pf = twn_realloc(c->pf, (c->n_pf + 1) * sizeof *c->pf);
    c->pf_lease = twn_realloc(c->pf_lease, (c->n_pf + 1) * sizeof *c->pf_lease);
    c->pf[c->n_pf] = j;
    c->pf_lease[c->n_pf++] = lease;
}

static int stashed_lease(const twn_role_conn *c, uint64_t lease) {
    for (size_t k = 0; k < c->n_stash; k++)
        if (c->stash[k]->body_case == TWN__ENVELOPE__BODY_UNIT_LEASE &&
            c->stash[k]->unit_lease->lease_id == lease)
            return 1;
    return 0;
}

/* A lease waiting to be read: held and not started, or in the stash. */
static int queued_lease(const twn_role_conn *c, const gate_set *gs, uint64_t lease) {
    for (size_t i = 0; gs && i < gs->n; i++)
        if (gs->v[i]->state == H_QUEUED && gs->v[i]->l->lease_id == lease) return 1;
    return stashed_lease(c, lease);
}

/* Moves what waits on the DEALER (without waiting) to the stash. */
static void drain(twn_role_conn *c) {
    lock(c);
    for (;;) {
        Twn__Envelope *m = NULL;
        twn_err e;
        twn_recv_status s = twn_recv_msg(c->dealer, 0, &c->fo, NULL, &m, &e);
        if (s == TWN_RECV_BAD) continue; /* consumed, as twn_role_serve would have */
        if (s != TWN_RECV_MSG) break;    /* nothing more (a failure: twn_role_serve sees it) */
        if (c->n_stash == c->cap_stash) {
            c->cap_stash = c->cap_stash ? 2 * c->cap_stash : 8;
            c->stash = twn_realloc(c->stash, c->cap_stash * sizeof *c->stash);
        }
        c->stash[c->n_stash++] = m;
    }
    unlock(c);
}

/* Drains the DEALER, drops the fetches of leases no longer queued, and starts fetching the units
 * of the queued leases, held ones first (at most credits). */
static void prefetch_ahead(twn_role_conn *c, const gate_set *gs) {
    const twn_role_cfg *cfg = c->cfg;
    drain(c);
    for (size_t i = 0; i < c->n_pf;) {
        if (queued_lease(c, gs, c->pf_lease[i]))
            i++;
        else
            twn_prefetch_drop(pf_take(c, c->pf_lease[i]));
    }
    /* at most credits windows in all: the one being read counts (it is no longer in c->pf) */
    size_t most = cfg->credits ? cfg->credits : 1;
    for (size_t k = 0; gs && k < gs->n; k++)
        if (gs->v[k]->state == H_READING && gs->v[k]->window && most) most--;
    for (size_t k = 0; gs && k < gs->n && c->n_pf < most; k++) {
        const held *h = gs->v[k];
        if (h->state == H_QUEUED && !pf_has(c, h->l->lease_id)) pf_start(c, h->l->lease_id, &h->u);
    }
    for (size_t k = 0; k < c->n_stash && c->n_pf < most; k++) {
        const Twn__Envelope *m = c->stash[k];
        if (m->body_case != TWN__ENVELOPE__BODY_UNIT_LEASE) continue;
        const Twn__UnitLease *l = m->unit_lease;
        twn_src_unit u;
        twn_err e;
        if (pf_has(c, l->lease_id) || twn_srcio_unit_from_proto(l->unit_id, l->source, &u, &e))
            continue;
        pf_start(c, l->lease_id, &u);
        twn_free(u.path);
    }
}

// ------------------------------------------------------------------------------------------------
// The gate loop over its held leases

/* Ends held lease h: its reader closed, its clock gone, Finished (abandoned or not) +
 * WorkRequest(1).  The other leases' buffered outputs stay. */
static int lease_end(twn_role_conn *c, held *h, int abandoned, twn_err *err) {
    twn_srcio_reader_close(h->r);
    h->r = NULL;
    twn_prefetch_drop(pf_take(c, h->l->lease_id));
    h->state = H_DONE;
    clock_remove(c, h->l->lease_id);
    return send_finished(c, h->l->lease_id, abandoned, err);
}

/* Gives up an overdue held lease (twn_role_abandon for one of several). */
static int give_up(twn_role_conn *c, held *h, twn_err *err) {
    char why[96];
    overdue_why(c, clock_overdue(c, h->l->lease_id), why, sizeof why);
    twn_log(TWN_LOG_WARN, "%s: unit %llu: lease %llu %s; its results are left to the next holder",
            c->cfg->id, (unsigned long long)h->l->unit_id, (unsigned long long)h->l->lease_id, why);
    return lease_end(c, h, 1, err);
}

static void held_free(held *h) {
    twn_srcio_reader_close(h->r);
    twn_free(h->u.path);
    twn_msg_free(h->own);
    twn_free(h);
}

/* Holds lease l (own: its envelope, freed with it, or NULL).  One that waited in our queue past
 * its deadline is given up at once. */
static int take(twn_role_conn *c, gate_set *gs, Twn__Envelope *own, const Twn__UnitLease *l,
                twn_err *err) {
    held *h = twn_calloc(1, sizeof *h);
    h->own = own;
    h->l = l;
    if (gs->n == gs->cap) {
        gs->cap = gs->cap ? 2 * gs->cap : 8;
        gs->v = twn_realloc(gs->v, gs->cap * sizeof *gs->v);
    }
    gs->v[gs->n++] = h;
    clock_add(c, l);
    if (clock_overdue(c, l->lease_id) > 0) return give_up(c, h, err);
    twn_err e;
    if (twn_srcio_unit_from_proto(l->unit_id, l->source, &h->u, &e)) {
        twn_log(TWN_LOG_WARN, "%s: unit %llu: %s", c->cfg->id, (unsigned long long)l->unit_id,
                e.msg);
        return lease_end(c, h, 0, err); /* the lease expires into dead letters */
    }
    h->next = h->u.first_index;
    h->state = H_QUEUED;
    return 0;
}

/* Holds the unit leases at the head of the stash, after draining the DEALER into it.  It stops at
 * any other message (a Welcome, a Shutdown): twn_role_serve handles those, in order, once the
 * held leases are done.  Leases that come while this role is joining again are left to
 * twn_role_serve, which drops them. */
static int take_queued(twn_role_conn *c, gate_set *gs, twn_err *err) {
    const twn_role_cfg *cfg = c->cfg;
    drain(c);
    while (c->n_stash && !c->rejoin && !(cfg->stop && *cfg->stop) &&
           c->stash[0]->body_case == TWN__ENVELOPE__BODY_UNIT_LEASE) {
        Twn__Envelope *m = c->stash[0];
        memmove(c->stash, c->stash + 1, --c->n_stash * sizeof *c->stash);
        if (take(c, gs, m, m->unit_lease, err)) return -1;
    }
    if (cfg->prefetch) prefetch_ahead(c, gs);
    return 0;
}

/* Opens held lease h's reader (through its prefetched window when the pool has one).  An unit
 * that cannot be opened is rejected whole; a lease overdue by now is given up. */
static int start(twn_role_conn *c, gate_set *gs, held *h, twn_err *err) {
    const twn_role_cfg *cfg = c->cfg;
    if (clock_overdue(c, h->l->lease_id) > 0) return give_up(c, h, err);
    twn_err e;
    twn_prefetch_job *pf = pf_take(c, h->l->lease_id);
    /* no longer queued (else the read-ahead below fetches its unit again) */
    h->state = H_READING;
    h->window = pf != NULL;
    if (cfg->prefetch)
        prefetch_ahead(c, gs); /* the next units are fetched while this one is read */
    twn_blob *pb = NULL;       /* the prefetched window (NULL: read the ordinary way) */
    if (!twn_role_io(c, &e) && pf) {
        twn_s3 *s3 = NULL; /* reads outside the window (a unit larger than the pool's room) */
        twn_err e2;
        if (twn_srcio_s3(c->io, &s3, &e2)) s3 = NULL;
        while (!twn_prefetch_wait(pf, 0.01)) prefetch_ahead(c, gs); /* leases that came meanwhile */
        pb = twn_prefetch_take(pf, s3);
        pf = NULL;
    }
    h->window = pb != NULL;
    twn_prefetch_drop(pf);
    if (!c->io || (pb ? twn_srcio_reader_open_blob(pb, &h->u, &cfg->src, &h->r, &e)
                      : twn_srcio_reader_open(c->io, &h->u, &cfg->src, &h->r, &e))) {
        h->r = NULL;
        h->state = H_READ;
        return reject_rest(c, h, h->u.first_index, e.msg, err);
    }
    h->state = H_READING;
    return 0;
}

/* Reads the next item of held lease h (H_READING) into *it: 1 an item for the batch; 0 none (a
 * bad one was rejected, or the unit is read to the end); -1 failure. */
static int read_one(twn_role_conn *c, held *h, twn_src_item *it, twn_err *err) {
    twn_err e;
    int got = twn_srcio_reader_next(h->r, it, &e);
    if (got != 1) {
        twn_srcio_reader_close(h->r);
        h->r = NULL;
        h->state = H_READ;
        return got < 0 ? reject_rest(c, h, h->next, e.msg, err) : 0;
    }
    h->next = it->index + 1;
    if (!it->fault) return 1; /* its images by reference are fetched with the batch's */
    Twn__ItemRef ir;
    Twn__SourceRef is;
    twn__item_ref__init(&ir);
    twn__source_ref__init(&is);
    int rc = twn_srcio_ref_to_proto(&h->u, it, &ir, &is, &h->buf, err);
    int st = it->fault == TWN_SRC_TRUNCATED ? TWN__STAGE__STAGE_READ : TWN__STAGE__STAGE_PARSE;
    if (!rc && (twn_role_reject(c, &ir, st, it->err.msg, err) || twn_role_flush(c, h->u.id, err)))
        rc = -1;
    twn_src_item_clear(it);
    return rc;
}

/* Images by reference of the batch items[0..n): s3:// images fetched at once on the reader pool
 * (twn_srcio_fetch_images_n), local paths checked.  An item with a dangling one is a dead letter
 * (STAGE_READ, naming the image) and leaves the batch; *n is what is left. */
static int batch_images(twn_role_conn *c, gate_set *gs, twn_src_item *items, size_t *owner, int *n,
                        twn_err *err) {
    twn_err *errs = twn_calloc((size_t)*n, sizeof *errs);
    int rc = 0, m = 0;
    size_t bad = twn_srcio_fetch_images_n(c->io, items, (size_t)*n, errs);
    for (int i = 0; i < *n; i++) {
        if (!bad || !errs[i].msg[0]) {
            if (m < i) {
                items[m] = items[i];
                owner[m] = owner[i];
                memset(&items[i], 0, sizeof items[i]);
            }
            m++;
            continue;
        }
        held *h = gs->v[owner[i]];
        Twn__ItemRef ir;
        Twn__SourceRef is;
        twn__item_ref__init(&ir);
        twn__source_ref__init(&is);
        if (!rc && (twn_srcio_ref_to_proto(&h->u, &items[i], &ir, &is, &h->buf, err) ||
                    twn_role_reject(c, &ir, TWN__STAGE__STAGE_READ, errs[i].msg, err) ||
                    twn_role_flush(c, h->u.id, err)))
            rc = -1;
        twn_src_item_clear(&items[i]);
    }
    twn_free(errs);
    *n = m;
    return rc;
}

/* The gate's lease handler: lease `first` and every lease queued behind it (taken from the stash
 * as the held ones run out of items), batch after batch, until none is held. */
static int gate_leases(twn_role_conn *c, const Twn__UnitLease *first, twn_err *err) {
    const twn_role_cfg *cfg = c->cfg;
    int cap = cfg->batch > 0 ? cfg->batch : 32, n = 0;
    twn_src_item *items = twn_calloc((size_t)cap, sizeof *items);
    size_t *owner = twn_calloc((size_t)cap, sizeof *owner);
    gate_set gs = {0};
    size_t cur = 0; /* gs.v[cur]: the lease being read (those before it are read to the end) */
    int rc = take(c, &gs, NULL, first, err);
    double t_read = twn_now();
    while (!rc && gs.n && !(cfg->stop && *cfg->stop)) {
        /* A batch from what is held now, in lease order: no waiting for leases to come. */
        rc = take_queued(c, &gs, err);
        while (!rc && n < cap) {
            if (cur == gs.n && ((rc = take_queued(c, &gs, err)) || cur == gs.n)) break;
            held *h = gs.v[cur];
            if (h->state == H_QUEUED) {
                rc = start(c, &gs, h, err);
            } else if (h->state == H_READING) {
                int got = read_one(c, h, &items[n], err);
                if (got < 0) rc = -1;
                if (got == 1) {
                    owner[n++] = cur;
                    h->pending++;
                }
            } else {
                /* read to the end: Finished now unless some of its items wait for the pass */
                if (h->state == H_READ && !h->pending) rc = lease_end(c, h, 0, err);
                cur++;
            }
        }
        if (rc) break;
        if (n) rc = batch_images(c, &gs, items, owner, &n, err);
        if (!rc && n) {
            twn_histogram_observe(twn_role_metrics_get()->read, twn_now() - t_read);
            rc = gate_batch(c, &gs, items, owner, n, err);
            for (int i = 0; i < n; i++) twn_src_item_clear(&items[i]);
            n = 0;
        }
        t_read = twn_now();
        /* The pass is flushed: Finished for the leases it read to the end, and the overdue ones
         * (results left out of the pass, or waiting behind it) given up. */
        for (size_t k = 0; k < gs.n && !rc; k++) {
            held *h = gs.v[k];
            int had = h->pending;
            h->pending = 0;
            if (h->state == H_DONE) continue;
            if (h->abandoned || clock_overdue(c, h->l->lease_id) > 0)
                rc = give_up(c, h, err);
            else if (h->state == H_READ && had)
                rc = lease_end(c, h, 0, err);
        }
        size_t m = 0;
        for (size_t k = 0; k < gs.n; k++) {
            if (gs.v[k]->state == H_DONE)
                held_free(gs.v[k]);
            else
                gs.v[m++] = gs.v[k];
        }
        gs.n = m;
        cur = 0; /* what is left: the lease being read, then those not started */
        if (!rc && !gs.n) rc = take_queued(c, &gs, err);
    }
    for (size_t k = 0; k < gs.n; k++) { /* a failure or a stop: the coordinator re-leases them */
        if (gs.v[k]->state != H_DONE) clock_remove(c, gs.v[k]->l->lease_id);
        twn_prefetch_drop(pf_take(c, gs.v[k]->l->lease_id)); /* its unit fetched ahead */
        held_free(gs.v[k]);
    }
    twn_free(gs.v);
    for (int i = 0; i < cap; i++) twn_src_item_clear(&items[i]);
    twn_free(items);
    twn_free(owner);
    return rc;
}

int twn_role_serve(const twn_role_cfg *cfg, int role, int body_case, twn_role_handler handle,
                   twn_err *err) {
    twn_role_conn c;
    int dim = cfg->model ? twn_model_dim(cfg->model) : cfg->null_dim;
    int rc = -1;
    if (twn_role_connect(&c, cfg, role, dim, err)) {
        if ((cfg->stop && *cfg->stop) || c.shut) rc = 0; /* stopped before Welcome: no failure */
        goto out;
    }
    for (;;) {
        if (cfg->stop && *cfg->stop) break; /* the job is over (or failed elsewhere) */
        if (twn_role_beat(&c, err)) goto out;
        Twn__Envelope *m = NULL;
        twn_err e;
        twn_recv_status s = TWN_RECV_MSG;
        if (c.n_stash) { /* taken early by the read-ahead: in order, before anything newer */
            m = c.stash[0];
            memmove(c.stash, c.stash + 1, --c.n_stash * sizeof *c.stash);
        } else {
            lock(&c); /* the pulse shares the DEALER */
            s = twn_recv_msg(c.dealer, 50, &c.fo, NULL, &m, &e);
            unlock(&c);
        }
        if (s == TWN_RECV_FAIL) {
            twn_err_set(err, "%s: %s", cfg->id, e.msg);
            goto out;
        }
        if (s != TWN_RECV_MSG) continue;
        int stop = m->body_case == TWN__ENVELOPE__BODY_SHUTDOWN;
        if (m->body_case == TWN__ENVELOPE__BODY_WELCOME && !m->welcome->accepted) {
            /* The coordinator does not know us: it was restarted (our DEALER reconnected by
             * itself) or it declared us dead.  Join again; leases granted before the new
             * Welcome are dropped (rejoin).  One Hello per heartbeat interval: more "say Hello"s
             * come while ours is on its way. */
            if (twn_now() - c.last_hello > c.beat.interval_s) {
                twn_log(TWN_LOG_INFO, "%s: the coordinator does not know us: joining again",
                        cfg->id);
                if (!c.rejoin) new_join(&c); /* the Hellos of one rejoin share it */
                c.rejoin = 1;
                if (send_hello(&c, err)) {
                    twn_msg_free(m);
                    goto out;
                }
            }
            twn_msg_free(m);
            continue;
        }
        if (m->body_case == TWN__ENVELOPE__BODY_WELCOME && c.rejoin) {
            c.rejoin = 0; /* alive again: what comes next is ours */
            twn_beat_init(&c.beat, m->welcome->heartbeat_ms / 1000.0, twn_now());
        } else if ((int)m->body_case == body_case && c.rejoin) {
            twn_log(TWN_LOG_WARN, "%s: dropping a lease granted before we joined again", cfg->id);
            twn_msg_free(m);
            continue;
        }
        int bad = (int)m->body_case == body_case && handle(&c, m, err);
        twn_msg_free(m);
        if (bad && cfg->stop && *cfg->stop) { /* the job is over: not this role's failure */
            twn_log(TWN_LOG_INFO, "%s: stopped: %s", cfg->id, err->msg);
            break;
        }
        if (bad && c.shut) { /* Shutdown came while a shard was full (wait_shard) */
            twn_log(TWN_LOG_INFO, "%s: stopped: %s", cfg->id, err->msg);
            role_bye(&c, "shutdown");
            break;
        }
        if (bad) goto out;
        if (stop) {
            role_bye(&c, "shutdown");
            break;
        }
    }
    rc = 0;
out:
    twn_role_close(&c);
    return rc;
}

static int gate_lease(twn_role_conn *c, const Twn__Envelope *m, twn_err *err) {
    return gate_leases(c, m->unit_lease, err);
}

int twn_gate_run(const twn_role_cfg *cfg, twn_err *err) {
    return twn_role_serve(cfg, TWN__ROLE__ROLE_GATE, TWN__ENVELOPE__BODY_UNIT_LEASE, gate_lease,
                          err);
}
