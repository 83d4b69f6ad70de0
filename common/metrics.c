/* metrics.c — the metrics registry and its Prometheus / JSON renderings (metrics.h).
 *
 * The registry is a list of families, each a list of series; both only grow, and a series never
 * moves, so a handle stays valid for the registry's life.  The mutex guards the lists (lookup,
 * creation, rendering); values are atomics that writers update without it.  Doubles (gauges,
 * histogram sums) live in a uint64 as their bit pattern and are updated with compare-and-swap. */
#include "common/metrics.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/mem.h"

const double twn_buckets_seconds[14] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                        0.1,    0.25,  0.5,    1,     2.5,  10,    60};
const double twn_buckets_batch[11] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024};
const double twn_buckets_p[10] = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0};

typedef struct series {
    char *labels;        /* as given: "k=v,k=v" ("" for none) */
    char **keys, **vals; /* parsed */
    size_t n_labels;
    _Atomic uint64_t u;        /* counter value */
    _Atomic uint64_t bits;     /* gauge value / histogram sum, as the bits of a double */
    _Atomic uint64_t *buckets; /* histogram: n_bounds + 1 per-bucket (not cumulative) counts */
    size_t n_buckets;
    const double *bounds;
    struct series *next;
} series;

typedef struct family {
    char *name, *help;
    twn_metric_type type;
    double *bounds;
    size_t n_bounds;
    series *first, *last;
    size_t n_series;
    struct family *next;
} family;

struct twn_metrics {
    pthread_mutex_t mu;
    family *first, *last;
    size_t n_families;
};

twn_metrics *twn_metrics_new(void) {
    twn_metrics *m = twn_calloc(1, sizeof *m);
    pthread_mutex_init(&m->mu, NULL);
    return m;
}

static void series_free(series *s) {
    for (size_t i = 0; i < s->n_labels; i++) {
        twn_free(s->keys[i]);
        twn_free(s->vals[i]);
    }
    twn_free(s->keys);
    twn_free(s->vals);
    twn_free(s->labels);
    twn_free((void *)s->buckets);
    twn_free(s);
}

void twn_metrics_free(twn_metrics *m) {
    if (!m) return;
    for (family *f = m->first, *fn; f; f = fn) {
        fn = f->next;
        for (series *s = f->first, *sn; s; s = sn) {
            sn = s->next;
            series_free(s);
        }
        twn_free(f->name);
        twn_free(f->help);
        twn_free(f->bounds);
        twn_free(f);
    }
    pthread_mutex_destroy(&m->mu);
    twn_free(m);
}

static twn_metrics *g_default;
static pthread_once_t g_default_once = PTHREAD_ONCE_INIT;
static void default_init(void) {
    g_default = twn_metrics_new();
}

twn_metrics *twn_metrics_default(void) {
    pthread_once(&g_default_once, default_init);
    return g_default;
}

// ------------------------------------------------------------------------------------------------
// Names and labels

static const char *type_name(twn_metric_type t) {
    return t == TWN_METRIC_COUNTER ? "counter" : t == TWN_METRIC_GAUGE ? "gauge" : "histogram";
}

static int name_ok(const char *s, int colon) {
    if (!s || !*s || (*s >= '0' && *s <= '9')) return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '_' || (colon && *s == ':')))
            return 0;
    return 1;
}

