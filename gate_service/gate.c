/* gate.c — the gate service loop and the client plumbing it shares with the worker (gate.h). */
#include "gate_service/gate.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
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

static int send_hello(twn_role_conn *c, twn_err *err) {
    Twn__Hello h = TWN__HELLO__INIT;
    h.role = c->role;
    h.id = (char *)c->cfg->id;
    h.credits = c->cfg->credits;
    h.dim = (uint32_t)c->dim;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_HELLO;
    env.hello = &h;
    c->last_hello = twn_now();
    return twn_role_send(c, &env, err);
}

void twn_role_lease_begin(twn_role_conn *c, uint64_t deadline_unix_ms, uint32_t lease_ms) {
    lock(c);
    double now = twn_now();
    c->abandoned = 0;
    c->lease_len = lease_ms / 1000.0;
    c->lease_end = 0;
    if (deadline_unix_ms)
        c->lease_end = now + ((double)deadline_unix_ms - (double)twn_unix_ms()) / 1000.0;
    /* A lease that waited in our queue was renewed by the heartbeats sent meanwhile. */
    if (lease_ms && c->lease_end && c->last_sent + c->lease_len > c->lease_end)
        c->lease_end = c->last_sent + c->lease_len;
    unlock(c);
}

double twn_role_lease_overdue(const twn_role_conn *c) {
    lock(c);
    double now = twn_now(), grace = c->beat.interval_s;
    double late = c->missed_beats
                      ? now - (c->last_sent + c->beat.interval_s * c->missed_beats + grace)
                      : -1e9;
    if (c->lease_end && now - (c->lease_end + grace) > late) late = now - (c->lease_end + grace);
    if (c->rejoin) late = 1e9;
    unlock(c);
    return late;
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
    c->fo = twn_frame_opts_default();
    if (cfg->max_message_bytes) c->fo.max_size = cfg->max_message_bytes;
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
    if (!twn_beat_due(&c->beat, now)) return 0;
    if (!c->rejoin && c->missed_beats &&
        now > c->last_sent + c->beat.interval_s * c->missed_beats) {
        /* Silent too long (a slow batch): the coordinator has declared us dead and ended our
         * leases, and it ignores a dead peer until it says Hello again. */
        twn_log(TWN_LOG_WARN, "%s: %.1f s without a message to the coordinator: joining again",
                c->cfg->id, now - c->last_sent);
        c->rejoin = 1;
        return send_hello(c, err);
    }
    if (c->lease_end && now < c->lease_end && now + c->lease_len > c->lease_end)
        c->lease_end = now + c->lease_len;
    Twn__Heartbeat hb = TWN__HEARTBEAT__INIT;
    hb.seq = ++c->hb_seq;
    uint64_t act = c->active;
    if (act) {
        hb.n_active_units = 1;
        hb.active_units = &act;
    }
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_HEARTBEAT;
    env.heartbeat = &hb;
    return twn_role_send(c, &env, err);
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

/* Flow control to the shards.  A PUSH socket holds at most shard_credits batches for its shard
 * and the indexer's PULL at most its credits (ZMQ_RCVHWM) per sender; a shard that falls behind
 * fills both, and then the sender waits here: it stops reading and gating, its units finish
 * later, it asks for fewer, and memory stays flat however slow a shard is.  The HWM is ZeroMQ's
 * own credit scheme (the receiver returns credit as it reads), so no CreditGrant round trips are
 * needed on the data path.  Heartbeats go on while waiting: a sender held back by a slow shard is
 * alive and keeps its leases. */
static int wait_shard(twn_role_conn *c, uint32_t s, twn_err *err) {
    for (;;) {
        zmq_pollitem_t pi = {c->push[s], 0, ZMQ_POLLOUT, 0};
        int n = zmq_poll(&pi, 1, 100);
        if (n < 0 && zmq_errno() != EINTR)
            return twn_err_set(err, "%s: waiting for shard %u: %s", c->cfg->id, s,
                               zmq_strerror(zmq_errno()));
        if (n > 0 && (pi.revents & ZMQ_POLLOUT)) return 0;
        c->shard_waits++;
        if (c->cfg->stop && *c->cfg->stop)
            return twn_err_set(err, "%s: stopped while shard %u was full", c->cfg->id, s);
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
        rc = wait_shard(c, s, err) || twn_send_msg(c->push[s], NULL, &env, &c->fo, err);
        twn_free(ptrs);
        c->n_emb[s] = 0;
    }
    if (!rc && c->n_hard) {
        Twn__HardItem **ptrs = twn_malloc(c->n_hard * sizeof *ptrs);
        for (size_t i = 0; i < c->n_hard; i++) ptrs[i] = &c->hard[i];
        Twn__HardItems h = TWN__HARD_ITEMS__INIT;
        h.unit_id = unit;
        h.n_items = c->n_hard;
        h.items = ptrs;
        Twn__Envelope env = TWN__ENVELOPE__INIT;
        env.body_case = TWN__ENVELOPE__BODY_HARD_ITEMS;
        env.hard_items = &h;
        rc = twn_role_send(c, &env, err);
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
// The gate pass over one batch of read items

static int gate_batch(twn_role_conn *c, const twn_src_unit *u, twn_src_item *items, int n,
                      twn_err *err) {
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
    for (int i = 0; i < n && !rc; i++) {
        int rej = cfg->model && res[i].error;
        int hard = cfg->model ? res[i].hard : twn_null_hard(items[i].id);
        float p = cfg->model ? res[i].p_think : twn_null_p_think(items[i].id);
        if (!rej && isfinite(p)) twn_histogram_observe(rm->p_think, p);
        twn_counter_inc(rm->routed[rej ? 2 : hard ? 1 : 0]);
    }
    if (!rc && twn_role_lease_overdue(c) > 0) c->abandoned = 1; /* results would be late */
    for (int i = 0; i < n && !rc && !c->abandoned; i++) {
        twn_src_item *it = &items[i];
        Twn__ItemRef r;
        Twn__SourceRef s;
        twn__item_ref__init(&r);
        twn__source_ref__init(&s);
        if ((rc = twn_srcio_ref_to_proto(u, it, &r, &s, &c->srcbuf, err))) break;
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
    if (!rc && !c->abandoned) rc = twn_role_flush(c, u->id, err);
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
    twn_log(TWN_LOG_WARN,
            "%s: %s %llu: lease %llu is %.1f s past its deadline (or this process was declared "
            "dead); its results are left to the next holder",
            c->cfg->id, what, (unsigned long long)id, (unsigned long long)lease,
            twn_role_lease_overdue(c));
    for (uint32_t s = 0; s < c->shards; s++) c->n_emb[s] = 0;
    c->n_hard = c->n_rej = c->n_refs = 0;
    c->abandoned = 0;
    return send_finished(c, lease, 1, err);
}

static void beat_while_waiting(void *user) {
    twn_role_conn *c = user;
    twn_err e;
    if (twn_role_beat(c, &e)) twn_log(TWN_LOG_WARN, "%s: heartbeat: %s", c->cfg->id, e.msg);
}

int twn_role_io(twn_role_conn *c, twn_err *err) {
    if (c->io) return 0;
    if (twn_srcio_open(c->cfg->io, &c->io, err)) return -1;
    twn_srcio_set_wait_hook(c->io, beat_while_waiting, c);
    return 0;
}

static int abandon(twn_role_conn *c, uint64_t unit, uint64_t lease, twn_err *err) {
    return twn_role_abandon(c, "unit", unit, lease, err);
}

/* Rejects items [from, first_index + count) of a unit that could not be read any further. */
static int reject_rest(twn_role_conn *c, const twn_src_unit *u, uint64_t from, const char *why,
                       twn_err *err) {
    Twn__SourceRef s = TWN__SOURCE_REF__INIT;
    if (twn_srcio_unit_to_proto(u, &s, &c->srcbuf, err)) return -1;
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
// Read-ahead (twn_role_cfg.prefetch): the units of the leases queued behind the current one are
// fetched by the process's pool while this gate works

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

static int stashed_lease(const twn_role_conn *c, uint64_t lease) {
    for (size_t k = 0; k < c->n_stash; k++)
        if (c->stash[k]->body_case == TWN__ENVELOPE__BODY_UNIT_LEASE &&
            c->stash[k]->unit_lease->lease_id == lease)
            return 1;
    return 0;
}

/* Moves what waits on the DEALER (without waiting) to the stash, drops the fetches of leases no
 * longer queued, and starts fetching the units of the queued leases (at most credits). */
static void prefetch_ahead(twn_role_conn *c) {
    const twn_role_cfg *cfg = c->cfg;
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
    for (size_t i = 0; i < c->n_pf;) {
        if (stashed_lease(c, c->pf_lease[i]))
            i++;
        else
            twn_prefetch_drop(pf_take(c, c->pf_lease[i]));
    }
    size_t most = cfg->credits ? cfg->credits : 1;
    for (size_t k = 0; k < c->n_stash && c->n_pf < most; k++) {
        const Twn__Envelope *m = c->stash[k];
        if (m->body_case != TWN__ENVELOPE__BODY_UNIT_LEASE) continue;
        const Twn__UnitLease *l = m->unit_lease;
        int have = 0;
        for (size_t i = 0; i < c->n_pf; i++) have |= c->pf_lease[i] == l->lease_id;
        twn_src_unit u;
        twn_err e;
        if (have || twn_srcio_unit_from_proto(l->unit_id, l->source, &u, &e)) continue;
        twn_prefetch_job *j = twn_prefetch_start(cfg->prefetch, &u);
        twn_free(u.path);
        if (!j) continue; /* not an S3 unit, or the pool's byte bound is reached */
        c->pf = twn_realloc(c->pf, (c->n_pf + 1) * sizeof *c->pf);
        c->pf_lease = twn_realloc(c->pf_lease, (c->n_pf + 1) * sizeof *c->pf_lease);
        c->pf[c->n_pf] = j;
        c->pf_lease[c->n_pf++] = l->lease_id;
    }
}

static int gate_unit(twn_role_conn *c, const Twn__UnitLease *l, twn_err *err) {
    const twn_role_cfg *cfg = c->cfg;
    twn_src_unit u;
    twn_err e;
    c->active = l->unit_id;
    twn_prefetch_job *pf = pf_take(c, l->lease_id);
    if (cfg->prefetch) prefetch_ahead(c); /* the next units are fetched while this one is worked */
    twn_role_lease_begin(c, l->deadline_unix_ms, l->lease_ms);
    if (twn_role_lease_overdue(c) > 0) { /* it waited in our queue past its deadline */
        twn_prefetch_drop(pf);
        c->abandoned = 1;
        return abandon(c, l->unit_id, l->lease_id, err);
    }
    if (twn_srcio_unit_from_proto(l->unit_id, l->source, &u, &e)) {
        twn_prefetch_drop(pf);
        twn_log(TWN_LOG_WARN, "%s: unit %llu: %s", cfg->id, (unsigned long long)l->unit_id, e.msg);
        return twn_role_finished(c, l->lease_id, err); /* the lease expires into dead letters */
    }
    int rc = 0;
    twn_srcio_reader *r = NULL;
    twn_blob *pb = NULL; /* the prefetched window (NULL: read the ordinary way) */
    if (!twn_role_io(c, &e) && pf) {
        twn_s3 *s3 = NULL; /* reads outside the window (a unit larger than the pool's room) */
        twn_err e2;
        if (twn_srcio_s3(c->io, &s3, &e2)) s3 = NULL;
        while (!twn_prefetch_wait(pf, 0.01)) prefetch_ahead(c); /* leases that came meanwhile */
        pb = twn_prefetch_take(pf, s3);
        pf = NULL;
    }
    twn_prefetch_drop(pf);
    if (!c->io || (pb ? twn_srcio_reader_open_blob(pb, &u, &cfg->src, &r, &e)
                      : twn_srcio_reader_open(c->io, &u, &cfg->src, &r, &e))) {
        rc = reject_rest(c, &u, u.first_index, e.msg, err);
        goto done;
    }
    int cap = cfg->batch > 0 ? cfg->batch : 32, n = 0;
    twn_src_item *items = twn_calloc((size_t)cap, sizeof *items);
    double t_read = twn_now();
    uint64_t next = u.first_index;
    for (;;) {
        int got = twn_srcio_reader_next(r, &items[n], &e);
        if (got == 1) {
            next = items[n].index + 1;
            /* images by reference: s3:// fetched, local paths checked (dangling -> dead letter) */
            int img_bad = !items[n].fault && twn_srcio_fetch_images(c->io, &items[n], &e);
            if (items[n].fault || img_bad) {
                Twn__ItemRef ir;
                Twn__SourceRef is;
                twn__item_ref__init(&ir);
                twn__source_ref__init(&is);
                if (twn_srcio_ref_to_proto(&u, &items[n], &ir, &is, &c->srcbuf, err)) {
                    rc = -1;
                    break;
                }
                int st = items[n].fault == TWN_SRC_TRUNCATED || img_bad ? TWN__STAGE__STAGE_READ
                                                                        : TWN__STAGE__STAGE_PARSE;
                rc = twn_role_reject(c, &ir, st, img_bad ? e.msg : items[n].err.msg, err) ||
                     twn_role_flush(c, u.id, err);
                twn_src_item_clear(&items[n]);
                if (rc) break;
                continue;
            }
            if (++n < cap) continue;
        }
        if (n) {
            twn_histogram_observe(twn_role_metrics_get()->read, twn_now() - t_read);
            rc = gate_batch(c, &u, items, n, err);
        }
        t_read = twn_now();
        for (int i = 0; i < n; i++) twn_src_item_clear(&items[i]);
        n = 0;
        if (rc || c->abandoned) break;
        if (got == 0) break;
        if (got < 0) {
            rc = reject_rest(c, &u, next, e.msg, err);
            break;
        }
    }
    for (int i = 0; i < cap; i++) twn_src_item_clear(&items[i]);
    twn_free(items);
done:
    twn_srcio_reader_close(r);
    twn_free(u.path);
    if (!rc && c->abandoned) return abandon(c, l->unit_id, l->lease_id, err);
    if (!rc) rc = twn_role_finished(c, l->lease_id, err);
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
    return gate_unit(c, m->unit_lease, err);
}

int twn_gate_run(const twn_role_cfg *cfg, twn_err *err) {
    return twn_role_serve(cfg, TWN__ROLE__ROLE_GATE, TWN__ENVELOPE__BODY_UNIT_LEASE, gate_lease,
                          err);
}
