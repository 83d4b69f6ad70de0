/* bench_kafka.c — records/s of the Kafka source reader against a plain librdkafka consumer loop on
 * the same topic, in the same run.
 *
 * The cluster is librdkafka's in-process mock (3 brokers on 127.0.0.1), so both sides pay the
 * same broker; what differs is the client work per record.  Readings, each over all M records:
 *   plain     a consumer assigned to one partition after the other (as the twn reader goes,
 *             one unit = one partition at a time), polling each from its low to its high
 *             watermark (no per-record work: the lower bound of any reader); also a variant
 *             assigned to every partition at once;
 *   plain+json  the one-partition-at-a-time loop plus json_loadb of each value (the parse any
 *             JSON reader needs);
 *   twn       twn_kafka_plan (units of U offsets) + a twn_kafka_reader per unit, one handle,
 *             every record turned into a twn_src_item (id, text, instruction, images).
 *
 * Each reading is the best of --reps (5) interleaved runs.
 *
 *   bench_kafka [--records M] [--unit U] [--partitions P] [--reps K] */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "common/kafka.h"
#include "util/clock.h"
#include "util/mem.h"

static void quiet(const rd_kafka_t *rk, int level, const char *fac, const char *buf) {
    (void)rk, (void)level, (void)fac, (void)buf;
}

static long g_dr_failed;
static char g_dr_error[256];
static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque) {
    (void)rk, (void)opaque;
    if (m->err && !g_dr_failed++)
        snprintf(g_dr_error, sizeof g_dr_error, "%s", rd_kafka_err2str(m->err));
}

static void die(const char *what) {
    fprintf(stderr, "bench_kafka: %s\n", what);
    exit(1);
}

static rd_kafka_t *make(rd_kafka_type_t type, const char *brokers) {
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, quiet);
    if (type == RD_KAFKA_PRODUCER) rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    if (brokers) {
        const char *kv[][2] = {{"bootstrap.servers", brokers},
                               {"group.id", "bench-plain"},
                               {"enable.auto.commit", "false"},
                               {"enable.partition.eof", "false"},
                               {"fetch.wait.max.ms", "100"}, /* as the twn handle */
                               {"linger.ms", "5"}};
        for (size_t i = 0; i < 6; i++) {
            if (type == RD_KAFKA_PRODUCER && i >= 1 && i <= 4) continue;
            if (type == RD_KAFKA_CONSUMER && i == 5) continue;
            if (rd_kafka_conf_set(conf, kv[i][0], kv[i][1], errstr, sizeof errstr)) die(errstr);
        }
    }
    rd_kafka_t *rk = rd_kafka_new(type, conf, errstr, sizeof errstr);
    if (!rk) die(errstr);
    return rk;
}

/* The plain loop until m messages arrived: every partition at once (one_by_one 0), or one
 * partition after the other, each from its low to its high watermark (the twn reader's pattern:
 * it reads a unit, i.e. one partition, at a time). */
