/* kafka.c — the librdkafka side of the Kafka source: the consumer handle, planning from
 * watermarks, the offset-range reader and the group offset helpers.  Turning a message into an
 * item is source_kafka.c. */
#include "common/kafka.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <librdkafka/rdkafka.h>

#include "common/json_fast.h"
#include "common/kafka_internal.h"

#include "util/clock.h"
#include "util/log.h"
#include "util/mem.h"

twn_kafka_config twn_kafka_config_default(void) {
    twn_kafka_config c = {
        .op_timeout_ms = 10000,
        .read_timeout_ms = 30000,
        .max_inline_image_bytes = 1u << 20,
    };
    return c;
}

/* Most messages taken from librdkafka's queue at once. */
#define KAFKA_BATCH 256

struct twn_kafka {
    rd_kafka_t *rk;
    char *group;
    int op_timeout_ms, read_timeout_ms;
    size_t max_inline;
    char last_error[512]; /* the latest error librdkafka reported (brokers down, ...) */
    int reading;          /* a reader is open on the handle */
    /* The partition stream the handle is assigned to.  A reader continuing where the previous
     * one stopped (the next unit of the same partition) keeps it: no re-assign, no re-fetch. */
    char *topic; /* NULL: nothing assigned */
    int32_t partition;
    int64_t pos;              /* the offset the stream delivers next */
    int64_t eof_at;           /* the partition end reported last (-1: none yet) */
    rd_kafka_message_t *held; /* a message at or after pos, taken from the stream early */
    /* Messages are taken from librdkafka in batches: rd_kafka_consumer_poll() locks the queue
     * and reads the clock once per message, which was a third of a bare poll loop's time. */
    rd_kafka_queue_t *queue;                /* the consumer queue */
    rd_kafka_message_t *batch[KAFKA_BATCH]; /* batch[batch_at, batch_n) not yet looked at */
    size_t batch_at, batch_n;
    void (*on_wait)(void *); /* called on every empty poll while a reader waits (may be NULL) */
    void *on_wait_user;
    twn_json_fast *json; /* the JSON records' parser, kept from one message to the next */
};

void twn_kafka_set_wait_hook(twn_kafka *k, void (*fn)(void *user), void *user) {
    k->on_wait = fn;
    k->on_wait_user = user;
}

static void on_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf) {
    (void)rk;
    twn_debug("librdkafka %d %s: %s", level, fac, buf);
}

static void on_error(rd_kafka_t *rk, int code, const char *reason, void *opaque) {
    (void)rk;
    twn_kafka *k = opaque;
    snprintf(k->last_error, sizeof k->last_error, "%s: %s",
             rd_kafka_err2name((rd_kafka_resp_err_t)code), reason);
}

static int conf_set(rd_kafka_conf_t *conf, const char *name, const char *value, twn_err *err) {
    char errstr[512];
    if (rd_kafka_conf_set(conf, name, value, errstr, sizeof errstr) != RD_KAFKA_CONF_OK)
        return twn_err_set(err, "kafka: setting '%s': %s", name, errstr);
    return 0;
}

