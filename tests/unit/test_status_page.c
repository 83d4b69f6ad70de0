/* test_status_page.c — the coordinator's status page in a real browser (Debian's chromium,
 * headless), during and after real jobs, checked against /status.json, /metrics and the job's
 * own summary line.
 *
 *  1. `twn coordinator` alone (processes over ipc://): the job is planned but nobody works, so it
 *     is running for as long as the test likes.  The page must show it running with the planned
 *     units and items, nothing done, every unit queued.
 *  2. Indexers, a gate and a worker join (separate processes); the job finishes, and the page
 *     (kept up by metrics.linger_ms) must show exactly the summary's easy / hard / rejected /
 *     think tokens, per-shard acks adding up to the acked items, and `twn status URL` must print
 *     the same numbers.
 *  3. `twn run --engine null` (threads of one process share one registry): the p_think and stage
 *     latency charts must show the gate's data.  Its screenshot is kept as
 *     BUILD/test-artifacts/status_page.png (the running one as status_page_running.png).
 *
 * The page writes every number it draws into data- attributes; the DOM is read with
 * `chromium --dump-dom`, with --virtual-time-budget so a few polls happen without real waiting.
 * Without chromium the test exits 77 (ctest: skipped), never passes silently. */
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tests/testutil.h"
#include "util/vec.h"

#define N_GOOD 600
#define N_BAD  3
#define UNIT   64

static char g_chromium[512];
static const char *g_dir;
static char g_flags[2048]; /* the job config shared by every role process */

// ------------------------------------------------------------------------------------------------
// Processes and files

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Every process spawned, so a failing test still leaves none behind (teardown). */
static pid_t g_pids[16];
static int g_npids;

/* Runs `sh -c cmd` in the background with stdout / stderr to files. */
static pid_t spawn(const char *cmd, const char *out, const char *err) {
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid > 0 && g_npids < 16) g_pids[g_npids++] = pid;
    if (pid == 0) {
        int o = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int e = open(err, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        dup2(o, 1);
        dup2(e, 2);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    return pid;
}

/* Waits up to timeout_ms for pid; its wait status, or -1 when it is still running. */
static int wait_for(pid_t pid, int timeout_ms) {
    for (int t = 0; t <= timeout_ms; t += 20) {
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid) {
            for (int i = 0; i < g_npids; i++)
                if (g_pids[i] == pid) g_pids[i] = 0;
            return st;
        }
        sleep_ms(20);
    }
    return -1;
}

static int kill_all(void **state) {
    (void)state;
    for (int i = 0; i < g_npids; i++)
        if (g_pids[i] > 0) {
            kill(g_pids[i], SIGKILL);
            waitpid(g_pids[i], NULL, 0);
        }
    g_npids = 0;
    return 0;
}

static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return strdup("");
    twn_str s = {0};
    twn_str_append(&s, "", 0);
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) twn_str_append(&s, buf, n);
    fclose(f);
    return s.v;
}

/* Waits until the file contains needle; returns its content (free) from needle on. */
static char *wait_text(const char *path, const char *needle, int timeout_ms) {
    for (int t = 0; t <= timeout_ms; t += 50) {
        char *s = slurp(path);
        char *p = strstr(s, needle);
        if (p) {
            char *r = strdup(p);
            free(s);
            return r;
        }
        free(s);
        sleep_ms(50);
    }
    char *s = slurp(path);
    fail_msg("no \"%s\" in %s within %d ms:\n%s", needle, path, timeout_ms, s);
    return NULL;
}

/* The status page URL from a coordinator's log line "... status page at http://H:P/ ...". */
static void url_from_log(const char *err_path, char *url, size_t n) {
    char *s = wait_text(err_path, "status page at http://", 20000);
    const char *p = s + strlen("status page at ");
    const char *slash = strchr(p + strlen("http://"), '/');
    snprintf(url, n, "%.*s", (int)(slash - p), p);
    free(s);
}

// ------------------------------------------------------------------------------------------------
// HTTP and the browser

static size_t on_body(char *p, size_t sz, size_t n, void *ud) {
    twn_str_append(ud, p, sz * n);
    return sz * n;
}

static char *http_get(const char *url) {
    twn_str b = {0};
    twn_str_append(&b, "", 0);
    CURL *c = curl_easy_init();
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 5000L);
    curl_easy_setopt(c, CURLOPT_NOPROXY, "*");
    CURLcode rc = curl_easy_perform(c);
    long code = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
    curl_easy_cleanup(c);
    if (rc != CURLE_OK || code != 200)
        fail_msg("GET %s: %s, HTTP %ld", url, curl_easy_strerror(rc), code);
    return b.v;
}