static double plain(const char *brokers, const char *topic, int parts, long m, int parse,
                    int one_by_one, long *bytes) {
    rd_kafka_t *c = make(RD_KAFKA_CONSUMER, brokers);
    rd_kafka_poll_set_consumer(c);
    long n = 0, parsed = 0;
    *bytes = 0;
    double t0 = twn_now();
    for (int round = 0; round < (one_by_one ? parts : 1); round++) {
        rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(parts);
        long want = m;
        if (one_by_one) {
            int64_t lo, hi;
            if (rd_kafka_query_watermark_offsets(c, topic, round, &lo, &hi, 10000))
                die("watermarks");
            rd_kafka_topic_partition_list_add(l, topic, round)->offset = lo;
            want = n + (long)(hi - lo);
        } else {
            for (int p = 0; p < parts; p++)
                rd_kafka_topic_partition_list_add(l, topic, p)->offset = RD_KAFKA_OFFSET_BEGINNING;
        }
        if (rd_kafka_assign(c, l)) die("assign failed");
        rd_kafka_topic_partition_list_destroy(l);
        /* as librdkafka's examples/consumer.c: poll, look, destroy (the clock is read only
         * when a poll comes back empty: a read per record costs several percent here) */
        while (n < want) {
            rd_kafka_message_t *msg = rd_kafka_consumer_poll(c, 100);
            if (!msg) {
                if (twn_now() - t0 > 60) break;
                continue;
            }
            if (!msg->err) {
                n++;
                *bytes += (long)msg->len;
                if (parse) {
                    json_t *j = json_loadb(msg->payload, msg->len, 0, NULL);
                    if (j && json_is_object(j)) parsed++;
                    json_decref(j);
                }
            }
            rd_kafka_message_destroy(msg);
        }
    }
    double dt = twn_now() - t0;
    rd_kafka_assign(c, NULL);
    rd_kafka_destroy_flags(c, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
    if (n != m || (parse && parsed != m)) {
        fprintf(stderr, "bench_kafka: plain loop: %ld of %ld records (%ld parsed)\n", n, m, parsed);
        die("the plain loop did not get every record");
    }
    return dt;
}

static double twn(const char *brokers, const char *topic, long m, uint64_t unit, size_t *units) {
    twn_kafka_config cfg = twn_kafka_config_default();
    cfg.brokers = brokers;
    twn_kafka *k;
    twn_err err;
    if (twn_kafka_open(&cfg, &k, &err)) die(err.msg);
    double t0 = twn_now();
    twn_kafka_units us = {0};
    if (twn_kafka_plan_units(k, topic, TWN_KAFKA_JSON, unit, 0, &us, &err)) die(err.msg);
    long n = 0;
    twn_src_item it = {0};
    for (size_t i = 0; i < us.n; i++) {
        twn_kafka_reader *r;
        if (twn_kafka_reader_open(k, &us.v[i], NULL, &r, &err)) die(err.msg);
        int rc;
        while ((rc = twn_kafka_reader_next(r, &it, &err)) == 1) {
            if (it.fault) die(it.err.msg);
            n++;
        }
        if (rc) die(err.msg);
        twn_kafka_reader_close(r);
    }
    double dt = twn_now() - t0;
    twn_src_item_clear(&it);
    *units = us.n;
    twn_kafka_units_free(&us);
    twn_kafka_close(k);
    if (n != m) die("the twn reader did not get every record");
    return dt;
}

int main(int argc, char **argv) {
    long m = 100000; /* the mock keeps ~5 MB per partition: more would be trimmed away */
    uint64_t unit = 10000;
    int parts = 4, reps = 5;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--records") && i + 1 < argc)
            m = atol(argv[++i]);
        else if (!strcmp(argv[i], "--unit") && i + 1 < argc)
            unit = (uint64_t)atol(argv[++i]);
        else if (!strcmp(argv[i], "--partitions") && i + 1 < argc)
            parts = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]) > 0 ? atoi(argv[i]) : 1;
        else {
            fprintf(stderr,
                    "usage: bench_kafka [--records M] [--unit U] [--partitions P] [--reps K]\n");
            return 2;
        }
    }
    rd_kafka_t *owner = make(RD_KAFKA_PRODUCER, NULL);
    rd_kafka_mock_cluster_t *mcl = rd_kafka_mock_cluster_new(owner, 3);
    if (!mcl) die("cannot create the mock cluster");
    const char *brokers = rd_kafka_mock_cluster_bootstraps(mcl);
    const char *topic = "bench";
    rd_kafka_mock_topic_create(mcl, topic, parts, 3);

    rd_kafka_t *p = make(RD_KAFKA_PRODUCER, brokers);
    double t0 = twn_now();
    char v[256];
    for (long i = 0; i < m; i++) {
        int n = snprintf(v, sizeof v,
                         "{\"id\": \"rec-%08ld\", \"text\": \"a caption for record %ld of the "
                         "benchmark topic\", \"instruction\": \"describe\"%s}",
                         i, i, i % 10 == 0 ? ", \"image\": \"s3://bkt/img/x.jpg\"" : "");
        while (rd_kafka_producev(p, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_PARTITION((int)(i % parts)),
                                 RD_KAFKA_V_VALUE(v, (size_t)n),
                                 RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
                                 RD_KAFKA_V_END) == RD_KAFKA_RESP_ERR__QUEUE_FULL)
            rd_kafka_poll(p, 10);
    }
    if (rd_kafka_flush(p, 60000)) die("flush failed");
    long in_topic = 0;
    for (int i = 0; i < parts; i++) {
        int64_t lo, hi;
        if (rd_kafka_query_watermark_offsets(p, topic, i, &lo, &hi, 10000)) die("watermarks");
        in_topic += (long)(hi - lo);
    }
    rd_kafka_destroy(p);
    if (in_topic != m) {
        fprintf(stderr,
                "bench_kafka: the topic holds %ld of the %ld records produced (%ld failed: %s)\n",
                in_topic, m, g_dr_failed, g_dr_error);
        die("producing failed");
    }
    printf("bench_kafka: librdkafka %s mock cluster (3 brokers, 127.0.0.1), topic of %d "
           "partitions, %ld JSON records produced in %.2f s\n",
           rd_kafka_version_str(), parts, m, twn_now() - t0);

    long bytes;
    size_t units = 0;
    printf("  %-16s %9s %12s %8s\n", "reader", "seconds", "records/s", "MB/s");
    /* the machine is shared: each reading is the best of `reps`, the four interleaved */
    const char *names[4] = {"plain, all parts", "plain", "plain+json", "twn"};
    double t[4] = {1e30, 1e30, 1e30, 1e30};
    for (int rep = 0; rep < reps; rep++) {
        double x[4];
        x[0] = plain(brokers, topic, parts, m, 0, 0, &bytes);
        x[1] = plain(brokers, topic, parts, m, 0, 1, &bytes);
        x[2] = plain(brokers, topic, parts, m, 1, 1, &bytes);
        x[3] = twn(brokers, topic, m, unit, &units);
        for (int i = 0; i < 4; i++)
            if (x[i] < t[i]) t[i] = x[i];
    }
    for (int i = 0; i < 4; i++)
        printf("  %-16s %9.3f %12.0f %8.1f\n", names[i], t[i], m / t[i], bytes / t[i] / 1e6);
    printf("  (best of %d; twn: %zu units of %llu; plain/plain+json read one partition at a time "
           "as twn does)\n",
           reps, units, (unsigned long long)unit);
    printf("  ratio twn/plain %.2f, twn/plain+json %.2f, twn/plain-all-partitions %.2f\n",
           t[1] / t[3], t[2] / t[3], t[0] / t[3]);
    rd_kafka_mock_cluster_destroy(mcl);
    rd_kafka_destroy(owner);
    return 0;
}
