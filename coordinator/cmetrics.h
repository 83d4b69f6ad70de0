/* cmetrics.h — the coordinator's metrics (the coordinator block of common/metrics.h's list).
 *
 * The loop calls twn_cmetrics_update with cstate's stats every ~100 ms and once at the end;
 * counters advance by the difference from the previous stats, so a journal replayed at start
 * shows up as work done by this process.  Acks and dead letters are counted as they arrive,
 * per shard / stage.  Owned by the coordinator thread (the registry itself is thread-safe). */
#ifndef TWN_COORDINATOR_CMETRICS_H
#define TWN_COORDINATOR_CMETRICS_H

#include <stdint.h>

#include "common/metrics.h"
#include "coordinator/cstate.h"

#define TWN_CMETRICS_RATE_SAMPLES 64

typedef struct twn_cmetrics {
    twn_counter *items[3]; /* easy, hard, rejected */
    twn_counter *think, *expired_unit, *expired_hard, *dead[TWN_STAGE_MAX + 1];
    twn_counter **shard_acked; /* [shards] */
    uint32_t shards;
    twn_gauge *job_items, *units_total, *units_done, *start, *end, *rate, *saved;
    twn_gauge *queue_units, *queue_hard, *live_unit, *live_hard;
    twn_progress last;
    uint64_t last_expired_unit, last_expired_hard;
    double last_update;
    /* (time, items done) samples for the rate over the last ~5 s */
    double rate_t[TWN_CMETRICS_RATE_SAMPLES], rate_v[TWN_CMETRICS_RATE_SAMPLES];
    size_t rate_n, rate_head;
} twn_cmetrics;

/* Registers the series (in m; NULL = no metrics) and records the job's start time. */
void twn_cmetrics_init(twn_cmetrics *cm, twn_metrics *m, uint32_t shards);
void twn_cmetrics_free(twn_cmetrics *cm);
/* From the state's stats; rate-limited to every 100 ms unless force. */
void twn_cmetrics_update(twn_cmetrics *cm, twn_cstate *cs, double now, int force);
/* n items acked by shard (any number: unknown shards are not counted). */
void twn_cmetrics_acked(twn_cmetrics *cm, uint32_t shard, uint64_t n);
void twn_cmetrics_dead_letter(twn_cmetrics *cm, twn_stage stage);

#endif