/* Parses "k=v,k=v" into s->keys / s->vals. */
static int parse_labels(series *s, const char *name, const char *labels, int histogram,
                        twn_err *err) {
    if (!*labels) return 0;
    size_t n = 1;
    for (const char *p = labels; *p; p++) n += *p == ',';
    s->keys = twn_calloc(n, sizeof *s->keys);
    s->vals = twn_calloc(n, sizeof *s->vals);
    const char *p = labels;
    for (size_t i = 0; i < n; i++) {
        const char *end = strchr(p, ',');
        if (!end) end = p + strlen(p);
        const char *eq = memchr(p, '=', (size_t)(end - p));
        if (!eq)
            return twn_err_set(err, "metric %s: label \"%.*s\" in \"%s\": expected key=value", name,
                               (int)(end - p), p, labels);
        s->keys[i] = twn_strndup(p, (size_t)(eq - p));
        s->vals[i] = twn_strndup(eq + 1, (size_t)(end - eq - 1));
        s->n_labels = i + 1;
        if (!name_ok(s->keys[i], 0) || !strncmp(s->keys[i], "__", 2) ||
            (histogram && !strcmp(s->keys[i], "le")))
            return twn_err_set(err,
                               "metric %s: label name \"%s\": expected [a-zA-Z_][a-zA-Z0-9_]*, "
                               "not starting with __%s",
                               name, s->keys[i],
                               histogram ? ", and not \"le\" on a histogram" : "");
        for (size_t k = 0; k < i; k++)
            if (!strcmp(s->keys[k], s->keys[i]))
                return twn_err_set(err, "metric %s: label \"%s\" appears twice in \"%s\"", name,
                                   s->keys[i], labels);
        p = end + 1;
    }
    return 0;
}

// ------------------------------------------------------------------------------------------------
// Get-or-create

static series *get(twn_metrics *m, const char *name, const char *help, const char *labels,
                   twn_metric_type type, const double *bounds, size_t n_bounds, twn_err *err) {
    if (!m) return NULL;
    if (!labels) labels = "";
    if (!name_ok(name, 1) || strncmp(name, "twn_", 4)) {
        twn_err_set(err, "metric name \"%s\": expected twn_ followed by [a-zA-Z0-9_:]",
                    name ? name : "(null)");
        return NULL;
    }
    if (type == TWN_METRIC_HISTOGRAM) {
        for (size_t i = 0; i < n_bounds; i++)
            if (!isfinite(bounds[i]) || (i && bounds[i] <= bounds[i - 1])) {
                twn_err_set(err,
                            "metric %s: bucket bound %zu is %g: expected finite and strictly "
                            "increasing bounds",
                            name, i, bounds[i]);
                return NULL;
            }
    }
    series *out = NULL;
    pthread_mutex_lock(&m->mu);
    family *f = m->first;
    while (f && strcmp(f->name, name)) f = f->next;
    if (f && f->type != type) {
        twn_err_set(err, "metric %s is a %s, not a %s", name, type_name(f->type), type_name(type));
        goto out;
    }
    if (f && type == TWN_METRIC_HISTOGRAM &&
        (f->n_bounds != n_bounds || memcmp(f->bounds, bounds, n_bounds * sizeof *bounds))) {
        twn_err_set(err, "metric %s: histogram already registered with other buckets", name);
        goto out;
    }
    if (f) {
        for (series *s = f->first; s; s = s->next)
            if (!strcmp(s->labels, labels)) {
                out = s;
                goto out;
            }
    }
    series *s = twn_calloc(1, sizeof *s);
    s->labels = twn_strdup(labels);
    if (parse_labels(s, name, labels, type == TWN_METRIC_HISTOGRAM, err)) {
        series_free(s);
        goto out;
    }
    if (!f) {
        f = twn_calloc(1, sizeof *f);
        f->name = twn_strdup(name);
        f->help = twn_strdup(help ? help : "");
        f->type = type;
        if (type == TWN_METRIC_HISTOGRAM) {
            f->bounds = twn_calloc(n_bounds + 1, sizeof *f->bounds);
            if (n_bounds) memcpy(f->bounds, bounds, n_bounds * sizeof *bounds);
            f->n_bounds = n_bounds;
        }
        if (m->last)
            m->last->next = f;
        else
            m->first = f;
        m->last = f;
        m->n_families++;
    }
    if (type == TWN_METRIC_HISTOGRAM) {
        s->n_buckets = f->n_bounds + 1;
        s->buckets = twn_calloc(s->n_buckets, sizeof *s->buckets);
        s->bounds = f->bounds;
    }
    if (f->last)
        f->last->next = s;
    else
        f->first = s;
    f->last = s;
    f->n_series++;
    out = s;
out:
    pthread_mutex_unlock(&m->mu);
    return out;
}

