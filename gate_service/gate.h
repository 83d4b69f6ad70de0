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

#include <stdint.h>

#include "common/source.h"
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
    twn_opts opts; /* mode etc.; pass is set by the role */
    int batch;     /* items per twn_embed_items call: 32 */
    twn_src_opts src;
    volatile int *stop; /* optional: set non-zero to return early */
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
} twn_role_conn;

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

/* A lease handler: does one leased piece of work (the envelope's body is of the served kind). */
typedef int (*twn_role_handler)(twn_role_conn *c, const Twn__Envelope *m, twn_err *err);
/* The loop every computing role runs: connect (Hello/Welcome), then heartbeat and receive until
 * Shutdown or cfg->stop; each envelope whose body is `body_case` goes to `handle`.  Shutdown and
 * cfg->stop end it normally (0); a handler failure or a dead socket ends it with err set. */
int twn_role_serve(const twn_role_cfg *cfg, int role, int body_case, twn_role_handler handle,
                   twn_err *err);

#endif
