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

/* A JSON number: integers exactly, large values to the millisecond, others with 6 significant
 * digits; null when not finite. */
static void num(twn_str *out, const char *key, double v) {
    if (key) twn_str_printf(out, "\"%s\":", key);
    if (!isfinite(v))
        twn_str_puts(out, "null");
    else if (v == (double)(long long)v)
        twn_str_printf(out, "%lld", (long long)v);
    else if (fabs(v) >= 1e5)
        twn_str_printf(out, "%.3f", v); /* unix times, large rates */
    else
        twn_str_printf(out, "%.6g", v);
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

    twn_str_puts(out, "{\"version\":1,");
    twn_str_printf(out, "\"time\":%.3f,", now);
    num(out, "start_time", start);
    twn_str_puts(out, ",");
    double end = get(m, "twn_job_end_time_seconds", NULL);
    num(out, "elapsed_s", start <= 0 ? 0 : (done && end > 0 ? end : now) - start);
    twn_str_printf(out, ",\"done\":%s,\"units\":{", done ? "true" : "false");
    num(out, "done", units_done);
    twn_str_puts(out, ",");
    num(out, "total", units_total);
    twn_str_puts(out, "},\"items\":{");
    num(out, "total", total);
    twn_str_puts(out, ",");
    num(out, "done", done_items);
    twn_str_puts(out, ",");
    num(out, "easy", easy);
    twn_str_puts(out, ",");
    num(out, "hard", hard);
    twn_str_puts(out, ",");
    num(out, "rejected", rej);
    twn_str_puts(out, "},");
    num(out, "rate", rate);
    twn_str_puts(out, ",");
    num(out, "eta_s", eta);
    twn_str_puts(out, ",");
    num(out, "think_tokens", get(m, "twn_think_tokens_total", NULL));
    twn_str_puts(out, ",");
    num(out, "tokens_saved", get(m, "twn_think_tokens_saved", NULL));
    twn_str_puts(out, ",");
    num(out, "dead_letters", twn_metrics_sum(m, "twn_dead_letters_total"));
    twn_str_puts(out, ",\"queues\":{");
    num(out, "units", get(m, "twn_queue_depth", "queue=units"));
    twn_str_puts(out, ",");
    num(out, "hard", get(m, "twn_queue_depth", "queue=hard"));
    twn_str_puts(out, "},\"leases\":{");
    num(out, "active_unit", get(m, "twn_leases_active", "lease=unit"));
    twn_str_puts(out, ",");
    num(out, "active_hard", get(m, "twn_leases_active", "lease=hard"));
    twn_str_puts(out, ",");
    num(out, "expired_unit", get(m, "twn_lease_expiries_total", "lease=unit"));
    twn_str_puts(out, ",");
    num(out, "expired_hard", get(m, "twn_lease_expiries_total", "lease=hard"));
    twn_str_puts(out, "},\"shards\":[");
    shard_list sl = {0};
    twn_metrics_foreach(m, "twn_shard_acked_items_total", visit_shard, &sl);
    if (sl.n) qsort(sl.v, sl.n, sizeof *sl.v, shard_cmp);
    for (size_t i = 0; i < sl.n; i++) {
        twn_str_printf(out, "%s{\"shard\":%ld,", i ? "," : "", sl.v[i].shard);
        num(out, "acked", sl.v[i].acked);
        twn_str_puts(out, "}");
    }
    twn_free(sl.v);
    twn_str_puts(out, "],\"metrics\":");
    twn_metrics_render_json(m, out);
    twn_str_puts(out, "}");
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
