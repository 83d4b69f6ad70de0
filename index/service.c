/* service.c — the indexer loop (service.h). */
#include "index/service.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#include "common/metrics.h"
#include "common/transport.h"
#include "index/committer.h"
#include "index/faiss_c_shim.h"
#include "index/ingest.h"
#include "index/out_kafka.h"
#include "index/shard.h"
#include "util/clock.h"
#include "util/log.h"
#include "util/mem.h"

void twn_indexer_cfg_default(twn_indexer_cfg *c) {
    memset(c, 0, sizeof *c);
    c->factory = "Flat";
    c->commit_ms = 5;
    c->n_shards = 1;
    c->credits = 4;
}

typedef struct pend {
    uint64_t unit, index, seq;
    uint32_t think;
    int route; /* Twn__Route */
} pend;

typedef struct ixr {
    const twn_indexer_cfg *cfg;
    void *dealer, *pull;
    twn_zap *zap; /* the context's ZAP handler while the PULL is CURVE (common/curve.h) */
    twn_shard *s;
    twn_committer *c;   /* group commits on their own thread (committer.h) */
    twn_out_kafka *out; /* the output topic (out_kafka.h), NULL: off */
    twn_frame_opts fo;
    pend *p;
    size_t n, cap;
    int stalled;            /* test_stall_ms done */
    int goodbye;            /* the last message: one try (see send) */
    twn_histogram *m_fsync; /* the indexer block of common/metrics.h */
    twn_counter *m_added, *m_rejected;
    twn_gauge *m_pending;
} ixr;

/* Acks must not be dropped, so a send waits until the coordinator takes it, but in tries of
 * SEND_TRY_MS that look at cfg->stop: a coordinator that is gone (an inproc:// one that failed
 * and closed its ROUTER leaves no pipe to queue on) must not hold this thread past stop. */
#define SEND_TRY_MS 100

static int send(ixr *x, Twn__Envelope *env, twn_err *err) {
    for (;;) {
        errno = 0;
        int rc = twn_send_msg(x->dealer, NULL, env, &x->fo, err);
        if (!rc || errno != EAGAIN || x->goodbye) return rc;
        if (x->cfg->stop && *x->cfg->stop)
            return twn_err_set(err, "%s: stopped while the coordinator at %s took no %s",
                               x->cfg->id, x->cfg->control, twn_msg_name(env));
    }
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
    twn_counter_add(x->m_rejected, n);
    int rc = n ? send(x, &env, err) : 0;
    twn_free(r);
    twn_free(rp);
    twn_free(refs);
    return rc;
}

static int on_batch(ixr *x, const Twn__EmbeddingBatch *b, twn_err *err) {
    twn_err e;
    double delay_ms = x->cfg->test_batch_delay_ms;
    if (x->cfg->test_stall_ms > 0 && !x->stalled++) delay_ms += x->cfg->test_stall_ms;
    if (delay_ms > 0) {
        struct timespec ts = {(time_t)(delay_ms / 1000.0), (long)(fmod(delay_ms, 1000.0) * 1e6)};
        nanosleep(&ts, NULL);
    }
    if (twn_batch_check(b, &e) || (int)b->dim != x->cfg->dim) {
        if (!e.msg[0] || (int)b->dim != x->cfg->dim)
            twn_err_set(&e, "shard %d: batch %llu from %s has dim %u, expected %d", x->cfg->shard,
                        (unsigned long long)b->batch_id, b->sender ? b->sender : "?", b->dim,
                        x->cfg->dim);
        return reject_batch(x, b, e.msg, err);
    }
    size_t n = b->n_items;
    float *v = NULL;
    twn_index_item *it = twn_calloc(n + 1, sizeof *it);
    twn_shard_ack *acks = twn_calloc(n + 1, sizeof *acks);
    int rc = twn_indexer_batch_items(b, it, &v, &e);
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
        twn_counter_add(x->m_added, n);
        twn_gauge_set(x->m_pending, (double)x->n);
        if (x->c) twn_committer_kick(x->c);
    }
    twn_free(v);
    twn_free(it);
    twn_free(acks);
    return rc;
}

/* Acks every pending item whose seq <= durable (on stable storage), merging consecutive easy
 * items of a unit into ranges. */
