/* test_metrics.c — the metrics registry: the exact Prometheus text (HELP/TYPE, escaping, label
 * order, cumulative buckets with +Inf, _sum/_count), the JSON rendering, registration errors,
 * and counts that add up exactly when threads update and register concurrently. */
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/metrics.h"
#include "tests/testutil.h"

static void expect_str(const char *got, const char *want) {
    if (strcmp(got, want)) fail_msg("got\n%s\nwant\n%s", got, want);
}

/* A registry with every kind of series; used by the text and JSON tests. */
static twn_metrics *sample(void) {
    twn_metrics *m = twn_metrics_new();
    twn_err err = {{0}};
    twn_counter *a = twn_metrics_counter(m, "twn_test_requests_total", "Requests served.",
                                         "path=/b,code=500", &err);
    twn_counter *b = twn_metrics_counter(m, "twn_test_requests_total", "ignored: family exists",
                                         "path=/a,code=200", &err);
    assert_non_null(a);
    assert_non_null(b);
    twn_counter_add(a, 1);
    twn_counter_add(b, 3);
    twn_gauge *t =
        twn_metrics_gauge(m, "twn_test_temp", "A \\ backslash\nand \"quotes\".", NULL, &err);
    twn_gauge_set(t, 1.5);
    twn_gauge *l = twn_metrics_gauge(m, "twn_test_labels", "Escaped values.", "v=a\"b\\c\nd", &err);
    twn_gauge_set(l, -2);
    twn_gauge_add(l, 0.25);
    static const double bounds[] = {0.1, 0.5, 1};
    twn_histogram *h = twn_metrics_histogram(m, "twn_test_seconds", "Stage latency.", "stage=gate",
                                             TWN_BUCKETS(bounds), &err);
    assert_non_null(h);
    twn_histogram_observe(h, 0.25);
    twn_histogram_observe(h, 0.5); /* le is inclusive */
    twn_histogram_observe(h, 0.75);
    twn_histogram_observe(h, 3);
    twn_histogram *e = twn_metrics_histogram(m, "twn_test_empty", "No labels, no samples.", "",
                                             TWN_BUCKETS(bounds), &err);
    assert_non_null(e);
    return m;
}

static void test_text_exposition(void **state) {
    (void)state;
    twn_metrics *m = sample();
    twn_str out = {0};
    twn_metrics_render(m, &out);
    expect_str(out.v, "# HELP twn_test_empty No labels, no samples.\n"
                      "# TYPE twn_test_empty histogram\n"
                      "twn_test_empty_bucket{le=\"0.1\"} 0\n"
                      "twn_test_empty_bucket{le=\"0.5\"} 0\n"
                      "twn_test_empty_bucket{le=\"1\"} 0\n"
                      "twn_test_empty_bucket{le=\"+Inf\"} 0\n"
                      "twn_test_empty_sum 0\n"
                      "twn_test_empty_count 0\n"
                      "# HELP twn_test_labels Escaped values.\n"
                      "# TYPE twn_test_labels gauge\n"
                      "twn_test_labels{v=\"a\\\"b\\\\c\\nd\"} -1.75\n"
                      "# HELP twn_test_requests_total Requests served.\n"
                      "# TYPE twn_test_requests_total counter\n"
                      "twn_test_requests_total{path=\"/a\",code=\"200\"} 3\n"
                      "twn_test_requests_total{path=\"/b\",code=\"500\"} 1\n"
                      "# HELP twn_test_seconds Stage latency.\n"
                      "# TYPE twn_test_seconds histogram\n"
                      "twn_test_seconds_bucket{stage=\"gate\",le=\"0.1\"} 0\n"
                      "twn_test_seconds_bucket{stage=\"gate\",le=\"0.5\"} 2\n"
                      "twn_test_seconds_bucket{stage=\"gate\",le=\"1\"} 3\n"
                      "twn_test_seconds_bucket{stage=\"gate\",le=\"+Inf\"} 4\n"
                      "twn_test_seconds_sum{stage=\"gate\"} 4.5\n"
                      "twn_test_seconds_count{stage=\"gate\"} 4\n"
                      "# HELP twn_test_temp A \\\\ backslash\\nand \"quotes\".\n"
                      "# TYPE twn_test_temp gauge\n"
                      "twn_test_temp 1.5\n");
    twn_str_free(&out);

    /* Values: shortest round-trip text, integers without a fraction, Inf / NaN spelled out. */
    twn_gauge *g = twn_metrics_gauge(m, "twn_test_temp", NULL, NULL, NULL);
    const double vals[] = {0.1, 1e20, 123456789, -0.000125, 1.0 / 0.0, -1.0 / 0.0, 0.0 / 0.0};
    const char *want[] = {"0.1", "1e+20", "123456789", "-0.000125", "+Inf", "-Inf", "NaN"};
    for (size_t i = 0; i < sizeof vals / sizeof *vals; i++) {
        twn_gauge_set(g, vals[i]);
        twn_metrics_render(m, &out);
        char line[64];
        snprintf(line, sizeof line, "\ntwn_test_temp %s\n", want[i]);
        if (!strstr(out.v, line)) fail_msg("%g: no line %s in\n%s", vals[i], line + 1, out.v);
        twn_str_free(&out);
    }
    twn_metrics_free(m);
}