int twn_kafka_open(const twn_kafka_config *cfg_in, twn_kafka **out, twn_err *err) {
    *out = NULL;
    twn_kafka_config cfg = cfg_in ? *cfg_in : twn_kafka_config_default();
    if (!cfg.brokers || !cfg.brokers[0])
        return twn_err_set(err, "kafka: no brokers; expected bootstrap servers host:port[,...]");
    twn_kafka *k = twn_calloc(1, sizeof *k);
    k->eof_at = -1;
    k->op_timeout_ms = cfg.op_timeout_ms > 0 ? cfg.op_timeout_ms : 10000;
    k->read_timeout_ms = cfg.read_timeout_ms > 0 ? cfg.read_timeout_ms : 30000;
    k->max_inline = cfg.max_inline_image_bytes;
    k->group = cfg.group ? twn_strdup(cfg.group) : NULL;
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_opaque(conf, k);
    rd_kafka_conf_set_log_cb(conf, on_log);
    rd_kafka_conf_set_error_cb(conf, on_error);
    /* The reader tracks offsets itself: nothing is committed or stored behind its back, an
     * offset that is gone is an error (never a silent jump), and the partition end is reported
     * so offsets without a message can be recognized.  Readers read only planned ranges, below
     * the high watermark of their plan, so a fetch never needs to wait for new messages: the
     * broker parks a fetch that finds nothing for fetch.wait.max.ms, and librdkafka keeps one
     * fetch per broker in flight, so moving to the next partition of the same broker waited
     * out the whole wait (100 ms per partition switch; bench_kafka).  The price of a short wait
     * is a fetch every 10 ms while a handle sits at the end of its partition. */
    const char *fixed[][2] = {
        {"bootstrap.servers", cfg.brokers},    {"enable.auto.commit", "false"},
        {"enable.auto.offset.store", "false"}, {"enable.partition.eof", "true"},
        {"auto.offset.reset", "error"},        {"fetch.wait.max.ms", "10"},
        {"allow.auto.create.topics", "false"}, {"log.connection.close", "false"}};
    int rc = 0;
    for (size_t i = 0; !rc && i < sizeof fixed / sizeof *fixed; i++)
        rc = conf_set(conf, fixed[i][0], fixed[i][1], err);
    /* librdkafka 2.0 refuses assign() without a group.id ("Unknown group"); assigning never
     * joins the group, and nothing is committed without a configured one. */
    if (!rc) rc = conf_set(conf, "group.id", cfg.group ? cfg.group : "twn-reader", err);
    for (const char *const *p = cfg.props; !rc && p && *p; p++) {
        const char *eq = strchr(*p, '=');
        if (!eq) {
            rc = twn_err_set(err, "kafka: property '%s' is not name=value", *p);
            break;
        }
        char name[256];
        snprintf(name, sizeof name, "%.*s", (int)(eq - *p), *p);
        rc = conf_set(conf, name, eq + 1, err);
    }
    if (rc) {
        rd_kafka_conf_destroy(conf);
        twn_kafka_close(k);
        return -1;
    }
    char errstr[512];
    k->rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof errstr);
    if (!k->rk) {
        rd_kafka_conf_destroy(conf);
        twn_kafka_close(k);
        return twn_err_set(err, "kafka: cannot create a consumer: %s", errstr);
    }
    rd_kafka_poll_set_consumer(k->rk);
    k->queue = rd_kafka_queue_get_consumer(k->rk);
    *out = k;
    return 0;
}

static void stream_reset(twn_kafka *k) {
    if (k->held) rd_kafka_message_destroy(k->held);
    k->held = NULL;
    while (k->batch_at < k->batch_n) rd_kafka_message_destroy(k->batch[k->batch_at++]);
    k->batch_at = k->batch_n = 0;
    twn_free(k->topic);
    k->topic = NULL;
    k->eof_at = -1;
}

