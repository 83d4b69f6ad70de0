/* bench_stream_mem.c — the coordinator's memory over a long kafka.streaming job: its VmRSS, the
 * units it holds and its journal's size as units stream through, with the roles as processes
 * (`twn coordinator|indexer|gate|worker`, null engine) against librdkafka's in-process mock
 * cluster (3 brokers on 127.0.0.1, 3 partitions).
 *
 * A producer keeps ~backlog records ahead of what is done; every --every units done one line is
 * printed: units done, the coordinator's VmRSS and VmHWM (KiB), the units it holds
 * (twn_coordinator_units_resident; -1 where the binary has no such gauge), the journal's size on
 * disk, and the seconds so far.  At --units the coordinator gets SIGTERM and every process is
 * waited for.  --baseline leaves the keys an older twn does not know (kafka.stream_max_units,
 * coordinator.journal_compact_bytes) out of the config, so the same run can measure the build
 * before this change.
 *
 *   bench_stream_mem TWN_BIN [--units N] [--unit-items U] [--every K] [--workdir DIR]
 *                    [--max-units M (256)] [--compact-bytes B (262144)] [--baseline]
 *
 * The processes, /metrics and the mock cluster are the tests' (tests/unit/procs.h,
 * tests/unit/kafka_peer.h; a failed setup step there ends the program with cmocka's message). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "tests/unit/kafka_peer.h"
#include "tests/unit/procs.h"
#include "util/clock.h"

#define PARTS 3

static void die(const char *what) {
    fprintf(stderr, "bench_stream_mem: %s\n", what);
    exit(1);
}

int main(int argc, char **argv) {
    if (argc < 2)
        die("usage: bench_stream_mem TWN_BIN [--units N] [--unit-items U] [--every K] "
            "[--workdir DIR] [--max-units M] [--baseline]");
    const char *twn = argv[1], *work = "/tmp/twn-bench-stream-mem";
    long units = 20000, unit_items = 1, every = 2000, max_units = 256, compact = 262144;
    int baseline = 0;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--units") && i + 1 < argc)
            units = atol(argv[++i]);
        else if (!strcmp(argv[i], "--unit-items") && i + 1 < argc)
            unit_items = atol(argv[++i]);
        else if (!strcmp(argv[i], "--every") && i + 1 < argc)
            every = atol(argv[++i]);
        else if (!strcmp(argv[i], "--workdir") && i + 1 < argc)
            work = argv[++i];
        else if (!strcmp(argv[i], "--max-units") && i + 1 < argc)
            max_units = atol(argv[++i]);
        else if (!strcmp(argv[i], "--compact-bytes") && i + 1 < argc)
            compact = atol(argv[++i]);
        else if (!strcmp(argv[i], "--baseline"))
            baseline = 1;
        else
            die("unknown argument (see the header of bench/bench_stream_mem.c)");
    }
    if (units < 1 || unit_items < 1 || every < 1)
        die("--units, --unit-items, --every must be >= 1");
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", work, work);
    if (system(cmd)) die("cannot make the work directory");

    kp_cluster kc;
    if (kp_start(&kc, 3) || rd_kafka_mock_topic_create(kc.mcl, "bench", PARTS, 3))
        die("no mock cluster");
    rd_kafka_t *prod = kp_producer(&kc, "linger.ms", "5", NULL);

    char control[64], eps[2][64], yaml[4096];
    tp_endpoints(work, 1, control, eps[0], sizeof eps[0], 2);
    char extra_c[128] = "", extra_k[128] = "";
    if (!baseline) {
        snprintf(extra_c, sizeof extra_c, "  journal_compact_bytes: %ld\n", compact);
        snprintf(extra_k, sizeof extra_k, "  stream_max_units: %ld\n", max_units);
    }
    snprintf(yaml, sizeof yaml,
             "job:\n  inputs:\n    - kafka://bench\n  out: %s/out\n  engine: null\n"
             "  dim: 8\n  shards: 2\n  unit_items: %ld\n"
             "coordinator:\n  listen: %s\n  heartbeat_ms: 500\n  lease_ms: 30000\n%s"
             "gate:\n  credits: 4\n  batch: 32\n"
             "worker:\n  credits: 2\n  batch: 32\n"
             "kafka:\n  brokers: %s\n  group: bench\n  streaming: true\n%s"
             "indexer:\n  commit_ms: 5\n  endpoints:\n",
             work, unit_items, control, extra_c, kc.brokers, extra_k);
    const char *cfg = tp_job_yaml(work, yaml, eps[0], sizeof eps[0], 2);

    /* every process's log is WORKDIR/NAME.log; all are killed at exit (tp_spawn) */
    for (int s = 0; s < 2; s++) {
        char name[32], shard[8];
        snprintf(name, sizeof name, "indexer-%d", s);
        snprintf(shard, sizeof shard, "%d", s);
        tp_spawn(name, work, twn, "indexer", "--config", cfg, "--shard", shard, NULL);
    }
    tp_spawn("gate-0", work, twn, "gate", "--config", cfg, NULL);
    tp_spawn("gate-1", work, twn, "gate", "--config", cfg, NULL);
    tp_spawn("worker", work, twn, "worker", "--config", cfg, NULL);
    int mport = tp_free_port();
    char listen[64];
    snprintf(listen, sizeof listen, "127.0.0.1:%d", mport);
    tp_proc *co = tp_spawn("coordinator", work, twn, "coordinator", "--config", cfg,
                           "--metrics.listen", listen, NULL);

    char journal[1200];
    snprintf(journal, sizeof journal, "%s/out/journal", work);
    printf("# %s, %ld units of %ld items%s\n", twn, units, unit_items,
           baseline ? " (baseline config)" : "");
    printf("# units_done rss_kib hwm_kib resident journal_bytes seconds\n");
    fflush(stdout);
    double t0 = twn_now(), last_done = -1, t_progress = t0;
    long produced = 0, next_print = every, backlog = 64 * unit_items + 512;
    for (;;) {
        double done = tp_metric(mport, TP_UNITS_DONE);
        if (done > last_done) {
            last_done = done;
            t_progress = twn_now();
        }
        if (twn_now() - t_progress > 60) die("no progress for 60 s (see the logs in the workdir)");
        if (tp_poll(co)) die("the coordinator ended early (coordinator.log)");
        double items_done = done < 0 ? 0 : done * (double)unit_items;
        while (produced < units * unit_items && produced - items_done < backlog) {
            char v[96], id[32];
            snprintf(id, sizeof id, "b%09ld", produced);
            int len = snprintf(v, sizeof v, "{\"id\": \"%s\", \"text\": \"r\"}", id);
            kp_produce(prod, "bench", (int32_t)(produced % PARTS), NULL, v, (size_t)len);
            produced++;
        }
        rd_kafka_poll(prod, 0);
        if (done >= next_print) {
            long rss, hwm;
            tp_proc_mem(co->pid, &rss, &hwm);
            struct stat st;
            long jb = stat(journal, &st) ? -1 : (long)st.st_size;
            printf("%10.0f %8ld %8ld %8.0f %12ld %8.1f\n", done, rss, hwm,
                   tp_metric(mport, "twn_coordinator_units_resident"), jb, twn_now() - t0);
            fflush(stdout);
            next_print += every;
        }
        if (done >= units) break;
        tp_sleep_ms(20);
    }
    tp_signal(co, SIGTERM);
    if (tp_wait_all(60)) die("processes did not end within 60 s after SIGTERM");
    rd_kafka_flush(prod, 5000);
    rd_kafka_destroy(prod);
    kp_stop(&kc);
    return 0;
}