static json_t *status_json(const char *base) {
    char url[256];
    snprintf(url, sizeof url, "%s/status.json", base);
    char *body = http_get(url);
    json_error_t je;
    json_t *j = json_loads(body, 0, &je);
    if (!j) fail_msg("status.json is not JSON (%s): %s", je.text, body);
    free(body);
    return j;
}

static double jnum(json_t *o, const char *a, const char *b) {
    json_t *v = json_object_get(o, a);
    if (b) v = json_object_get(v, b);
    if (!json_is_number(v))
        fail_msg("status.json: %s%s%s is not a number", a, b ? "." : "", b ? b : "");
    return json_number_value(v);
}

/* The page after a few polls (virtual time): its DOM, and a screenshot when shot != NULL. */
static char *browse(const char *base, const char *shot) {
    char cmd[4096], dom[1024], log[1024];
    snprintf(dom, sizeof dom, "%s/dom.html", g_dir);
    snprintf(log, sizeof log, "%s/chromium.log", g_dir);
    const char *common = "--headless --no-sandbox --disable-gpu --no-first-run --hide-scrollbars "
                         "--window-size=1280,900 --virtual-time-budget=4000";
    snprintf(cmd, sizeof cmd,
             "timeout 120 '%s' %s --user-data-dir='%s/profile' --dump-dom '%s/' > '%s' 2> '%s'",
             g_chromium, common, g_dir, base, dom, log);
    if (system(cmd) != 0) fail_msg("chromium failed: %s\n%s", cmd, slurp(log));
    if (shot) {
        unlink(shot);
        snprintf(cmd, sizeof cmd,
                 "timeout 120 '%s' %s --user-data-dir='%s/profile' --screenshot='%s' '%s/' > "
                 "/dev/null 2> '%s'",
                 g_chromium, common, g_dir, shot, base, log);
        if (system(cmd) != 0) fail_msg("chromium failed: %s\n%s", cmd, slurp(log));
        struct stat st;
        if (stat(shot, &st) || st.st_size < 10000)
            fail_msg("no screenshot (or a blank one) at %s", shot);
        printf("status page screenshot: %s\n", shot);
    }
    return slurp(dom);
}

/* The value of attribute `attr` in the element with id="id" (the tag's own attributes). */
static char *dom_attr(const char *dom, const char *id, const char *attr) {
    char key[128];
    snprintf(key, sizeof key, "id=\"%s\"", id);
    const char *p = strstr(dom, key);
    if (!p) fail_msg("no element id=%s in the page's DOM", id);
    const char *tag = p;
    while (tag > dom && *tag != '<') tag--;
    const char *end = strchr(p, '>');
    snprintf(key, sizeof key, " %s=\"", attr);
    const char *a = strstr(tag, key);
    if (!a || a > end) fail_msg("element id=%s has no %s", id, attr);
    a += strlen(key);
    return strndup(a, strcspn(a, "\""));
}

static double dom_num(const char *dom, const char *id, const char *attr) {
    char *v = dom_attr(dom, id, attr);
    double d = strtod(v, NULL);
    free(v);
    return d;
}

static char *dom_text(const char *dom, const char *id) {
    char key[128];
    snprintf(key, sizeof key, "id=\"%s\"", id);
    const char *p = strstr(dom, key);
    if (!p) fail_msg("no element id=%s in the page's DOM", id);
    p = strchr(p, '>') + 1;
    return strndup(p, strcspn(p, "<"));
}

/* Sum and count of data-value over the <rect>s of the chart with id="id". */
static double bars_sum(const char *dom, const char *id, int *count, char *labels, size_t lsz) {
    char key[128];
    snprintf(key, sizeof key, "id=\"%s\"", id);
    const char *p = strstr(dom, key);
    if (!p) fail_msg("no chart %s", id);
    const char *end = strstr(p, "</svg>");
    double sum = 0;
    *count = 0;
    if (labels) labels[0] = 0;
    for (const char *r = strstr(p, "<rect"); r && r < end; r = strstr(r + 1, "<rect")) {
        const char *v = strstr(r, "data-value=\"");
        const char *l = strstr(r, "data-label=\"");
        sum += strtod(v + strlen("data-value=\""), NULL);
        if (labels) {
            l += strlen("data-label=\"");
            size_t ln = strlen(labels);
            snprintf(labels + ln, lsz - ln, "%s%.*s", ln ? "," : "", (int)strcspn(l, "\""), l);
        }
        (*count)++;
    }
    return sum;
}