void twn_kafka_close(twn_kafka *k) {
    if (!k) return;
    stream_reset(k);
    if (k->rk) {
        /* The handle only ever assign()s, so there is no group membership to leave; a full
         * consumer close would wait for the group coordinator, without a deadline when its
         * broker is down. */
        rd_kafka_assign(k->rk, NULL);
        if (k->queue) rd_kafka_queue_destroy(k->queue);
        rd_kafka_destroy_flags(k->rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
    }
    twn_json_fast_free(k->json);
    twn_free(k->group);
    twn_free(k);
}

const char *twn_kafka_last_error(const twn_kafka *k) {
    return k->last_error;
}

// ------------------------------------------------------------------------------------------------
// Planning

void twn_kafka_units_free(twn_kafka_units *l) {
    for (size_t i = 0; i < l->n; i++) twn_free(l->v[i].topic);
    twn_free(l->v);
    memset(l, 0, sizeof *l);
}

static int cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* The partition ids of a topic, ascending. */
static int partitions_of(twn_kafka *k, const char *topic, int32_t **ids, int *n, twn_err *err) {
    *ids = NULL;
    *n = 0;
    rd_kafka_topic_t *t = rd_kafka_topic_new(k->rk, topic, NULL);
    if (!t) return twn_err_set(err, "kafka: topic name '%s' is not valid", topic);
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_resp_err_t e = rd_kafka_metadata(k->rk, 0, t, &md, k->op_timeout_ms);
    rd_kafka_topic_destroy(t);
    if (e)
        return twn_err_set(err, "kafka: metadata for topic '%s': %s", topic, rd_kafka_err2str(e));
    int rc = 0;
    if (md->topic_cnt != 1 || strcmp(md->topics[0].topic, topic)) {
        rc = twn_err_set(err, "kafka: metadata for topic '%s' did not describe it", topic);
    } else if (md->topics[0].err) {
        rc = twn_err_set(err, "kafka: topic '%s': %s", topic, rd_kafka_err2str(md->topics[0].err));
    } else if (md->topics[0].partition_cnt <= 0) {
        rc = twn_err_set(err, "kafka: topic '%s' has no partitions", topic);
    } else {
        *n = md->topics[0].partition_cnt;
        *ids = twn_malloc((size_t)*n * sizeof **ids);
        for (int i = 0; i < *n; i++) (*ids)[i] = md->topics[0].partitions[i].id;
        qsort(*ids, (size_t)*n, sizeof **ids, cmp_i32);
    }
    rd_kafka_metadata_destroy(md);
    return rc;
}

int twn_kafka_plan(twn_kafka *k, const char *topic, twn_kafka_format fmt, uint64_t items_per_unit,
                   int from_committed, uint64_t *next_id, twn_kafka_unit_fn fn, void *user,
                   twn_err *err) {
    if (!items_per_unit) return twn_err_set(err, "kafka: items per unit must be at least 1");
    if (fmt != TWN_KAFKA_JSON && fmt != TWN_KAFKA_PROTO)
        return twn_err_set(err,
                           "kafka: unknown message format %d; expected FORMAT_KAFKA_JSON (3) "
                           "or FORMAT_KAFKA_PROTO (4)",
                           (int)fmt);
    if (from_committed && !k->group)
        return twn_err_set(err, "kafka: planning '%s' from committed offsets needs a group", topic);
    int32_t *ids;
    int np;
    if (partitions_of(k, topic, &ids, &np, err)) return -1;
    int rc = 0;
    for (int i = 0; !rc && i < np; i++) {
        int64_t lo, hi;
        rd_kafka_resp_err_t e =
            rd_kafka_query_watermark_offsets(k->rk, topic, ids[i], &lo, &hi, k->op_timeout_ms);
        if (e) {
            rc = twn_err_set(err, "kafka: watermarks of %s[%d]: %s", topic, ids[i],
                             rd_kafka_err2str(e));
            break;
        }
        int64_t from = lo;
        if (from_committed) {
            int64_t c;
            if ((rc = twn_kafka_committed(k, topic, ids[i], &c, err))) break;
            if (c > from) from = c;
        }
        twn_kafka_unit u = {.format = fmt, .topic = (char *)topic, .partition = ids[i]};
        for (int64_t s = from; s < hi && !rc; s += (int64_t)items_per_unit) {
            u.id = (*next_id)++;
            u.start = s;
            u.end = hi - s > (int64_t)items_per_unit ? s + (int64_t)items_per_unit : hi;
            rc = fn(&u, user, err);
        }
    }
    twn_free(ids);
    return rc;
}

static int collect(const twn_kafka_unit *u, void *user, twn_err *err) {
    (void)err;
    twn_kafka_units *l = user;
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 16;
        l->v = twn_realloc(l->v, l->cap * sizeof *l->v);
    }
    l->v[l->n] = *u;
    l->v[l->n].topic = twn_strdup(u->topic);
    l->n++;
    return 0;
}

int twn_kafka_plan_units(twn_kafka *k, const char *topic, twn_kafka_format fmt,
                         uint64_t items_per_unit, int from_committed, twn_kafka_units *out,
                         twn_err *err) {
    uint64_t next_id = out->n ? out->v[out->n - 1].id + 1 : 0;
    return twn_kafka_plan(k, topic, fmt, items_per_unit, from_committed, &next_id, collect, out,
                          err);
}

