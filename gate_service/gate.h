/* gate.h — the gate service role (DESIGN.md §3): units in, easy embeddings to the shards, hard
 * refs and rejects to the coordinator.
 *
 * One DEALER to the coordinator (Hello with credits, then Welcome gives the shard endpoints), one
 * PUSH per shard.  For each UnitLease it reads the unit's items from the source itself; bad
 * records are rejected (STAGE_READ / STAGE_PARSE) and the rest go through twn_embed_items with
 * TWN_PASS_GATE in batches: easy items -> EmbeddingBatch to shard twn_hash64(id) mod S, hard ->
 * HardItems, failures -> Rejects (STAGE_GATE).  Then Finished + WorkRequest(1).  Heartbeats go out
 * between batches.  Returns on Shutdown.
 *
 * A batch is filled across every unit lease the gate holds (up to credits: the one being read and
 * those queued behind it), in lease order: the tail of one unit and the heads of the next share a
 * gate pass, so units smaller than a batch do not make part-empty passes.  Nothing waits for a
 * lease to come: a batch is short only when the leases held have no more items.  The units are
 * read one after another (one reader open at a time: a Kafka handle reads one unit at a time).
 * Each lease has its own lease clock (twn_role_clock); its Finished goes out once its last item
 * has been through a gate pass and that pass's outputs are flushed, and a lease overdue after a
 * pass is given up (Finished{abandoned}) without touching the others in the same pass.  Size
 * gate.credits >= gate.batch / job.unit_items + 1 to keep the passes full. */
#ifndef TWN_GATE_SERVICE_GATE_H
#define TWN_GATE_SERVICE_GATE_H

#include <pthread.h>
#include <stdint.h>

#include "common/curve.h"
#include "common/source.h"
#include "common/source_io.h"
#include "common/transport.h"
#include "engine/twn.h"
#include "util/err.h"

typedef struct twn_role_cfg {
    void *zctx;
    const char *control;    /* the coordinator's ROUTER endpoint */
    const char *id;         /* unique process/thread id (DEALER routing id) */
    uint32_t credits;       /* units (gate) / hard batches (worker) held at once: 2 */
    const twn_model *model; /* NULL: the null engine (null_engine.h) with null_dim */
    int null_dim;
    /* the null engine pretends each item takes this long (0: instant; job.null_item_us) */
    int null_item_us;
    twn_opts opts; /* mode etc.; pass is set by the role */
    int batch;     /* items per twn_embed_items call: 32 */
    twn_src_opts src;
    /* Flow control to the indexers (DESIGN.md principle 4): EmbeddingBatches queued per shard
     * (ZMQ_SNDHWM of each PUSH): 4.  See twn_role_flush. */
    int shard_credits;
    const twn_srcio_cfg *io;  /* S3 / Kafka access (NULL: defaults and the AWS_* variables) */
    volatile int *stop;       /* optional: set non-zero to return early */
    double connect_timeout_s; /* no Welcome within this long: fail; 0 = wait forever */
    /* CURVE for tcp:// (NULL: plain; common/curve.h) */
    const twn_curve_cfg *curve;
    /* frame / ZeroMQ message limit (limits.max_message_bytes); 0 = 64 MiB (transport.h) */
    size_t max_message_bytes;
    const char *compress; /* limits.compress: auto|always|never; NULL = auto */
    /* tests: no pulse thread (twn_role_conn.pulse), heartbeats only between batches, so a slow
     * batch loses its lease as it would have before the pulse existed */
    int no_pulse;
    /* gate: the process's S3 read-ahead pool (s3.readers > 1; common/prefetch.h), or NULL.  The
     * units leased behind the current one (up to credits - 1) are fetched into memory by it
     * while this gate works. */
    struct twn_prefetch *prefetch;
} twn_role_cfg;

void twn_role_cfg_default(twn_role_cfg *c);

/* Runs until Shutdown (0) or a transport failure / stop (-1 with err). */
int twn_gate_run(const twn_role_cfg *cfg, twn_err *err);

// ------------------------------------------------------------------------------------------------
// Client plumbing shared with the reasoning worker (worker/ links this library)

/* The lease clock of one of several leases held at once (the gate's; see
 * twn_role_lease_overdue): the pulse moves `end` with each Heartbeat and lists `unit` in it. */
