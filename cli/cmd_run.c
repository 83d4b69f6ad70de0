/* cmd_run.c — `twn run`: coordinator, indexers, gates and workers as threads of one process over
 * inproc:// (DESIGN.md §3, "Embedded default"). */
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include "cli/commands.h"
#include "cli/observe.h"
#include "cli/rolecfg.h"
#include "common/prefetch.h"
#include "coordinator/service.h"
#include "index/outdir_s3.h"
#include "index/service.h"
#include "worker/worker.h"
#include "util/fileio.h"
#include "util/mem.h"

typedef struct job {
    int kind; /* 0 coordinator, 1 indexer, 2 gate, 3 worker */
    twn_coord_cfg *cc;
    twn_coord_summary sum;
    twn_indexer_cfg ic;
    twn_role_cfg rc;
    int status;
    twn_err err;
    int seq; /* 1 + how many roles had failed before this one (0: did not fail) */
} job;

static volatile int g_stop;
static int g_failed; /* roles failed so far (atomic) */

static void *job_main(void *arg) {
    job *j = arg;
    switch (j->kind) {
    case 0:
        j->status = twn_coord_run(j->cc, &j->sum, &j->err);
        break;
    case 1:
        j->status = twn_indexer_run(&j->ic, &j->err);
        break;
    case 2:
        j->status = twn_gate_run(&j->rc, &j->err);
        break;
    default:
        j->status = twn_worker_run(&j->rc, &j->err);
        break;
    }
    /* A role that failed (an indexer that cannot open its shard, ...) ends the whole job: the
     * others would wait for it forever.  The journal keeps what was done for a re-run. */
    if (j->status) {
        j->seq = __atomic_add_fetch(&g_failed, 1, __ATOMIC_SEQ_CST);
        g_stop = 1;
    }
    return NULL;
}

static int usage(void) {
    fprintf(stderr, "usage: twn run --out DIR --input PATH... [--model DIR] [--shards S] [--mode M]"
                    " [--factory F] [--unit-items N] [--gates G] [--workers W] [--engine twn|null]"
                    " [--dim D] [--backend cpu|cuda|auto] [--config FILE] [--section.key value]\n"
                    "  (every key: twn config --defaults)\n");
    return 2;
}

/* All roles share the cores: idle OpenMP threads must sleep, not spin.  With the default
 * (active) policy an engine thread waiting at a barrier, or FAISS' k-means teams in an indexer,
 * spin for up to ~300 ms against whoever has real work.  libgomp reads OMP_WAIT_POLICY once,
 * when it is loaded (before main), so the only way to set it from inside is to run again with
 * it in the environment.  A value the user set is kept. */
static void omp_passive(int argc, char **argv) {
    if (getenv("OMP_WAIT_POLICY")) return;
    setenv("OMP_WAIT_POLICY", "passive", 1);
    char **av = twn_calloc((size_t)argc + 2, sizeof *av);
    av[0] = (char *)"twn";
    for (int i = 0; i < argc; i++) av[i + 1] = argv[i];
    execv("/proc/self/exe", av);
    twn_free(av); /* no /proc: go on with the spinning default */
}

