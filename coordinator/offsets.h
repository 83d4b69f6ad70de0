/* offsets.h — committing Kafka consumer-group offsets no further than the job has made durable
 * (DESIGN.md §4: "offsets committed for the consumer group only up to the lowest unit not yet
 * durable").
 *
 * The coordinator's plan (common/source_io.h) holds Kafka units "kafka://topic/partition" with
 * offset ranges, in plan order.  twn_cstate_low_water() is the lowest plan position whose unit is
 * not yet durably done: every unit before it is in the journal as done.  For each partition the
 * commit point is then the start of its first unit at or after the low-water mark (or the end of
 * its last unit when all of them are below it).  Those points only move forward; a commit is
 * sent when one moved, at most every min_interval_s (a commit is a broker round trip and the
 * coordinator loop must keep answering its peers), and always when forced (end of the job).
 *
 * A failed commit (a broker down, the group coordinator moving) is not fatal: the offsets stay
 * where they were, the pass stops at the first failure (not one timeout per partition), and the
 * next try waits longer (doubling up to 10 s).  After a restart the coordinator plans from the
 * committed offsets, and the journal covers the units done but not yet committed. */
#ifndef TWN_COORDINATOR_OFFSETS_H
#define TWN_COORDINATOR_OFFSETS_H

#include <stddef.h>
#include <stdint.h>

#include "common/source.h"
#include "common/source_io.h"
#include "util/err.h"

typedef struct twn_offsets twn_offsets;

/* Collects the Kafka partitions of the plan (borrowed: it must outlive the tracker).  A plan
 * without Kafka units gives a tracker that never commits. */
int twn_offsets_new(const twn_src_units *plan, double min_interval_s, twn_offsets **out,
                    twn_err *err);
void twn_offsets_free(twn_offsets *o);
/* The plan grew (streaming: units appended at its end, offsets ascending per partition): tracks
 * the new units too.  A partition's commit point stays monotone: its new units start where its
 * last one ended. */
int twn_offsets_extend(twn_offsets *o, twn_err *err);

/* Tracks one more unit at plan position seq (a stream whose plan drops its released prefix
 * cannot use twn_offsets_extend).  Units that are not Kafka's are ignored. */
int twn_offsets_add(twn_offsets *o, uint32_t seq, const twn_src_unit *u, twn_err *err);

/* Commits the points low_water allows (see above) through io's Kafka handle (which needs the
 * group).  0: nothing to do or committed; -1: a commit failed (err), to be retried.  The same as
 * twn_offsets_due + twn_offsets_apply + twn_offsets_done in one thread. */
int twn_offsets_commit(twn_offsets *o, twn_srcio *io, uint32_t low_water, double now, int force,
                       twn_err *err);

/* Committing from another thread, so that a broker outage never blocks the coordinator loop:
 * the loop asks twn_offsets_due for the points to commit (pacing and backoff as above; at most
 * one request at a time), hands a copy to the thread that owns a Kafka handle, which runs
 * twn_offsets_apply, and gives the outcome back to twn_offsets_done. */
typedef struct twn_offset_point {
    char topic[256];
    int32_t partition;
    int64_t offset;    /* the commit point */
    int64_t committed; /* after twn_offsets_apply: what the group has (>= offset); -1: failed */
    uint32_t part;     /* the tracker's partition index */
} twn_offset_point;

/* The points that low_water allows beyond what was committed; *pts is owned by o (valid until
 * twn_offsets_done).  0 when nothing is due, when pacing or backoff says wait, or while a request
 * is out. */
size_t twn_offsets_due(twn_offsets *o, uint32_t low_water, double now, int force,
                       const twn_offset_point **pts);
/* Commits pts[0..n) in order through k, filling each one's `committed`; stops at the first
 * failure (0 / -1 with err). */
int twn_offsets_apply(twn_kafka *k, twn_offset_point *pts, size_t n, twn_err *err);
/* The outcome of the request twn_offsets_due handed out (the points as twn_offsets_apply left
 * them; NULL: the request was dropped, a failure).  A failure doubles the wait before the next
 * request (up to 10 s).  A no-op when no request is out. */
void twn_offsets_done(twn_offsets *o, const twn_offset_point *pts, size_t n);
/* A plan position below which every tracked unit's offsets are committed: the low water of the
 * last request that fully succeeded (or that had nothing left to commit). */
uint32_t twn_offsets_committed_low(const twn_offsets *o);
/* Stops tracking the units below `below` (at most twn_offsets_committed_low): a stream drops
 * them with the rest of their state. */
void twn_offsets_forget(twn_offsets *o, uint32_t below);

/* The partitions tracked, and what was committed for partition i (-1: nothing yet). */
size_t twn_offsets_count(const twn_offsets *o);
int64_t twn_offsets_committed(const twn_offsets *o, size_t i, const char **topic,
                              int32_t *partition);

#endif
