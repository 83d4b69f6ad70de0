/* testutil.c — see testutil.h. */
#include "tests/testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

const char *tu_tmpdir(const char *tag) {
    static char buf[8][1024];
    static int next = 0;
    char *d = buf[next++ % 8];
    const char *base = getenv("TWN_TEST_TMP");
    if (!base || !*base) base = "/tmp/twn-test";
    snprintf(d, 1024, "%s/%s", base, tag);
    char cmd[2200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && mkdir -p '%s'", d, d);
    assert_int_equal(system(cmd), 0);
    return d;
}

void tu_write(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

char *tu_read(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) fail_msg("cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)len + 1);
    assert_int_equal(fread(buf, 1, (size_t)len, f), (size_t)len);
    fclose(f);
    buf[len] = 0;
    if (n) *n = (size_t)len;
    return buf;
}

int tu_run(const char *cmd, char **out) {
    char full[8192];
    snprintf(full, sizeof full, "%s 2>&1", cmd);
    FILE *p = popen(full, "r");
    assert_non_null(p);
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    size_t r;
    while ((r = fread(buf + n, 1, cap - n - 1, p)) > 0) {
        n += r;
        if (n + 1 >= cap) buf = realloc(buf, cap *= 2);
    }
    buf[n] = 0;
    int st = pclose(p);
    if (out)
        *out = buf;
    else
        free(buf);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

double tu_max_rel(const float *a, const float *b, size_t n, double floor) {
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]) / fmax(fabs((double)b[i]), floor);
        if (d > m || isnan(d)) m = isnan(d) ? INFINITY : d;
    }
    return m;
}

double tu_max_abs(const float *a, const float *b, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > m || isnan(d)) m = isnan(d) ? INFINITY : d;
    }
    return m;
}

const char *tu_tiny_model(void) {
    static char dir[1024];
    if (dir[0]) return dir;
    const char *base = getenv("TWN_TEST_TMP");
    if (!base || !*base) base = "/tmp/twn-test";
    snprintf(dir, sizeof dir, "%s/tiny-model-%d", base, (int)getpid());
    char cmd[4096], *out = NULL;
    snprintf(cmd, sizeof cmd, "rm -rf '%s' && '%s' mkmodel --out '%s' --preset tiny --seed 1", dir,
             TWN_BIN, dir);
    if (tu_run(cmd, &out) != 0) fail_msg("twn mkmodel failed: %s", out);
    free(out);
    return dir;
}
