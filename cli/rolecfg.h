/* rolecfg.h — the roles' configurations built from the job configuration (common/jobconf.h).
 *
 * `twn run` (every role as a thread) and the role commands (`twn coordinator|gate|worker|indexer`,
 * one role per process) read the same keys through these functions, so a setting means the same
 * thing in both shapes.  A twn_cli_job holds what the config leads to beyond plain values: the
 * loaded model (or just its manifest hash and dimension for the roles that never run it), the
 * S3 / Kafka access, CURVE keys, the parsed mode.  Messages go to stderr prefixed with the
 * command ("twn gate: config: ..."). */
#ifndef TWN_CLI_ROLECFG_H
#define TWN_CLI_ROLECFG_H

#include <stdio.h>

#include "common/curve.h"
#include "common/jobconf.h"
#include "common/source_io.h"
#include "coordinator/service.h"
#include "engine/twn.h"
#include "gate_service/gate.h"
#include "index/service.h"

enum {
    TWN_CLI_NEED_MODEL = 1,  /* load the model (job.engine twn) and open job.backend for it */
    TWN_CLI_NEED_HASH = 2,   /* only the manifest hash and the embedding dimension */
    TWN_CLI_NEED_INPUTS = 4, /* job.inputs must not be empty */
    TWN_CLI_NEED_OUT = 8,    /* job.out must be set */
    TWN_CLI_SEPARATE = 16,   /* a role process: no inproc:// endpoint (it cannot cross processes) */
};

typedef struct twn_cli_job {
    twn_conf conf;
    twn_model *model;    /* NEED_MODEL with job.engine twn; NULL otherwise */
    char model_hash[65]; /* the manifest's sha256, "null" for the null engine */
    int dim;             /* the model's embedding dimension, or job.dim for the null engine */
    twn_opts opts;       /* job.mode parsed */
    twn_srcio_cfg io;    /* s3.* / kafka.* / limits.max_item_bytes */
    twn_curve_cfg curve; /* security.* keys, when security.curve */
    int has_curve;
} twn_cli_job;

/* Loads the config from argv (flags, --config FILE) and the environment, applies log.level and
 * log.format, then prepares what `needs` asks for.  Returns 0, or the exit status after printing
 * the error: 2 for a bad or incomplete config, 1 when the model or keys cannot be loaded.  The job
 * must be closed either way. */
int twn_cli_job_open(twn_cli_job *j, const char *prog, int argc, char **argv, unsigned needs);
void twn_cli_job_close(twn_cli_job *j);

/* Every field the config decides; the caller sets zctx, stop, and (for twn run) its inproc://
 * endpoints.  Strings point into the job. */
void twn_cli_coord_cfg(const twn_cli_job *j, twn_coord_cfg *cc);
void twn_cli_role_cfg(const twn_cli_job *j, int worker, twn_role_cfg *rc);
void twn_cli_indexer_cfg(const twn_cli_job *j, int shard, twn_indexer_cfg *ic);
/* The process's S3 reader pool (common/prefetch.h) when s3.readers > 1: gates read s3:// units
 * ahead with it, gates and workers fetch a batch's s3:// images with it (source_io.h).  Its
 * threads start on first use, so a job that never needs one has none.  NULL otherwise or when
 * it cannot start (logged: the roles then read on their own). */
struct twn_prefetch *twn_cli_prefetch_open(const twn_cli_job *j, const char *prog);

/* The coordinator's one-line summary ("units U items N easy E hard H rejected R think_tokens T
 * seconds S"), the line `twn run` and `twn coordinator` print on stdout at the end. */
void twn_cli_print_summary(FILE *f, const twn_coord_summary *s);

#endif
