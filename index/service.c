/* service.c — the indexer loop (service.h). */
#include "index/service.h"

#include <string.h>
#include <zmq.h>

#include "common/transport.h"
#include "index/shard.h"
#include "util/clock.h"
#include "util/log.h"
#include "util/mem.h"

void twn_indexer_cfg_default(twn_indexer_cfg *c) {
    memset(c, 0, sizeof *c);
    c->factory = "Flat";
    c->commit_ms = 5;
    c->n_shards = 1;
}

typedef struct pend {
    uint64_t unit, index, seq;
    uint32_t think;
    int route; /* Twn__Route */
} pend;

typedef struct ixr {
    const twn_indexer_cfg *cfg;
    void *dealer, *pull;
    twn_shard *s;
    twn_frame_opts fo;
    pend *p;
    size_t n, cap;
} ixr;

static int send(ixr *x, Twn__Envelope *env, twn_err *err) {
    return twn_send_msg(x->dealer, NULL, env, &x->fo, err);
}

static int reject_batch(ixr *x, const Twn__EmbeddingBatch *b, const char *why, twn_err *err) {
    size_t n = b->n_items;
    Twn__Reject *r = twn_calloc(n + 1, sizeof *r);
    Twn__Reject **rp = twn_calloc(n + 1, sizeof *rp);
    Twn__ItemRef *refs = twn_calloc(n + 1, sizeof *refs);
    for (size_t i = 0; i < n; i++) {
        twn__item_ref__init(&refs[i]);
        refs[i].unit_id = b->items[i]->unit_id;
        refs[i].item_index = b->items[i]->item_index;
        refs[i].item_id = b->items[i]->id;
        twn__reject__init(&r[i]);
        r[i].ref = &refs[i];
        r[i].stage = TWN__STAGE__STAGE_INDEX;
        r[i].reason = (char *)why;
        rp[i] = &r[i];
    }
    Twn__Rejects rs = TWN__REJECTS__INIT;
    rs.n_items = n;
    rs.items = rp;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_REJECTS;
    env.rejects = &rs;
    int rc = n ? send(x, &env, err) : 0;
    twn_free(r);
    twn_free(rp);
    twn_free(refs);
    return rc;
}

static int on_batch(ixr *x, const Twn__EmbeddingBatch *b, twn_err *err) {
    twn_err e;
    if (twn_batch_check(b, &e) || (int)b->dim != x->cfg->dim) {
        if (!e.msg[0] || (int)b->dim != x->cfg->dim)
            twn_err_set(&e, "shard %d: batch %llu from %s has dim %u, expected %d", x->cfg->shard,
                        (unsigned long long)b->batch_id, b->sender ? b->sender : "?", b->dim,
                        x->cfg->dim);
        return reject_batch(x, b, e.msg, err);
    }
    size_t n = b->n_items;
    float *v = twn_malloc(n * (size_t)b->dim * sizeof *v + 1);
    twn_index_item *it = twn_calloc(n + 1, sizeof *it);
    twn_shard_ack *acks = twn_calloc(n + 1, sizeof *acks);
    int rc = twn_batch_get_vectors(b, v, &e);
    for (size_t i = 0; i < n && !rc; i++) {
        const Twn__EmbeddingItem *ei = b->items[i];
        it[i].id = ei->id;
        it[i].vec = v + i * b->dim;
        it[i].route = ei->route == TWN__ROUTE__ROUTE_HARD ? TWN_ROUTE_HARD : TWN_ROUTE_EASY;
        it[i].p_think = ei->p_think;
        it[i].think_tokens = ei->think_tokens;
    }
    if (!rc) rc = twn_shard_add(x->s, it, n, acks, &e);
    if (rc) {
        rc = reject_batch(x, b, e.msg, err);
    } else {
        for (size_t i = 0; i < n; i++) {
            if (x->n == x->cap) {
                x->cap = x->cap ? 2 * x->cap : 1024;
                x->p = twn_realloc(x->p, x->cap * sizeof *x->p);
            }
            const Twn__EmbeddingItem *ei = b->items[i];
            x->p[x->n++] = (pend){ei->unit_id, ei->item_index, acks[i].seq, ei->think_tokens,
                                  ei->route == TWN__ROUTE__ROUTE_HARD ? TWN__ROUTE__ROUTE_HARD
                                                                      : TWN__ROUTE__ROUTE_EASY};
        }
    }
    twn_free(v);
    twn_free(it);
    twn_free(acks);
    return rc;
}

/* Commits and acks everything durable, merging consecutive easy items of a unit into ranges. */
static int commit_ack(ixr *x, twn_err *err) {
    if (!x->n) return 0;
    uint64_t durable = 0;
    if (twn_shard_commit(x->s, &durable, err)) return -1;
    Twn__AckRange *r = twn_calloc(x->n, sizeof *r);
    Twn__AckRange **rp = twn_calloc(x->n, sizeof *rp);
    size_t nr = 0, keep = 0;
    for (size_t i = 0; i < x->n; i++) {
        pend *p = &x->p[i];
        if (p->seq > durable) {
            x->p[keep++] = *p;
            continue;
        }
        Twn__AckRange *last = nr ? &r[nr - 1] : NULL;
        if (last && p->route == TWN__ROUTE__ROUTE_EASY && (int)last->route == p->route &&
            last->unit_id == p->unit && last->first_index + last->count == p->index) {
            last->count++;
            continue;
        }
        twn__ack_range__init(&r[nr]);
        r[nr].unit_id = p->unit;
        r[nr].first_index = p->index;
        r[nr].count = 1;
        r[nr].route = p->route;
        r[nr].think_tokens = p->think;
        rp[nr] = &r[nr];
        nr++;
    }
    x->n = keep;
    int rc = 0;
    if (nr) {
        Twn__Ack a = TWN__ACK__INIT;
        a.shard = (uint32_t)x->cfg->shard;
        a.wal_seq = durable;
        a.n_ranges = nr;
        a.ranges = rp;
        Twn__Envelope env = TWN__ENVELOPE__INIT;
        env.body_case = TWN__ENVELOPE__BODY_ACK;
        env.ack = &a;
        rc = send(x, &env, err);
    }
    twn_free(r);
    twn_free(rp);
    return rc;
}

