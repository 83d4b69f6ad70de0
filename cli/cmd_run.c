/* cmd_run.c — `twn run`: coordinator, indexers, gates and workers as threads of one process over
 * inproc:// (DESIGN.md §3, "Embedded default"). */
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <zmq.h>

#include "cli/commands.h"
#include "coordinator/service.h"
#include "index/service.h"
#include "worker/worker.h"
#include "util/mem.h"

typedef struct job {
    int kind; /* 0 coordinator, 1 indexer, 2 gate, 3 worker */
    twn_coord_cfg *cc;
    twn_coord_summary sum;
    twn_indexer_cfg ic;
    twn_role_cfg rc;
    int status;
    twn_err err;
} job;

static volatile int g_stop;

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
    return NULL;
}

static int usage(void) {
    fprintf(stderr, "usage: twn run --out DIR --input PATH... [--model DIR] [--shards S] [--mode M]"
                    " [--factory F] [--unit-items N] [--gates G] [--workers W] [--engine twn|null]"
                    " [--dim D]\n");
    return 2;
}

int twn_cmd_run(int argc, char **argv) {
    const char *model_dir = NULL, *out = NULL, *factory = "Flat", *mode = NULL, *engine = "twn";
    const char **inputs = twn_calloc((size_t)argc + 1, sizeof *inputs);
    size_t n_in = 0;
    int shards = 1, gates = 1, workers = 1, dim = 64;
    long unit_items = 256;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--input") && v) {
            inputs[n_in++] = v;
            i++;
            while (i + 1 < argc && argv[i + 1][0] != '-') inputs[n_in++] = argv[++i];
            continue;
        }
        if (!v) {
            twn_free(inputs);
            return usage();
        }
        i++;
        if (!strcmp(a, "--model"))
            model_dir = v;
        else if (!strcmp(a, "--out"))
            out = v;
        else if (!strcmp(a, "--shards"))
            shards = atoi(v);
        else if (!strcmp(a, "--mode"))
            mode = v;
        else if (!strcmp(a, "--factory"))
            factory = v;
        else if (!strcmp(a, "--unit-items"))
            unit_items = atol(v);
        else if (!strcmp(a, "--gates"))
            gates = atoi(v);
        else if (!strcmp(a, "--workers"))
            workers = atoi(v);
        else if (!strcmp(a, "--engine"))
            engine = v;
        else if (!strcmp(a, "--dim"))
            dim = atoi(v);
        else {
            twn_free(inputs);
            return usage();
        }
    }
    int null_engine = !strcmp(engine, "null");
    if (!out || !n_in || shards < 1 || gates < 1 || workers < 1 || unit_items < 1 ||
        (!null_engine && (strcmp(engine, "twn") || !model_dir))) {
        twn_free(inputs);
        return usage();
    }
    twn_err err = {0};
    twn_model *model = NULL;
    twn_opts opts;
    twn_opts_default(&opts);
    if (mode && twn_mode_parse(mode, &opts, &err)) {
        fprintf(stderr, "twn run: %s\n", err.msg);
        twn_free(inputs);
        return 2;
    }
    if (!null_engine) {
        if (twn_model_load(model_dir, &model, &err)) {
            fprintf(stderr, "twn run: %s\n", err.msg);
            twn_free(inputs);
            return 1;
        }
        dim = twn_model_dim(model);
    }
    mkdir(out, 0755);
    void *zctx = zmq_ctx_new();
    size_t n_jobs = 1 + (size_t)shards + (size_t)gates + (size_t)workers;
    job *jobs = twn_calloc(n_jobs, sizeof *jobs);
    pthread_t *th = twn_calloc(n_jobs, sizeof *th);
    char **eps = twn_calloc((size_t)shards, sizeof *eps);
    char **ids = twn_calloc(n_jobs, sizeof *ids);
    char **dirs = twn_calloc((size_t)shards, sizeof *dirs);
    char journal[4096], dead[4096];
    snprintf(journal, sizeof journal, "%s/journal", out);
    snprintf(dead, sizeof dead, "%s/dead_letter.jsonl", out);
    const char *control = "inproc://twn-control";
    twn_coord_cfg cc;
    twn_coord_cfg_default(&cc);
    cc.zctx = zctx;
    cc.endpoint = control;
    cc.inputs = inputs;
    cc.n_inputs = n_in;
    cc.unit_items = (uint64_t)unit_items;
    cc.journal_path = journal;
    cc.dead_letter_path = dead;
    cc.model_hash = model ? model->man.sha256 : "null";
    cc.shards = (uint32_t)shards;
    cc.shard_endpoints = (const char *const *)eps;
    cc.stop = &g_stop;
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
        twn_indexer_cfg_default(&j->ic);
        j->ic.zctx = zctx;
        j->ic.control = control;
        j->ic.id = ids[k];
        j->ic.endpoint = eps[s];
        j->ic.dir = dirs[s];
        j->ic.shard = s;
        j->ic.n_shards = shards;
        j->ic.dim = dim;
        j->ic.factory = factory;
        j->ic.model = model_dir ? model_dir : "null";
        j->ic.model_hash = cc.model_hash;
        j->ic.stop = &g_stop;
    }
    for (int g = 0; g < gates + workers; g++, k++) {
        job *j = &jobs[k];
        j->kind = g < gates ? 2 : 3;
        ids[k] = twn_malloc(32);
        snprintf(ids[k], 32, g < gates ? "gate-%d" : "worker-%d", g < gates ? g : g - gates);
        twn_role_cfg_default(&j->rc);
        j->rc.zctx = zctx;
        j->rc.control = control;
        j->rc.id = ids[k];
        j->rc.model = model;
        j->rc.null_dim = dim;
        j->rc.opts = opts;
        j->rc.stop = &g_stop;
    }
    /* Indexers first (they bind the shard endpoints), then the coordinator, then the rest. */
    for (size_t i = 1; i <= (size_t)shards; i++) pthread_create(&th[i], NULL, job_main, &jobs[i]);
    pthread_create(&th[0], NULL, job_main, &jobs[0]);
    for (size_t i = (size_t)shards + 1; i < n_jobs; i++)
        pthread_create(&th[i], NULL, job_main, &jobs[i]);
    pthread_join(th[0], NULL);
    if (jobs[0].status) g_stop = 1;
    /* Indexers got Shutdown from the coordinator and finish their outputs; then the job is over
     * for gates and workers too, including any that never got a Welcome (a re-run over a
     * finished journal is done before they connect). */
    for (size_t i = 1; i <= (size_t)shards; i++) pthread_join(th[i], NULL);
    g_stop = 1;
    for (size_t i = (size_t)shards + 1; i < n_jobs; i++) pthread_join(th[i], NULL);
    int status = 0;
    for (size_t i = 0; i < n_jobs; i++) {
        if (jobs[i].status) {
            fprintf(stderr, "twn run: %s\n", jobs[i].err.msg);
            status = 1;
        }
    }
    if (!status) {
        const twn_coord_summary *s = &jobs[0].sum;
        printf("units %llu items %llu easy %llu hard %llu rejected %llu think_tokens %llu seconds "
               "%.3f\n",
               (unsigned long long)s->units, (unsigned long long)s->items,
               (unsigned long long)s->easy, (unsigned long long)s->hard,
               (unsigned long long)s->rejected, (unsigned long long)s->think_tokens, s->seconds);
    }
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
    twn_free(inputs);
    if (model) twn_model_free(model);
    return status;
}