typedef struct twn_role_clock {
    uint64_t lease, unit;
    double end; /* local estimate of the deadline; 0 = none */
    double len; /* seconds each Heartbeat adds (lease_ms) */
    /* Progress, listed with the lease in every Heartbeat (twn_role_lease_progress): 1 when the
     * lease is taken off the socket, + work done since.  The coordinator ends a lease whose
     * progress stands still for stall (stall_ms; 0: never), and so does the local estimate. */
    uint64_t progress;
    double moved; /* twn_now() when progress last changed */
    double stall; /* seconds */
} twn_role_clock;

typedef struct twn_role_conn {
    const twn_role_cfg *cfg;
    void *dealer;
    void **push; /* [shards] */
    uint32_t shards;
    int dim;
    twn_frame_opts fo;
    twn_frame_opts fo_push; /* frames to the shards: compressed only if one is over tcp:// */
    twn_beat beat;
    uint64_t hb_seq, batch_seq;
    uint64_t active; /* the unit / batch being worked on (listed in heartbeats) */
    /* The gate's held unit leases, in lease order (under mu): when there are any, Heartbeats list
     * their units (instead of `active`) and move each one's clock. */
    twn_role_clock *clocks;
    size_t n_clocks, cap_clocks;
    int shut; /* Shutdown came before the Welcome (twn_role_connect failed on purpose), or while
                 a shard was full (twn_role_flush failed on purpose) */
    /* The lease clock (see twn_role_lease_overdue). */
    int role;
    uint32_t missed_beats; /* from the Welcome */
    double last_sent;      /* twn_now() of the last message to the coordinator */
    double lease_end;      /* local estimate of the current lease's deadline; 0 = none */
    double lease_len;      /* seconds each Heartbeat adds (lease_ms) */
    /* The current lease (twn_role_lease_begin; 0 = none) and its progress, as a clock's. */
    uint64_t lease_id, lease_progress;
    double lease_moved, lease_stall;
    /* twn_now() of the last Heartbeat that listed a started lease whose progress moved within
     * its stall time: the coordinator renewed the leases still queued for us then
     * (coordinator/lease.h twn_leases_report). */
    double last_renewing;
    int rejoin;           /* declared dead: Hello sent again; leases until Welcome are stale */
    uint64_t join_id;     /* Hello.join_id of the current join (new on connect and on rejoin) */
    double last_hello;    /* twn_now() of the last Hello (answers to the coordinator's "say
                             Hello" are paced by it) */
    int abandoned;        /* the current lease was given up (overdue) */
    uint64_t shard_waits; /* 100 ms waits for a full shard queue (back-pressure seen) */
    /* The pulse: a thread that sends the Heartbeats while this role's thread is inside a long
     * engine call (a CoT batch on a CPU outlasts missed_beats intervals, and a silent peer is
     * declared dead and loses its leases).  Every use of the DEALER and of the lease clock goes
     * through mu (recursive).  A role stuck inside the engine does not keep its leases for that:
     * the pulse lists their progress, which only the working thread moves, and a lease that
     * stands still for stall_ms ends (see twn_role_lease_begin). */
    pthread_mutex_t mu;
    int mu_init, pulse_on;
    volatile int pulse_stop;
    pthread_t pulse;
    /* Outputs of one batch, flushed together (fixed capacity: refs point into these arrays). */
    size_t cap;
    size_t *n_emb;            /* [shards] */
    Twn__EmbeddingItem **emb; /* [shards][cap] */
    float **vec;              /* [shards][cap * dim] */
    size_t n_hard, n_rej;
    Twn__HardItem *hard;
    Twn__Reject *rej;
    Twn__ItemRef *refs; /* [2 * cap]: hard then rejects */
    Twn__SourceRef *srcs;
    size_t n_refs;
    twn_srcio *io;        /* the stores, opened on first use */
    twn_srcio_buf srcbuf; /* bucket / topic of the unit being read (its refs point here; the
                             gate keeps one per held lease) */
    /* Read-ahead (cfg->prefetch): messages taken off the DEALER early to find the queued leases,
     * handled in order by twn_role_serve before it receives again; the fetches of those leases'
     * units, by lease id. */
    Twn__Envelope **stash;
    size_t n_stash, cap_stash;
    struct twn_prefetch_job **pf;
    uint64_t *pf_lease;
    size_t n_pf;
} twn_role_conn;

/* c->io (the stores: files, S3, Kafka), opened on first use, with heartbeats kept going while a
 * read waits on a store. */
int twn_role_io(twn_role_conn *c, twn_err *err);

