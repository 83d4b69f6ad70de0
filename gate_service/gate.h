/* gate.h — the gate service role (DESIGN.md §3): units in, easy embeddings to the shards, hard
 * refs and rejects to the coordinator.
 *
 * One DEALER to the coordinator (Hello with credits, then Welcome gives the shard endpoints), one
 * PUSH per shard.  For each UnitLease it reads the unit's items from the source itself; bad
 * records are rejected (STAGE_READ / STAGE_PARSE) and the rest go through twn_embed_items with
 * TWN_PASS_GATE in batches: easy items -> EmbeddingBatch to shard twn_hash64(id) mod S, hard ->
 * HardItems, failures -> Rejects (STAGE_GATE).  Then Finished + WorkRequest(1).  Heartbeats go out
 * between batches.  Returns on Shutdown. */
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

typedef struct twn_role_conn {
    const twn_role_cfg *cfg;
    void *dealer;
    void **push; /* [shards] */
    uint32_t shards;
    int dim;
    twn_frame_opts fo;
    twn_beat beat;
    uint64_t hb_seq, batch_seq;
    uint64_t active; /* the unit / batch being worked on (listed in heartbeats) */
    int shut;        /* Shutdown came before the Welcome (twn_role_connect failed on purpose) */
    /* The lease clock (see twn_role_lease_overdue). */
    int role;
    uint32_t missed_beats; /* from the Welcome */
    double last_sent;      /* twn_now() of the last message to the coordinator */
    double lease_end;      /* local estimate of the current lease's deadline; 0 = none */
    double lease_len;      /* seconds each Heartbeat adds (lease_ms) */
    int rejoin;            /* declared dead: Hello sent again; leases until Welcome are stale */
    double last_hello;     /* twn_now() of the last Hello (answers to the coordinator's "say
                              Hello" are paced by it) */
    int abandoned;         /* the current lease was given up (overdue) */
    uint64_t shard_waits;  /* 100 ms waits for a full shard queue (back-pressure seen) */
    /* The pulse: a thread that sends the Heartbeats while this role's thread is inside a long
     * engine call (a CoT batch on a CPU outlasts missed_beats intervals, and a silent peer is
     * declared dead and loses its leases).  Every use of the DEALER and of the lease clock goes
     * through mu (recursive).  The price: a role stuck inside the engine keeps its leases; the
     * job then waits for it instead of re-leasing the work. */
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
    twn_srcio_buf srcbuf; /* bucket / topic of the unit being read (its refs point here) */
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
/* A Heartbeat when one is due (listing c->active). */
int twn_role_beat(twn_role_conn *c, twn_err *err);
/* Queues outputs; a full buffer is flushed first.  Strings / ref fields are copied shallowly:
 * they must stay valid until the next twn_role_flush. */
int twn_role_emb(twn_role_conn *c, uint64_t unit, uint64_t index, const char *id, const float *v,
                 int route, float p_think, uint32_t think_tokens, twn_err *err);
int twn_role_hard(twn_role_conn *c, const Twn__ItemRef *ref, float p_think, twn_err *err);
int twn_role_reject(twn_role_conn *c, const Twn__ItemRef *ref, int stage, const char *reason,
                    twn_err *err);
/* Sends the queued EmbeddingBatches (one per shard), HardItems and Rejects. */
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
 * estimate (deadline_unix_ms); hosts are assumed NTP-synchronised well within lease_ms. */
void twn_role_lease_begin(twn_role_conn *c, uint64_t deadline_unix_ms, uint32_t lease_ms);
/* Seconds the current lease is overdue by the estimate above (> 0: give it up), else <= 0. */
double twn_role_lease_overdue(const twn_role_conn *c);
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
