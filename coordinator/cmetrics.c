/* cmetrics.c — the coordinator's metrics (cmetrics.h). */
#include "coordinator/cmetrics.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

#include "util/mem.h"

void twn_cmetrics_init(twn_cmetrics *cm, twn_metrics *m, uint32_t shards) {
    memset(cm, 0, sizeof *cm);
    static const char *routes[3] = {"route=easy", "route=hard", "route=rejected"};
    for (int i = 0; i < 3; i++)
        cm->items[i] = twn_metrics_counter(m, "twn_items_total",
                                           "Items finished (durably acked or dead-lettered), by "
                                           "route: easy, hard, rejected.",
                                           routes[i], NULL);
    cm->think =
        twn_metrics_counter(m, "twn_think_tokens_total",
                            "CoT tokens generated for the finished hard items.", NULL, NULL);
    const char *exp_help = "Leases that expired, by kind: unit (gate) or hard (reasoning batch).";
    cm->expired_unit =
        twn_metrics_counter(m, "twn_lease_expiries_total", exp_help, "lease=unit", NULL);
    cm->expired_hard =
        twn_metrics_counter(m, "twn_lease_expiries_total", exp_help, "lease=hard", NULL);
    for (int s = 1; s <= TWN_STAGE_MAX; s++) {
        char l[32];
        snprintf(l, sizeof l, "stage=%s", twn_stage_name((twn_stage)s));
        cm->dead[s] = twn_metrics_counter(m, "twn_dead_letters_total",
                                          "Dead-lettered items, by stage.", l, NULL);
    }
    cm->shards = shards;
    cm->shard_acked = twn_calloc(shards + 1, sizeof *cm->shard_acked);
    for (uint32_t s = 0; s < shards; s++) {
        char l[32];
        snprintf(l, sizeof l, "shard=%u", s);
        cm->shard_acked[s] = twn_metrics_counter(m, "twn_shard_acked_items_total",
                                                 "Items acked durably, by index shard.", l, NULL);
    }
    cm->job_items =
        twn_metrics_gauge(m, "twn_job_items", "Items in the planned units of the job.", NULL, NULL);
    const char *units_help = "Units of the job, by state: total, done.";
    cm->units_total = twn_metrics_gauge(m, "twn_job_units", units_help, "state=total", NULL);
    cm->units_done = twn_metrics_gauge(m, "twn_job_units", units_help, "state=done", NULL);
    cm->start = twn_metrics_gauge(m, "twn_job_start_time_seconds",
                                  "Unix time the coordinator started the job.", NULL, NULL);
    cm->end = twn_metrics_gauge(m, "twn_job_end_time_seconds",
                                "Unix time every unit of the job was done (0 while running).", NULL,
                                NULL);
    twn_gauge_set(cm->end, 0);
    cm->rate = twn_metrics_gauge(m, "twn_items_per_second",
                                 "Finished items per second over the last ~5 s.", NULL, NULL);
    cm->saved = twn_metrics_gauge(m, "twn_think_tokens_saved",
                                  "Estimated CoT tokens saved vs always-think: mean think tokens "
                                  "of the finished hard items times the easy items.",
                                  NULL, NULL);
    const char *q_help = "Work waiting for a lease: units (not yet leased), hard (hard items "
                         "waiting for a reasoning worker).";
    cm->queue_units = twn_metrics_gauge(m, "twn_queue_depth", q_help, "queue=units", NULL);
    cm->queue_hard = twn_metrics_gauge(m, "twn_queue_depth", q_help, "queue=hard", NULL);
    const char *l_help = "Leases currently held, by kind: unit, hard.";
    cm->live_unit = twn_metrics_gauge(m, "twn_leases_active", l_help, "lease=unit", NULL);
    cm->live_hard = twn_metrics_gauge(m, "twn_leases_active", l_help, "lease=hard", NULL);
    cm->resident = twn_metrics_gauge(m, "twn_coordinator_units_resident",
                                     "Units the coordinator holds in memory: planned and not yet "
                                     "released (a stream releases a unit once it is done and its "
                                     "Kafka offsets are committed; a batch job holds its plan).",
                                     NULL, NULL);
    cm->journal_bytes = twn_metrics_gauge(
        m, "twn_coordinator_journal_bytes",
        "Size of the coordinator journal (a stream compacts it as units are released).", NULL,
        NULL);
    cm->loop_max = twn_metrics_gauge(
        m, "twn_coordinator_loop_pass_max_seconds",
        "Longest pass of the coordinator loop over the last 10-20 s: the most a heartbeat, ack or "
        "lease expiry waited to be handled.",
        NULL, NULL);
    cm->peers_lost = twn_metrics_counter(m, "twn_coordinator_peers_lost_total",
                                         "Peers declared dead by the coordinator: silent for "
                                         "coordinator.missed_beats heartbeat intervals.",
                                         NULL, NULL);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    twn_gauge_set(cm->start, (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9);
    twn_gauge_set(cm->rate, 0);
    cm->last_update = -1e30;
}

void twn_cmetrics_free(twn_cmetrics *cm) {
    twn_free(cm->shard_acked);
    cm->shard_acked = NULL;
}

static void advance(twn_counter *c, uint64_t now, uint64_t *last) {
    if (now > *last) twn_counter_add(c, now - *last);
    *last = now;
}

void twn_cmetrics_update(twn_cmetrics *cm, twn_cstate *cs, double now, int force) {
    if (!force && now - cm->last_update < 0.1) return;
    cm->last_update = now;
    twn_cstate_stats st;
    twn_cstate_stats_get(cs, &st);
    const twn_progress *p = &st.progress;
    advance(cm->items[0], p->easy, &cm->last.easy);
    advance(cm->items[1], p->hard, &cm->last.hard);
    advance(cm->items[2], p->rejected, &cm->last.rejected);
    advance(cm->think, p->think_tokens, &cm->last.think_tokens);
    advance(cm->expired_unit, st.unit_leases.expired, &cm->last_expired_unit);
    advance(cm->expired_hard, st.hard_leases.expired, &cm->last_expired_hard);
    twn_gauge_set(cm->job_items, (double)p->items_total);
    twn_gauge_set(cm->units_total, (double)p->units_total);
    twn_gauge_set(cm->units_done, (double)p->units_done);
    if (p->units_total && p->units_done >= p->units_total && twn_gauge_value(cm->end) == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        twn_gauge_set(cm->end, (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9);
    }
    twn_gauge_set(cm->saved,
                  p->hard ? (double)p->think_tokens / (double)p->hard * (double)p->easy : 0.0);
    twn_gauge_set(cm->queue_units, (double)st.units_queued);
    twn_gauge_set(cm->queue_hard, (double)st.hard_queued);
    twn_gauge_set(cm->live_unit, (double)st.unit_leases_live);
    twn_gauge_set(cm->live_hard, (double)st.hard_leases_live);
    twn_gauge_set(cm->resident, (double)st.units_resident);
    twn_gauge_set(cm->journal_bytes, (double)st.journal_bytes);
    /* Rate over the oldest sample still within 5 s (the ring holds ~6 s at 10 samples/s). */
    double done = (double)(p->easy + p->hard + p->rejected);
    size_t i = cm->rate_head;
    cm->rate_t[i] = now;
    cm->rate_v[i] = done;
    cm->rate_head = (i + 1) % TWN_CMETRICS_RATE_SAMPLES;
    if (cm->rate_n < TWN_CMETRICS_RATE_SAMPLES) cm->rate_n++;
    size_t oldest =
        (cm->rate_head + TWN_CMETRICS_RATE_SAMPLES - cm->rate_n) % TWN_CMETRICS_RATE_SAMPLES;
    while (oldest != i && now - cm->rate_t[oldest] > 5.0)
        oldest = (oldest + 1) % TWN_CMETRICS_RATE_SAMPLES;
    double dt = now - cm->rate_t[oldest];
    twn_gauge_set(cm->rate, dt > 0 ? (done - cm->rate_v[oldest]) / dt : 0.0);
}

void twn_cmetrics_acked(twn_cmetrics *cm, uint32_t shard, uint64_t n) {
    if (shard < cm->shards) twn_counter_add(cm->shard_acked[shard], n);
}

void twn_cmetrics_dead_letter(twn_cmetrics *cm, twn_stage stage) {
    if ((int)stage >= 1 && (int)stage <= TWN_STAGE_MAX) twn_counter_inc(cm->dead[stage]);
}

void twn_cmetrics_loop_pass(twn_cmetrics *cm, double seconds, double now) {
    if (now - cm->loop_window_t >= TWN_CMETRICS_LOOP_WINDOW_S) {
        /* a window with no pass at all (a stall longer than it) counts as its own maximum */
        cm->loop_prev = now - cm->loop_window_t < 2 * TWN_CMETRICS_LOOP_WINDOW_S ? cm->loop_cur : 0;
        cm->loop_cur = 0;
        cm->loop_window_t = now;
    }
    if (seconds > cm->loop_cur) cm->loop_cur = seconds;
    twn_gauge_set(cm->loop_max, cm->loop_cur > cm->loop_prev ? cm->loop_cur : cm->loop_prev);
}

void twn_cmetrics_peers_lost(twn_cmetrics *cm, uint64_t n) {
    if (n) twn_counter_add(cm->peers_lost, n);
}