// ------------------------------------------------------------------------------------------------
// Reading

struct twn_kafka_reader {
    twn_kafka *k;
    twn_kafka_unit u; /* u.topic owned */
    twn_src_opts o;
    int64_t next;         /* the offset of the next item to return */
    double last_progress; /* when the reader last returned an item, as of the first idle poll
                             after it (a clock read per record costs ~8% of a read) */
    int moved;            /* an item was returned since last_progress was taken */
};

int twn_kafka_reader_open(twn_kafka *k, const twn_kafka_unit *u, const twn_src_opts *o,
                          twn_kafka_reader **out, twn_err *err) {
    *out = NULL;
    if (k->reading)
        return twn_err_set(err,
                           "kafka: %s[%d]: the handle is already reading a unit; use one "
                           "handle per reader",
                           u->topic, u->partition);
    if (u->end < u->start || u->start < 0)
        return twn_err_set(err, "kafka: %s[%d]: unit %llu has a bad range [%lld, %lld)", u->topic,
                           u->partition, (unsigned long long)u->id, (long long)u->start,
                           (long long)u->end);
    if (u->format != TWN_KAFKA_JSON && u->format != TWN_KAFKA_PROTO)
        return twn_err_set(err, "kafka: %s[%d]: unit %llu has unknown format %d", u->topic,
                           u->partition, (unsigned long long)u->id, (int)u->format);
    int same = k->topic && !strcmp(k->topic, u->topic) && k->partition == u->partition &&
               k->pos == u->start;
    if (!same && u->end > u->start) {
        stream_reset(k);
        rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
        rd_kafka_topic_partition_list_add(l, u->topic, u->partition)->offset = u->start;
        rd_kafka_resp_err_t e = rd_kafka_assign(k->rk, l);
        rd_kafka_topic_partition_list_destroy(l);
        if (e)
            return twn_err_set(err, "kafka: %s[%d]: cannot start reading at offset %lld: %s",
                               u->topic, u->partition, (long long)u->start, rd_kafka_err2str(e));
        k->topic = twn_strdup(u->topic);
        k->partition = u->partition;
        k->pos = u->start;
    }
    twn_kafka_reader *r = twn_calloc(1, sizeof *r);
    r->k = k;
    r->u = *u;
    r->u.topic = twn_strdup(u->topic);
    r->o = o ? *o : twn_src_opts_default();
    r->next = u->start;
    r->last_progress = twn_now();
    k->reading = 1;
    *out = r;
    return 0;
}

/* The item for an offset that holds no message. */
static void hole_item(twn_kafka_reader *r, twn_src_item *it) {
    it->index = it->offset = (uint64_t)r->next;
    it->fault = TWN_SRC_EMPTY;
    twn_err_set(&it->err,
                "kafka %s[%d]@%lld: no message at this offset (a transaction marker, or an "
                "aborted or compacted-away record); nothing to embed",
                r->u.topic, r->u.partition, (long long)r->next);
    r->next++;
    r->k->pos = r->next;
    r->moved = 1;
}

static void message_item(twn_kafka_reader *r, const rd_kafka_message_t *m, twn_src_item *it) {
    if (r->u.format == TWN_KAFKA_JSON && !r->k->json) r->k->json = twn_json_fast_new();
    twn_kafka_parse_ex(m->payload, m->len, m->key, m->key_len, r->u.format, r->u.topic,
                       r->u.partition, m->offset, &r->o, r->k->max_inline, r->k->json, it);
    r->next = m->offset + 1;
    r->k->pos = r->next;
    r->moved = 1;
}

/* The next message of the stream (the held one first, then the batch), or NULL after waiting
 * ~100 ms. */