twn_counter *twn_metrics_counter(twn_metrics *m, const char *name, const char *help,
                                 const char *labels, twn_err *err) {
    return (twn_counter *)get(m, name, help, labels, TWN_METRIC_COUNTER, NULL, 0, err);
}

twn_gauge *twn_metrics_gauge(twn_metrics *m, const char *name, const char *help, const char *labels,
                             twn_err *err) {
    return (twn_gauge *)get(m, name, help, labels, TWN_METRIC_GAUGE, NULL, 0, err);
}

twn_histogram *twn_metrics_histogram(twn_metrics *m, const char *name, const char *help,
                                     const char *labels, const double *bounds, size_t n_bounds,
                                     twn_err *err) {
    return (twn_histogram *)get(m, name, help, labels, TWN_METRIC_HISTOGRAM, bounds, n_bounds, err);
}

// ------------------------------------------------------------------------------------------------
// Updates

static double bits_to_d(uint64_t b) {
    double d;
    memcpy(&d, &b, sizeof d);
    return d;
}

static uint64_t d_to_bits(double d) {
    uint64_t b;
    memcpy(&b, &d, sizeof b);
    return b;
}

static void atomic_add_double(_Atomic uint64_t *a, double d) {
    uint64_t old = atomic_load_explicit(a, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(a, &old, d_to_bits(bits_to_d(old) + d),
                                                  memory_order_relaxed, memory_order_relaxed)) {
    }
}

void twn_counter_add(twn_counter *c, uint64_t n) {
    if (c) atomic_fetch_add_explicit(&((series *)c)->u, n, memory_order_relaxed);
}

void twn_gauge_set(twn_gauge *g, double v) {
    if (g) atomic_store_explicit(&((series *)g)->bits, d_to_bits(v), memory_order_relaxed);
}

void twn_gauge_add(twn_gauge *g, double d) {
    if (g) atomic_add_double(&((series *)g)->bits, d);
}

void twn_histogram_observe(twn_histogram *h, double v) {
    if (!h) return;
    series *s = (series *)h;
    size_t b = 0;
    while (b + 1 < s->n_buckets && !(v <= s->bounds[b])) b++; /* NaN lands in +Inf */
    atomic_fetch_add_explicit(&s->buckets[b], 1, memory_order_relaxed);
    atomic_add_double(&s->bits, v);
}

uint64_t twn_counter_value(const twn_counter *c) {
    return c ? atomic_load_explicit(&((series *)c)->u, memory_order_relaxed) : 0;
}

double twn_gauge_value(const twn_gauge *g) {
    return g ? bits_to_d(atomic_load_explicit(&((series *)g)->bits, memory_order_relaxed)) : 0;
}

static uint64_t hist_count(const series *s) {
    uint64_t n = 0;
    for (size_t i = 0; i < s->n_buckets; i++)
        n += atomic_load_explicit(&s->buckets[i], memory_order_relaxed);
    return n;
}

static double series_value(const family *f, const series *s) {
    switch (f->type) {
    case TWN_METRIC_COUNTER:
        return (double)twn_counter_value((const twn_counter *)s);
    case TWN_METRIC_GAUGE:
        return twn_gauge_value((const twn_gauge *)s);
    default:
        return (double)hist_count(s);
    }
}

int twn_metrics_get(twn_metrics *m, const char *name, const char *labels, double *v) {
    if (!m) return -1;
    if (!labels) labels = "";
    int rc = -1;
    pthread_mutex_lock(&m->mu);
    for (family *f = m->first; f && rc; f = f->next) {
        if (strcmp(f->name, name)) continue;
        for (series *s = f->first; s; s = s->next)
            if (!strcmp(s->labels, labels)) {
                *v = series_value(f, s);
                rc = 0;
                break;
            }
        break;
    }
    pthread_mutex_unlock(&m->mu);
    return rc;
}

double twn_metrics_sum(twn_metrics *m, const char *name) {
    if (!m) return 0;
    double sum = 0;
    pthread_mutex_lock(&m->mu);
    for (family *f = m->first; f; f = f->next) {
        if (strcmp(f->name, name)) continue;
        for (series *s = f->first; s; s = s->next) sum += series_value(f, s);
        break;
    }
    pthread_mutex_unlock(&m->mu);
    return sum;
}

