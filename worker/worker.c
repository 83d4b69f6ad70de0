/* worker.c — the reasoning worker loop (worker.h). */
#include "worker/worker.h"

#include <string.h>

#include "gate_service/null_engine.h"
#include "gate_service/role_metrics.h"
#include "util/clock.h"
#include "util/log.h"
#include "util/mem.h"

/* Reads the item `r` names from its store (a ranged read of its bytes, or its Kafka message); 0
 * with *it filled (check it->fault), -1 with msg.  Its images are fetched with the batch's. */
static int read_item(twn_role_conn *c, const Twn__ItemRef *r, twn_src_item *it, twn_err *e) {
    if (twn_role_io(c, e)) return -1;
    return twn_srcio_read_ref(c->io, r, &c->cfg->src, it, e);
}

static int reason_lease(twn_role_conn *c, const Twn__ReasonLease *l, twn_err *err) {
    const twn_role_cfg *cfg = c->cfg;
    size_t n = l->n_items;
    c->active = l->lease_id;
    twn_role_lease_begin(c, l->lease_id, l->deadline_unix_ms, l->lease_ms, l->stall_ms);
    if (twn_role_lease_overdue(c) > 0) /* it waited in our queue past its deadline */
        return twn_role_abandon(c, "reasoning batch", l->batch_id, l->lease_id, err);
    twn_src_item *items = twn_calloc(n + 1, sizeof *items);
    twn_item *in = twn_calloc(n + 1, sizeof *in);
    twn_result *res = twn_calloc(n + 1, sizeof *res);
    int *ok = twn_calloc(n + 1, sizeof *ok);
    size_t *map = twn_calloc(n + 1, sizeof *map);
    const char ***paths = twn_calloc(n + 1, sizeof *paths);
    const void ***datas = twn_calloc(n + 1, sizeof *datas);
    size_t **sizes = twn_calloc(n + 1, sizeof *sizes);
    char **why = twn_calloc(n + 1, sizeof *why);
    float *v = twn_malloc((size_t)c->dim * sizeof *v);
    int rc = 0, m = 0;
    const twn_role_metrics *rm = twn_role_metrics_get();
    double t_stage = twn_now();
    for (size_t i = 0; i < n; i++) {
        twn_err e = {0};
        const Twn__ItemRef *r = l->items[i]->ref;
        if (twn_role_beat(c, err)) { /* reads can wait on a store (a Kafka leader moving) */
            rc = -1;
            break;
        }
        int bad = !r || read_item(c, r, &items[i], &e) || items[i].fault;
        twn_role_lease_alive(c); /* an item read: the lease moves (heartbeats list progress) */
        if (bad) {
            why[i] = twn_strdup(!r               ? "hard item without a ref"
                                : items[i].fault ? items[i].err.msg
                                                 : e.msg);
            continue;
        }
        ok[i] = 1;
    }
    if (!rc && c->io) { /* images by reference: the batch's s3:// images fetched at once */
        twn_err *errs = twn_calloc(n + 1, sizeof *errs);
        if (twn_srcio_fetch_images_n(c->io, items, n, errs))
            for (size_t i = 0; i < n; i++)
                if (ok[i] && errs[i].msg[0]) {
                    ok[i] = 0;
                    why[i] = twn_strdup(errs[i].msg);
                }
        twn_free(errs);
        twn_role_lease_alive(c); /* the images are in: the lease moves */
    }
    for (size_t i = 0; i < n && !rc; i++) {
        if (!ok[i]) continue;
        twn_src_item *it = &items[i];
        twn_item *x = &in[m];
        map[m++] = i;
        x->id = it->id;
        x->text = it->text;
        x->instruction = it->instruction;
        x->p_think = l->items[i]->p_think;
        x->n_images = (int)it->n_images;
        if (it->n_images) {
            paths[i] = twn_calloc(it->n_images, sizeof **paths);
            datas[i] = twn_calloc(it->n_images, sizeof **datas);
            sizes[i] = twn_calloc(it->n_images, sizeof **sizes);
            int mem = it->images[0].data != NULL;
            for (size_t k = 0; k < it->n_images; k++) {
                paths[i][k] = it->images[k].path ? it->images[k].path : it->images[k].member;
                datas[i][k] = it->images[k].data;
                sizes[i][k] = it->images[k].size;
            }
            x->images = paths[i];
            x->image_data = mem ? datas[i] : NULL;
            x->image_size = mem ? sizes[i] : NULL;
        }
    }
    twn_histogram_observe(rm->read, twn_now() - t_stage);
    t_stage = twn_now();
    if (!rc && cfg->model && m) {
        twn_opts o = cfg->opts;
        o.pass = TWN_PASS_REASON;
        rc = twn_embed_items(cfg->model, in, m, &o, res, err);
    } else {
        twn_null_pace(cfg->null_item_us, m);
    }
    if (m) {
        twn_histogram_observe(rm->reason, twn_now() - t_stage);
        twn_histogram_observe(rm->batch_worker, m);
    }
    int late = !rc && twn_role_lease_overdue(c) > 0; /* CoT took past the lease: results are late */
    if (!late) twn_role_lease_alive(c); /* back from the engine (after the check above) */
    for (int j = 0; j < m && !rc && !late; j++) {
        size_t i = map[j];
        const Twn__ItemRef *r = l->items[i]->ref;
        if (!cfg->model) {
            twn_null_vec(items[i].id, c->dim, v);
            rc = twn_role_emb(c, r->unit_id, r->item_index, items[i].id, v, TWN__ROUTE__ROUTE_HARD,
                              l->items[i]->p_think, twn_null_think_tokens(items[i].id), err);
        } else if (res[j].error) {
            rc = twn_role_reject(c, r, TWN__STAGE__STAGE_REASON, res[j].error, err);
        } else {
            rc = twn_role_emb(c, r->unit_id, r->item_index, items[i].id, res[j].embedding,
                              TWN__ROUTE__ROUTE_HARD, res[j].p_think, (uint32_t)res[j].think_tokens,
                              err);
        }
    }
    for (size_t i = 0; i < n && !rc && !late; i++)
        if (!ok[i] && l->items[i]->ref)
            rc = twn_role_reject(c, l->items[i]->ref, TWN__STAGE__STAGE_REASON, why[i], err);
    if (!rc && !late) rc = twn_role_flush(c, 0, err);
    for (int j = 0; j < m; j++)
        if (cfg->model) twn_result_free(&res[j]);
    for (size_t i = 0; i < n; i++) {
        twn_src_item_clear(&items[i]);
        twn_free(paths[i]);
        twn_free(datas[i]);
        twn_free(sizes[i]);
        twn_free(why[i]);
    }
    twn_free(items);
    twn_free(in);
    twn_free(res);
    twn_free(ok);
    twn_free(map);
    twn_free(paths);
    twn_free(datas);
    twn_free(sizes);
    twn_free(why);
    twn_free(v);
    if (!rc && late) return twn_role_abandon(c, "reasoning batch", l->batch_id, l->lease_id, err);
    if (!rc) rc = twn_role_finished(c, l->lease_id, err);
    return rc;
}

static int worker_lease(twn_role_conn *c, const Twn__Envelope *m, twn_err *err) {
    return reason_lease(c, m->reason_lease, err);
}

int twn_worker_run(const twn_role_cfg *cfg, twn_err *err) {
    return twn_role_serve(cfg, TWN__ROLE__ROLE_WORKER, TWN__ENVELOPE__BODY_REASON_LEASE,
                          worker_lease, err);
}
