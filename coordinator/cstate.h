/* cstate.h — the coordinator's state: units, leases and journal behind one small API.
 *
 * This is everything the coordinator decides, without sockets, protobuf or clocks: the service
 * loop (ZeroMQ) translates messages into these calls and their results back into messages.
 * DESIGN.md §3's principles map onto it as follows.
 *
 *  2. Exactly once = at-least-once + idempotent index.  A unit is done only when each of its
 *     items is durably acked by its shard (twn_cstate_ack*) or dead-lettered
 *     (twn_cstate_dead_letter, or by lease poisoning).  Duplicate and late acks count once.
 *  3. Leases, not trust.  Units are leased to gate services, batches of hard items to reasoning
 *     workers, each with a deadline that heartbeats extend.  Expired or dead workers' work goes
 *     back to the front of its queue; after max_attempts expiries an item is dead-lettered with
 *     "lease expired N times".  A holder that finished its part calls twn_cstate_finish: then
 *     the shards' acks have ack_timeout_s to arrive before the work is leased again.
 *  4. Credits: work is only granted when asked for; no new units are granted while more than
 *     max_hard_queued hard items wait for reasoning workers.
 *  5. Restartable from the journal only: open replays it (UNIT_DONE, DEAD_LETTER, HARD_ROUTED);
 *     items acked in a unit that was not journaled done are simply processed again.
 *
 * Lifecycle of an item ref as the service loop sees it:
 *   gate:    twn_cstate_grant_unit -> reads the unit's items, for each: easy -> embedding to
 *            shard; hard -> twn_cstate_report_hard; bad -> twn_cstate_dead_letter;
 *            then twn_cstate_finish(lease).  Heartbeats: twn_cstate_report(worker, leases).
 *   reason:  twn_cstate_grant_hard -> CoT + embedding -> shard; twn_cstate_finish(lease).
 *   shard:   after fsync, twn_cstate_ack(unit, items, route, think tokens).
 *   loop:    twn_cstate_tick(now) every few ms (expiries, group commit);
 *            twn_cstate_low_water() for Kafka offset commits.
 *
 * Units are named by a stable 64-bit key (twn_unit_key over source + byte/offset range), items
 * by their index inside the unit.  Workers are small integer ids (< TWN_LEASE_MAX_WORKERS) that
 * the service assigns per connection: a restarted worker must get a new id, or its heartbeats
 * would keep its dead predecessor's leases alive.  Not thread-safe: one thread (the coordinator
 * loop) owns it. */
#ifndef TWN_COORDINATOR_CSTATE_H
#define TWN_COORDINATOR_CSTATE_H

#include <stddef.h>
#include <stdint.h>

#include "coordinator/journal.h"
#include "coordinator/lease.h"
#include "coordinator/units.h"
#include "util/err.h"

typedef struct twn_cstate_cfg {
    twn_lease_cfg unit_lease; /* units -> gate services (defaults: twn_lease_cfg_default) */
    twn_lease_cfg hard_lease; /* hard-item batches -> reasoning workers (same defaults) */
    twn_journal_cfg journal;  /* group commit (twn_journal_cfg_default) */
    uint32_t hard_batch;      /* 64: most hard items granted in one batch */
    uint64_t max_hard_queued; /* 65536: grant no units while more hard items than this wait */
    /* 4 MiB: twn_cstate_forget compacts the journal once it is this large and twice its size
     * after the previous compaction (0: never) */
    uint64_t journal_compact_bytes;
} twn_cstate_cfg;

void twn_cstate_cfg_default(twn_cstate_cfg *cfg);
/* Fails naming the field and its value. */
int twn_cstate_cfg_check(const twn_cstate_cfg *cfg, twn_err *err);

/* A planned unit: what the planner (common/source_*) produced, reduced to what bookkeeping needs.
 */
typedef struct twn_unit_spec {
    uint64_t key;     /* twn_unit_key(source, offset, length) */
    uint32_t n_items; /* items in the unit */
} twn_unit_spec;

/* Stable key of a planned unit: twn_hash64 over the source name, a NUL, and the little-endian
 * offset and length of its byte range (or Kafka offset range). */
uint64_t twn_unit_key(const char *source, uint64_t offset, uint64_t length);

/* Optional notifications (any may be NULL), called synchronously from the call that caused them.
 * Their records are appended to the journal first; durable after the next commit. */