static rd_kafka_message_t *stream_next(twn_kafka *k) {
    if (k->held) {
        rd_kafka_message_t *m = k->held;
        k->held = NULL;
        return m;
    }
    if (k->batch_at == k->batch_n) {
        /* what librdkafka has fetched already, without waiting (a batch read with a timeout
         * would wait for a full batch) */
        ssize_t n = rd_kafka_consume_batch_queue(k->queue, 0, k->batch, KAFKA_BATCH);
        k->batch_at = 0;
        k->batch_n = n > 0 ? (size_t)n : 0;
        if (!k->batch_n) return rd_kafka_consumer_poll(k->rk, 100);
    }
    return k->batch[k->batch_at++];
}

int twn_kafka_reader_next(twn_kafka_reader *r, twn_src_item *it, twn_err *err) {
    twn_src_item_clear(it);
    twn_kafka *k = r->k;
    for (;;) {
        if (r->next >= r->u.end) return 0;
        /* the partition ends (for now) at eof_at: offsets below it with no message are holes */
        if (k->eof_at > r->next && !k->held) {
            hole_item(r, it);
            return 1;
        }
        rd_kafka_message_t *m = stream_next(k);
        if (!m) {
            if (k->on_wait) k->on_wait(k->on_wait_user);
            double now = twn_now();
            if (r->moved) {
                r->last_progress = now;
                r->moved = 0;
            }
            double idle = (now - r->last_progress) * 1000;
            if (idle < k->read_timeout_ms) continue;
            char ends[64] = "";
            if (k->eof_at >= 0)
                snprintf(ends, sizeof ends, "; the partition ends at %lld", (long long)k->eof_at);
            return twn_err_set(err,
                               "kafka: %s[%d]: no message at offset %lld for %d ms (unit %llu "
                               "[%lld, %lld)%s%s%s)",
                               r->u.topic, r->u.partition, (long long)r->next, k->read_timeout_ms,
                               (unsigned long long)r->u.id, (long long)r->u.start,
                               (long long)r->u.end, ends, k->last_error[0] ? "; last error: " : "",
                               k->last_error);
        }
        int mine = m->rkt && m->partition == r->u.partition &&
                   !strcmp(rd_kafka_topic_name(m->rkt), r->u.topic);
        if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF) {
            if (mine) k->eof_at = m->offset;
            rd_kafka_message_destroy(m);
            continue;
        }
        if (m->err) {
            rd_kafka_resp_err_t e = m->err;
            char what[512];
            snprintf(what, sizeof what, "%s", rd_kafka_message_errstr(m));
            rd_kafka_message_destroy(m);
            if (e == RD_KAFKA_RESP_ERR__AUTO_OFFSET_RESET ||
                e == RD_KAFKA_RESP_ERR_OFFSET_OUT_OF_RANGE) {
                stream_reset(k);
                return twn_err_set(err,
                                   "kafka: %s[%d]: offsets [%lld, %lld) of unit %llu are no longer "
                                   "available (deleted by retention?): %s",
                                   r->u.topic, r->u.partition, (long long)r->next,
                                   (long long)r->u.end, (unsigned long long)r->u.id, what);
            }
            if (e == RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART ||
                e == RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED ||
                e == RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION) {
                stream_reset(k);
                return twn_err_set(err, "kafka: %s[%d]: %s", r->u.topic, r->u.partition, what);
            }
            /* transient (broker down, leader moving): librdkafka retries; remember it */
            snprintf(k->last_error, sizeof k->last_error, "%s", what);
            continue;
        }
        if (!mine || m->offset < r->next) { /* not ours, or an old prefetch */
            rd_kafka_message_destroy(m);
            continue;
        }
        if (m->offset > r->next) {
            /* nothing at [next, offset): holes; the message waits for its turn (or the next
             * unit, when it lies past this one) */
            k->held = m;
            hole_item(r, it);
            return 1;
        }
        message_item(r, m, it);
        rd_kafka_message_destroy(m);
        return 1;
    }
}

void twn_kafka_reader_close(twn_kafka_reader *r) {
    if (!r) return;
    /* the assignment stays: the next unit of this partition continues the stream */
    r->k->reading = 0;
    twn_free(r->u.topic);
    twn_free(r);
}

