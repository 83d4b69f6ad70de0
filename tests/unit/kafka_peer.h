/* kafka_peer.h — the Kafka peer of the tests: librdkafka's mock cluster (brokers on 127.0.0.1,
 * topics created on demand, brokers taken down and leaders moved by the test), with the producer
 * side the tests share: producers, records produced with the queue-full retry, flushes,
 * watermarks and a group's committed offsets.
 *
 * Header-only (static inline) so a test includes it without a CMake change.  Prefix kp_.
 * Start it from a cmocka group setup and stop it from the group teardown (kp_stop is safe after
 * a failed start); call kp_brokers_up from the teardown of a test that takes brokers down, so
 * a failure leaves the cluster whole for the next test.  Every wait has a deadline (flush 20 s,
 * watermarks the timeout given, offsets twn_kafka's op_timeout_ms).
 *
 *     static kp_cluster g_kc;
 *     static int group_setup(void **st) { return kp_start(&g_kc, 3); }
 *     static int group_teardown(void **st) { kp_stop(&g_kc); return 0; }
 *     ...
 *     assert_int_equal(rd_kafka_mock_topic_create(g_kc.mcl, "t", 4, 3), 0);
 *     rd_kafka_t *p = kp_producer(&g_kc, "enable.idempotence", "true", NULL);
 *     kp_produce(p, "t", 0, "key", "{...}", n);
 *     kp_flush(p);
 *     rd_kafka_destroy(p); */
#ifndef TWN_TESTS_UNIT_KAFKA_PEER_H
#define TWN_TESTS_UNIT_KAFKA_PEER_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "common/kafka.h"
#include "common/source_io.h"
#include "tests/testutil.h"

typedef struct kp_cluster {
    rd_kafka_t *rk;               /* owns the mock cluster */
    rd_kafka_mock_cluster_t *mcl; /* for rd_kafka_mock_* (topics, brokers, leaders) */
    const char *brokers;          /* "127.0.0.1:P1,127.0.0.1:P2,..." */
    int n_brokers;
} kp_cluster;

/* librdkafka's log callback that drops everything (the mock cluster is chatty). */
static inline void kp_quiet_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf) {
    (void)rk, (void)level, (void)fac, (void)buf;
}

/* Starts a mock cluster of n_brokers.  0, or -1 (a cmocka group setup's return value). */
static inline int kp_start(kp_cluster *k, int n_brokers) {
    memset(k, 0, sizeof *k);
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, kp_quiet_log);
    k->rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    if (!k->rk || !(k->mcl = rd_kafka_mock_cluster_new(k->rk, n_brokers))) return -1;
    k->brokers = rd_kafka_mock_cluster_bootstraps(k->mcl);
    k->n_brokers = n_brokers;
    return 0;
}

/* Destroys the cluster and its owner; a no-op for what was not started. */
static inline void kp_stop(kp_cluster *k) {
    if (k->mcl) rd_kafka_mock_cluster_destroy(k->mcl);
    if (k->rk) rd_kafka_destroy(k->rk);
    memset(k, 0, sizeof *k);
}

/* Every broker of the cluster up again. */
static inline void kp_brokers_up(kp_cluster *k) {
    for (int b = 1; b <= k->n_brokers; b++) rd_kafka_mock_broker_set_up(k->mcl, b);
}

/* A producer to k with quiet logs and the extra settings given as "name", "value" pairs ending
 * in NULL; asserts every setting is taken.  rd_kafka_destroy it. */
static inline rd_kafka_t *kp_producer(const kp_cluster *k, ...) {
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, kp_quiet_log);
    va_list ap;
    va_start(ap, k);
    for (const char *name; (name = va_arg(ap, const char *)) != NULL;) {
        const char *value = va_arg(ap, const char *);
        assert_int_equal(rd_kafka_conf_set(conf, name, value, errstr, sizeof errstr),
                         RD_KAFKA_CONF_OK);
    }
    va_end(ap);
    assert_int_equal(
        rd_kafka_conf_set(conf, "bootstrap.servers", k->brokers, errstr, sizeof errstr),
        RD_KAFKA_CONF_OK);
    rd_kafka_t *p = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof errstr);
    assert_non_null(p);
    return p;
}

/* Produces one record (key NULL: none) to topic/part, polling while the queue is full; asserts
 * it was queued. */
static inline void kp_produce(rd_kafka_t *p, const char *topic, int32_t part, const char *key,
                              const void *value, size_t len) {
    rd_kafka_resp_err_t e;
    for (;;) {
        e = rd_kafka_producev(p, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_PARTITION(part),
                              RD_KAFKA_V_KEY(key, key ? strlen(key) : 0),
                              RD_KAFKA_V_VALUE((void *)value, len),
                              RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
        if (e != RD_KAFKA_RESP_ERR__QUEUE_FULL) break;
        rd_kafka_poll(p, 10);
    }
    assert_int_equal(e, 0);
}

/* Waits up to 20 s until every record produced is delivered; asserts it was. */
static inline void kp_flush(rd_kafka_t *p) {
    assert_int_equal(rd_kafka_flush(p, 20000), 0);
}

/* *c: twn_srcio_cfg_default's, reading k as `group` with these timeouts (twn_kafka_config's
 * op_timeout_ms and read_timeout_ms). */
static inline void kp_srcio_cfg(twn_srcio_cfg *c, const kp_cluster *k, const char *group,
                                int op_timeout_ms, int read_timeout_ms) {
    twn_srcio_cfg_default(c);
    c->kafka.brokers = k->brokers;
    c->kafka.group = group;
    c->kafka.op_timeout_ms = op_timeout_ms;
    c->kafka.read_timeout_ms = read_timeout_ms;
}

/* The high watermarks of partitions 0..n-1 of topic, asking through h (any client handle). */
static inline void kp_high_water(rd_kafka_t *h, const char *topic, int n, int64_t *out,
                                 int timeout_ms) {
    for (int p = 0; p < n; p++) {
        int64_t lo;
        assert_int_equal(rd_kafka_query_watermark_offsets(h, topic, p, &lo, &out[p], timeout_ms),
                         0);
    }
}

/* The offsets `group` committed on partitions 0..n-1 of topic (twn_kafka_committed: -1 where
 * nothing is); returns their sum counting only those > 0.  Fails the test on an error. */
static inline int64_t kp_committed(const kp_cluster *k, const char *topic, const char *group, int n,
                                   int64_t *out) {
    twn_kafka_config c = twn_kafka_config_default();
    c.brokers = k->brokers;
    c.group = group;
    twn_kafka *h;
    twn_err err = {{0}};
    if (twn_kafka_open(&c, &h, &err)) fail_msg("%s", err.msg);
    int64_t sum = 0;
    for (int p = 0; p < n; p++) {
        if (twn_kafka_committed(h, topic, p, &out[p], &err)) fail_msg("%s", err.msg);
        sum += out[p] > 0 ? out[p] : 0;
    }
    twn_kafka_close(h);
    return sum;
}

#endif
