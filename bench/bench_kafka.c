/* bench_kafka.c — records/s of the Kafka source reader against a plain librdkafka consumer loop on
 * the same topic, in the same run.
 *
 * The cluster is librdkafka's in-process mock (3 brokers on 127.0.0.1), so both sides pay the
 * same broker; what differs is the client work per record.  Readings, each over all M records:
 *   plain     a consumer assigned to one partition after the other (as the twn reader goes,
 *             one unit = one partition at a time), polling each from its low to its high
 *             watermark (no per-record work: the lower bound of any reader); also a variant
 *             assigned to every partition at once;
 *   plain, batches  the same taking what librdkafka has fetched in batches of up to 256
 *             (rd_kafka_consume_batch_queue, as the twn reader does) instead of one poll each;
 *   plain+json  the one-partition-at-a-time loop plus json_loadb of each value (jansson);
 *   twn       twn_kafka_plan (units of U offsets) + a twn_kafka_reader per unit, one handle,
 *             every record turned into a twn_src_item (id, text, instruction, images);
 *   example   librdkafka's examples/consumer.c as written (subscribe() in a group, default
 *             settings), timed from its first message (--example: the group join costs seconds).
 *
 * Each reading is the best (and the median) of --reps (5) interleaved runs.  Every consumer on both
 * sides gets fetch.wait.max.ms = --fetch-wait-ms (10, the twn handle's setting): a fetch that finds
 * nothing new is parked by the broker for that long, and librdkafka keeps one fetch in flight per
 * broker, so moving to a partition led by the same broker waits it out.  --only picks readers
 * (profiling).
 *
 *   bench_kafka [--records M] [--unit U] [--partitions P] [--reps K] [--fetch-wait-ms MS]
 *               [--only all,plain,batch,json,twn] [--example] */
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

static char g_fetch_wait[16] = "10"; /* fetch.wait.max.ms of every consumer, both sides */

