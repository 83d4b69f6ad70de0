/* role_metrics.c — the gate / worker metrics (role_metrics.h). */
#include "gate_service/role_metrics.h"

#include <pthread.h>

static twn_role_metrics g_rm;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void init(void) {
    twn_metrics *m = twn_metrics_default();
    const char *bh = "Items per engine call, by role: gate, worker.";
    g_rm.batch_gate = twn_metrics_histogram(m, "twn_batch_size", bh, "role=gate",
                                            TWN_BUCKETS(twn_buckets_batch), NULL);
    g_rm.batch_worker = twn_metrics_histogram(m, "twn_batch_size", bh, "role=worker",
                                              TWN_BUCKETS(twn_buckets_batch), NULL);
    const char *sh = "Seconds per batch in a stage: read (items read from the source), gate (gate "
                     "pass), reason (CoT + embedding pass), send (outputs flushed).";
    g_rm.read = twn_metrics_histogram(m, "twn_stage_seconds", sh, "stage=read",
                                      TWN_BUCKETS(twn_buckets_seconds), NULL);
    g_rm.gate = twn_metrics_histogram(m, "twn_stage_seconds", sh, "stage=gate",
                                      TWN_BUCKETS(twn_buckets_seconds), NULL);
    g_rm.reason = twn_metrics_histogram(m, "twn_stage_seconds", sh, "stage=reason",
                                        TWN_BUCKETS(twn_buckets_seconds), NULL);
    g_rm.send = twn_metrics_histogram(m, "twn_stage_seconds", sh, "stage=send",
                                      TWN_BUCKETS(twn_buckets_seconds), NULL);
    g_rm.p_think = twn_metrics_histogram(m, "twn_p_think",
                                         "Gate probabilities (p_think) of the items the gate saw.",
                                         NULL, TWN_BUCKETS(twn_buckets_p), NULL);
    const char *rh = "The gate's routing decisions: easy, hard, rejected.";
    g_rm.routed[0] = twn_metrics_counter(m, "twn_gate_routed_total", rh, "route=easy", NULL);
    g_rm.routed[1] = twn_metrics_counter(m, "twn_gate_routed_total", rh, "route=hard", NULL);
    g_rm.routed[2] = twn_metrics_counter(m, "twn_gate_routed_total", rh, "route=rejected", NULL);
    g_rm.gate_batches = twn_metrics_counter(
        m, "twn_gate_batches_total",
        "Gate passes (engine calls of the gate service; a pass is filled across the unit leases "
        "the gate holds, up to gate.batch items).",
        NULL, NULL);
    g_rm.gate_batch_items = twn_metrics_counter(
        m, "twn_gate_batch_items_total",
        "Items in the gate passes: / twn_gate_batches_total = mean items per pass.", NULL, NULL);
}

const twn_role_metrics *twn_role_metrics_get(void) {
    pthread_once(&g_once, init);
    return &g_rm;
}