typedef struct twn_cstate_hooks {
    void *ctx;
    void (*dead_letter)(void *ctx, uint64_t unit, uint32_t item, twn_stage stage,
                        const char *reason);
    void (*unit_done)(void *ctx, uint64_t unit, const twn_unit_counts *c);
} twn_cstate_hooks;

typedef struct twn_cstate twn_cstate;

/* Opens (or creates) the journal and replays it.  Units are added next with
 * twn_cstate_add_units; the replayed state applies to each as it is added.  info (may be NULL)
 * reports creation, the epoch, a truncated torn tail and whether the job had finished. */
int twn_cstate_open(const char *journal_path, const twn_plan_fp *fp, const twn_cstate_cfg *cfg,
                    const twn_cstate_hooks *hooks, twn_cstate **out, twn_journal_info *info,
                    twn_err *err);

/* Adds planned units (plan order; may be called again as a stream is planned).  Replayed units
 * come back done, their dead letters dead, their hard items queued for reasoning; the others are
 * queued for the gate.  Fails for a duplicate key, or when the journal's UNIT_DONE for a key
 * disagrees with its item count. */
int twn_cstate_add_units(twn_cstate *c, const twn_unit_spec *units, size_t n, twn_err *err);

typedef struct twn_unit_grant {
    twn_lease_id lease;
    uint64_t unit; /* key */
    uint32_t n_items;
    uint32_t n_pending; /* < n_items when some items are already resolved (see item_state) */
    uint32_t attempt;   /* 1 on its first lease */
    double deadline;
} twn_unit_grant;

/* Grants the next unit (retries first) to a gate worker.  1: *g filled; 0: nothing to grant
 * (queue empty, or back-pressure from the hard queue). */
int twn_cstate_grant_unit(twn_cstate *c, uint32_t worker, double now, twn_unit_grant *g,
                          twn_err *err);

typedef struct twn_item_ref {
    uint64_t unit;
    uint32_t item;
    uint32_t attempt; /* 1 on its first lease */
} twn_item_ref;

typedef struct twn_hard_grant {
    twn_lease_id lease;
    double deadline;
    size_t n;
    const twn_item_ref *items; /* valid until the next twn_cstate_grant_hard */
} twn_hard_grant;

/* Grants up to max (0: cfg.hard_batch) hard items to a reasoning worker.  1 / 0 as above. */
int twn_cstate_grant_hard(twn_cstate *c, uint32_t worker, size_t max, double now, twn_hard_grant *g,
                          twn_err *err);

/* The gate routed items to reasoning (journaled as HARD_ROUTED, queued for reasoning workers).
 * Repeats are ignored. */
int twn_cstate_report_hard(twn_cstate *c, uint64_t unit, const uint32_t *items, size_t n,
                           twn_err *err);
/* An item cannot be processed: journaled and counted as rejected; the unit goes on. */
int twn_cstate_dead_letter(twn_cstate *c, uint64_t unit, uint32_t item, twn_stage stage,
                           const char *reason, twn_err *err);
/* Durable acks from a shard (after its WAL fsync).  think_tokens may be NULL.  An unknown unit or
 * an item out of range refuses the whole batch with a message and counts a bad report. */
int twn_cstate_ack(twn_cstate *c, uint64_t unit, const uint32_t *items,
                   const uint32_t *think_tokens, size_t n, twn_route route, twn_err *err);
int twn_cstate_ack_range(twn_cstate *c, uint64_t unit, uint32_t lo, uint32_t hi, twn_route route,
                         twn_err *err);

/* The holder of a lease finished its part.  1: done; 0: the lease had already ended (a late
 * message; harmless); -1: an id this coordinator never issued. */
int twn_cstate_finish(twn_cstate *c, twn_lease_id lease, double now, twn_err *err);
/* The holder gave the lease up past its deadline (Finished.abandoned: its results were dropped):
 * the lease ends now as an expiry, its work goes back to the front of its queue, or is
 * dead-lettered ("lease expired N times") when that was its last attempt.  Same return values. */
int twn_cstate_release(twn_cstate *c, twn_lease_id lease, twn_err *err);
/* Extends one lease (same return values). */
int twn_cstate_renew(twn_cstate *c, twn_lease_id lease, double now, twn_err *err);
/* A heartbeat from a worker that does not say what it works on: renews all of its active leases
 * (tests, benchmarks).  The service uses twn_cstate_report. */