static void test_json(void **state) {
    (void)state;
    twn_metrics *m = sample();
    twn_str out = {0};
    twn_metrics_render_json(m, &out);
    json_error_t je;
    json_t *j = json_loads(out.v, 0, &je);
    if (!j) fail_msg("invalid JSON (%s): %s", je.text, out.v);
    assert_int_equal(json_array_size(j), 5);
    json_t *f = json_array_get(j, 3);
    expect_str(json_string_value(json_object_get(f, "name")), "twn_test_seconds");
    expect_str(json_string_value(json_object_get(f, "type")), "histogram");
    json_t *s = json_array_get(json_object_get(f, "series"), 0);
    expect_str(json_string_value(json_object_get(json_object_get(s, "labels"), "stage")), "gate");
    char *buckets = json_dumps(json_object_get(s, "buckets"), JSON_COMPACT);
    char *le = json_dumps(json_object_get(s, "le"), JSON_COMPACT);
    expect_str(buckets, "[0,2,3,4]");
    expect_str(le, "[0.10000000000000001,0.5,1]"); /* jansson re-renders 0.1; 1 is an integer */
    free(buckets);
    free(le);
    assert_true(json_real_value(json_object_get(s, "sum")) == 4.5);
    assert_int_equal(json_integer_value(json_object_get(s, "count")), 4);
    f = json_array_get(j, 1);
    s = json_array_get(json_object_get(f, "series"), 0);
    expect_str(json_string_value(json_object_get(json_object_get(s, "labels"), "v")), "a\"b\\c\nd");
    assert_true(json_number_value(json_object_get(s, "value")) == -1.75);
    json_decref(j);
    /* The first family verbatim: the exact shape the status page reads. */
    const char *head = "[{\"name\":\"twn_test_empty\",\"type\":\"histogram\",\"help\":\"No "
                       "labels, no samples.\",\"series\":[{\"labels\":{},\"le\":[0.1,0.5,1],"
                       "\"buckets\":[0,0,0,0],\"sum\":0,\"count\":0}]},";
    if (strncmp(out.v, head, strlen(head)))
        fail_msg("JSON\n%s\ndoes not start with\n%s", out.v, head);
    twn_str_free(&out);
    twn_metrics_free(m);
}

