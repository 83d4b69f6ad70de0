/* cmd_status.c — `twn status URL`: a summary of a running job from its coordinator's
 * /status.json (coordinator/status.h), for a terminal or a script (--json prints the document). */
#include <curl/curl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "cli/commands.h"
#include "common/progress_view.h"
#include "util/mem.h"
#include "util/vec.h"

static size_t on_body(char *p, size_t sz, size_t n, void *ud) {
    twn_str_append(ud, p, sz * n);
    return sz * n;
}

static double num(json_t *o, const char *a, const char *b) {
    json_t *v = json_object_get(o, a);
    if (b) v = json_object_get(v, b);
    return json_is_number(v) ? json_number_value(v) : NAN;
}

static void print_summary(const char *url, json_t *st) {
    double total = num(st, "items", "total"), done = num(st, "items", "done");
    char eta[32], el[32];
    twn_pview_duration(num(st, "eta_s", NULL), eta);
    twn_pview_duration(num(st, "elapsed_s", NULL), el);
    printf("twn status %s: %s\n", url,
           json_is_true(json_object_get(st, "done")) ? "finished" : "running");
    printf("  units        %.0f/%.0f done\n", num(st, "units", "done"), num(st, "units", "total"));
    printf("  items        %.0f/%.0f done (%.1f%%): easy %.0f, hard %.0f, rejected %.0f\n", done,
           total, total > 0 ? 100 * done / total : 0.0, num(st, "items", "easy"),
           num(st, "items", "hard"), num(st, "items", "rejected"));
    printf("  rate         %.1f items/s, ETA %s, elapsed %s\n", num(st, "rate", NULL), eta, el);
    printf("  think        %.0f tokens, %.0f saved vs always-think (estimate)\n",
           num(st, "think_tokens", NULL), num(st, "tokens_saved", NULL));
    printf("  queues       %.0f units, %.0f hard items waiting\n", num(st, "queues", "units"),
           num(st, "queues", "hard"));
    printf("  leases       %.0f unit + %.0f hard active, %.0f unit + %.0f hard expired\n",
           num(st, "leases", "active_unit"), num(st, "leases", "active_hard"),
           num(st, "leases", "expired_unit"), num(st, "leases", "expired_hard"));
    printf("  dead letters %.0f\n", num(st, "dead_letters", NULL));
    json_t *shards = json_object_get(st, "shards");
    printf("  shards      ");
    for (size_t i = 0; i < json_array_size(shards); i++) {
        json_t *s = json_array_get(shards, i);
        printf(" %.0f: %.0f", num(s, "shard", NULL), num(s, "acked", NULL));
    }
    printf("%s\n", json_array_size(shards) ? " acked" : " none");
}

int twn_cmd_status(int argc, char **argv) {
    const char *url = NULL;
    int raw = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json"))
            raw = 1;
        else if (argv[i][0] != '-' && !url)
            url = argv[i];
        else
            url = NULL, i = argc;
    }
    if (!url) {
        fprintf(stderr, "usage: twn status URL [--json]   (URL: the coordinator's metrics.listen, "
                        "e.g. http://127.0.0.1:9100)\n");
        return 2;
    }
    twn_str full = {0};
    if (!strstr(url, "://")) twn_str_puts(&full, "http://");
    twn_str_puts(&full, url);
    size_t jl = strlen("/status.json");
    if (full.n < jl || strcmp(full.v + full.n - jl, "/status.json")) {
        while (full.n && full.v[full.n - 1] == '/') full.v[--full.n] = 0;
        twn_str_puts(&full, "/status.json");
    }
    twn_str body = {0};
    twn_str_append(&body, "", 0);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    CURL *c = curl_easy_init();
    char cerr[CURL_ERROR_SIZE] = "";
    curl_easy_setopt(c, CURLOPT_URL, full.v);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &body);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, cerr);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 10000L);
    CURLcode rc = curl_easy_perform(c);
    long code = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
    curl_easy_cleanup(c);
    curl_global_cleanup();
    int status = 1;
    json_t *st = NULL;
    if (rc != CURLE_OK) {
        fprintf(stderr, "twn status: %s: %s\n", full.v, cerr[0] ? cerr : curl_easy_strerror(rc));
        goto out;
    }
    if (code != 200) {
        fprintf(stderr, "twn status: %s: HTTP %ld (is this a coordinator's metrics.listen?)\n",
                full.v, code);
        goto out;
    }
    json_error_t je;
    st = json_loadb(body.v, body.n, 0, &je);
    if (!json_is_object(st) || !json_is_object(json_object_get(st, "items"))) {
        fprintf(stderr, "twn status: %s: not a twn status document (%s)\n", full.v,
                st ? "no \"items\" object" : je.text);
        goto out;
    }
    if (raw)
        printf("%s\n", body.v);
    else
        print_summary(url, st);
    status = 0;
out:
    json_decref(st);
    twn_str_free(&body);
    twn_str_free(&full);
    return status;
}
