/* cmd_roles.c — `twn coordinator|gate|worker|indexer --config FILE [flags]`: one role per process
 * (DESIGN.md §3), the fleet shape of what `twn run` does with threads.
 *
 * Each process reads the same job config (common/jobconf.h) and builds its role's cfg with
 * rolecfg.h, with its own ZeroMQ context over ipc:// or tcp:// (inproc:// cannot cross
 * processes, so it is refused).  SIGINT / SIGTERM set the role's stop flag: the role ends its loop
 * and closes its sockets, and the process exits with 128 + the signal number.
 *
 * Exit status: 0 when the role ended on the coordinator's Shutdown (the coordinator: when every
 * unit is done, after printing the summary line); 1 on a failure; 2 for a bad config.  A gate,
 * worker or indexer that is not welcomed within coordinator.connect_timeout_ms — the coordinator
 * is not running, or the job was over and the coordinator gone before it started — exits 1 with
 * "no Welcome from the coordinator at ENDPOINT within N ms", so no process waits forever. */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "cli/commands.h"
#include "cli/observe.h"
#include "cli/rolecfg.h"
#include "common/prefetch.h"
#include "index/outdir_s3.h"
#include "util/fileio.h"
#include "util/mem.h"
#include "worker/worker.h"

static volatile int g_stop;
static volatile sig_atomic_t g_signal;

static void on_signal(int sig) {
    g_signal = sig;
    g_stop = 1;
}

static void catch_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

typedef enum { ROLE_COORDINATOR, ROLE_GATE, ROLE_WORKER, ROLE_INDEXER } role_kind;

static const char *const role_names[] = {"coordinator", "gate", "worker", "indexer"};

static int usage(const char *role, FILE *f) {
    fprintf(f,
            "usage: twn %s --config FILE [--section.key value ...]\n"
            "  runs the %s role as its own process; the job config's keys, their defaults and the\n"
            "  short flags (--out, --input, --shards, --model, --engine, --shard, ...) are listed\n"
            "  by `twn config --defaults`.  Exit: 0 after the coordinator's Shutdown, 1 failure,\n"
            "  2 bad config.\n",
            role, role);
    return f == stdout ? 0 : 2;
}

