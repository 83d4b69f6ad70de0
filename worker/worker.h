/* worker.h — the reasoning worker role (DESIGN.md §3): ReasonLease in, hard embeddings out.
 *
 * Same shape as the gate (gate_service/gate.h, whose client plumbing it shares): for each
 * ReasonLease it reads every item by its ref (twn_src_read_ref; a ref of length 0 — known only by
 * (unit, index) after a coordinator restart — is found by scanning its unit), runs
 * twn_embed_items with TWN_PASS_REASON (p_think carried), streams the vectors to the shards with
 * route hard, rejects failures (STAGE_REASON), then Finished + WorkRequest(1). */
#ifndef TWN_WORKER_WORKER_H
#define TWN_WORKER_WORKER_H

#include "gate_service/gate.h"

int twn_worker_run(const twn_role_cfg *cfg, twn_err *err);

#endif
