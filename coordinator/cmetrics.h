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

#define TWN_CMETRICS_RATE_SAMPLES  64
#define TWN_CMETRICS_LOOP_WINDOW_S 10.0

typedef struct twn_cmetrics {
    twn_counter *items[3]; /* easy, hard, rejected */
    twn_counter *think, *expired_unit, *expired_hard, *dead[TWN_STAGE_MAX + 1];
    twn_counter **shard_acked; /* [shards] */
    uint32_t shards;
    twn_gauge *job_items, *units_total, *units_done, *start, *end, *rate, *saved;
    twn_gauge *queue_units, *queue_hard, *live_unit, *live_hard;
    twn_gauge *resident, *journal_bytes, *loop_max;
    twn_counter *peers_lost;
    /* longest loop pass in the current and the previous window (TWN_CMETRICS_LOOP_WINDOW_S) */
    double loop_cur, loop_prev, loop_window_t;
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
/* One pass of the coordinator loop took `seconds` (ending at now).  The gauge
 * twn_coordinator_loop_pass_max_seconds shows the longest pass of the last 10-20 s: how long a
 * peer's heartbeat or ack may have waited to be read (the loop's lag). */
void twn_cmetrics_loop_pass(twn_cmetrics *cm, double seconds, double now);
/* n peers were declared dead (silent for missed_beats heartbeat intervals). */
void twn_cmetrics_peers_lost(twn_cmetrics *cm, uint64_t n);

#endif
