/* test_progress_view.c — the progress display: mode parsing (auto follows the TTY), the exact bar
 * and plain lines for known numbers (percent, rate, ETA, durations), the snapshot read from the
 * coordinator's metrics, and the bar thread redrawing in place and ending its line. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/progress_view.h"
#include "tests/testutil.h"

static void test_modes(void **state) {
    (void)state;
    twn_pview_mode m;
    twn_err err = {{0}};
    assert_int_equal(twn_pview_mode_parse("auto", 1, &m, &err), 0);
    assert_int_equal(m, TWN_PVIEW_BAR);
    assert_int_equal(twn_pview_mode_parse("auto", 0, &m, &err), 0);
    assert_int_equal(m, TWN_PVIEW_LINES);
    assert_int_equal(twn_pview_mode_parse("lines", 1, &m, &err), 0);
    assert_int_equal(m, TWN_PVIEW_LINES);
    assert_int_equal(twn_pview_mode_parse("bar", 0, &m, &err), 0);
    assert_int_equal(m, TWN_PVIEW_BAR);
    assert_int_equal(twn_pview_mode_parse("off", 1, &m, &err), 0);
    assert_int_equal(m, TWN_PVIEW_OFF);
    assert_int_equal(twn_pview_mode_parse("sometimes", 1, &m, &err), -1);
    assert_string_equal(err.msg, "log.progress = \"sometimes\": expected auto, bar, lines or off");
    assert_null(twn_pview_start(NULL, TWN_PVIEW_OFF, 1, stderr));
}

static void test_format(void **state) {
    (void)state;
    twn_pview_snap s = {.items_done = 150,
                        .items_total = 600,
                        .units_done = 2,
                        .units_total = 10,
                        .easy = 100,
                        .hard = 40,
                        .rejected = 10,
                        .rate = 12.5,
                        .elapsed_s = 12};
    twn_str out = {0};
    twn_pview_format(&s, 1, &out);
    assert_string_equal(out.v, "[######------------------]  25.0% 150/600 items  12.5/s  ETA 36s  "
                               "easy 100 hard 40 rejected 10");
    twn_str_reset(&out);
    twn_pview_format(&s, 0, &out);
    assert_string_equal(out.v, "progress: 25.0% 150/600 items, 2/10 units, 12.5 items/s, ETA 36s, "
                               "elapsed 12s, easy 100 hard 40 rejected 10");
    /* No rate yet: the ETA is unknown.  Done: 0s. */
    s.rate = 0;
    twn_str_reset(&out);
    twn_pview_format(&s, 0, &out);
    assert_non_null(strstr(out.v, ", 0.0 items/s, ETA ?, elapsed 12s,"));
    s.items_done = s.items_total = 600;
    s.units_done = 10;
    s.elapsed_s = 3723;
    twn_str_reset(&out);
    twn_pview_format(&s, 1, &out);
    assert_string_equal(out.v, "[########################] 100.0% 600/600 items  0.0/s  ETA 0s  "
                               "easy 100 hard 40 rejected 10");
    twn_str_reset(&out);
    twn_pview_format(&s, 0, &out);
    assert_non_null(strstr(out.v, "ETA 0s, elapsed 1h02m03s,"));
    /* Before the plan is known. */
    twn_pview_snap z = {0};
    twn_str_reset(&out);
    twn_pview_format(&z, 1, &out);
    assert_string_equal(out.v, "[------------------------]   0.0% 0/0 items  0.0/s  ETA ?  easy 0 "
                               "hard 0 rejected 0");
    twn_str_free(&out);

    char b[32];
    const double secs[] = {0, 7.4, 125, 3723, -1, NAN, INFINITY};
    const char *want[] = {"0s", "7s", "2m05s", "1h02m03s", "?", "?", "?"};
    for (size_t i = 0; i < sizeof secs / sizeof *secs; i++) {
        twn_pview_duration(secs[i], b);
        assert_string_equal(b, want[i]);
    }
}

static twn_metrics *coordinator_like(void) {
    twn_metrics *m = twn_metrics_new();
    twn_counter_add(twn_metrics_counter(m, "twn_items_total", "", "route=easy", NULL), 300);
    twn_counter_add(twn_metrics_counter(m, "twn_items_total", "", "route=hard", NULL), 90);
    twn_counter_add(twn_metrics_counter(m, "twn_items_total", "", "route=rejected", NULL), 10);
    twn_gauge_set(twn_metrics_gauge(m, "twn_job_items", "", NULL, NULL), 800);
    twn_gauge_set(twn_metrics_gauge(m, "twn_job_units", "", "state=total", NULL), 8);
    twn_gauge_set(twn_metrics_gauge(m, "twn_job_units", "", "state=done", NULL), 4);
    twn_gauge_set(twn_metrics_gauge(m, "twn_items_per_second", "", NULL, NULL), 100);
    return m;
}

static void test_snapshot_and_thread(void **state) {
    (void)state;
    twn_metrics *m = coordinator_like();
    twn_pview_snap s;
    twn_pview_snap_get(m, 3, &s);
    assert_true(s.items_done == 400 && s.items_total == 800 && s.units_done == 4 &&
                s.units_total == 8 && s.easy == 300 && s.hard == 90 && s.rejected == 10 &&
                s.rate == 100 && s.elapsed_s == 3);

    FILE *f = tmpfile();
    assert_non_null(f);
    twn_pview *p = twn_pview_start(m, TWN_PVIEW_BAR, 0.01, f);
    struct timespec ts = {0, 100 * 1000000L};
    nanosleep(&ts, NULL);
    twn_counter_add(twn_metrics_counter(m, "twn_items_total", "", "route=easy", NULL), 400);
    twn_gauge_set(twn_metrics_gauge(m, "twn_job_units", "", "state=done", NULL), 8);
    twn_pview_stop(p);
    long n = ftell(f);
    rewind(f);
    char *buf = calloc(1, (size_t)n + 1);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    /* Redrawn in place (several \r-frames, each clearing the rest of the line), then the final
     * frame and a newline. */
    int frames = 0;
    for (char *q = buf; (q = strstr(q, "\r[")); q++) frames++;
    assert_true(frames >= 3);
    assert_non_null(strstr(buf, "\r[############------------]  50.0% 400/800 items  100.0/s  ETA "
                                "4s  easy 300 hard 90 rejected 10\033[K"));
    const char *fin = "\r[########################] 100.0% 800/800 items  100.0/s  ETA 0s  easy "
                      "700 hard 90 rejected 10\033[K\n";
    size_t fl = strlen(fin);
    assert_true((size_t)n >= fl);
    assert_string_equal(buf + n - fl, fin);
    free(buf);
    twn_metrics_free(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_modes),
        cmocka_unit_test(test_format),
        cmocka_unit_test(test_snapshot_and_thread),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
