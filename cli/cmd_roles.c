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
        if (!(rc = twn_mkdirs(c->job.out, &err)) && !(rc = twn_coord_run(&cc, &sum, &err)))
            twn_cli_print_summary(stdout, &sum);
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
        break;
    }
    default: {
        twn_role_cfg rc_;
        twn_cli_role_cfg(&j, role == ROLE_WORKER, &rc_);
        rc_.zctx = zctx;
        rc_.id = id;
        rc_.stop = &g_stop;
        rc = role == ROLE_GATE ? twn_gate_run(&rc_, &err) : twn_worker_run(&rc_, &err);
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