static int run_role(role_kind role, int argc, char **argv) {
    char prog[64];
    snprintf(prog, sizeof prog, "twn %s", role_names[role]);
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h"))
            return usage(role_names[role], stdout);
    unsigned needs = role == ROLE_COORDINATOR
                         ? TWN_CLI_NEED_HASH | TWN_CLI_NEED_INPUTS | TWN_CLI_NEED_OUT
                     : role == ROLE_INDEXER ? TWN_CLI_NEED_HASH
                                            : TWN_CLI_NEED_MODEL;
    twn_cli_job j;
    int status = twn_cli_job_open(&j, prog, argc, argv, needs | TWN_CLI_SEPARATE);
    if (status) goto done;
    const twn_conf *c = &j.conf;
    if (role == ROLE_INDEXER && !*c->indexer.dir) {
        fprintf(stderr, "%s: indexer.dir is not set (--out DIR, or indexer.dir)\n", prog);
        status = 2;
        goto done;
    }
    /* job.out = s3://...: the coordinator stages its journal and dead letters in the directory of
     * coordinator.journal, an indexer its shard in indexer.dir (both local); at the end an indexer
     * uploads its shard's final snapshot to <job.out>/shard-NNNNN/ (manifest last) and the
     * coordinator the dead letters to <job.out>/dead_letter.jsonl (index/outdir_s3.h). */
    const char *out_uri = twn_s3_is_uri(c->job.out) ? c->job.out : NULL;
    const char *local_key = role == ROLE_COORDINATOR ? "coordinator.journal"
                            : role == ROLE_INDEXER   ? "indexer.dir"
                                                     : NULL;
    const char *local = role == ROLE_COORDINATOR ? c->coordinator.journal : c->indexer.dir;
    if (out_uri && local_key && twn_s3_is_uri(local)) {
        fprintf(stderr,
                "%s: job.out is %s: set %s to a local %s; the %s is staged there and uploaded "
                "at the end\n",
                prog, out_uri, local_key, role == ROLE_INDEXER ? "directory" : "file",
                role == ROLE_INDEXER ? "shard" : "journal (and the dead letters beside it)");
        status = 2;
        goto done;
    }

    char id[192], host[64] = "";
    gethostname(host, sizeof host - 1);
    if (role == ROLE_INDEXER)
        snprintf(id, sizeof id, "indexer-%lld", (long long)c->indexer.shard);
    else
        snprintf(id, sizeof id, "%s-%s-%ld", role_names[role], host, (long)getpid());
    twn_err err = {{0}};
    int rc = 0;
    catch_signals();
    twn_cli_observe obs; /* metrics.listen: /metrics (+ status page and progress: coordinator) */
    if ((status = twn_cli_observe_start(&obs, prog, c->metrics.listen, role == ROLE_COORDINATOR,
                                        c->log.progress)))
        goto done;
    void *zctx = zmq_ctx_new();
    switch (role) {
    case ROLE_COORDINATOR: {
        twn_coord_cfg cc;
        twn_cli_coord_cfg(&j, &cc);
        cc.zctx = zctx;
        cc.stop = &g_stop;
        twn_coord_summary sum;
        char *stage = out_uri ? twn_path_dirname(c->coordinator.journal) : NULL, stage_dl[4200];
        if (stage) {
            snprintf(stage_dl, sizeof stage_dl, "%s/dead_letter.jsonl", stage);
            if (twn_s3_is_uri(cc.dead_letter_path)) cc.dead_letter_path = stage_dl;
        }
        if (!(rc = twn_mkdirs(stage ? stage : c->job.out, &err)) &&
            !(rc = twn_coord_run(&cc, &sum, &err)))
            twn_cli_print_summary(stdout, &sum);
        if (!rc && stage && cc.dead_letter_path == stage_dl && !access(stage_dl, R_OK)) {
            char uri[4200];
            size_t n = strlen(out_uri);
            snprintf(uri, sizeof uri, "%s%sdead_letter.jsonl", out_uri,
                     n && out_uri[n - 1] == '/' ? "" : "/");
            twn_s3 *s3 = NULL;
            unsigned long long sent = 0;
            if (!(rc = twn_s3_open(&j.io.s3, &s3, &err)) &&
                !(rc = twn_outdir_upload_file(stage_dl, s3, uri, &sent, &err)))
                printf("uploaded %llu bytes to %s\n", sent, uri);
            twn_s3_close(s3);
        }
        twn_free(stage);
        break;
    }
    case ROLE_INDEXER: {
        twn_indexer_cfg ic;
        twn_cli_indexer_cfg(&j, (int)c->indexer.shard, &ic);
        ic.zctx = zctx;
        ic.id = id;
        ic.stop = &g_stop;
        char *parent = twn_path_dirname(c->indexer.dir);
        rc = twn_mkdirs(parent, &err);
        twn_free(parent);
        if (!rc) rc = twn_indexer_run(&ic, &err);
        if (!rc && out_uri && !g_signal) { /* the final snapshot is written: publish it */
            twn_s3 *s3 = NULL;
            unsigned long long sent = 0;
            if (!(rc = twn_s3_open(&j.io.s3, &s3, &err)) &&
                !(rc = twn_outdir_upload_shard(c->indexer.dir, (int)c->indexer.shard, s3, out_uri,
                                               &sent, &err)))
                printf("uploaded %llu bytes to %s%sshard-%05d/\n", sent, out_uri,
                       out_uri[strlen(out_uri) - 1] == '/' ? "" : "/", (int)c->indexer.shard);
            twn_s3_close(s3);
        }
        break;
    }
    default: {
        twn_role_cfg rc_;
        twn_cli_role_cfg(&j, role == ROLE_WORKER, &rc_);
        rc_.zctx = zctx;
        rc_.id = id;
        rc_.stop = &g_stop;
        /* s3.readers > 1: a gate reads the units it holds leases for ahead (common/prefetch.h) */
        twn_prefetch *pool = twn_cli_prefetch_open(&j, prog);
        rc_.prefetch = role == ROLE_GATE ? pool : NULL;
        j.io.pool = pool; /* a batch's s3:// images fetched at once (twn_srcio_fetch_images_n) */
        rc = role == ROLE_GATE ? twn_gate_run(&rc_, &err) : twn_worker_run(&rc_, &err);
        twn_prefetch_close(pool);
        break;
    }
    }
    fflush(stdout);
    twn_cli_observe_stop(&obs, (double)c->metrics.linger_ms / 1000.0, &g_stop);
    zmq_ctx_term(zctx);
    if (g_signal) {
        fprintf(stderr, "%s: stopped by signal %d\n", prog, (int)g_signal);
        status = 128 + (int)g_signal;
    } else if (rc) {
        fprintf(stderr, "%s: %s\n", prog, err.msg);
        status = 1;
    }
done:
    twn_cli_job_close(&j);
    return status;
}

int twn_cmd_coordinator(int argc, char **argv) {
    return run_role(ROLE_COORDINATOR, argc, argv);
}
int twn_cmd_gate(int argc, char **argv) {
    return run_role(ROLE_GATE, argc, argv);
}
int twn_cmd_worker(int argc, char **argv) {
    return run_role(ROLE_WORKER, argc, argv);
}
int twn_cmd_indexer(int argc, char **argv) {
    return run_role(ROLE_INDEXER, argc, argv);
}
