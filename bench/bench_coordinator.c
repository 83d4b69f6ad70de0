/* bench_coordinator.c — the coordinator's bookkeeping at full speed, with a null engine.
 *
 * plan -> lease -> ack (in shard batches) -> done, for N items (default 10M) in units of U items
 * (default 4096) across S = 4 index shards: gate workers lease units and route 10% of the items
 * hard (reported in one call per unit); every other item goes to its shard (hash of unit and
 * item), which acks in batches of B (default 256) items of one unit; reasoning workers lease hard
 * batches of 64 and their shards ack them the same way.  The journal is real (group commit with
 * fdatasync on the file system of the output directory) and the loop ticks with the real clock.
 *
 * Prints items/s, ns per item, the journal's size and commits, and resident memory sampled
 * during the run (it must stay flat: per-item state is freed as each unit completes) with the
 * peak from getrusage.  The baseline measured in the same run is the least any tracker must do:
 * one hash (shard assignment) and one bit set per item in a flat bitmap.
 *
 *   bench_coordinator [--items N] [--unit U] [--batch B] [--dir DIR] [--no-fsync] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "coordinator/cstate.h"
#include "util/clock.h"
#include "util/mem.h"

#define SHARDS  4
#define GATES   8
#define REASONS 4

static long rss_kb(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    long pages = 0, res = 0;
    if (f) {
        if (fscanf(f, "%ld %ld", &pages, &res) != 2) res = 0;
        fclose(f);
    }
    return res * (sysconf(_SC_PAGESIZE) / 1024);
}

static long peak_kb(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss;
}

static inline uint64_t mix(uint64_t x) {
    x ^= x >> 31;
    x *= 0x7fb5d329728ea185ull;
    x ^= x >> 27;
    return x;
}

/* One shard's ack buffer: items of one unit, flushed when full or when the unit changes. */
typedef struct shard {
    uint64_t unit;
    twn_route route;
    uint32_t items[65536];
    uint32_t think[65536];
    size_t n;
    uint64_t acks;
} shard;

static void die(const char *what, const twn_err *err) {
    fprintf(stderr, "bench_coordinator: %s: %s\n", what, err->msg);
    exit(1);
}

static void flush(twn_cstate *c, shard *s) {
    if (!s->n) return;
    twn_err err = {{0}};
    if (twn_cstate_ack(c, s->unit, s->items, s->route == TWN_ROUTE_HARD ? s->think : NULL, s->n,
                       s->route, &err) != 0)
        die("ack", &err);
    s->n = 0;
    s->acks++;
}

static void to_shard(twn_cstate *c, shard *sh, size_t batch, uint64_t unit, uint32_t item,
                     twn_route route) {
    shard *s = &sh[mix(unit ^ item) % SHARDS];
    if (s->n && (s->unit != unit || s->route != route)) flush(c, s);
    s->unit = unit;
    s->route = route;
    s->think[s->n] = 100;
    s->items[s->n++] = item;
    if (s->n >= batch) flush(c, s);
}

