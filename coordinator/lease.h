/* lease.h — leases with deadlines: how the coordinator hands out work without trusting anyone.
 *
 * DESIGN.md §3 principle 3.  A pool holds a queue of work refs (opaque 64-bit values: a unit's
 * sequence number, or unit<<32|item for a hard item) and the leases granted from it.  A lease
 * gives a batch of refs to one worker until a deadline; heartbeats push the deadline out; when
 * it passes (or the worker is declared dead) every ref the lease still holds goes back to the
 * FRONT of the queue with one more attempt, so retried work is re-leased before new work.  A ref
 * that has been leased max_attempts times and expired every time is poison: it is handed to the
 * caller to dead-letter ("lease expired N times") instead of being queued again.
 *
 * The pool does not know what a ref means.  Three hooks connect it to the caller's state:
 *   bind(ref, slot)   at grant: 1 = the ref still needs work (the caller records that lease
 *                     `slot` now holds it), 0 = drop it (finished while it waited in the queue);
 *   unbind(ref, slot) when a lease ends with the ref unsettled: forget the binding; 1 = it still
 *                     needs work (queue it again), 0 = it finished meanwhile;
 *   poison(ref, n)    the ref expired n == max_attempts times.
 * The caller reports progress with twn_leases_settle(slot) once per ref that finished while
 * bound to that lease; a lease whose refs are all settled closes.  A late ack from a previous
 * holder therefore needs no special case: the ref is finished, so it is dropped at grant, not
 * queued by unbind, and settles whatever lease holds it now, exactly once.
 *
 * A lease is ACTIVE (the holder is working; heartbeats renew it) until the holder says it has
 * finished its part (twn_leases_finish); then it waits at most ack_timeout_s for the downstream
 * acks (the index shards') that settle its refs, and heartbeats no longer extend it.  A holder
 * that gives a lease up instead (past its deadline, results dropped) releases it
 * (twn_leases_release): it ends at once, as an expiry.  So every ref that still needs work is
 * always queued, or held by a lease with a deadline that only its holder's heartbeats extend.
 *
 * Renewal is per lease, not per holder (twn_leases_report): a holder's heartbeat thread can
 * outlive its working thread (a hung engine call), and "the process is alive" must not mean "the
 * work goes on".  Heartbeats list the leases being worked with a progress counter each; a
 * started lease is renewed only while its progress moves, and one whose progress stands still
 * for stall_s ends (an expiry) although its holder is alive.  A lease the holder has received
 * but not started (queued behind its current work) has no progress of its own: it is renewed
 * while any started lease of the same holder moves, so it may wait behind slow but live work
 * as long as that takes, and it runs out lease_s after the holder's last moving lease stalled.
 * A hung holder therefore keeps nothing longer than stall_s + lease_s.
 *
 * An attempt counts against max_attempts when a lease ends with its work unfinished (expiry,
 * stall, silence or death before twn_leases_finish, or a release) and when a finished lease's
 * ack_timeout_s runs out (an item that takes its shard down every time must reach the dead
 * letters, not go round forever).  A finished lease whose holder then dies puts its unsettled
 * refs back without counting the attempt: that death is no fault of those items.
 *
 * Time is a double in seconds passed in by the caller (no hidden clock), so tests are exact.
 * Worker ids are small integers (< TWN_LEASE_MAX_WORKERS) that the caller assigns. */
#ifndef TWN_COORDINATOR_LEASE_H
#define TWN_COORDINATOR_LEASE_H

#include <stddef.h>
#include <stdint.h>

#include "util/err.h"

#define TWN_LEASE_MAX_WORKERS (1u << 16)
#define TWN_LEASE_MAX_SLOTS   (1u << 24) /* concurrent leases per pool */

typedef struct twn_lease_cfg {
    double lease_s;             /* 30: deadline after a grant or renewal */
    double heartbeat_s;         /* 5: the interval workers are told to heartbeat at */
    uint32_t missed_heartbeats; /* 3: a worker silent for heartbeat_s * this is dead */
    double ack_timeout_s;       /* 60: after finish, how long the refs' acks may take */
    uint32_t max_attempts;      /* 3: leases of one ref that may expire before it is poison */
    /* 300: a started lease whose reported progress stands still this long ends, even while its
     * holder heartbeats (0: never for that reason).  Longer than the slowest single engine call
     * (a gate batch, a reasoning batch), which reports no progress while it runs. */
    double stall_s;
} twn_lease_cfg;

void twn_lease_cfg_default(twn_lease_cfg *cfg);
/* Fails naming the field and its value when a setting is out of range. */
int twn_lease_cfg_check(const twn_lease_cfg *cfg, twn_err *err);

typedef struct twn_lease_hooks {
    void *ctx;
    int (*bind)(void *ctx, uint64_t ref, uint32_t slot);
    int (*unbind)(void *ctx, uint64_t ref, uint32_t slot);
    void (*poison)(void *ctx, uint64_t ref, uint32_t attempts);
} twn_lease_hooks;

/* A lease id: prefix (16 bits) | generation (24) | slot (24); never 0.  The prefix is the pool's
 * id_prefix: the coordinator uses epoch << 1 | pool, so ids are unique across pools and across
 * restarts (each run has a new epoch). */
typedef uint64_t twn_lease_id;

typedef struct twn_lease_grant {
    twn_lease_id id;
    uint32_t slot;
    double deadline;
    size_t n;                 /* refs granted */
    const uint64_t *refs;     /* valid until the lease ends */
    const uint32_t *attempts; /* per ref: 1 on its first lease, 2 on its second, ... */
} twn_lease_grant;