int twn_indexer_run(const twn_indexer_cfg *cfg, twn_err *err) {
    ixr x = {0};
    x.cfg = cfg;
    x.fo = twn_frame_opts_default();
    int rc = -1;
    twn_shard_opts so = {0};
    so.dim = cfg->dim;
    so.factory = cfg->factory;
    so.model = cfg->model;
    so.model_hash = cfg->model_hash;
    so.shard = cfg->shard;
    so.n_shards = cfg->n_shards;
    if (twn_shard_open(cfg->dir, &so, &x.s, NULL, err)) return -1;
    twn_sock_opts o = twn_sock_opts_default();
    o.linger_ms = 0;
    if (!(x.pull = twn_sock_new(cfg->zctx, ZMQ_PULL, &o, err)) ||
        twn_sock_bind(x.pull, cfg->endpoint, NULL, 0, err))
        goto out;
    o.routing_id = cfg->id;
    o.sndtimeo_ms = -1;
    if (!(x.dealer = twn_sock_new(cfg->zctx, ZMQ_DEALER, &o, err)) ||
        twn_sock_connect(x.dealer, cfg->control, err))
        goto out;
    Twn__Hello h = TWN__HELLO__INIT;
    h.role = TWN__ROLE__ROLE_INDEXER;
    h.id = (char *)cfg->id;
    h.dim = (uint32_t)cfg->dim;
    h.shard_first = (uint32_t)cfg->shard;
    h.shard_count = 1;
    h.data_endpoint = (char *)cfg->endpoint;
    Twn__Envelope env = TWN__ENVELOPE__INIT;
    env.body_case = TWN__ENVELOPE__BODY_HELLO;
    env.hello = &h;
    if (send(&x, &env, err)) goto out;
    twn_beat beat;
    twn_beat_init(&beat, 1.0, twn_now());
    uint64_t hb_seq = 0;
    double last_commit = twn_now();
    for (;;) {
        if (cfg->stop && *cfg->stop) {
            twn_err_set(err, "%s: stopped", cfg->id);
            goto out;
        }
        zmq_pollitem_t pi[2] = {{x.pull, 0, ZMQ_POLLIN, 0}, {x.dealer, 0, ZMQ_POLLIN, 0}};
        int timeout = x.n ? 1 : 20;
        if (zmq_poll(pi, 2, timeout) < 0) {
            twn_err_set(err, "%s: zmq_poll: %s", cfg->id, zmq_strerror(zmq_errno()));
            goto out;
        }
        for (int k = 0; k < 256; k++) {
            Twn__Envelope *m = NULL;
            twn_err e;
            twn_recv_status s = twn_recv_msg(x.pull, 0, &x.fo, NULL, &m, &e);
            if (s == TWN_RECV_BAD) twn_log(TWN_LOG_WARN, "%s: %s", cfg->id, e.msg);
            if (s != TWN_RECV_MSG) break;
            int bad = m->body_case == TWN__ENVELOPE__BODY_EMBEDDING_BATCH &&
                      on_batch(&x, m->embedding_batch, err);
            twn_msg_free(m);
            if (bad) goto out;
        }
        double now = twn_now();
        if (x.n && (now - last_commit) * 1000.0 >= cfg->commit_ms) {
            if (commit_ack(&x, err)) goto out;
            last_commit = now;
        }
        if (twn_beat_due(&beat, now)) {
            Twn__Heartbeat hb = TWN__HEARTBEAT__INIT;
            hb.seq = ++hb_seq;
            Twn__Envelope he = TWN__ENVELOPE__INIT;
            he.body_case = TWN__ENVELOPE__BODY_HEARTBEAT;
            he.heartbeat = &hb;
            if (send(&x, &he, err)) goto out;
        }
        Twn__Envelope *m = NULL;
        twn_err e;
        twn_recv_status s = twn_recv_msg(x.dealer, 0, &x.fo, NULL, &m, &e);
        if (s == TWN_RECV_FAIL) {
            twn_err_set(err, "%s: %s", cfg->id, e.msg);
            goto out;
        }
        if (s != TWN_RECV_MSG) continue;
        if (m->body_case == TWN__ENVELOPE__BODY_WELCOME && m->welcome->heartbeat_ms)
            twn_beat_init(&beat, m->welcome->heartbeat_ms / 1000.0, twn_now());
        int stop = m->body_case == TWN__ENVELOPE__BODY_SHUTDOWN;
        twn_msg_free(m);
        if (stop) break;
    }
    if (commit_ack(&x, err)) goto out;
    if (twn_shard_finish(x.s, NULL, err)) goto out;
    rc = 0;
out:
    if (x.s) {
        twn_err e2;
        twn_shard_close(x.s, rc ? &e2 : err);
    }
    if (x.pull) twn_sock_close(x.pull);
    if (x.dealer) twn_sock_close(x.dealer);
    twn_free(x.p);
    return rc;
}