int main(int argc, char **argv) {
    uint64_t n_items = 10000000;
    uint32_t unit = 4096;
    size_t batch = 256;
    const char *dir = "/tmp";
    int do_fsync = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--items") && i + 1 < argc)
            n_items = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--unit") && i + 1 < argc)
            unit = (uint32_t)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--batch") && i + 1 < argc)
            batch = (size_t)atoi(argv[++i]);
        else if (!strcmp(argv[i], "--dir") && i + 1 < argc)
            dir = argv[++i];
        else if (!strcmp(argv[i], "--no-fsync"))
            do_fsync = 0;
        else {
            fprintf(stderr,
                    "usage: %s [--items N] [--unit U] [--batch B] [--dir DIR] "
                    "[--no-fsync]\n",
                    argv[0]);
            return 2;
        }
    }
    if (unit < 1 || batch < 1 || batch > 65536) {
        fprintf(stderr, "bench_coordinator: --unit must be >= 1 and --batch 1..65536\n");
        return 2;
    }

    /* Baseline: hash + bit set per item. */
    double t0 = twn_now();
    uint64_t *bits = twn_calloc(n_items / 64 + 1, 8);
    uint64_t sink = 0;
    for (uint64_t i = 0; i < n_items; i++) {
        sink += mix(i) % SHARDS;
        bits[i >> 6] |= 1ull << (i & 63);
    }
    double base_s = twn_now() - t0;
    twn_free(bits);

    char path[4096];
    snprintf(path, sizeof path, "%s/bench_coordinator.%d.journal", dir, (int)getpid());
    unlink(path);
    twn_cstate_cfg cfg;
    twn_cstate_cfg_default(&cfg);
    cfg.journal.fsync = do_fsync;
    twn_plan_fp fp = {"bench.jsonl", unit, "null-engine"};
    twn_cstate *c;
    twn_err err = {{0}};
    long rss0 = rss_kb();
    t0 = twn_now();
    if (twn_cstate_open(path, &fp, &cfg, NULL, &c, NULL, &err) != 0) die("open", &err);
    size_t n_units = (size_t)((n_items + unit - 1) / unit);
    twn_unit_spec *plan = twn_malloc(n_units * sizeof *plan);
    for (size_t u = 0; u < n_units; u++) {
        uint64_t first = (uint64_t)u * unit;
        uint64_t n = n_items - first < unit ? n_items - first : unit;
        plan[u] = (twn_unit_spec){twn_unit_key("bench.jsonl", first * 100, n * 100), (uint32_t)n};
    }
    if (twn_cstate_add_units(c, plan, n_units, &err) != 0) die("add_units", &err);
    twn_free(plan);
    long rss_plan = rss_kb();

    shard *sh = twn_calloc(SHARDS, sizeof *sh);
    uint32_t *hard = twn_malloc((size_t)unit * sizeof *hard);
    long samples[4] = {0};
    int next_sample = 0;
    uint64_t grants = 0, hard_batches = 0;
    for (;;) {
        double now = twn_now();
        int progress = 0;
        for (uint32_t g = 1; g <= GATES; g++) {
            twn_unit_grant gr;
            int r = twn_cstate_grant_unit(c, g, now, &gr, &err);
            if (r < 0) die("grant_unit", &err);
            if (!r) break;
            grants++;
            progress = 1;
            size_t nh = 0;
            for (uint32_t i = 0; i < gr.n_items; i++) {
                if (mix(gr.unit + i) % 10 == 0)
                    hard[nh++] = i;
                else
                    to_shard(c, sh, batch, gr.unit, i, TWN_ROUTE_EASY);
            }
            if (nh && twn_cstate_report_hard(c, gr.unit, hard, nh, &err) != 0)
                die("report_hard", &err);
            if (twn_cstate_finish(c, gr.lease, now, &err) < 0) die("finish", &err);
        }
        for (uint32_t w = 100; w < 100 + REASONS; w++) {
            twn_hard_grant hg;
            int r = twn_cstate_grant_hard(c, w, 0, now, &hg, &err);
            if (r < 0) die("grant_hard", &err);
            if (!r) break;
            hard_batches++;
            progress = 1;
            for (size_t k = 0; k < hg.n; k++)
                to_shard(c, sh, batch, hg.items[k].unit, hg.items[k].item, TWN_ROUTE_HARD);
            if (twn_cstate_finish(c, hg.lease, now, &err) < 0) die("finish", &err);
        }
        if (!progress)
            for (int s = 0; s < SHARDS; s++) flush(c, &sh[s]); /* shards drain when idle */
        for (uint32_t w = 1; w <= GATES; w++) twn_cstate_heartbeat(c, w, now);
        for (uint32_t w = 100; w < 100 + REASONS; w++) twn_cstate_heartbeat(c, w, now);
        if (twn_cstate_tick(c, now, &err) != 0) die("tick", &err);
        twn_cstate_stats st;
        twn_cstate_stats_get(c, &st);
        while (next_sample < 4 &&
               st.progress.items_done >= (uint64_t)(next_sample + 1) * n_items / 5)
            samples[next_sample++] = rss_kb();
        if (twn_cstate_all_done(c)) break;
        if (!progress && !st.unit_leases_live && !st.hard_leases_live && !st.units_queued &&
            !st.hard_queued) {
            fprintf(stderr, "bench_coordinator: stalled at %llu items\n",
                    (unsigned long long)st.progress.items_done);
            return 1;
        }
    }
    if (twn_cstate_sync(c, &err) != 0) die("sync", &err);
    double run_s = twn_now() - t0;
    twn_cstate_stats st;
    twn_cstate_stats_get(c, &st);
    long rss_end = rss_kb();
    uint64_t acks = 0;
    for (int s = 0; s < SHARDS; s++) acks += sh[s].acks;
    if (twn_cstate_close(c, &err) != 0) die("close", &err);
    FILE *jf = fopen(path, "rb");
    long jbytes = 0;
    if (jf) {
        fseek(jf, 0, SEEK_END);
        jbytes = ftell(jf);
        fclose(jf);
    }
    unlink(path);

    printf("bench_coordinator: %llu items, %zu units of %u, %d shards, ack batches of %zu, "
           "fsync %s\n",
           (unsigned long long)n_items, n_units, unit, SHARDS, batch, do_fsync ? "on" : "off");
    printf("  done: %llu items (easy %llu, hard %llu, rejected %llu), %llu unit grants, %llu hard "
           "batches, %llu ack calls\n",
           (unsigned long long)st.progress.items_done, (unsigned long long)st.progress.easy,
           (unsigned long long)st.progress.hard, (unsigned long long)st.progress.rejected,
           (unsigned long long)grants, (unsigned long long)hard_batches, (unsigned long long)acks);
    printf("  coordinator: %.3f s, %.2f M items/s, %.1f ns/item\n", run_s,
           (double)n_items / run_s / 1e6, run_s / (double)n_items * 1e9);
    printf("  baseline (hash + bit per item): %.3f s, %.1f ns/item; coordinator / baseline = "
           "%.1fx\n",
           base_s, base_s / (double)n_items * 1e9, run_s / base_s);
    printf("  journal: %ld bytes, %llu records, %llu commits\n", jbytes,
           (unsigned long long)st.journal_records, (unsigned long long)st.journal_commits);
    printf("  rss KiB: start %ld, after plan %ld, at 20/40/60/80%% %ld %ld %ld %ld, end %ld; "
           "peak %ld\n",
           rss0, rss_plan, samples[0], samples[1], samples[2], samples[3], rss_end, peak_kb());
    printf("  per-item state held at the end: %zu bytes\n", st.item_bytes);
    twn_free(sh);
    twn_free(hard);
    if (sink == 42) printf(" ");
    return st.progress.items_done == n_items ? 0 : 1;
}