static int ack_upto(ixr *x, uint64_t durable, twn_err *err) {
    if (!x->n) return 0;
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
    twn_gauge_set(x->m_pending, (double)keep);
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

/* Acks what the committer thread has made durable since the last call. */
static int ack_durable(ixr *x, twn_err *err) {
    uint64_t durable = 0;
    int done = twn_committer_poll(x->c, &durable, err);
    if (done < 0) return twn_err_wrap(err, "%s", x->cfg->id);
    return done ? ack_upto(x, durable, err) : 0;
}

/* The final commit, on this thread (the committer is stopped), and its acks. */
static int commit_ack(ixr *x, twn_err *err) {
    if (!x->n) return 0;
    uint64_t durable = 0;
    double t_commit = twn_now();
    if (twn_shard_commit(x->s, &durable, err)) return -1;
    twn_histogram_observe(x->m_fsync, twn_now() - t_commit);
    return ack_upto(x, durable, err);
}

static void ixr_metrics(ixr *x) {
    twn_metrics *m = twn_metrics_default();
    char l[32];
    snprintf(l, sizeof l, "shard=%d", x->cfg->shard);
    x->m_fsync = twn_metrics_histogram(m, "twn_wal_fsync_seconds",
                                       "Seconds per group commit (WAL write + fsync), by shard.", l,
                                       TWN_BUCKETS(twn_buckets_seconds), NULL);
    x->m_added = twn_metrics_counter(m, "twn_index_vectors_added_total",
                                     "Vectors appended to the shard.", l, NULL);
    x->m_rejected = twn_metrics_counter(m, "twn_index_rejected_items_total",
                                        "Items of embedding batches the shard refused.", l, NULL);
    x->m_pending = twn_metrics_gauge(m, "twn_index_pending_acks",
                                     "Vectors added but not yet durable and acked.", l, NULL);
}

int twn_indexer_run(const twn_indexer_cfg *cfg, twn_err *err) {
    ixr x = {0};
    x.cfg = cfg;
    ixr_metrics(&x);
    x.fo = twn_frame_opts_for(cfg->control, cfg->compress);
    if (cfg->max_message_bytes) x.fo.max_size = cfg->max_message_bytes;
    int rc = -1;
    twn_shard_opts so = {0};
    so.dim = cfg->dim;
    so.factory = cfg->factory;
    so.model = cfg->model;
    so.model_hash = cfg->model_hash;
    so.shard = cfg->shard;
    so.n_shards = cfg->n_shards;
    so.wal_defer_writes = 1; /* the committer thread writes */
    if (cfg->out_topic && *cfg->out_topic) {
        /* Before the shard: its WAL replay produces the replayed records again. */
        twn_out_kafka_cfg oc = {.brokers = cfg->out_brokers,
                                .topic = cfg->out_topic,
                                .props = cfg->out_props,
                                .model = cfg->model,
                                .model_hash = cfg->model_hash,
                                .shard = cfg->shard,
                                .dim = cfg->dim,
                                .stop = cfg->stop};
        if (twn_out_kafka_open(&oc, &x.out, err)) return twn_err_wrap(err, "%s", cfg->id);
        so.on_durable = twn_out_kafka_on_durable;
        so.on_durable_ctx = x.out;
    }
    if (cfg->faiss_threads > 0) twn_faiss_thread_threads(cfg->faiss_threads);
    if (twn_shard_open(cfg->dir, &so, &x.s, NULL, err)) {
        twn_out_kafka_close(x.out);
        return -1;
    }
    if (twn_committer_start(x.s, cfg->commit_ms, x.m_fsync, &x.c, err)) goto out;
    twn_sock_opts o = twn_sock_opts_default();
    o.linger_ms = 0;
    o.max_msg_bytes = twn_wire_limit(&x.fo);
    o.rcvhwm = cfg->credits > 0 ? cfg->credits : 4;
    if (!(x.pull = twn_sock_new(cfg->zctx, ZMQ_PULL, &o, err)) ||
        twn_curve_server(cfg->zctx, x.pull, cfg->bind ? cfg->bind : cfg->endpoint, cfg->curve,
                         &x.zap, err) ||
        twn_sock_bind(x.pull, cfg->bind ? cfg->bind : cfg->endpoint, NULL, 0, err))
        goto out;
    o.routing_id = cfg->id;
    o.sndtimeo_ms = SEND_TRY_MS;
    if (!(x.dealer = twn_sock_new(cfg->zctx, ZMQ_DEALER, &o, err)) ||
        twn_curve_client(x.dealer, cfg->control, cfg->curve, err) ||
        twn_curve_watch(cfg->zctx, x.dealer, cfg->control, cfg->curve, err) ||
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
    double t_hello = twn_now(), last_hello = t_hello;
    int welcomed = 0;
    for (;;) {
        if (cfg->stop && *cfg->stop) {
            twn_err_set(err, "%s: stopped", cfg->id);
            goto out;
        }
        if (!welcomed && twn_curve_refused(x.dealer, err)) { /* our CURVE key is not listed */
            twn_err_wrap(err, "%s", cfg->id);
            goto out;
        }
        if (!welcomed && cfg->connect_timeout_s > 0 &&
            twn_now() - t_hello > cfg->connect_timeout_s) {
            twn_err_set(err,
                        "%s: no Welcome from the coordinator at %s within %.0f ms (the job is "
                        "over, or the coordinator is not running)",
                        cfg->id, cfg->control, cfg->connect_timeout_s * 1000.0);
            goto out;
        }
        zmq_pollitem_t pi[3] = {{x.pull, 0, ZMQ_POLLIN, 0},
                                {x.dealer, 0, ZMQ_POLLIN, 0},
                                {NULL, twn_committer_fd(x.c), ZMQ_POLLIN, 0}};
        if (zmq_poll(pi, 3, 20) < 0) {
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
            /* Acks go out as soon as their commit is done, also in the middle of a burst. */
            if (bad || ack_durable(&x, err)) goto out;
        }
        if (ack_durable(&x, err)) goto out;
        double now = twn_now();
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
        if (m->body_case == TWN__ENVELOPE__BODY_WELCOME && !m->welcome->accepted) {
            /* The coordinator does not know us (it was restarted and our DEALER reconnected by
             * itself): Hello again, once per heartbeat interval, so it can send our Shutdown. */
            twn_msg_free(m);
            if (twn_now() - last_hello > beat.interval_s) {
                last_hello = twn_now();
                if (send(&x, &env, err)) goto out;
            }
            continue;
        }
        if (m->body_case == TWN__ENVELOPE__BODY_WELCOME && !welcomed) {
            welcomed = 1;
            twn_curve_unwatch(x.dealer);
        }
        if (m->body_case == TWN__ENVELOPE__BODY_WELCOME && m->welcome->heartbeat_ms)
            twn_beat_init(&beat, m->welcome->heartbeat_ms / 1000.0, twn_now());
        int stop = m->body_case == TWN__ENVELOPE__BODY_SHUTDOWN;
        twn_msg_free(m);
        if (stop) break;
    }
    /* The last commit on this thread: the committer must be stopped before the snapshot. */
    if (twn_committer_stop(x.c, err)) {
        x.c = NULL;
        twn_err_wrap(err, "%s", cfg->id);
        goto out;
    }
    x.c = NULL;
    if (commit_ack(&x, err)) goto out;
    if (x.out) {
        /* Every durable record delivered before the snapshot trims the WAL (after it they are
         * never replayed, so never produced again).  Failures are logged and counted, and do not
         * hold the job: librdkafka already retried them for message.timeout.ms. */
        twn_err e2;
        if (twn_out_kafka_flush(x.out, -1, &e2)) twn_log(TWN_LOG_ERROR, "%s: %s", cfg->id, e2.msg);
    }
    if (twn_shard_finish(x.s, NULL, err)) goto out;
    {
        /* Answer the Shutdown once the snapshot is durable, so the coordinator's end (it waits
         * for every answer, a bounded time) means the shard outputs are complete; an indexer
         * killed while finishing never answers, and its restart (with a coordinator still
         * waiting, or re-run) finishes from the WAL.  Linger: the answer must leave before the
         * socket closes. */
        Twn__Shutdown sd = TWN__SHUTDOWN__INIT;
        sd.reason = (char *)"shutdown";
        Twn__Envelope be = TWN__ENVELOPE__INIT;
        be.body_case = TWN__ENVELOPE__BODY_SHUTDOWN;
        be.shutdown = &sd;
        twn_err e2;
        /* Sends are retried until stop (acks must not be dropped), but a coordinator that has
         * already gone (an inproc:// one that exited leaves no pipe to queue on) must not hold
         * the indexer here: the goodbye gets one try of one second. */
        int linger = 1000, sndtimeo = 1000;
        x.goodbye = 1;
        zmq_setsockopt(x.dealer, ZMQ_LINGER, &linger, sizeof linger);
        zmq_setsockopt(x.dealer, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo);
        if (send(&x, &be, &e2)) twn_log(TWN_LOG_DEBUG, "%s: goodbye not sent: %s", cfg->id, e2.msg);
    }
    rc = 0;
out:
    if (x.c) twn_committer_stop(x.c, NULL);
    if (x.s) {
        twn_err e2;
        twn_shard_close(x.s, rc ? &e2 : err);
    }
    twn_out_kafka_close(x.out); /* after the shard: its close commits (and produces) the rest */
    if (x.pull) twn_sock_close(x.pull);
    twn_zap_release(x.zap); /* after the PULL: no handshake may find the handler gone */
    if (x.dealer) twn_sock_close(x.dealer);
    twn_free(x.p);
    return rc;
}
