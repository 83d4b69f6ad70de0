/* progress_view.c — the progress bar / lines of a running job (progress_view.h). */
#include "common/progress_view.h"

#include <math.h>
#include <pthread.h>
#include <string.h>
#include <time.h>

#include "util/clock.h"
#include "util/log.h"
#include "util/mem.h"

int twn_pview_mode_parse(const char *s, int tty, twn_pview_mode *out, twn_err *err) {
    if (!s || !strcmp(s, "auto"))
        *out = tty ? TWN_PVIEW_BAR : TWN_PVIEW_LINES;
    else if (!strcmp(s, "bar"))
        *out = TWN_PVIEW_BAR;
    else if (!strcmp(s, "lines"))
        *out = TWN_PVIEW_LINES;
    else if (!strcmp(s, "off"))
        *out = TWN_PVIEW_OFF;
    else
        return twn_err_set(err, "log.progress = \"%s\": expected auto, bar, lines or off", s);
    return 0;
}

static double get(twn_metrics *m, const char *name, const char *labels) {
    double v = 0;
    twn_metrics_get(m, name, labels, &v);
    return v;
}

void twn_pview_snap_get(twn_metrics *m, double elapsed_s, twn_pview_snap *s) {
    memset(s, 0, sizeof *s);
    s->easy = get(m, "twn_items_total", "route=easy");
    s->hard = get(m, "twn_items_total", "route=hard");
    s->rejected = get(m, "twn_items_total", "route=rejected");
    s->items_done = s->easy + s->hard + s->rejected;
    s->items_total = get(m, "twn_job_items", NULL);
    s->units_done = get(m, "twn_job_units", "state=done");
    s->units_total = get(m, "twn_job_units", "state=total");
    s->rate = get(m, "twn_items_per_second", NULL);
    s->elapsed_s = elapsed_s;
}

void twn_pview_duration(double s, char buf[32]) {
    if (!isfinite(s) || s < 0) {
        strcpy(buf, "?");
        return;
    }
    long t = lround(s);
    if (t >= 3600)
        snprintf(buf, 32, "%ldh%02ldm%02lds", t / 3600, t / 60 % 60, t % 60);
    else if (t >= 60)
        snprintf(buf, 32, "%ldm%02lds", t / 60, t % 60);
    else
        snprintf(buf, 32, "%lds", t);
}

void twn_pview_format(const twn_pview_snap *s, int bar, twn_str *out) {
    double frac = s->items_total > 0 ? s->items_done / s->items_total : 0;
    if (frac > 1) frac = 1;
    int done = s->units_total > 0 && s->units_done >= s->units_total;
    char eta[32], el[32];
    twn_pview_duration(done ? 0
                       : s->rate > 0 && s->items_total >= s->items_done
                           ? (s->items_total - s->items_done) / s->rate
                           : NAN,
                       eta);
    twn_pview_duration(s->elapsed_s, el);
    if (bar) {
        enum { W = 24 };
        int fill = (int)(frac * W + 1e-9);
        twn_str_puts(out, "[");
        for (int i = 0; i < W; i++) twn_str_puts(out, i < fill ? "#" : "-");
        twn_str_printf(out,
                       "] %5.1f%% %.0f/%.0f items  %.1f/s  ETA %s  easy %.0f hard %.0f "
                       "rejected %.0f",
                       100 * frac, s->items_done, s->items_total, s->rate, eta, s->easy, s->hard,
                       s->rejected);
        return;
    }
    twn_str_printf(out,
                   "progress: %.1f%% %.0f/%.0f items, %.0f/%.0f units, %.1f items/s, ETA %s, "
                   "elapsed %s, easy %.0f hard %.0f rejected %.0f",
                   100 * frac, s->items_done, s->items_total, s->units_done, s->units_total,
                   s->rate, eta, el, s->easy, s->hard, s->rejected);
}

// ------------------------------------------------------------------------------------------------
// The display thread

struct twn_pview {
    twn_metrics *m;
    twn_pview_mode mode;
    double interval_s, t0;
    FILE *f;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stop;
};

static void show(twn_pview *p) {
    twn_pview_snap s;
    twn_pview_snap_get(p->m, twn_now() - p->t0, &s);
    twn_str line = {0};
    twn_pview_format(&s, p->mode == TWN_PVIEW_BAR, &line);
    if (p->mode == TWN_PVIEW_BAR) {
        fprintf(p->f, "\r%s\033[K", line.v);
        fflush(p->f);
    } else {
        twn_info("%s", line.v);
    }
    twn_str_free(&line);
}

static void *run(void *arg) {
    twn_pview *p = arg;
    pthread_mutex_lock(&p->mu);
    while (!p->stop) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        double until = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9 + p->interval_s;
        ts.tv_sec = (time_t)until;
        ts.tv_nsec = (long)((until - (double)ts.tv_sec) * 1e9);
        pthread_cond_timedwait(&p->cv, &p->mu, &ts);
        if (p->stop) break;
        pthread_mutex_unlock(&p->mu);
        show(p);
        pthread_mutex_lock(&p->mu);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

twn_pview *twn_pview_start(twn_metrics *m, twn_pview_mode mode, double interval_s, FILE *f) {
    if (mode == TWN_PVIEW_OFF) return NULL;
    twn_pview *p = twn_calloc(1, sizeof *p);
    p->m = m;
    p->mode = mode;
    p->interval_s = interval_s > 0 ? interval_s : 1;
    p->t0 = twn_now();
    p->f = f ? f : stderr;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    pthread_create(&p->th, NULL, run, p);
    return p;
}

void twn_pview_stop(twn_pview *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
    pthread_join(p->th, NULL);
    show(p);
    if (p->mode == TWN_PVIEW_BAR) {
        fputc('\n', p->f);
        fflush(p->f);
    }
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    twn_free(p);
}
