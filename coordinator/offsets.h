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

/* Commits the points low_water allows (see above) through io's Kafka handle (which needs the
 * group).  0: nothing to do or committed; -1: a commit failed (err), to be retried. */
int twn_offsets_commit(twn_offsets *o, twn_srcio *io, uint32_t low_water, double now, int force,
                       twn_err *err);

/* The partitions tracked, and what was committed for partition i (-1: nothing yet). */
size_t twn_offsets_count(const twn_offsets *o);
int64_t twn_offsets_committed(const twn_offsets *o, size_t i, const char **topic,
                              int32_t *partition);

#endif