static double metric(const char *text, const char *series) {
    char key[256];
    snprintf(key, sizeof key, "\n%s ", series);
    const char *p = strstr(text, key);
    if (!p) fail_msg("/metrics has no %s", series);
    return strtod(p + strlen(key), NULL);
}

// ------------------------------------------------------------------------------------------------

static void write_items(void) {
    char path[1024];
    snprintf(path, sizeof path, "%s/items.jsonl", g_dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    for (int i = 0; i < N_GOOD + N_BAD; i++) {
        if (i % 200 == 100)
            fprintf(f, "{\"id\": \"broken-%d\", \"text\": \n", i); /* a parse dead letter */
        else
            fprintf(f, "{\"id\":\"item-%d\",\"text\":\"caption number %d\"}\n", i, i);
    }
    fclose(f);
}

typedef struct summary {
    unsigned long long units, items, easy, hard, rejected, think;
} summary;

static summary parse_summary(const char *line) {
    summary s;
    double secs;
    if (sscanf(
            line,
            "units %llu items %llu easy %llu hard %llu rejected %llu think_tokens %llu seconds %lf",
            &s.units, &s.items, &s.easy, &s.hard, &s.rejected, &s.think, &secs) != 7)
        fail_msg("not a summary line: %s", line);
    return s;
}

static void test_status_page(void **state) {
    (void)state;
    g_dir = tu_tmpdir("status_page");
    write_items();
    char art[1024], shot_running[1200], shot[1200];
    snprintf(art, sizeof art, "%s/test-artifacts", TWN_BUILD_DIR);
    mkdir(art, 0755);
    snprintf(shot_running, sizeof shot_running, "%s/status_page_running.png", art);
    snprintf(shot, sizeof shot, "%s/status_page.png", art);
    const unsigned n_lines = N_GOOD + N_BAD, n_units = (n_lines + UNIT - 1) / UNIT;
    snprintf(g_flags, sizeof g_flags,
             "--engine null --input '%s/items.jsonl' --out '%s/out' --shards 2 --unit-items %d "
             "--coordinator.listen 'ipc://%s/ctl' --indexer.endpoints 'ipc://%s/s0' "
             "--indexer.endpoints 'ipc://%s/s1' --log.progress off",
             g_dir, g_dir, UNIT, g_dir, g_dir, g_dir);

    // 1. The coordinator alone: a job that is running and waiting for workers.
    char cmd[4096], out[1024], err[1024], base[256];
    snprintf(cmd, sizeof cmd,
             "exec '%s' coordinator %s --metrics.listen 127.0.0.1:0 --metrics.linger_ms 60000",
             TWN_BIN, g_flags);
    snprintf(out, sizeof out, "%s/coord.out", g_dir);
    snprintf(err, sizeof err, "%s/coord.err", g_dir);
    pid_t coord = spawn(cmd, out, err);
    url_from_log(err, base, sizeof base);
    assert_int_equal(strncmp(base, "http://127.0.0.1:", 17), 0);

    json_t *st = status_json(base);
    for (int t = 0; jnum(st, "units", "total") == 0 && t < 10000; t += 20) { /* still planning */
        json_decref(st);
        sleep_ms(20);
        st = status_json(base);
    }
    assert_false(json_is_true(json_object_get(st, "done")));
    assert_true(jnum(st, "units", "total") == n_units);
    assert_true(jnum(st, "items", "total") == n_lines);
    assert_true(jnum(st, "items", "done") == 0);
    assert_true(jnum(st, "queues", "units") == n_units);
    json_decref(st);
    char *dom = browse(base, shot_running);
    char *s = dom_text(dom, "state");
    assert_string_equal(s, "running");
    free(s);
    assert_true(dom_num(dom, "page", "data-polls") >= 1);
    assert_true(dom_num(dom, "v-units-total", "data-value") == n_units);
    assert_true(dom_num(dom, "v-items-total", "data-value") == n_lines);
    assert_true(dom_num(dom, "v-items-done", "data-value") == 0);
    assert_true(dom_num(dom, "v-units-done", "data-value") == 0);
    assert_true(dom_num(dom, "v-q-units", "data-value") == n_units);
    assert_true(dom_num(dom, "chart-items", "data-points") >= 1);
    assert_true(dom_num(dom, "chart-queues", "data-last") == n_units); /* units waiting */
    assert_true(dom_num(dom, "chart-shards", "data-bars") == 2);
    free(dom);

    // 2. Indexers, a gate and a worker join; the job finishes; the page stays up (linger).
    pid_t peers[4];
    const char *roles[4] = {"indexer --indexer.shard 0", "indexer --indexer.shard 1", "gate",
                            "worker"};
    for (int i = 0; i < 4; i++) {
        char po[1024], pe[1024];
        snprintf(cmd, sizeof cmd, "exec '%s' %s %s", TWN_BIN, roles[i], g_flags);
        snprintf(po, sizeof po, "%s/peer%d.out", g_dir, i);
        snprintf(pe, sizeof pe, "%s/peer%d.err", g_dir, i);
        peers[i] = spawn(cmd, po, pe);
    }
    char *line = wait_text(out, "units ", 60000);
    summary sum = parse_summary(line);
    free(line);
    assert_int_equal(sum.units, n_units);
    assert_int_equal(sum.items, n_lines);
    assert_int_equal(sum.rejected, N_BAD);
    assert_int_equal(sum.easy + sum.hard, N_GOOD);
    assert_true(sum.hard > 0 && sum.think >= sum.hard); /* null engine: 1..8 tokens per hard item */
    for (int i = 0; i < 4; i++) {
        int ws = wait_for(peers[i], 20000);
        if (ws < 0) fail_msg("%s did not stop after the job", roles[i]);
        assert_true(WIFEXITED(ws));
        assert_int_equal(WEXITSTATUS(ws), 0);
    }

    st = status_json(base);
    assert_true(json_is_true(json_object_get(st, "done")));
    assert_true(jnum(st, "items", "easy") == sum.easy);
    assert_true(jnum(st, "items", "hard") == sum.hard);
    assert_true(jnum(st, "items", "rejected") == sum.rejected);
    assert_true(jnum(st, "dead_letters", NULL) == N_BAD);
    assert_true(jnum(st, "think_tokens", NULL) == sum.think);
    json_t *shards = json_object_get(st, "shards");
    assert_int_equal(json_array_size(shards), 2);
    double acked = jnum(json_array_get(shards, 0), "acked", NULL) +
                   jnum(json_array_get(shards, 1), "acked", NULL);
    assert_true(acked == sum.easy + sum.hard);

    dom = browse(base, NULL);
    s = dom_text(dom, "state");
    assert_string_equal(s, "finished");
    free(s);
    assert_true(dom_num(dom, "v-units-done", "data-value") == sum.units);
    assert_true(dom_num(dom, "v-items-done", "data-value") == sum.items);
    assert_true(dom_num(dom, "v-easy", "data-value") == sum.easy);
    assert_true(dom_num(dom, "v-hard", "data-value") == sum.hard);
    assert_true(dom_num(dom, "v-dead", "data-value") == N_BAD);
    assert_true(dom_num(dom, "v-think", "data-value") == sum.think);
    assert_true(dom_num(dom, "v-saved", "data-value") ==
                jnum(st, "tokens_saved", NULL)); /* the page shows the coordinator's estimate */
    assert_true(dom_num(dom, "chart-items", "data-last") == sum.easy); /* the easy line's end */
    int nb;
    assert_true(bars_sum(dom, "chart-shards", &nb, NULL, 0) == acked);
    assert_int_equal(nb, 2);
    json_decref(st);

    /* /metrics agrees with the page. */
    char url[300];
    snprintf(url, sizeof url, "%s/metrics", base);
    char *prom = http_get(url);
    assert_true(metric(prom, "twn_items_total{route=\"easy\"}") ==
                dom_num(dom, "v-easy", "data-value"));
    assert_true(metric(prom, "twn_items_total{route=\"rejected\"}") == N_BAD);
    assert_true(metric(prom, "twn_dead_letters_total{stage=\"read\"}") == N_BAD);
    assert_true(metric(prom, "twn_job_units{state=\"done\"}") == n_units);
    free(prom);
    free(dom);

    /* `twn status URL` prints the same numbers. */
    char *txt = NULL;
    snprintf(cmd, sizeof cmd, "'%s' status %s", TWN_BIN, base);
    assert_int_equal(tu_run(cmd, &txt), 0);
    char want[512];
    snprintf(want, sizeof want, "twn status %s: finished\n  units        %u/%u done\n", base,
             n_units, n_units);
    if (strncmp(txt, want, strlen(want))) fail_msg("twn status printed\n%s\nnot\n%s", txt, want);
    snprintf(want, sizeof want,
             "\n  items        %u/%u done (100.0%%): easy %llu, hard %llu, rejected %d\n", n_lines,
             n_lines, sum.easy, sum.hard, N_BAD);
    if (!strstr(txt, want)) fail_msg("twn status printed\n%s\nwithout\n%s", txt, want);
    snprintf(want, sizeof want, "\n  dead letters %d\n", N_BAD);
    if (!strstr(txt, want)) fail_msg("twn status printed\n%s\nwithout\n%s", txt, want);
    free(txt);

    /* SIGTERM ends the linger at once. */
    kill(coord, SIGTERM);
    int ws = wait_for(coord, 5000);
    if (ws < 0) fail_msg("the coordinator did not stop on SIGTERM while lingering");
    assert_true(WIFEXITED(ws));
    assert_int_equal(WEXITSTATUS(ws), 128 + SIGTERM);

    // 3. twn run: one process, one registry: the gate's p_think and stage timings show too.
    snprintf(cmd, sizeof cmd,
             "exec '%s' run --engine null --input '%s/items.jsonl' --out '%s/run' --shards 2 "
             "--unit-items %d --metrics.listen 127.0.0.1:0 --metrics.linger_ms 60000 "
             "--log.progress lines --log.format json",
             TWN_BIN, g_dir, g_dir, UNIT);
    snprintf(out, sizeof out, "%s/run.out", g_dir);
    snprintf(err, sizeof err, "%s/run.err", g_dir);
    pid_t run = spawn(cmd, out, err);
    url_from_log(err, base, sizeof base);
    line = wait_text(out, "units ", 60000);
    summary rs = parse_summary(line);
    free(line);
    assert_int_equal(rs.easy, sum.easy); /* the null engine routes by id */
    assert_int_equal(rs.hard, sum.hard);
    /* log.progress lines + log.format json: the final progress line is a JSON log line. */
    char prog[256];
    snprintf(prog, sizeof prog,
             "\"level\":\"info\",\"msg\":\"progress: 100.0%% %u/%u items, %u/%u units,", n_lines,
             n_lines, n_units, n_units);
    free(wait_text(err, prog, 5000));

    /* The page is self-contained: no scripts, styles, fonts or images from anywhere else. */
    char page_url[300];
    snprintf(page_url, sizeof page_url, "%s/", base);
    char *page = http_get(page_url);
    assert_non_null(strstr(page, "<svg id=\"chart-pthink\""));
    assert_null(strstr(page, "https://"));
    assert_null(strstr(page, "src="));
    assert_null(strstr(page, "<link"));
    assert_null(strstr(page, "@import"));
    free(page);

    dom = browse(base, shot);
    assert_true(dom_num(dom, "v-easy", "data-value") == rs.easy);
    char labels[512];
    double seen = bars_sum(dom, "chart-pthink", &nb, labels, sizeof labels);
    assert_int_equal(nb, 10);
    assert_true(seen == rs.easy + rs.hard); /* every item the gate saw has a p_think */
    assert_string_equal(labels, "≤0.1,≤0.2,≤0.3,≤0.4,≤0.5,≤0.6,≤0.7,≤0.8,≤0.9,≤1");
    bars_sum(dom, "chart-stages", &nb, labels, sizeof labels);
    assert_string_equal(labels, "gate,read,reason,send,wal fsync");
    free(dom);
    kill(run, SIGTERM);
    ws = wait_for(run, 5000);
    if (ws < 0) fail_msg("twn run did not stop on SIGTERM");
    assert_true(WIFSIGNALED(ws) && WTERMSIG(ws) == SIGTERM);
}

/* $TWN_CHROMIUM when set (only that: a wrong path skips), else Debian's chromium. */
static int find_chromium(void) {
    const char *env = getenv("TWN_CHROMIUM");
    const char *cands[] = {"/usr/bin/chromium", "/usr/bin/chromium-browser"};
    if (env && *env) {
        snprintf(g_chromium, sizeof g_chromium, "%s", env);
        return access(env, X_OK) == 0;
    }
    for (size_t i = 0; i < sizeof cands / sizeof *cands; i++)
        if (access(cands[i], X_OK) == 0) {
            snprintf(g_chromium, sizeof g_chromium, "%s", cands[i]);
            return 1;
        }
    return 0;
}

int main(void) {
    if (!find_chromium()) {
        printf("test_status_page: no chromium (apt-get install chromium, or TWN_CHROMIUM=PATH): "
               "skipped\n");
        return 77;
    }
    signal(SIGPIPE, SIG_IGN);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    const struct CMUnitTest tests[] = {cmocka_unit_test_teardown(test_status_page, kill_all)};
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    curl_global_cleanup();
    return rc;
}