/* Why a lease ended without being settled, for counters. */
typedef struct twn_lease_stats {
    uint64_t granted, closed, expired, worker_deaths, requeued, poisoned, dropped, late;
    uint64_t released;  /* of the expired: given up by their holder (twn_leases_release) */
    uint64_t stalled;   /* of the expired: progress stood still for stall_s (holder alive) */
    uint64_t uncounted; /* refs queued again without an attempt counted (their lease finished) */
} twn_lease_stats;

typedef struct twn_leases twn_leases;

/* name ("unit", "hard batch") appears in error messages.  id_prefix (16 bits) tops every lease
 * id of this pool; ids with a smaller prefix are from an earlier run (late), with a larger one
 * were never issued. */
twn_leases *twn_leases_new(const char *name, const twn_lease_cfg *cfg, const twn_lease_hooks *hooks,
                           uint32_t id_prefix);
void twn_leases_free(twn_leases *l);

/* Queues a ref at the back (new work), with the attempts it already had (0 for new work). */
void twn_leases_enqueue(twn_leases *l, uint64_t ref, uint32_t attempts);
size_t twn_leases_queued(const twn_leases *l);
/* Live leases (active or finished-awaiting-acks). */
size_t twn_leases_live(const twn_leases *l);

/* Grants up to max_refs queued refs (front first) to worker: returns 1 with *g filled, 0 when the
 * queue holds nothing that still needs work, -1 for a bad worker id.  A grant also counts as a
 * sign of life from the worker. */
int twn_leases_grant(twn_leases *l, uint32_t worker, size_t max_refs, double now,
                     twn_lease_grant *g, twn_err *err);

/* 1 when id names a live lease (and *slot), 0 when it ended (expired, closed, or from an earlier
 * run: a late message), -1 with a message when it was never issued by this pool. */
int twn_leases_resolve(const twn_leases *l, twn_lease_id id, uint32_t *slot, twn_err *err);
/* The holder of lease id finished its part; its refs now have ack_timeout_s to settle.
 * Returns twn_leases_resolve's value. */
int twn_leases_finish(twn_leases *l, twn_lease_id id, double now, twn_err *err);
/* The holder gave the lease up (past its deadline, it dropped its results): ends it now as an
 * expiry, so its unsettled refs are queued again at the front (or poisoned after max_attempts)
 * instead of waiting ack_timeout_s for acks that will not come.  Returns twn_leases_resolve's
 * value (0 for a lease that already ended: a late message, harmless). */
int twn_leases_release(twn_leases *l, twn_lease_id id, twn_err *err);
/* Renews one active lease: deadline = now + lease_s.  Returns twn_leases_resolve's value. */
int twn_leases_renew(twn_leases *l, twn_lease_id id, double now, twn_err *err);
/* A heartbeat from worker that does not say what it works on: renews every ACTIVE lease it
 * holds whatever their progress; returns how many.  For callers that do not track progress
 * (tests, benchmarks); the coordinator service uses twn_leases_report. */
size_t twn_leases_heartbeat(twn_leases *l, uint32_t worker, double now);

/* One lease of a heartbeat: its id and its holder's progress counter (0: received, not started;
 * then any value that changes whenever work on it gets done). */
typedef struct twn_lease_beat {
    twn_lease_id id;
    uint64_t progress;
} twn_lease_beat;

/* A heartbeat from worker listing the leases it works on (ids of other pools or workers, and
 * ended leases, are ignored).  A sign of life.  Renews (deadline = now + lease_s):
 *   - each listed started lease (progress > 0) whose progress moved within stall_s (a change
 *     since the last report counts as moving now);
 *   - each of the worker's leases not started (listed with progress 0, or not listed and never
 *     reported started: queued inside the worker or on the way) while at least one of its
 *     listed started leases moves.
 * A started lease that is not listed is not renewed.  Returns leases renewed. */
size_t twn_leases_report(twn_leases *l, uint32_t worker, double now, const twn_lease_beat *b,
                         size_t n);
/* One ref bound to slot finished.  Returns 1 when that closed the lease. */
int twn_leases_settle(twn_leases *l, uint32_t slot);

/* Ends every lease whose deadline is <= now, every started ACTIVE lease whose progress has
 * stood still for stall_s, and every lease of a worker that holds an ACTIVE lease and has been
 * silent for heartbeat_s * missed_heartbeats (that worker is then forgotten; a worker whose
 * leases are all finished may go quiet).  Returns leases ended. */
size_t twn_leases_expire(twn_leases *l, double now);
/* The worker is gone (crash reported by the transport, or missed heartbeats): ends all of its
 * leases now, as expiries (attempts count only for those not finished).  Returns leases ended. */
size_t twn_leases_worker_dead(twn_leases *l, uint32_t worker);

/* The caller could not listen for dt seconds (its own stall: a slow fsync, the process starved
 * or stopped), so the heartbeats, reports and acks of that time wait unread in its queue: every
 * worker's silence, every live lease's deadline and standstill are moved dt later, so that the
 * stall is held against no holder (coordinator/service.c, test_coord_stall). */
void twn_leases_pause(twn_leases *l, double dt);

/* The lease in slot (live), for inspection and tests. */
uint32_t twn_leases_worker_of(const twn_leases *l, uint32_t slot);
double twn_leases_deadline(const twn_leases *l, uint32_t slot);
/* Live leases held by worker. */
size_t twn_leases_held(const twn_leases *l, uint32_t worker);
const twn_lease_stats *twn_leases_stats(const twn_leases *l);

#endif