/* Most messages read and dropped to reach a ref's offset from the current stream position. */
#define READ_REF_SKIP_MAX 4096

int twn_kafka_read_ref(twn_kafka *k, const char *topic, int32_t partition, int64_t offset,
                       twn_kafka_format fmt, const twn_src_opts *o, twn_src_item *it,
                       twn_err *err) {
    twn_src_item_clear(it);
    twn_kafka_unit u = {.format = fmt,
                        .topic = (char *)topic,
                        .partition = partition,
                        .start = offset,
                        .end = offset + 1};
    /* Refs of one batch usually come in offset order: when the handle's stream is on this
     * partition a little before the offset, read forward through what librdkafka has already
     * fetched instead of re-assigning (a new fetch round trip per item). */
    if (k->topic && !strcmp(k->topic, topic) && k->partition == partition && k->pos < offset &&
        offset - k->pos <= READ_REF_SKIP_MAX)
        u.start = k->pos;
    twn_kafka_reader *r;
    if (twn_kafka_reader_open(k, &u, o, &r, err)) return -1;
    int rc;
    while ((rc = twn_kafka_reader_next(r, it, err)) == 1 && (int64_t)it->offset < offset) {
    }
    twn_kafka_reader_close(r);
    if (rc == 0) /* cannot happen: the range ends at offset + 1 */
        return twn_err_set(err, "kafka: %s[%d]@%lld: no item read", topic, partition,
                           (long long)offset);
    return rc < 0 ? -1 : 0;
}

// ------------------------------------------------------------------------------------------------
// Group offsets

int twn_kafka_committed(twn_kafka *k, const char *topic, int32_t partition, int64_t *offset,
                        twn_err *err) {
    *offset = -1;
    if (!k->group) return twn_err_set(err, "kafka: committed offsets need a consumer group");
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_t *p = rd_kafka_topic_partition_list_add(l, topic, partition);
    rd_kafka_resp_err_t e = rd_kafka_committed(k->rk, l, k->op_timeout_ms);
    int rc = 0;
    if (e || p->err)
        rc = twn_err_set(err, "kafka: committed offset of group '%s' for %s[%d]: %s", k->group,
                         topic, partition, rd_kafka_err2str(e ? e : p->err));
    else
        *offset = p->offset >= 0 ? p->offset : -1;
    rd_kafka_topic_partition_list_destroy(l);
    return rc;
}

int twn_kafka_commit(twn_kafka *k, const char *topic, int32_t partition, int64_t upto,
                     int64_t *committed, twn_err *err) {
    int64_t cur;
    if (twn_kafka_committed(k, topic, partition, &cur, err)) return -1;
    if (committed) *committed = cur;
    if (upto < 0)
        return twn_err_set(err, "kafka: commit %s[%d]: offset %lld is negative", topic, partition,
                           (long long)upto);
    if (cur >= upto) return 0;
    /* rd_kafka_commit(sync) has no deadline (it waits out a lost coordinator); commit through a
     * queue instead and wait op_timeout_ms for the result. */
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, topic, partition)->offset = upto;
    rd_kafka_queue_t *q = rd_kafka_queue_new(k->rk);
    rd_kafka_resp_err_t e = rd_kafka_commit_queue(k->rk, l, q, NULL, NULL);
    rd_kafka_topic_partition_list_destroy(l);
    int rc = 0;
    if (e) {
        rc = twn_err_set(err, "kafka: commit %s[%d] at %lld for group '%s': %s", topic, partition,
                         (long long)upto, k->group, rd_kafka_err2str(e));
    } else {
        rd_kafka_event_t *ev = NULL;
        double deadline = twn_now() + k->op_timeout_ms / 1000.0;
        while (!ev && twn_now() < deadline) {
            ev = rd_kafka_queue_poll(q, 100);
            if (ev && rd_kafka_event_type(ev) != RD_KAFKA_EVENT_OFFSET_COMMIT) {
                rd_kafka_event_destroy(ev);
                ev = NULL;
            }
        }
        if (!ev) {
            rc = twn_err_set(err,
                             "kafka: commit %s[%d] at %lld for group '%s': no answer within "
                             "%d ms%s%s",
                             topic, partition, (long long)upto, k->group, k->op_timeout_ms,
                             k->last_error[0] ? "; last error: " : "", k->last_error);
        } else {
            e = rd_kafka_event_error(ev);
            const rd_kafka_topic_partition_list_t *res = rd_kafka_event_topic_partition_list(ev);
            if (!e && res && res->cnt == 1 && res->elems[0].err) e = res->elems[0].err;
            if (e)
                rc = twn_err_set(err, "kafka: commit %s[%d] at %lld for group '%s': %s", topic,
                                 partition, (long long)upto, k->group, rd_kafka_err2str(e));
            else if (committed)
                *committed = upto;
            rd_kafka_event_destroy(ev);
        }
    }
    rd_kafka_queue_destroy(q);
    return rc;
}