static rd_kafka_t *make(rd_kafka_type_t type, const char *brokers) {
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, quiet);
    if (type == RD_KAFKA_PRODUCER) rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    if (brokers) {
        const char *kv[][2] = {
            {"bootstrap.servers", brokers},      {"group.id", "bench-plain"},
            {"enable.auto.commit", "false"},     {"enable.partition.eof", "false"},
            {"fetch.wait.max.ms", g_fetch_wait}, {"linger.ms", "5"}};
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
 * partition after the other (the twn reader's pattern: it reads a unit, i.e. one partition, at a
 * time), each from its low to its high watermark.  The watermarks are taken up front, inside the
 * timing, as twn_kafka_plan does: asked for while a partition is still assigned, the request
 * waits behind that partition's parked fetch.  Offsets are explicit: a logical one
 * (RD_KAFKA_OFFSET_BEGINNING) costs librdkafka 2.0.2 ~0.5 s before the first message. */
static double plain(const char *brokers, const char *topic, int parts, long m, int parse,
                    int one_by_one, int batch) {
    rd_kafka_t *c = make(RD_KAFKA_CONSUMER, brokers);
    rd_kafka_poll_set_consumer(c);
    rd_kafka_queue_t *q = rd_kafka_queue_get_consumer(c);
    rd_kafka_message_t *msgs[256];
    long n = 0, parsed = 0;
    double t0 = twn_now();
    int64_t *lo = twn_malloc((size_t)parts * sizeof *lo),
            *hi = twn_malloc((size_t)parts * sizeof *hi);
    for (int p = 0; p < parts; p++)
        if (rd_kafka_query_watermark_offsets(c, topic, p, &lo[p], &hi[p], 10000)) die("watermarks");
    for (int round = 0; round < (one_by_one ? parts : 1); round++) {
        rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(parts);
        long want = m;
        if (one_by_one) {
            rd_kafka_topic_partition_list_add(l, topic, round)->offset = lo[round];
            want = n + (long)(hi[round] - lo[round]);
        } else {
            for (int p = 0; p < parts; p++)
                rd_kafka_topic_partition_list_add(l, topic, p)->offset = lo[p];
        }
        if (rd_kafka_assign(c, l)) die("assign failed");
        rd_kafka_topic_partition_list_destroy(l);
        /* as librdkafka's examples/consumer.c: poll, look, destroy (the clock is read only
         * when a poll comes back empty: a read per record costs several percent here) */
        while (n < want) {
            /* batch: what librdkafka has fetched, without waiting, as the twn reader does */
            ssize_t got = batch ? rd_kafka_consume_batch_queue(q, 0, msgs, 256) : 0;
            if (got <= 0) {
                msgs[0] = rd_kafka_consumer_poll(c, 100);
                got = msgs[0] ? 1 : 0;
            }
            if (!got) {
                if (twn_now() - t0 > 60) break;
                continue;
            }
            for (ssize_t i = 0; i < got; i++) {
                rd_kafka_message_t *msg = msgs[i];
                if (!msg->err) {
                    n++;
                    if (parse) {
                        json_t *j = json_loadb(msg->payload, msg->len, 0, NULL);
                        if (j && json_is_object(j)) parsed++;
                        json_decref(j);
                    }
                }
                rd_kafka_message_destroy(msg);
            }
        }
    }
    double dt = twn_now() - t0;
    twn_free(lo);
    twn_free(hi);
    rd_kafka_queue_destroy(q);
    rd_kafka_assign(c, NULL);
    rd_kafka_destroy_flags(c, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
    if (n != m || (parse && parsed != m)) {
        fprintf(stderr, "bench_kafka: plain loop: %ld of %ld records (%ld parsed)\n", n, m, parsed);
        die("the plain loop did not get every record");
    }
    return dt;
}

/* librdkafka's examples/consumer.c as written: subscribe() in a fresh group, its default
 * settings (auto.offset.reset=earliest so it starts at the beginning), poll until m messages.
 * The group join is timed separately (*join: until the first message) and left out. */
static double example(const char *brokers, const char *topic, long m, double *join) {
    static int group_no;
    char errstr[256], group[32];
    snprintf(group, sizeof group, "bench-example-%d", group_no++);
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, quiet);
    const char *kv[][2] = {
        {"bootstrap.servers", brokers}, {"group.id", group}, {"auto.offset.reset", "earliest"}};
    for (size_t i = 0; i < 3; i++)
        if (rd_kafka_conf_set(conf, kv[i][0], kv[i][1], errstr, sizeof errstr)) die(errstr);
    rd_kafka_t *c = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof errstr);
    if (!c) die(errstr);
    rd_kafka_poll_set_consumer(c);
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(l, topic, RD_KAFKA_PARTITION_UA);
    double t0 = twn_now(), t1 = 0;
    if (rd_kafka_subscribe(c, l)) die("subscribe failed");
    rd_kafka_topic_partition_list_destroy(l);
    long n = 0;
    while (n < m) {
        rd_kafka_message_t *msg = rd_kafka_consumer_poll(c, 100);
        if (!msg) {
            if (twn_now() - t0 > 60) break;
            continue;
        }
        if (!msg->err && !n++) t1 = twn_now();
        rd_kafka_message_destroy(msg);
    }
    double dt = twn_now() - t1;
    *join = t1 - t0;
    rd_kafka_consumer_close(c);
    rd_kafka_destroy(c);
    if (n != m) die("the example loop did not get every record");
    return dt;
}