void twn_cstate_heartbeat(twn_cstate *c, uint32_t worker, double now);
/* A heartbeat listing the leases the worker works on with their progress (Heartbeat.lease_ids,
 * lease_progress): renews per lease, and stalled leases end at the next tick (twn_leases_report;
 * cfg.*_lease.stall_s). */
void twn_cstate_report(twn_cstate *c, uint32_t worker, double now, const twn_lease_beat *b,
                       size_t n);
/* The transport saw the worker die: all of its leases end now (their work is re-queued). */
void twn_cstate_worker_dead(twn_cstate *c, uint32_t worker);
/* The caller did not read its peers for dt seconds (its own stall): both pools' silences and
 * deadlines move dt later (twn_leases_pause). */
void twn_cstate_pause(twn_cstate *c, double dt);

/* Ends expired leases and silent workers' leases, and group-commits the journal.  Call every
 * few ms. */
int twn_cstate_tick(twn_cstate *c, double now, twn_err *err);
/* Commits the journal now. */
int twn_cstate_sync(twn_cstate *c, twn_err *err);

/* Every unit added so far is done. */
int twn_cstate_all_done(const twn_cstate *c);
/* Lowest unit sequence number (plan order) not yet DURABLY done: offsets below it may be
 * committed to Kafka.  == number of units when all are. */
uint32_t twn_cstate_low_water(twn_cstate *c);
/* Streams.  A stream's units are done, journaled, and then their Kafka offsets are committed;
 * after that nothing needs them: twn_cstate_forget(below) releases the units below sequence
 * number `below` (at most the durable low water; prefix only): their records, keys, durability
 * flags and lease bookkeeping.  Their keys become unknown (a late report about one fails like any
 * unknown unit; a queued lease ref of one is dropped).  Then, when the journal has grown past
 * cfg.journal_compact_bytes and twice its size after the previous compaction, the journal is
 * compacted (journal.h) to the records of units still held, of keys given to
 * twn_cstate_keep_keys, and of replayed units not yet added again.  Sequence numbers are never
 * reused (32 bits: 4 G units per journal).  *released (may be NULL): units released.  -1 only
 * when the journal failed. */
int twn_cstate_forget(twn_cstate *c, uint32_t below, size_t *released, twn_err *err);
/* Records of these units survive compaction after they are released (units a restart plans again
 * from scratch: the local or S3 inputs of a stream). */
void twn_cstate_keep_keys(twn_cstate *c, const uint64_t *keys, size_t n);
/* Frees what the journal's replay holds for units not added yet: call it once every unit that a
 * restart can plan again has been added (a stream: once it has planned up to a high watermark
 * read after the open), or compaction keeps their records forever. */
void twn_cstate_replay_drop(twn_cstate *c);
/* 1 and *seq when the unit is held (added and not released), else 0. */
int twn_cstate_seq_of(const twn_cstate *c, uint64_t unit, uint32_t *seq);
/* Lowest sequence number not released. */
uint32_t twn_cstate_base(const twn_cstate *c);

/* The item's state (TWN_ITEM_COMPLETED once its unit is done); -1 for an unknown unit/item. */
int twn_cstate_item_state(const twn_cstate *c, uint64_t unit, uint32_t item);
/* The unit's counts so far (final once done); -1 for an unknown unit. */
int twn_cstate_unit_counts(const twn_cstate *c, uint64_t unit, twn_unit_counts *counts, int *done);

typedef struct twn_cstate_stats {
    twn_progress progress;
    twn_lease_stats unit_leases, hard_leases;
    uint64_t units_queued, hard_queued; /* waiting for a lease */
    uint64_t unit_leases_live, hard_leases_live;
    uint64_t journal_records, journal_commits;
    uint32_t low_water;                      /* durable, as twn_cstate_low_water */
    size_t item_bytes;                       /* per-item state of active units */
    uint64_t units_resident, units_released; /* in memory / forgotten (twn_cstate_forget) */
    uint64_t journal_bytes, journal_compactions;
} twn_cstate_stats;

void twn_cstate_stats_get(twn_cstate *c, twn_cstate_stats *s);

/* Writes JOB_FINISHED when every unit is done (once), commits and frees.  j is freed either way. */
int twn_cstate_close(twn_cstate *c, twn_err *err);
/* Frees without committing buffered journal records: what kill -9 leaves behind (tests). */
void twn_cstate_abandon(twn_cstate *c);

#endif
