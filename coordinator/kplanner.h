/* kplanner.h — the coordinator's Kafka side: a thread that plans a stream's new offsets and
 * commits the consumer group's offsets, so that the coordinator loop never waits on a broker.
 *
 * Every librdkafka call that talks to a broker (metadata, watermarks, committed offsets, commits)
 * waits up to kafka op_timeout_ms when the brokers are gone.  On the loop that meant no
 * heartbeats, acks or lease expiries for that long, once per poll: peers declared dead, leases
 * lost.  So the loop only exchanges messages with this thread through a mutex-protected mailbox,
 * and never blocks on it:
 *
 *   twn_kplanner_take        the units planned since the last call, moved onto the loop's plan;
 *   twn_kplanner_commit      one commit request at a time (coordinator/offsets.h: the loop asks
 *   twn_kplanner_commit_result  twn_offsets_due, the thread runs twn_offsets_apply, the loop
 *                            gives the outcome to twn_offsets_done);
 *   twn_kplanner_set_base    how many units the loop has released: the thread plans no more
 *                            than max_units ahead of that, so a backlog (a restart after a long
 *                            outage) is planned as the stream drains it, not all at once.
 *
 * The thread has its own twn_srcio (its own Kafka handle, opened on first use).  It keeps, of the
 * plan, only the last unit of each path: where each partition goes on (twn_srcio_plan_more_max)
 * and the next unit id.  twn_kplanner_stop wakes and joins it; a librdkafka call in progress
 * finishes first (op_timeout_ms at most).  After the stop the mailbox can still be read. */
#ifndef TWN_COORDINATOR_KPLANNER_H
#define TWN_COORDINATOR_KPLANNER_H

#include <stddef.h>
#include <stdint.h>

#include "common/source_io.h"
#include "coordinator/offsets.h"
#include "util/err.h"

typedef struct twn_kplanner_cfg {
    const twn_srcio_cfg *io;   /* as the coordinator's (NULL: defaults) */
    const char *const *inputs; /* the job's inputs: only kafka:// ones are planned again */
    size_t n_inputs;
    uint64_t unit_items;
    int streaming;    /* 0: commits only (a batch job's Kafka inputs) */
    double poll_s;    /* between two plannings */
    size_t max_units; /* most units planned and not yet released (0: no limit) */
} twn_kplanner_cfg;

typedef struct twn_kplanner_stats {
    uint64_t plans, plan_errors, planned; /* plannings, failed ones, units planned */
    uint64_t commits, commit_errors;      /* requests run, failed ones */
    int caught_up; /* a planning reached the high watermarks it read (not cut by max_units) */
    double longest_call_s; /* longest planning or commit (what the loop no longer waits for) */
} twn_kplanner_stats;

typedef struct twn_kplanner twn_kplanner;

/* Starts the thread.  plan is the loop's plan so far (units 0 .. plan->n - 1 by sequence
 * number); the thread continues it. */
int twn_kplanner_start(const twn_kplanner_cfg *cfg, const twn_src_units *plan, twn_kplanner **out,
                       twn_err *err);
/* Moves the units planned since the last call to the end of plan (ids and order continue it);
 * returns how many. */
size_t twn_kplanner_take(twn_kplanner *kp, twn_src_units *plan);
/* Units below sequence number `base` are released (twn_cstate_forget). */
void twn_kplanner_set_base(twn_kplanner *kp, uint64_t base);
/* Hands a commit request to the thread (copied).  -1 while the previous one has no result yet. */
int twn_kplanner_commit(twn_kplanner *kp, const twn_offset_point *pts, size_t n);
/* The finished request's points (committed filled in), valid until the next
 * twn_kplanner_commit; NULL while none is finished. */
const twn_offset_point *twn_kplanner_commit_result(twn_kplanner *kp, size_t *n);
void twn_kplanner_stats_get(twn_kplanner *kp, twn_kplanner_stats *s);
/* Stops and joins the thread (idempotent). */
void twn_kplanner_stop(twn_kplanner *kp);
/* Stops it if needed and frees everything, units not taken included. */
void twn_kplanner_free(twn_kplanner *kp);

#endif