int64_t twn_kafka_commit_point(const twn_kafka_unit *units, const unsigned char *durable, size_t n,
                               const char *topic, int32_t partition, int64_t from) {
    int64_t pos = from;
    for (int moved = 1; moved;) { /* units of a partition are usually in order: one pass */
        moved = 0;
        for (size_t i = 0; i < n; i++) {
            const twn_kafka_unit *u = &units[i];
            if (u->partition != partition || strcmp(u->topic, topic) || u->start != pos) continue;
            if (!durable[i]) return pos;
            if (u->end > pos) {
                pos = u->end;
                moved = 1;
            }
        }
    }
    return pos;
}

// ------------------------------------------------------------------------------------------------
// Protobuf

void twn_kafka_unit_to_proto(const twn_kafka_unit *u, Twn__SourceRef *s) {
    twn__source_ref__init(s);
    s->store = TWN__STORE__STORE_KAFKA;
    s->format = (Twn__Format)u->format;
    s->path = u->topic;
    s->partition = u->partition;
    s->start = (uint64_t)u->start;
    s->end = (uint64_t)u->end;
    s->first_index = (uint64_t)u->start;
    s->count = (uint64_t)(u->end - u->start);
}

int twn_kafka_unit_from_proto(uint64_t unit_id, const Twn__SourceRef *s, twn_kafka_unit *u,
                              twn_err *err) {
    memset(u, 0, sizeof *u);
    if (!s) return twn_err_set(err, "source ref is missing");
    if (s->store != TWN__STORE__STORE_KAFKA)
        return twn_err_set(err, "source '%s': store %d is not Kafka (STORE_KAFKA = 3)", s->path,
                           (int)s->store);
    if (s->format != TWN__FORMAT__FORMAT_KAFKA_JSON && s->format != TWN__FORMAT__FORMAT_KAFKA_PROTO)
        return twn_err_set(err,
                           "source '%s': format %d; expected FORMAT_KAFKA_JSON (3) or "
                           "FORMAT_KAFKA_PROTO (4)",
                           s->path, (int)s->format);
    if (!s->path[0]) return twn_err_set(err, "Kafka source ref has an empty topic");
    if (s->end < s->start || s->end > (uint64_t)INT64_MAX || s->partition < 0)
        return twn_err_set(err, "source %s[%d]: bad offset range [%llu, %llu)", s->path,
                           s->partition, (unsigned long long)s->start, (unsigned long long)s->end);
    u->id = unit_id;
    u->format = (twn_kafka_format)s->format;
    u->topic = twn_strdup(s->path);
    u->partition = s->partition;
    u->start = (int64_t)s->start;
    u->end = (int64_t)s->end;
    return 0;
}

void twn_kafka_ref_to_proto(const twn_kafka_unit *u, const twn_src_item *it, Twn__ItemRef *r,
                            Twn__SourceRef *s) {
    twn_kafka_unit_to_proto(u, s);
    twn__item_ref__init(r);
    r->unit_id = u->id;
    r->item_index = it->index;
    r->source = s;
    r->offset = it->offset;
    r->length = it->length;
    r->item_id = it->id ? it->id : (char *)"";
}