static series **sorted_series(const family *f);

void twn_metrics_foreach(twn_metrics *m, const char *name, twn_metrics_visit visit, void *ctx) {
    if (!m) return;
    pthread_mutex_lock(&m->mu);
    for (family *f = m->first; f; f = f->next) {
        if (strcmp(f->name, name)) continue;
        series **ss = sorted_series(f);
        for (size_t i = 0; i < f->n_series; i++) visit(ctx, ss[i]->labels, series_value(f, ss[i]));
        twn_free(ss);
        break;
    }
    pthread_mutex_unlock(&m->mu);
}

// ------------------------------------------------------------------------------------------------
// Rendering

/* Prometheus / Go float text: integers without a fraction, otherwise the shortest %g that reads
 * back exactly; +Inf, -Inf, NaN. */
static void fmt_double(char buf[40], double v) {
    if (isnan(v)) {
        strcpy(buf, "NaN");
    } else if (isinf(v)) {
        strcpy(buf, v > 0 ? "+Inf" : "-Inf");
    } else if (v == floor(v) && fabs(v) < 1e15) {
        snprintf(buf, 40, "%.0f", v);
    } else {
        for (int prec = 6; prec <= 17; prec++) {
            snprintf(buf, 40, "%.*g", prec, v);
            if (strtod(buf, NULL) == v) break;
        }
    }
}

static void put_escaped(twn_str *out, const char *s, int quote) {
    for (; *s; s++) {
        if (*s == '\\')
            twn_str_puts(out, "\\\\");
        else if (*s == '\n')
            twn_str_puts(out, "\\n");
        else if (quote && *s == '"')
            twn_str_puts(out, "\\\"");
        else
            twn_str_append(out, s, 1);
    }
}

/* {k="v",...[,le="x"]} or nothing. */
static void put_labels(twn_str *out, const series *s, const char *le) {
    if (!s->n_labels && !le) return;
    twn_str_puts(out, "{");
    for (size_t i = 0; i < s->n_labels; i++) {
        twn_str_printf(out, "%s%s=\"", i ? "," : "", s->keys[i]);
        put_escaped(out, s->vals[i], 1);
        twn_str_puts(out, "\"");
    }
    if (le) twn_str_printf(out, "%sle=\"%s\"", s->n_labels ? "," : "", le);
    twn_str_puts(out, "}");
}

static int family_cmp(const void *a, const void *b) {
    return strcmp((*(family *const *)a)->name, (*(family *const *)b)->name);
}

static int series_cmp(const void *a, const void *b) {
    return strcmp((*(series *const *)a)->labels, (*(series *const *)b)->labels);
}

/* The families sorted by name (caller holds the mutex; free the array). */
static family **sorted_families(twn_metrics *m) {
    family **fs = twn_calloc(m->n_families + 1, sizeof *fs);
    size_t n = 0;
    for (family *f = m->first; f; f = f->next) fs[n++] = f;
    qsort(fs, n, sizeof *fs, family_cmp);
    return fs;
}

static series **sorted_series(const family *f) {
    series **ss = twn_calloc(f->n_series + 1, sizeof *ss);
    size_t n = 0;
    for (series *s = f->first; s; s = s->next) ss[n++] = s;
    qsort(ss, n, sizeof *ss, series_cmp);
    return ss;
}

