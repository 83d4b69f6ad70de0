/* rolecfg.c — job configuration -> role configurations (rolecfg.h). */
#include "cli/rolecfg.h"

#include <string.h>

#include "cli/backend_opt.h"
#include "common/prefetch.h"
#include "engine/config.h"
#include "engine/manifest.h"
#include "util/fileio.h"
#include "util/log.h"
#include "util/mem.h"

extern char **environ;

/* The manifest hash and the text model's hidden size, without reading any weights. */
static int model_meta(twn_cli_job *j, twn_err *err) {
    twn_manifest m;
    if (twn_manifest_load(j->conf.job.model, &m, err)) return -1;
    snprintf(j->model_hash, sizeof j->model_hash, "%s", m.sha256);
    char *p = twn_path_join(m.base_dir, "config.json");
    twn_config mc;
    int rc = twn_config_load(p, &mc, err);
    if (!rc) j->dim = mc.text.hidden_size;
    twn_free(p);
    twn_manifest_free(&m);
    return rc;
}

/* An endpoint another process must reach: inproc:// names live inside one process. */
static int cross_process(const char *prog, const twn_conf *c, const char *key, const char *ep) {
    if (strncmp(ep, "inproc://", 9)) return 0;
    const twn_conf_key *k = twn_conf_find(key);
    fprintf(stderr,
            "%s: config: %s = \"%s\" (%s): a separate process needs an ipc:// or tcp:// "
            "endpoint\n",
            prog, key, ep, c->origin[k - twn_conf_key_at(0)]);
    return 2;
}

int twn_cli_job_open(twn_cli_job *j, const char *prog, int argc, char **argv, unsigned needs) {
    memset(j, 0, sizeof *j);
    twn_srcio_cfg_default(&j->io);
    twn_opts_default(&j->opts);
    twn_err err = {{0}};
    twn_conf *c = &j->conf;
    if (twn_conf_load(c, argc, argv, (const char *const *)environ, &err)) {
        fprintf(stderr, "%s: %s\n", prog, err.msg);
        return 2;
    }
    static const char *levels[] = {"debug", "info", "warn", "error"};
    for (int i = 0; i < 4; i++)
        if (!strcmp(c->log.level, levels[i])) twn_log_set_level((twn_log_level)i);
    twn_log_set_json(!strcmp(c->log.format, "json"));
    int null_engine = !strcmp(c->job.engine, "null");
    if (needs & TWN_CLI_SEPARATE) {
        int rc = cross_process(prog, c, "coordinator.listen", c->coordinator.listen);
        if (!rc) rc = cross_process(prog, c, "coordinator.connect", c->coordinator.connect);
        for (size_t s = 0; !rc && s < c->indexer.endpoints.n; s++)
            rc = cross_process(prog, c, "indexer.endpoints", c->indexer.endpoints.v[s]);
        if (rc) return rc;
    }
    if ((needs & TWN_CLI_NEED_OUT) && !*c->job.out) {
        fprintf(stderr, "%s: job.out is not set (--out DIR, or job.out in --config FILE)\n", prog);
        return 2;
    }
    if ((needs & TWN_CLI_NEED_INPUTS) && !c->job.inputs.n) {
        fprintf(stderr,
                "%s: job.inputs is empty (--input PATH..., or job.inputs in --config FILE)\n",
                prog);
        return 2;
    }
    if ((needs & (TWN_CLI_NEED_MODEL | TWN_CLI_NEED_HASH)) && !null_engine && !*c->job.model) {
        fprintf(stderr,
                "%s: job.model is not set: job.engine = twn needs a checkpoint (--model DIR), or "
                "use --engine null\n",
                prog);
        return 2;
    }
    if (twn_mode_parse(c->job.mode, &j->opts, &err)) {
        fprintf(stderr, "%s: %s\n", prog, err.msg);
        return 2;
    }
    if (twn_srcio_cfg_from_conf(&j->io, c, &err)) {
        fprintf(stderr, "%s: %s\n", prog, err.msg);
        return 2;
    }
    if (c->security.curve) {
        twn_curve_files f = {c->security.server_secret_key_file, c->security.server_public_key_file,
                             c->security.client_secret_key_file, c->security.client_public_key_file,
                             c->security.allowed_clients_file};
        if (twn_curve_load(&j->curve, &f, &err)) {
            fprintf(stderr, "%s: %s\n", prog, err.msg);
            return 1;
        }
        j->has_curve = 1;
    }
    snprintf(j->model_hash, sizeof j->model_hash, "null");
    j->dim = (int)c->job.dim;
    if (null_engine) return 0;
    if (needs & TWN_CLI_NEED_MODEL) {
        twn_backend_opts bo;
        int brc = twn_cli_backend_check(prog, c->job.backend, 0, &bo);
        if (brc) return brc;
        if (twn_model_load(c->job.model, &j->model, &err)) {
            fprintf(stderr, "%s: %s\n", prog, err.msg);
            return 1;
        }
        if (twn_cli_backend_apply(prog, j->model, &bo, false)) return 1;
        snprintf(j->model_hash, sizeof j->model_hash, "%s", j->model->man.sha256);
        j->dim = twn_model_dim(j->model);
    } else if ((needs & TWN_CLI_NEED_HASH) && model_meta(j, &err)) {
        fprintf(stderr, "%s: %s\n", prog, err.msg);
        return 1;
    }
    return 0;
}

