/* out_kafka.c — the output topic's producer (out_kafka.h). */
#include "index/out_kafka.h"

#include <librdkafka/rdkafka.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/metrics.h"
#include "proto/twn.pb-c.h"
#include "util/log.h"
#include "util/mem.h"

#define QUEUE_KBYTES "65536" /* queue.buffering.max.kbytes unless kafka.properties set it */
#define LOG_FIRST    10      /* delivery errors logged one by one; after that every 1000th */

struct twn_out_kafka {
    rd_kafka_t *rk;
    rd_kafka_topic_t *rkt;
    char *topic, *model, *model_hash;
    int shard, dim;
    volatile int *stop;
    twn_counter *m_records, *m_errors;
    /* updated by the delivery-report callback, which runs inside rd_kafka_poll / flush on the
     * thread calling them (the committer's); read by get_stats from any thread: atomics */
    uint64_t produced, delivered, errors, waits;
    uint64_t errors_seen;  /* errors at the last flush */
    char first_error[512]; /* since the last flush */
};

static void on_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf) {
    (void)rk;
    twn_debug("librdkafka %d %s: %s", level, fac, buf);
}

static void count_error(twn_out_kafka *o, const char *id, size_t id_len, const char *what) {
    uint64_t n = __atomic_add_fetch(&o->errors, 1, __ATOMIC_RELAXED);
    twn_counter_inc(o->m_errors);
    if (!o->first_error[0])
        snprintf(o->first_error, sizeof o->first_error, "item \"%.*s\": %s",
                 (int)(id_len > 200 ? 200 : id_len), id ? id : "", what);
    if (n <= LOG_FIRST || n % 1000 == 0)
        twn_log(TWN_LOG_WARN,
                "shard %d: output topic %s: item \"%.*s\" not delivered: %s (%llu so far)",
                o->shard, o->topic, (int)(id_len > 200 ? 200 : id_len), id ? id : "", what,
                (unsigned long long)n);
}

static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque) {
    (void)rk;
    twn_out_kafka *o = opaque;
    if (m->err) {
        count_error(o, m->key, m->key_len, rd_kafka_err2str(m->err));
        return;
    }
    __atomic_add_fetch(&o->delivered, 1, __ATOMIC_RELAXED);
    twn_counter_inc(o->m_records);
}

static void on_error(rd_kafka_t *rk, int code, const char *reason, void *opaque) {
    twn_out_kafka *o = opaque;
    if (code == RD_KAFKA_RESP_ERR__FATAL) {
        char why[512];
        rd_kafka_fatal_error(rk, why, sizeof why);
        twn_log(TWN_LOG_ERROR,
                "shard %d: output topic %s: the producer failed for good (%s); every further "
                "record fails (restart the indexer: its WAL replay produces them again)",
                o->shard, o->topic, why);
        return;
    }
    twn_debug("shard %d: output topic %s: %s: %s", o->shard, o->topic,
              rd_kafka_err2name((rd_kafka_resp_err_t)code), reason);
}

static int conf_set(rd_kafka_conf_t *conf, const char *name, const char *value, twn_err *err) {
    char errstr[512];
    if (rd_kafka_conf_set(conf, name, value, errstr, sizeof errstr) != RD_KAFKA_CONF_OK)
        return twn_err_set(err, "kafka.output_topic: setting '%s': %s", name, errstr);
    return 0;
}

int twn_out_kafka_open(const twn_out_kafka_cfg *cfg, twn_out_kafka **out, twn_err *err) {
    *out = NULL;
    if (!cfg->topic || !*cfg->topic) return twn_err_set(err, "kafka.output_topic: no topic name");
    if (!cfg->brokers || !*cfg->brokers)
        return twn_err_set(err,
                           "kafka.output_topic is \"%s\" but kafka.brokers is empty; expected "
                           "bootstrap servers host:port[,...]",
                           cfg->topic);
    twn_out_kafka *o = twn_calloc(1, sizeof *o);
    o->topic = twn_strdup(cfg->topic);
    o->model = twn_strdup(cfg->model ? cfg->model : "");
    o->model_hash = twn_strdup(cfg->model_hash ? cfg->model_hash : "");
    o->shard = cfg->shard;
    o->dim = cfg->dim;
    o->stop = cfg->stop;
    twn_metrics *m = twn_metrics_default();
    char l[32];
    snprintf(l, sizeof l, "shard=%d", cfg->shard);
    o->m_records = twn_metrics_counter(
        m, "twn_index_output_records_total",
        "Durable vectors delivered to the output topic (kafka.output_topic).", l, NULL);
    o->m_errors = twn_metrics_counter(
        m, "twn_index_output_errors_total",
        "Durable vectors the output topic did not get (produce or delivery failed).", l, NULL);
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_opaque(conf, o);
    rd_kafka_conf_set_log_cb(conf, on_log);
    rd_kafka_conf_set_error_cb(conf, on_error);
    rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    const char *fixed[][2] = {{"bootstrap.servers", cfg->brokers},
                              {"enable.idempotence", "true"},
                              {"acks", "all"},
                              {"queue.buffering.max.kbytes", QUEUE_KBYTES},
                              {"log.connection.close", "false"}};
    int rc = 0;
    for (size_t i = 0; !rc && i < sizeof fixed / sizeof *fixed; i++)
        rc = conf_set(conf, fixed[i][0], fixed[i][1], err);
    for (const char *const *p = cfg->props; !rc && p && *p; p++) {
        const char *eq = strchr(*p, '=');
        if (!eq) {
            rc = twn_err_set(err, "kafka.properties: '%s' is not name=value", *p);
            break;
        }
        char name[256];
        snprintf(name, sizeof name, "%.*s", (int)(eq - *p), *p);
        rc = conf_set(conf, name, eq + 1, err);
    }
    char errstr[512];
    if (!rc && !(o->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr)))
        rc = twn_err_set(err, "kafka.output_topic %s: cannot create a producer: %s", cfg->topic,
                         errstr);
    if (rc) {
        if (!o->rk) rd_kafka_conf_destroy(conf);
        twn_out_kafka_close(o);
        return -1;
    }
    o->rkt = rd_kafka_topic_new(o->rk, cfg->topic, NULL);
    if (!o->rkt) {
        rc = twn_err_set(err, "kafka.output_topic %s: %s", cfg->topic,
                         rd_kafka_err2str(rd_kafka_last_error()));
        twn_out_kafka_close(o);
        return rc;
    }
    *out = o;
    return 0;
}