void twn_metrics_render(twn_metrics *m, twn_str *out) {
    twn_str_append(out, "", 0); /* a non-NULL, NUL-terminated string even when empty */
    if (!m) return;
    pthread_mutex_lock(&m->mu);
    family **fs = sorted_families(m);
    char num[40], le[40];
    for (size_t i = 0; i < m->n_families; i++) {
        const family *f = fs[i];
        twn_str_printf(out, "# HELP %s ", f->name);
        put_escaped(out, f->help, 0);
        twn_str_printf(out, "\n# TYPE %s %s\n", f->name, type_name(f->type));
        series **ss = sorted_series(f);
        for (size_t k = 0; k < f->n_series; k++) {
            const series *s = ss[k];
            if (f->type != TWN_METRIC_HISTOGRAM) {
                twn_str_puts(out, f->name);
                put_labels(out, s, NULL);
                fmt_double(num, series_value(f, s));
                twn_str_printf(out, " %s\n", num);
                continue;
            }
            uint64_t cum = 0;
            for (size_t b = 0; b < s->n_buckets; b++) {
                cum += atomic_load_explicit(&s->buckets[b], memory_order_relaxed);
                if (b < f->n_bounds)
                    fmt_double(le, f->bounds[b]);
                else
                    strcpy(le, "+Inf");
                twn_str_printf(out, "%s_bucket", f->name);
                put_labels(out, s, le);
                twn_str_printf(out, " %llu\n", (unsigned long long)cum);
            }
            fmt_double(num, bits_to_d(atomic_load_explicit(&s->bits, memory_order_relaxed)));
            twn_str_printf(out, "%s_sum", f->name);
            put_labels(out, s, NULL);
            twn_str_printf(out, " %s\n%s_count", num, f->name);
            put_labels(out, s, NULL);
            twn_str_printf(out, " %llu\n", (unsigned long long)cum);
        }
        twn_free(ss);
    }
    twn_free(fs);
    pthread_mutex_unlock(&m->mu);
}

json_t *twn_json_number(double v) {
    if (!isfinite(v)) return json_null();
    if (v == floor(v) && fabs(v) < 1e15) return json_integer((json_int_t)v);
    return json_real(v);
}

/* Label values are whatever the code put there; bytes that are not UTF-8 are kept as they are,
 * as in the text exposition. */
static json_t *jstr(const char *s) {
    return json_stringn_nocheck(s, strlen(s));
}

json_t *twn_metrics_json(twn_metrics *m) {
    json_t *all = json_array();
    if (!m) return all;
    pthread_mutex_lock(&m->mu);
    family **fs = sorted_families(m);
    for (size_t i = 0; i < m->n_families; i++) {
        const family *f = fs[i];
        json_t *jf = json_object(), *jss = json_array();
        json_object_set_new(jf, "name", jstr(f->name));
        json_object_set_new(jf, "type", json_string(type_name(f->type)));
        json_object_set_new(jf, "help", jstr(f->help));
        json_object_set_new(jf, "series", jss);
        json_array_append_new(all, jf);
        series **ss = sorted_series(f);
        for (size_t k = 0; k < f->n_series; k++) {
            const series *s = ss[k];
            json_t *js = json_object(), *jl = json_object();
            for (size_t l = 0; l < s->n_labels; l++)
                json_object_set_new_nocheck(jl, s->keys[l], jstr(s->vals[l]));
            json_object_set_new(js, "labels", jl);
            json_array_append_new(jss, js);
            if (f->type != TWN_METRIC_HISTOGRAM) {
                json_object_set_new(js, "value", twn_json_number(series_value(f, s)));
                continue;
            }
            json_t *le = json_array(), *bk = json_array();
            for (size_t b = 0; b < f->n_bounds; b++)
                json_array_append_new(le, twn_json_number(f->bounds[b]));
            uint64_t cum = 0;
            for (size_t b = 0; b < s->n_buckets; b++) {
                cum += atomic_load_explicit(&s->buckets[b], memory_order_relaxed);
                json_array_append_new(bk, json_integer((json_int_t)cum));
            }
            json_object_set_new(js, "le", le);
            json_object_set_new(js, "buckets", bk);
            json_object_set_new(
                js, "sum",
                twn_json_number(bits_to_d(atomic_load_explicit(&s->bits, memory_order_relaxed))));
            json_object_set_new(js, "count", json_integer((json_int_t)cum));
        }
        twn_free(ss);
    }
    twn_free(fs);
    pthread_mutex_unlock(&m->mu);
    return all;
}

void twn_json_append(twn_str *out, json_t *j) {
    char *t = json_dumps(j, TWN_JSON_FLAGS);
    if (t) twn_str_puts(out, t);
    free(t);
    json_decref(j);
}

void twn_metrics_render_json(twn_metrics *m, twn_str *out) {
    twn_json_append(out, twn_metrics_json(m));
}