int twn_cmd_run(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return usage();
    omp_passive(argc, argv);
    /* The job config (common/jobconf.h): --config FILE, TWN_* variables, flags; the old flags
     * are its short aliases.  twn run always meets over inproc:// (the endpoints set below). */
    twn_cli_job J;
    int jrc = twn_cli_job_open(&J, "twn run", argc, argv,
                               TWN_CLI_NEED_MODEL | TWN_CLI_NEED_INPUTS | TWN_CLI_NEED_OUT);
    if (jrc) {
        twn_cli_job_close(&J);
        return jrc;
    }
    const twn_conf *conf = &J.conf;
    const char *model_dir = J.model ? conf->job.model : NULL, *out = conf->job.out;
    const char *const *inputs = (const char *const *)conf->job.inputs.v;
    size_t n_in = conf->job.inputs.n;
    int shards = (int)conf->job.shards, gates = (int)conf->gate.count,
        workers = (int)conf->worker.count, dim = J.dim;
    twn_model *model = J.model;
    twn_srcio_cfg io = J.io; /* borrowed: J owns what it points to */
    /* job.out = s3://...: the journal, the shards and the dead letters are staged in the local
     * directory of coordinator.journal; the finished snapshots are uploaded at the end, each
     * shard's manifest last (index/outdir_s3.h). */
    const char *out_uri = NULL;
    char *stage = NULL, stage_dl[4200];
    if (twn_s3_is_uri(out)) {
        if (twn_s3_is_uri(conf->coordinator.journal)) {
            fprintf(stderr,
                    "twn run: job.out is %s: set coordinator.journal to a local file; the "
                    "journal, the shards and the dead letters are staged in its directory\n",
                    out);
            twn_cli_job_close(&J);
            return 2;
        }
        out_uri = out;
        out = stage = twn_path_dirname(conf->coordinator.journal);
        snprintf(stage_dl, sizeof stage_dl, "%s/dead_letter.jsonl", stage);
    }
    mkdir(out, 0755);
    twn_cli_observe obs; /* metrics.listen (status page, /metrics) and log.progress */
    if ((jrc =
             twn_cli_observe_start(&obs, "twn run", conf->metrics.listen, 1, conf->log.progress))) {
        twn_cli_job_close(&J);
        return jrc;
    }
    void *zctx = zmq_ctx_new();
    size_t n_jobs = 1 + (size_t)shards + (size_t)gates + (size_t)workers;
    job *jobs = twn_calloc(n_jobs, sizeof *jobs);
    pthread_t *th = twn_calloc(n_jobs, sizeof *th);
    char **eps = twn_calloc((size_t)shards, sizeof *eps);
    char **ids = twn_calloc(n_jobs, sizeof *ids);
    char **dirs = twn_calloc((size_t)shards, sizeof *dirs);
    const char *control = "inproc://twn-control";
    /* s3.readers > 1: the gates' S3 read-ahead pool, one per process (common/prefetch.h) */
    twn_prefetch *pool = twn_cli_prefetch_open(&J, "twn run");
    io.pool = pool; /* gates and workers: a batch's s3:// images fetched at once */
    twn_coord_cfg cc;
    twn_cli_coord_cfg(&J, &cc);
    cc.zctx = zctx;
    cc.endpoint = control;
    cc.inputs = inputs;
    cc.n_inputs = n_in;
    cc.shards = (uint32_t)shards;
    cc.shard_endpoints = (const char *const *)eps;
    cc.stop = &g_stop;
    cc.expect_peers = (uint32_t)(shards + gates + workers);
    cc.io = &io;
    if (out_uri && twn_s3_is_uri(cc.dead_letter_path)) cc.dead_letter_path = stage_dl;
    jobs[0].kind = 0;
    jobs[0].cc = &cc;
    size_t k = 1;
    for (int s = 0; s < shards; s++, k++) {
        eps[s] = twn_malloc(64);
        snprintf(eps[s], 64, "inproc://twn-shard-%d", s);
        dirs[s] = twn_malloc(strlen(out) + 32);
        sprintf(dirs[s], "%s/shard-%05d", out, s);
        ids[k] = twn_malloc(32);
        snprintf(ids[k], 32, "indexer-%d", s);
        job *j = &jobs[k];
        j->kind = 1;
        twn_cli_indexer_cfg(&J, s, &j->ic);
        j->ic.zctx = zctx;
        j->ic.control = control;
        j->ic.id = ids[k];
        j->ic.endpoint = eps[s];
        j->ic.bind = NULL;
        j->ic.dir = dirs[s];
        j->ic.shard = s;
        j->ic.n_shards = shards;
        j->ic.dim = dim;
        j->ic.model = model_dir ? model_dir : "null";
        j->ic.model_hash = cc.model_hash;
        j->ic.stop = &g_stop;
        j->ic.faiss_threads = 1; /* see twn_faiss_thread_threads */
    }
    for (int g = 0; g < gates + workers; g++, k++) {
        job *j = &jobs[k];
        j->kind = g < gates ? 2 : 3;
        ids[k] = twn_malloc(32);
        snprintf(ids[k], 32, g < gates ? "gate-%d" : "worker-%d", g < gates ? g : g - gates);
        twn_cli_role_cfg(&J, g >= gates, &j->rc);
        j->rc.zctx = zctx;
        j->rc.control = control;
        j->rc.id = ids[k];
        j->rc.model = model;
        j->rc.null_dim = dim;
        j->rc.stop = &g_stop;
        j->rc.io = &io;
        if (g < gates) j->rc.prefetch = pool;
    }
    /* Indexers first (they bind the shard endpoints), then the coordinator, then the rest. */
    for (size_t i = 1; i <= (size_t)shards; i++) pthread_create(&th[i], NULL, job_main, &jobs[i]);
    pthread_create(&th[0], NULL, job_main, &jobs[0]);
    for (size_t i = (size_t)shards + 1; i < n_jobs; i++)
        pthread_create(&th[i], NULL, job_main, &jobs[i]);
    pthread_join(th[0], NULL);
    twn_cli_observe_job_done(&obs);
    if (jobs[0].status) g_stop = 1;
    /* Indexers got Shutdown from the coordinator and finish their outputs; then the job is over
     * for gates and workers too, including any that never got a Welcome (a re-run over a
     * finished journal is done before they connect). */
    for (size_t i = 1; i <= (size_t)shards; i++) pthread_join(th[i], NULL);
    g_stop = 1;
    /* Gates and workers see the stop between messages and inside their send retries
     * (twn_role_send, the shard-credit wait), so the joins below end. */
    for (size_t i = (size_t)shards + 1; i < n_jobs; i++) pthread_join(th[i], NULL);
    twn_prefetch_close(pool);
    /* The first failure is the cause; the roles that failed after it mostly only saw the stop.
     * Each line names its role (most messages already start with it). */
    int status = 0;
    for (int seq = 1; seq <= g_failed; seq++)
        for (size_t i = 0; i < n_jobs; i++) {
            if (!jobs[i].status || jobs[i].seq != seq) continue;
            const char *who = i ? ids[i] : "coordinator", *msg = jobs[i].err.msg;
            size_t n = strlen(who);
            int named = !strncmp(msg, who, n) && msg[n] == ':';
            fprintf(stderr, "twn run: %s%s%s%s\n", seq > 1 ? "then " : "", named ? "" : who,
                    named ? "" : ": ", msg);
            status = 1;
        }
    if (!status) {
        const twn_coord_summary *s = &jobs[0].sum;
        printf("units %llu items %llu easy %llu hard %llu rejected %llu think_tokens %llu seconds "
               "%.3f\n",
               (unsigned long long)s->units, (unsigned long long)s->items,
               (unsigned long long)s->easy, (unsigned long long)s->hard,
               (unsigned long long)s->rejected, (unsigned long long)s->think_tokens, s->seconds);
    }
    if (!status && out_uri) {
        twn_s3 *s3 = NULL;
        twn_err e = {0};
        unsigned long long sent = 0;
        if (twn_s3_open(&io.s3, &s3, &e) ||
            twn_outdir_upload_job(out, shards, s3, out_uri, &sent, &e)) {
            fprintf(stderr, "twn run: uploading %s to %s: %s\n", out, out_uri, e.msg);
            status = 1;
        } else {
            printf("uploaded %llu bytes to %s\n", sent, out_uri);
        }
        twn_s3_close(s3);
    }
    fflush(stdout);
    twn_cli_observe_stop(&obs, (double)conf->metrics.linger_ms / 1000.0, NULL);
    zmq_ctx_term(zctx);
    for (size_t i = 0; i < n_jobs; i++) twn_free(ids[i]);
    for (int s = 0; s < shards; s++) {
        twn_free(eps[s]);
        twn_free(dirs[s]);
    }
    twn_free(ids);
    twn_free(eps);
    twn_free(dirs);
    twn_free(jobs);
    twn_free(th);
    twn_free(stage);
    twn_cli_job_close(&J);
    return status;
}
