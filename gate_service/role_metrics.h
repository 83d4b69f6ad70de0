/* role_metrics.h — the metrics of the computing roles (gate service, reasoning worker), the
 * gate/worker block of common/metrics.h's list.  One set per process, in twn_metrics_default(),
 * shared by every gate and worker thread of `twn run`. */
#ifndef TWN_GATE_ROLE_METRICS_H
#define TWN_GATE_ROLE_METRICS_H

#include "common/metrics.h"

typedef struct twn_role_metrics {
    twn_histogram *batch_gate, *batch_worker;   /* twn_batch_size{role} */
    twn_histogram *read, *gate, *reason, *send; /* twn_stage_seconds{stage} */
    twn_histogram *p_think;                     /* twn_p_think */
    twn_counter *routed[3]; /* twn_gate_routed_total{route}: easy, hard, rejected */
    /* Batch fill (items per pass / gate.batch): twn_gate_batches_total (gate passes) and
     * twn_gate_batch_items_total (items in them) */
    twn_counter *gate_batches, *gate_batch_items;
} twn_role_metrics;

/* Registered on first use. */
const twn_role_metrics *twn_role_metrics_get(void);

#endif
