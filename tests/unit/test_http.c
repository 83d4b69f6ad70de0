/* test_http.c — the HTTP server on loopback, scraped with libcurl: /metrics' content type and
 * body, custom routes, 404 / 405, the 127.0.0.1 default bind (not reachable on 127.0.0.2), the
 * bound port of ":0", listen-string errors and a port already in use. */
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/http.h"
#include "tests/testutil.h"

static void expect_str(const char *got, const char *want) {
    if (strcmp(got, want)) fail_msg("got\n%s\nwant\n%s", got, want);
}

typedef struct reply {
    long status;
    char type[128];
    twn_str body;
    CURLcode rc;
} reply;

static size_t on_body(char *p, size_t sz, size_t n, void *ud) {
    twn_str_append(ud, p, sz * n);
    return sz * n;
}

static reply fetch(const char *url, const char *method) {
    reply r = {0};
    twn_str_append(&r.body, "", 0);
    CURL *c = curl_easy_init();
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &r.body);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 5000L);
    curl_easy_setopt(c, CURLOPT_NOPROXY, "*");
    if (method) curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    r.rc = curl_easy_perform(c);
    if (r.rc == CURLE_OK) {
        char *ct = NULL;
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r.status);
        curl_easy_getinfo(c, CURLINFO_CONTENT_TYPE, &ct);
        snprintf(r.type, sizeof r.type, "%s", ct ? ct : "");
    }
    curl_easy_cleanup(c);
    return r;
}

static int hello(void *ctx, const char *path, twn_str *body, const char **type) {
    twn_str_printf(body, "{\"path\":\"%s\",\"n\":%d}", path, ++*(int *)ctx);
    *type = "application/json";
    return 202;
}

static void test_metrics_and_routes(void **state) {
    (void)state;
    twn_metrics *m = twn_metrics_new();
    twn_counter_add(twn_metrics_counter(m, "twn_items_total", "Items.", "route=easy", NULL), 7);
    int calls = 0;
    twn_http_route extra = {"/hello", "text/plain", hello, &calls};
    twn_http *h;
    twn_err err = {{0}};
    if (twn_metrics_http_start(":0", m, &extra, 1, &h, &err)) fail_msg("%s", err.msg);
    uint16_t port = twn_http_port(h);
    assert_true(port > 0);
    char want_url[64];
    snprintf(want_url, sizeof want_url, "http://127.0.0.1:%u", port);
    expect_str(twn_http_url(h), want_url);

    char url[128];
    snprintf(url, sizeof url, "%s/metrics", twn_http_url(h));
    reply r = fetch(url, NULL);
    assert_int_equal(r.rc, CURLE_OK);
    assert_int_equal(r.status, 200);
    expect_str(r.type, "text/plain; version=0.0.4; charset=utf-8");
    expect_str(r.body.v, "# HELP twn_items_total Items.\n"
                         "# TYPE twn_items_total counter\n"
                         "twn_items_total{route=\"easy\"} 7\n");
    twn_str_free(&r.body);

    /* The body is rendered per request. */
    twn_counter_add(twn_metrics_counter(m, "twn_items_total", NULL, "route=easy", NULL), 1);
    r = fetch(url, NULL);
    assert_non_null(strstr(r.body.v, "twn_items_total{route=\"easy\"} 8\n"));
    twn_str_free(&r.body);

    snprintf(url, sizeof url, "%s/hello", twn_http_url(h));
    r = fetch(url, NULL);
    assert_int_equal(r.status, 202);
    expect_str(r.type, "application/json");
    expect_str(r.body.v, "{\"path\":\"/hello\",\"n\":1}");
    twn_str_free(&r.body);

    snprintf(url, sizeof url, "%s/metrics/extra?x=1", twn_http_url(h));
    r = fetch(url, NULL);
    assert_int_equal(r.status, 404);
    expect_str(r.body.v, "not found: /metrics/extra\n");
    twn_str_free(&r.body);

    snprintf(url, sizeof url, "%s/metrics", twn_http_url(h));
    r = fetch(url, "POST");
    assert_int_equal(r.status, 405);
    expect_str(r.body.v, "method not allowed\n");
    twn_str_free(&r.body);

    /* Bound to 127.0.0.1 only: another loopback address of this machine is refused. */
    snprintf(url, sizeof url, "http://127.0.0.2:%u/metrics", port);
    r = fetch(url, NULL);
    assert_int_equal(r.rc, CURLE_COULDNT_CONNECT);
    twn_str_free(&r.body);

    /* The port is taken while the server runs. */
    char taken[32];
    snprintf(taken, sizeof taken, "127.0.0.1:%u", port);
    twn_http *h2 = NULL;
    assert_int_equal(twn_http_start(taken, NULL, 0, &h2, &err), -1);
    assert_null(h2);
    char want[160];
    snprintf(want, sizeof want, "cannot bind http server to %s: Address already in use", taken);
    expect_str(err.msg, want);

    twn_http_stop(h);
    assert_int_equal(calls, 1);
    /* Stopped: the port is free again and nothing answers. */
    r = fetch(url, NULL);
    assert_int_not_equal(r.rc, CURLE_OK);
    twn_str_free(&r.body);
    twn_metrics_free(m);
}

static void test_listen_strings(void **state) {
    (void)state;
    char host[64];
    uint16_t port;
    twn_err err = {{0}};
    assert_int_equal(twn_http_parse_listen("9100", host, sizeof host, &port, &err), 0);
    expect_str(host, "127.0.0.1");
    assert_int_equal(port, 9100);
    assert_int_equal(twn_http_parse_listen("0.0.0.0:80", host, sizeof host, &port, &err), 0);
    expect_str(host, "0.0.0.0");
    assert_int_equal(port, 80);
    assert_int_equal(twn_http_parse_listen("localhost:0", host, sizeof host, &port, &err), 0);
    expect_str(host, "127.0.0.1");
    assert_int_equal(twn_http_parse_listen("[::1]:65535", host, sizeof host, &port, &err), 0);
    expect_str(host, "::1");
    assert_int_equal(port, 65535);
    const char *bad[] = {"", "127.0.0.1:", "127.0.0.1:65536", "::1:80", "[::1]80", "h:12x"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        assert_int_equal(twn_http_parse_listen(bad[i], host, sizeof host, &port, &err), -1);
        char want[200];
        snprintf(want, sizeof want,
                 "http listen address \"%s\": expected HOST:PORT, [IPV6]:PORT, :PORT or PORT "
                 "(port 0..65535, 0 = any free port)",
                 bad[i]);
        expect_str(err.msg, want);
    }
    twn_http *h = NULL;
    assert_int_equal(twn_http_start("example.com:0", NULL, 0, &h, &err), -1);
    expect_str(err.msg, "http listen address \"example.com:0\": host \"example.com\" is not a "
                        "numeric IPv4/IPv6 address or localhost");
    assert_null(h);
}

int main(void) {
    curl_global_init(CURL_GLOBAL_DEFAULT);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_metrics_and_routes),
        cmocka_unit_test(test_listen_strings),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    curl_global_cleanup();
    return rc;
}