void twn_cli_job_close(twn_cli_job *j) {
    if (j->model) twn_model_free(j->model);
    if (j->has_curve) twn_curve_free(&j->curve);
    twn_srcio_cfg_free(&j->io);
    twn_conf_free(&j->conf);
    memset(j, 0, sizeof *j);
}

void twn_cli_coord_cfg(const twn_cli_job *j, twn_coord_cfg *cc) {
    const twn_conf *c = &j->conf;
    twn_coord_cfg_default(cc);
    cc->endpoint = c->coordinator.listen;
    cc->inputs = (const char *const *)c->job.inputs.v;
    cc->n_inputs = c->job.inputs.n;
    cc->unit_items = (uint64_t)c->job.unit_items;
    cc->streaming = c->kafka.streaming;
    cc->stream_max_units = (size_t)c->kafka.stream_max_units;
    cc->cs.journal_compact_bytes = (uint64_t)c->coordinator.journal_compact_bytes;
    cc->journal_path = c->coordinator.journal;
    cc->dead_letter_path = c->job.dead_letter;
    cc->model_hash = j->model_hash;
    cc->shards = (uint32_t)c->job.shards;
    cc->shard_endpoints = (const char *const *)c->indexer.endpoints.v;
    cc->heartbeat_s = (double)c->coordinator.heartbeat_ms / 1000.0;
    cc->missed_beats = (uint32_t)c->coordinator.missed_beats;
    cc->hard_batch = (uint32_t)c->coordinator.hard_batch;
    cc->cs.hard_batch = cc->hard_batch;
    cc->cs.unit_lease.lease_s = (double)c->coordinator.lease_ms / 1000.0;
    cc->cs.hard_lease.lease_s = cc->cs.unit_lease.lease_s;
    cc->cs.unit_lease.ack_timeout_s = (double)c->coordinator.ack_timeout_ms / 1000.0;
    cc->cs.hard_lease.ack_timeout_s = cc->cs.unit_lease.ack_timeout_s;
    cc->cs.unit_lease.stall_s = (double)c->coordinator.stall_ms / 1000.0;
    cc->cs.hard_lease.stall_s = cc->cs.unit_lease.stall_s;
    /* the lease pools judge silence by the same beat the peers are told to keep */
    cc->cs.unit_lease.heartbeat_s = cc->cs.hard_lease.heartbeat_s = cc->heartbeat_s;
    cc->cs.unit_lease.missed_heartbeats = cc->cs.hard_lease.missed_heartbeats = cc->missed_beats;
    cc->io = &j->io;
    cc->curve = j->has_curve ? &j->curve : NULL;
    cc->max_message_bytes = (size_t)c->limits.max_message_bytes;
    cc->compress = c->limits.compress;
}