void twn_out_kafka_on_durable(void *ctx, const twn_wal_rec *r) {
    twn_out_kafka *o = ctx;
    const twn_index_item *it = &r->item;
    size_t id_len = it->id_len ? it->id_len : strlen(it->id);
    char *id = twn_strndup(it->id, id_len); /* protobuf-c strings are NUL-terminated */
    Twn__EmbeddingRecord rec = TWN__EMBEDDING_RECORD__INIT;
    rec.id = id;
    rec.vector.data = (uint8_t *)it->vec; /* little-endian hosts only (transport.h) */
    rec.vector.len = (size_t)o->dim * sizeof(float);
    rec.dim = (uint32_t)o->dim;
    rec.route = it->route == TWN_ROUTE_HARD ? TWN__ROUTE__ROUTE_HARD : TWN__ROUTE__ROUTE_EASY;
    rec.p_think = it->p_think;
    rec.think_tokens = it->think_tokens;
    rec.model = o->model;
    rec.model_hash = o->model_hash;
    rec.shard = (uint32_t)o->shard;
    rec.faiss_id = (uint64_t)r->faiss_id;
    rec.wal_seq = r->seq;
    size_t n = twn__embedding_record__get_packed_size(&rec);
    uint8_t *buf = malloc(n ? n : 1); /* librdkafka free()s it (RD_KAFKA_MSG_F_FREE) */
    if (!buf) {
        count_error(o, id, id_len, "out of memory packing the record");
        twn_free(id);
        return;
    }
    twn__embedding_record__pack(&rec, buf);
    for (;;) {
        if (rd_kafka_produce(o->rkt, RD_KAFKA_PARTITION_UA, RD_KAFKA_MSG_F_FREE, buf, n, id, id_len,
                             NULL) == 0) {
            __atomic_add_fetch(&o->produced, 1, __ATOMIC_RELAXED);
            break;
        }
        rd_kafka_resp_err_t e = rd_kafka_last_error();
        if (e == RD_KAFKA_RESP_ERR__QUEUE_FULL && !(o->stop && *o->stop)) {
            /* Back-pressure: wait for deliveries to make room rather than drop. */
            __atomic_add_fetch(&o->waits, 1, __ATOMIC_RELAXED);
            rd_kafka_poll(o->rk, 50);
            continue;
        }
        count_error(o, id, id_len, rd_kafka_err2str(e));
        free(buf);
        break;
    }
    rd_kafka_poll(o->rk, 0); /* serve delivery reports */
    twn_free(id);
}

int twn_out_kafka_flush(twn_out_kafka *o, int timeout_ms, twn_err *err) {
    int waited = 0;
    while (rd_kafka_outq_len(o->rk) > 0) {
        if (o->stop && *o->stop) break;
        if (timeout_ms >= 0 && waited >= timeout_ms) break;
        rd_kafka_flush(o->rk, 100);
        waited += 100;
    }
    rd_kafka_poll(o->rk, 0);
    int left = rd_kafka_outq_len(o->rk);
    uint64_t errors = __atomic_load_n(&o->errors, __ATOMIC_RELAXED);
    uint64_t new_errors = errors - o->errors_seen;
    o->errors_seen = errors;
    int rc = 0;
    if (left > 0)
        rc = twn_err_set(err, "output topic %s: %d record(s) still undelivered after %d ms",
                         o->topic, left, waited);
    else if (new_errors)
        rc = twn_err_set(err, "output topic %s: %llu record(s) failed; the first: %s", o->topic,
                         (unsigned long long)new_errors, o->first_error);
    o->first_error[0] = 0;
    return rc;
}

void twn_out_kafka_get_stats(twn_out_kafka *o, twn_out_kafka_stats *st) {
    st->produced = __atomic_load_n(&o->produced, __ATOMIC_RELAXED);
    st->delivered = __atomic_load_n(&o->delivered, __ATOMIC_RELAXED);
    st->errors = __atomic_load_n(&o->errors, __ATOMIC_RELAXED);
    st->waits = __atomic_load_n(&o->waits, __ATOMIC_RELAXED);
}

void twn_out_kafka_close(twn_out_kafka *o) {
    if (!o) return;
    if (o->rkt) rd_kafka_topic_destroy(o->rkt);
    if (o->rk) {
        rd_kafka_purge(o->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
        rd_kafka_poll(o->rk, 0); /* the purged records' reports: counted as errors */
        rd_kafka_destroy(o->rk);
    }
    twn_free(o->topic);
    twn_free(o->model);
    twn_free(o->model_hash);
    twn_free(o);
}