static double twn(const char *brokers, const char *topic, long m, uint64_t unit, size_t *units) {
    twn_kafka_config cfg = twn_kafka_config_default();
    cfg.brokers = brokers;
    char fw[48];
    snprintf(fw, sizeof fw, "fetch.wait.max.ms=%s", g_fetch_wait);
    const char *props[] = {fw, NULL};
    cfg.props = props;
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

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void usage(void) {
    fprintf(stderr, "usage: bench_kafka [--records M] [--unit U] [--partitions P] [--reps K] "
                    "[--fetch-wait-ms MS] [--only NAME,...] [--example]\n"
                    "  NAME: all, plain, batch, json, twn\n");
    exit(2);
}

int main(int argc, char **argv) {
    long m = 100000; /* the mock keeps ~5 MB per partition: more would be trimmed away */
    uint64_t unit = 10000;
    int parts = 4, reps = 5, with_example = 0;
    const char *only = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--records") && i + 1 < argc)
            m = atol(argv[++i]);
        else if (!strcmp(argv[i], "--unit") && i + 1 < argc)
            unit = (uint64_t)atol(argv[++i]);
        else if (!strcmp(argv[i], "--partitions") && i + 1 < argc)
            parts = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]) > 0 ? atoi(argv[i]) : 1;
        else if (!strcmp(argv[i], "--fetch-wait-ms") && i + 1 < argc)
            snprintf(g_fetch_wait, sizeof g_fetch_wait, "%d", atoi(argv[++i]));
        else if (!strcmp(argv[i], "--only") && i + 1 < argc)
            only = argv[++i];
        else if (!strcmp(argv[i], "--example"))
            with_example = 1;
        else
            usage();
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
    long bytes = 0; /* every reader reads them all */
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
        bytes += n;
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

    size_t units = 0;
    printf("  %-16s %9s %12s %8s %11s\n", "reader", "seconds", "records/s", "MB/s", "median s");
    /* the machine is shared: each reading is the best of `reps`, the readers interleaved */
    enum { ALL, PLAIN, BATCH, JSON, TWN, EXAMPLE, NR };
    const char *names[NR] = {"plain, all parts", "plain", "plain, batches",
                             "plain+json",       "twn",   "example"};
    const char *keys[NR] = {"all", "plain", "batch", "json", "twn", "example"};
    int on[NR];
    for (int i = 0; i < NR; i++) {
        on[i] = i == EXAMPLE ? with_example : 1;
        if (only && i != EXAMPLE) {
            const char *f = strstr(only, keys[i]);
            size_t kl = strlen(keys[i]);
            on[i] = f && (f == only || f[-1] == ',') && (f[kl] == ',' || !f[kl]);
        }
    }
    double t[NR], join = 1e30, *all = twn_malloc((size_t)reps * NR * sizeof *all);
    for (int i = 0; i < NR; i++) t[i] = 1e30;
    for (int rep = 0; rep < reps; rep++) {
        double x[NR], j = 0;
        for (int i = 0; i < NR; i++) x[i] = 1e30;
        if (on[ALL]) x[ALL] = plain(brokers, topic, parts, m, 0, 0, 0);
        if (on[PLAIN]) x[PLAIN] = plain(brokers, topic, parts, m, 0, 1, 0);
        if (on[BATCH]) x[BATCH] = plain(brokers, topic, parts, m, 0, 1, 1);
        if (on[JSON]) x[JSON] = plain(brokers, topic, parts, m, 1, 1, 0);
        if (on[TWN]) x[TWN] = twn(brokers, topic, m, unit, &units);
        if (on[EXAMPLE]) x[EXAMPLE] = example(brokers, topic, m, &j);
        for (int i = 0; i < NR; i++) {
            if (x[i] < t[i]) t[i] = x[i];
            all[i * reps + rep] = x[i];
        }
        if (on[EXAMPLE] && j < join) join = j;
    }
    double med[NR];
    for (int i = 0; i < NR; i++) {
        qsort(all + i * reps, (size_t)reps, sizeof *all, cmp_double);
        med[i] = all[i * reps + reps / 2];
        if (on[i])
            printf("  %-16s %9.3f %12.0f %8.1f %11.3f\n", names[i], t[i], m / t[i],
                   (double)bytes / t[i] / 1e6, med[i]);
    }
    twn_free(all);
    printf("  (best of %d, and the median; fetch.wait.max.ms %s on both sides; twn: %zu units of "
           "%llu; all but 'plain, all parts' read one partition at a time as twn does)\n",
           reps, g_fetch_wait, units, (unsigned long long)unit);
    if (on[EXAMPLE])
        printf("  (example: subscribe() with librdkafka's defaults, timed from its first message; "
               "the group join before it took %.2f s)\n",
               join);
    if (on[TWN]) {
        printf("  ratio (best)  ");
        for (int i = 0; i < NR; i++)
            if (i != TWN && on[i]) printf("  twn/%s %.2f", keys[i], t[i] / t[TWN]);
        printf("\n  ratio (median)");
        for (int i = 0; i < NR; i++)
            if (i != TWN && on[i]) printf("  twn/%s %.2f", keys[i], med[i] / med[TWN]);
        printf("\n");
    }
    rd_kafka_mock_cluster_destroy(mcl);
    rd_kafka_destroy(owner);
    return 0;
}