void twn_cli_role_cfg(const twn_cli_job *j, int worker, twn_role_cfg *rc) {
    const twn_conf *c = &j->conf;
    twn_role_cfg_default(rc);
    rc->control = c->coordinator.connect;
    rc->credits = (uint32_t)(worker ? c->worker.credits : c->gate.credits);
    rc->batch = (int)(worker ? c->worker.batch : c->gate.batch);
    rc->model = j->model;
    rc->null_dim = (int)c->job.dim;
    rc->null_item_us = (int)c->job.null_item_us;
    rc->opts = j->opts;
    rc->src.max_item_bytes = (size_t)c->limits.max_item_bytes;
    rc->io = &j->io;
    rc->curve = j->has_curve ? &j->curve : NULL;
    rc->max_message_bytes = (size_t)c->limits.max_message_bytes;
    rc->compress = c->limits.compress;
    rc->connect_timeout_s = (double)c->coordinator.connect_timeout_ms / 1000.0;
    rc->shard_credits = (int)c->indexer.credits; /* each side queues this many (gate.h) */
}

struct twn_prefetch *twn_cli_prefetch_open(const twn_cli_job *j, const char *prog) {
    const twn_conf *c = &j->conf;
    /* whatever the inputs: items of local or Kafka inputs may name s3:// images too; the readers
     * open their clients on their first job, so an idle pool needs no credentials */
    if (c->s3.readers <= 1) return NULL;
    twn_prefetch *pool = NULL;
    twn_err err = {{0}};
    if (twn_prefetch_open(&j->io.s3, (int)c->s3.readers, 0, &pool, &err)) {
        twn_log(TWN_LOG_WARN, "%s: no S3 read-ahead: %s", prog, err.msg);
        return NULL;
    }
    return pool;
}

void twn_cli_indexer_cfg(const twn_cli_job *j, int shard, twn_indexer_cfg *ic) {
    const twn_conf *c = &j->conf;
    twn_indexer_cfg_default(ic);
    ic->control = c->coordinator.connect;
    ic->endpoint = (size_t)shard < c->indexer.endpoints.n ? c->indexer.endpoints.v[shard] : NULL;
    /* indexer.listen is the bind of the shard a twn indexer process serves (indexer.shard) */
    ic->bind = shard == c->indexer.shard ? c->indexer.listen : NULL;
    ic->dir = c->indexer.dir;
    ic->shard = shard;
    ic->n_shards = (int)c->job.shards;
    ic->dim = j->dim;
    ic->factory = c->job.factory;
    ic->model = *c->job.model ? c->job.model : "null";
    ic->model_hash = j->model_hash;
    ic->commit_ms = (double)c->indexer.commit_ms;
    ic->credits = (int)c->indexer.credits;
    ic->curve = j->has_curve ? &j->curve : NULL;
    ic->max_message_bytes = (size_t)c->limits.max_message_bytes;
    ic->compress = c->limits.compress;
    ic->connect_timeout_s = (double)c->coordinator.connect_timeout_ms / 1000.0;
    ic->out_topic = c->kafka.output_topic;
    ic->out_brokers = j->io.kafka.brokers;
    ic->out_props = j->io.kafka.props;
}

void twn_cli_print_summary(FILE *f, const twn_coord_summary *s) {
    fprintf(f,
            "units %llu items %llu easy %llu hard %llu rejected %llu think_tokens %llu seconds "
            "%.3f\n",
            (unsigned long long)s->units, (unsigned long long)s->items, (unsigned long long)s->easy,
            (unsigned long long)s->hard, (unsigned long long)s->rejected,
            (unsigned long long)s->think_tokens, s->seconds);
}