/* DEALER + Hello(role, credits, dim), waits for Welcome, connects one PUSH per shard. */
int twn_role_connect(twn_role_conn *c, const twn_role_cfg *cfg, int role, int dim, twn_err *err);
void twn_role_close(twn_role_conn *c);
int twn_role_send(twn_role_conn *c, Twn__Envelope *env, twn_err *err);
/* A Heartbeat when one is due (listing the held leases' units, else c->active). */
int twn_role_beat(twn_role_conn *c, twn_err *err);
/* Queues outputs; a full buffer is flushed first.  Strings / ref fields are copied shallowly:
 * they must stay valid until the next twn_role_flush. */
int twn_role_emb(twn_role_conn *c, uint64_t unit, uint64_t index, const char *id, const float *v,
                 int route, float p_think, uint32_t think_tokens, twn_err *err);
int twn_role_hard(twn_role_conn *c, const Twn__ItemRef *ref, float p_think, twn_err *err);
int twn_role_reject(twn_role_conn *c, const Twn__ItemRef *ref, int stage, const char *reason,
                    twn_err *err);
/* Sends the queued EmbeddingBatches (one per shard), HardItems (one per unit, in the order the
 * units first appear; `unit` names the unit of a hard item without a ref) and Rejects. */
int twn_role_flush(twn_role_conn *c, uint64_t unit, twn_err *err);
/* Finished(lease) + WorkRequest(1). */
int twn_role_finished(twn_role_conn *c, uint64_t lease, twn_err *err);

/* Leases have deadlines (DESIGN.md principle 3).  The coordinator sends deadline_unix_ms (its
 * wall clock) and lease_ms (how far a Heartbeat moves it); the role turns that into a local
 * monotonic estimate at receipt and moves it with every Heartbeat it sends before the estimate
 * runs out.  Separately, the coordinator declares a peer dead (ending all of its leases) after
 * missed_beats silent heartbeat intervals.  Both estimates are conservative (the coordinator's
 * view is later by the message transit time), and one heartbeat interval of grace is added.
 * Results of an overdue lease are not sent: the unit/batch is already someone else's, and
 * although the index is idempotent, late vectors cost WAL bytes and fsyncs for nothing.  A role
 * that finds itself declared dead sends Hello again (a new worker id, fresh credits) and drops
 * leases that arrive before the new Welcome.  Cross-host clock skew shifts only the first
 * estimate (deadline_unix_ms); hosts are assumed NTP-synchronised well within lease_ms.
 *
 * Heartbeats renew per lease: each lists the leases taken off the socket with a progress
 * counter, and a lease whose progress stands still for stall_ms ends at the coordinator even
 * while the pulse beats (a hung engine call must not hold its work forever).  The local estimate
 * follows: heartbeats stop moving a stalled lease's deadline, and a lease is overdue once its
 * progress has stood still for stall_ms (+ the grace).  Leases still queued on the socket are
 * renewed by heartbeats that list a moving lease (twn_role_conn.last_renewing). */
void twn_role_lease_begin(twn_role_conn *c, uint64_t lease_id, uint64_t deadline_unix_ms,
                          uint32_t lease_ms, uint32_t stall_ms);
/* Seconds the current lease is overdue by the estimate above (> 0: give it up), else <= 0. */
double twn_role_lease_overdue(const twn_role_conn *c);
/* Work on lease `lease` (a clock's or the current one) moved by n (items read or computed). */
void twn_role_lease_progress(twn_role_conn *c, uint64_t lease, uint64_t n);
/* The role's working thread is alive and working (back from the engine, waiting on a store or a
 * full shard): every lease it holds moves by one.  Only the working thread calls this, never
 * the pulse: a hung working thread must look hung. */
void twn_role_lease_alive(twn_role_conn *c);
/* Gives the current lease up: logs what (e.g. "unit", id), drops the buffered outputs, and sends
 * Finished (abandoned: the coordinator re-leases the work at once) + WorkRequest. */
int twn_role_abandon(twn_role_conn *c, const char *what, uint64_t id, uint64_t lease, twn_err *err);

/* A lease handler: does one leased piece of work (the envelope's body is of the served kind). */
typedef int (*twn_role_handler)(twn_role_conn *c, const Twn__Envelope *m, twn_err *err);
/* The loop every computing role runs: connect (Hello/Welcome), then heartbeat and receive until
 * Shutdown or cfg->stop; each envelope whose body is `body_case` goes to `handle`.  Shutdown and
 * cfg->stop end it normally (0); a handler failure or a dead socket ends it with err set. */
int twn_role_serve(const twn_role_cfg *cfg, int role, int body_case, twn_role_handler handle,
                   twn_err *err);

#endif
