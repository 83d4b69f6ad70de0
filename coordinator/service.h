/* service.h — the coordinator role: a ROUTER on the control endpoint around cstate.h.
 *
 * The loop plans the units of its inputs (local JSONL/tar files, s3:// prefixes, kafka:// topics:
 * common/source_io.h), opens the journal (cstate), and translates messages into cstate calls (see
 * cstate.h's header for which call goes with which message):
 *   Hello -> Welcome (shard endpoints, heartbeat interval) + a fresh worker id for leases;
 *   WorkRequest -> credits; units go to gates and hard batches to workers only against credits;
 *   HardItems -> twn_cstate_report_hard (their refs are kept until the unit is done, so a
 *   ReasonLease carries full refs; after a restart only (unit, item) is known: the ref then has
 *   length 0 and the worker finds the item by scanning its unit);
 *   Rejects -> twn_cstate_dead_letter + one line in dead_letter.jsonl;
 *   Ack -> twn_cstate_ack / ack_range; Finished -> twn_cstate_finish; Heartbeat -> renewals.
 * Kafka offsets are committed for the consumer group behind the durable low-water mark
 * (coordinator/offsets.h); a restarted coordinator plans Kafka from them and finds the units
 * done since in its journal.
 * Peers silent past missed_beats intervals are declared dead (their leases re-queued); a peer
 * that sends Shutdown is leaving (its leases are re-queued at once).  When every unit is done it
 * sends Shutdown to every peer, waits until each has answered with a Shutdown or gone silent
 * (see expect_peers), and returns the job's summary.
 *
 * Item indices on the wire (ItemRef.item_index, EmbeddingItem.item_index, AckRange.first_index)
 * are indices in the source object; the coordinator converts them to indices in the unit. */
#ifndef TWN_COORDINATOR_SERVICE_H
#define TWN_COORDINATOR_SERVICE_H

#include <stddef.h>
#include <stdint.h>

#include "common/curve.h"
#include "common/source_io.h"
#include "coordinator/cstate.h"
#include "util/err.h"

typedef struct twn_coord_cfg {
    void *zctx;                /* ZeroMQ context (shared with the other roles) */
    const char *endpoint;      /* ROUTER bind, e.g. "inproc://twn-control" */
    const char *const *inputs; /* local JSONL / tar files, in plan order */
    size_t n_inputs;
    uint64_t unit_items;                /* items per unit (256) */
    const char *journal_path;           /* cstate journal */
    const char *dead_letter_path;       /* dead_letter.jsonl (appended) */
    const char *model_hash;             /* for the plan fingerprint ("" when none) */
    uint32_t shards;                    /* S */
    const char *const *shard_endpoints; /* [S] PULL endpoints, sent in Welcome */
    double heartbeat_s;                 /* interval told to peers (cs.unit_lease.heartbeat_s) */
    uint32_t missed_beats;              /* dead after this many silent intervals */
    uint32_t hard_batch;                /* hard items per ReasonLease (cs.hard_batch) */
    twn_cstate_cfg cs;
    const twn_srcio_cfg *io; /* S3 / Kafka access for s3:// and kafka:// inputs (NULL: defaults
                                and the AWS_* variables; Kafka then has no brokers) */
    /* CURVE for a tcp:// endpoint (NULL: plain; common/curve.h) */
    const twn_curve_cfg *curve;
    /* frame / ZeroMQ message limit (limits.max_message_bytes); 0 = 64 MiB (transport.h) */
    size_t max_message_bytes;
    const char *compress; /* limits.compress: auto|always|never; NULL = auto */
    volatile int *stop;   /* optional: set non-zero to stop early (returns -1; streaming: 0) */
    /* kafka.streaming: the job never ends by itself.  Every stream_poll_s (0.5 s) the Kafka
     * thread (coordinator/kplanner.h) reads the high watermarks of the kafka:// inputs again and
     * plans the offsets beyond the plan as new units (twn_srcio_plan_more_max: same unit size,
     * at most stream_max_units held), which the loop picks up without waiting; they are
     * journaled as they are done and the group's offsets follow the durable low water as in
     * batch mode (committed by the same thread).  Done and committed units are released and the
     * journal compacted (cs.journal_compact_bytes), so memory and journal stay bounded.  Other
     * inputs are planned once at the start, as in a batch job; a streaming job without a kafka://
     * input is refused.  *stop ends it cleanly: no new leases, the leases in flight are drained
     * (until none is live, or lease_s at most), the journal is committed, the offsets are committed
     * up to the durable low water, peers get Shutdown, and 0 is returned.  No JOB_FINISHED is
     * written: a restart plans from the committed offsets (the fingerprint does not cover the
     * number of units, so the journal is taken) and goes on streaming. */
    int streaming;
    double stream_poll_s;
    /* A stream holds in memory only the units planned and not yet released: a unit is released
     * (its state, keys, journal records) once it is done and its offsets are committed.  The
     * Kafka thread (coordinator/kplanner.h), which does the planning and the commits so that a
     * broker outage never blocks this loop, plans at most this many units ahead of the releases
     * (1024), so a backlog is planned as it drains. */
    size_t stream_max_units;
    /* At the end every peer answers Shutdown (or goes silent); the coordinator returns once all
     * have, and at least expect_peers peers have been seen (twn run knows its threads: a re-run
     * of a finished job must still tell each one to stop), or after missed_beats intervals. */
    uint32_t expect_peers;
} twn_coord_cfg;

/* Defaults: unit_items 256, heartbeat 1 s, 5 missed beats, cstate defaults. */
void twn_coord_cfg_default(twn_coord_cfg *c);

typedef struct twn_coord_summary {
    uint64_t units, items, easy, hard, rejected, think_tokens;
    uint64_t duplicates; /* late / repeated acks */
    double seconds;
} twn_coord_summary;

/* Runs the job to the end (every unit done): 0 and *sum filled, or -1 with err. */
int twn_coord_run(const twn_coord_cfg *cfg, twn_coord_summary *sum, twn_err *err);

#endif
