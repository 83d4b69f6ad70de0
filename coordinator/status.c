/* status.c — /status.json and the status page routes (status.h). */
#include "coordinator/status.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "util/mem.h"

static double get(twn_metrics *m, const char *name, const char *labels) {
    double v = 0;
    twn_metrics_get(m, name, labels, &v);
    return v;
}

typedef struct shard_count {
    long shard;
    double acked;
} shard_count;

typedef struct shard_list {
    shard_count *v;
    size_t n, cap;
} shard_list;

static void visit_shard(void *ctx, const char *labels, double value) {
    shard_list *l = ctx;
    const char *p = strstr(labels, "shard=");
    if (!p) return;
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 16;
        l->v = twn_realloc(l->v, l->cap * sizeof *l->v);
    }
    l->v[l->n++] = (shard_count){strtol(p + 6, NULL, 10), value};
}

static int shard_cmp(const void *a, const void *b) {
    long x = ((const shard_count *)a)->shard, y = ((const shard_count *)b)->shard;
    return x < y ? -1 : x > y;
}

/* Sets key to a number (twn_json_number) in object o. */
static void num(json_t *o, const char *key, double v) {
    json_object_set_new(o, key, twn_json_number(v));
}

void twn_status_json(twn_metrics *m, twn_str *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    double now = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    double start = get(m, "twn_job_start_time_seconds", NULL);
    double easy = get(m, "twn_items_total", "route=easy");
    double hard = get(m, "twn_items_total", "route=hard");
    double rej = get(m, "twn_items_total", "route=rejected");
    double total = get(m, "twn_job_items", NULL), done_items = easy + hard + rej;
    double units_done = get(m, "twn_job_units", "state=done");
    double units_total = get(m, "twn_job_units", "state=total");
    double rate = get(m, "twn_items_per_second", NULL);
    int done = units_total > 0 && units_done >= units_total;
    double eta = done ? 0 : rate > 0 && total >= done_items ? (total - done_items) / rate : NAN;
    double end = get(m, "twn_job_end_time_seconds", NULL);

    json_t *j = json_object(), *units = json_object(), *items = json_object();
    json_t *queues = json_object(), *leases = json_object(), *shards = json_array();
    num(j, "version", 1);
    json_object_set_new(j, "time", json_real(now));
    num(j, "start_time", start);
    num(j, "elapsed_s", start <= 0 ? 0 : (done && end > 0 ? end : now) - start);
    json_object_set_new(j, "done", json_boolean(done));
    num(units, "done", units_done);
    num(units, "total", units_total);
    json_object_set_new(j, "units", units);
    num(items, "total", total);
    num(items, "done", done_items);
    num(items, "easy", easy);
    num(items, "hard", hard);
    num(items, "rejected", rej);
    json_object_set_new(j, "items", items);
    num(j, "rate", rate);
    num(j, "eta_s", eta);
    num(j, "think_tokens", get(m, "twn_think_tokens_total", NULL));
    num(j, "tokens_saved", get(m, "twn_think_tokens_saved", NULL));
    num(j, "dead_letters", twn_metrics_sum(m, "twn_dead_letters_total"));
    num(queues, "units", get(m, "twn_queue_depth", "queue=units"));
    num(queues, "hard", get(m, "twn_queue_depth", "queue=hard"));
    json_object_set_new(j, "queues", queues);
    num(leases, "active_unit", get(m, "twn_leases_active", "lease=unit"));
    num(leases, "active_hard", get(m, "twn_leases_active", "lease=hard"));
    num(leases, "expired_unit", get(m, "twn_lease_expiries_total", "lease=unit"));
    num(leases, "expired_hard", get(m, "twn_lease_expiries_total", "lease=hard"));
    json_object_set_new(j, "leases", leases);
    shard_list sl = {0};
    twn_metrics_foreach(m, "twn_shard_acked_items_total", visit_shard, &sl);
    if (sl.n) qsort(sl.v, sl.n, sizeof *sl.v, shard_cmp);
    for (size_t i = 0; i < sl.n; i++) {
        json_t *o = json_object();
        num(o, "shard", (double)sl.v[i].shard);
        num(o, "acked", sl.v[i].acked);
        json_array_append_new(shards, o);
    }
    twn_free(sl.v);
    json_object_set_new(j, "shards", shards);
    json_object_set_new(j, "metrics", twn_metrics_json(m));
    twn_json_append(out, j);
}

static int page_handler(void *ctx, const char *path, twn_str *body, const char **type) {
    twn_str_append(body, (const char *)twn_status_page_html, twn_status_page_html_len);
    return 200;
}

static int json_handler(void *ctx, const char *path, twn_str *body, const char **type) {
    twn_status_json(ctx, body);
    return 200;
}

int twn_status_http_start(const char *listen, twn_metrics *m, twn_http **out, twn_err *err) {
    const twn_http_route routes[] = {
        {"/", "text/html; charset=utf-8", page_handler, NULL},
        {"/index.html", "text/html; charset=utf-8", page_handler, NULL},
        {"/status.json", "application/json", json_handler, m},
    };
    return twn_metrics_http_start(listen, m, routes, sizeof routes / sizeof *routes, out, err);
}