static void test_get_sum_null(void **state) {
    (void)state;
    twn_metrics *m = sample();
    double v = -1;
    assert_int_equal(twn_metrics_get(m, "twn_test_requests_total", "path=/a,code=200", &v), 0);
    assert_true(v == 3);
    assert_int_equal(twn_metrics_get(m, "twn_test_seconds", "stage=gate", &v), 0);
    assert_true(v == 4); /* a histogram's count */
    assert_int_equal(twn_metrics_get(m, "twn_test_requests_total", "code=200", &v), -1);
    assert_int_equal(twn_metrics_get(m, "twn_nope", NULL, &v), -1);
    assert_true(twn_metrics_sum(m, "twn_test_requests_total") == 4);
    assert_true(twn_metrics_sum(m, "twn_nope") == 0);
    /* Same name + labels = same handle. */
    twn_err err;
    assert_ptr_equal(twn_metrics_gauge(m, "twn_test_temp", NULL, "", &err),
                     twn_metrics_gauge(m, "twn_test_temp", NULL, NULL, &err));
    /* NULL handles and registries do nothing. */
    twn_counter_add(NULL, 5);
    twn_gauge_set(NULL, 1);
    twn_gauge_add(NULL, 1);
    twn_histogram_observe(NULL, 1);
    assert_int_equal(twn_counter_value(NULL), 0);
    assert_null(twn_metrics_counter(NULL, "twn_x", "", "", &err));
    twn_metrics_free(m);
    /* The default registry is one object. */
    assert_ptr_equal(twn_metrics_default(), twn_metrics_default());
}

static void test_errors(void **state) {
    (void)state;
    twn_metrics *m = twn_metrics_new();
    twn_err err = {{0}};
    static const double b1[] = {1, 2}, b2[] = {1, 3}, bad[] = {2, 1};
    assert_null(twn_metrics_counter(m, "requests_total", "", "", &err));
    expect_str(err.msg, "metric name \"requests_total\": expected twn_ followed by [a-zA-Z0-9_:]");
    assert_null(twn_metrics_counter(m, "twn_bad-name", "", "", &err));
    expect_str(err.msg, "metric name \"twn_bad-name\": expected twn_ followed by [a-zA-Z0-9_:]");
    assert_null(twn_metrics_counter(m, "twn_x_total", "", "route", &err));
    expect_str(err.msg, "metric twn_x_total: label \"route\" in \"route\": expected key=value");
    assert_null(twn_metrics_counter(m, "twn_x_total", "", "a=1,9b=2", &err));
    expect_str(err.msg, "metric twn_x_total: label name \"9b\": expected [a-zA-Z_][a-zA-Z0-9_]*, "
                        "not starting with __");
    assert_null(twn_metrics_counter(m, "twn_x_total", "", "a=1,a=2", &err));
    expect_str(err.msg, "metric twn_x_total: label \"a\" appears twice in \"a=1,a=2\"");
    assert_non_null(twn_metrics_counter(m, "twn_x_total", "", "a=1", &err));
    assert_null(twn_metrics_gauge(m, "twn_x_total", "", "a=1", &err));
    expect_str(err.msg, "metric twn_x_total is a counter, not a gauge");
    assert_non_null(twn_metrics_histogram(m, "twn_h", "", "", TWN_BUCKETS(b1), &err));
    assert_null(twn_metrics_histogram(m, "twn_h", "", "x=1", TWN_BUCKETS(b2), &err));
    expect_str(err.msg, "metric twn_h: histogram already registered with other buckets");
    assert_null(twn_metrics_histogram(m, "twn_h", "", "le=1", TWN_BUCKETS(b1), &err));
    expect_str(err.msg, "metric twn_h: label name \"le\": expected [a-zA-Z_][a-zA-Z0-9_]*, not "
                        "starting with __, and not \"le\" on a histogram");
    assert_null(twn_metrics_histogram(m, "twn_h2", "", "", TWN_BUCKETS(bad), &err));
    expect_str(err.msg, "metric twn_h2: bucket bound 1 is 1: expected finite and strictly "
                        "increasing bounds");
    /* Failed registrations leave nothing behind. */
    twn_str out = {0};
    twn_metrics_render(m, &out);
    assert_null(strstr(out.v, "twn_h2"));
    assert_null(strstr(out.v, "x=\"1\""));
    twn_str_free(&out);
    twn_metrics_free(m);
}

// ------------------------------------------------------------------------------------------------
// Threads

#define THREADS 8
#define ROUNDS  20000

typedef struct {
    twn_metrics *m;
    int idx;
} targ;

static void *hammer(void *p) {
    targ *a = p;
    char labels[32];
    snprintf(labels, sizeof labels, "role=r%d", a->idx % 2);
    for (int i = 0; i < ROUNDS; i++) {
        /* Lookups race with creation; the series must still be one per name+labels. */
        twn_counter *c = twn_metrics_counter(a->m, "twn_t_total", "t", labels, NULL);
        twn_counter_add(c, 2);
        twn_gauge_add(twn_metrics_gauge(a->m, "twn_t_g", "g", NULL, NULL), 0.5);
        twn_histogram *h =
            twn_metrics_histogram(a->m, "twn_t_p", "p", NULL, TWN_BUCKETS(twn_buckets_p), NULL);
        twn_histogram_observe(h, (i % 10) / 10.0 + 0.05);
    }
    return NULL;
}

static void test_threads(void **state) {
    (void)state;
    twn_metrics *m = twn_metrics_new();
    pthread_t th[THREADS];
    targ a[THREADS];
    for (int i = 0; i < THREADS; i++) {
        a[i] = (targ){m, i};
        pthread_create(&th[i], NULL, hammer, &a[i]);
    }
    /* Render while they write: every snapshot is well-formed (+Inf bucket == _count). */
    for (int k = 0; k < 50; k++) {
        twn_str out = {0};
        twn_metrics_render(m, &out);
        const char *inf = strstr(out.v, "twn_t_p_bucket{le=\"+Inf\"} ");
        const char *cnt = strstr(out.v, "twn_t_p_count ");
        if (inf && cnt)
            assert_int_equal(strtoull(inf + strlen("twn_t_p_bucket{le=\"+Inf\"} "), NULL, 10),
                             strtoull(cnt + strlen("twn_t_p_count "), NULL, 10));
        twn_str_free(&out);
    }
    for (int i = 0; i < THREADS; i++) pthread_join(th[i], NULL);
    double v;
    assert_int_equal(twn_metrics_get(m, "twn_t_total", "role=r0", &v), 0);
    assert_true(v == 2.0 * ROUNDS * THREADS / 2);
    assert_true(twn_metrics_sum(m, "twn_t_total") == 2.0 * ROUNDS * THREADS);
    assert_int_equal(twn_metrics_get(m, "twn_t_g", NULL, &v), 0);
    assert_true(v == 0.5 * ROUNDS * THREADS);
    twn_str out = {0};
    twn_metrics_render(m, &out);
    /* Each bucket of width 0.1 got exactly 1/10 of the observations. */
    char want[128];
    snprintf(want, sizeof want, "twn_t_p_bucket{le=\"0.3\"} %d\n", 3 * ROUNDS * THREADS / 10);
    if (!strstr(out.v, want)) fail_msg("no %s in\n%s", want, out.v);
    snprintf(want, sizeof want, "twn_t_p_count %d\n", ROUNDS * THREADS);
    if (!strstr(out.v, want)) fail_msg("no %s in\n%s", want, out.v);
    /* Two series for twn_t_total, no more. */
    const char *p = out.v;
    int n = 0;
    while ((p = strstr(p, "\ntwn_t_total{"))) n++, p++;
    assert_int_equal(n, 2);
    twn_str_free(&out);
    twn_metrics_free(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_text_exposition), cmocka_unit_test(test_json),
        cmocka_unit_test(test_get_sum_null),    cmocka_unit_test(test_errors),
        cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
