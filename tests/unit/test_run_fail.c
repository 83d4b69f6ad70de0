/* test_run_fail.c — `twn run` ends with a clear error when one of its roles fails.
 *
 * All roles are threads of one process; a role that fails (here an indexer whose shard directory
 * cannot be created because a plain file has its name) must stop the others instead of leaving
 * the coordinator waiting for it forever.  The first failure is printed first, naming its role;
 * the ones that only saw the stop follow, marked "then". */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "tests/unit/procs.h"

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_indexer_fails_at_start(void **state) {
    (void)state;
    const char *dir = tu_tmpdir("run-fail");
    char in[512], out[512], blocker[600];
    snprintf(in, sizeof in, "%s/in.jsonl", dir);
    snprintf(out, sizeof out, "%s/out", dir);
    FILE *f = fopen(in, "w");
    assert_non_null(f);
    for (int i = 0; i < 200; i++)
        fprintf(f, "{\"id\":\"item-%d\",\"text\":\"caption %d\"}\n", i, i);
    fclose(f);
    assert_int_equal(mkdir(out, 0755), 0);
    snprintf(blocker, sizeof blocker, "%s/shard-00000", out);
    write_file(blocker, "not a directory\n");
    tp_proc *p = tp_spawn("run", dir, TWN_BIN, "run", "--engine", "null", "--dim", "8", "--shards",
                          "2", "--input", in, "--out", out, "--log.progress", "off", NULL);
    /* Before the fix this never ended (the coordinator waited for indexer-0). */
    if (tp_wait(p, 60)) fail_msg("twn run did not end within 60 s:%s", tp_report());
    assert_int_equal(p->status, 1);
    char *log = tp_log(p);
    char want[1200];
    snprintf(want, sizeof want, "twn run: indexer-0: cannot open %s/LOCK: Not a directory\n",
             blocker);
    const char *first = strstr(log, "twn run: ");
    while (first && !strncmp(first, "twn run: status page", 20))
        first = strstr(first + 1, "twn run: ");
    if (!first || strncmp(first, want, strlen(want)))
        fail_msg("the first error line is not\n%sin\n%s", want, log);
    /* what followed only saw the stop, and says so */
    const char *rest = first + strlen(want);
    for (const char *l = strstr(rest, "twn run: "); l; l = strstr(l + 1, "twn run: "))
        if (strncmp(l, "twn run: then ", 14))
            fail_msg("a later error line lacks \"then\":\n%s", log);
    assert_null(strstr(log, "units ")); /* no summary for a failed job */
    free(log);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_indexer_fails_at_start, tp_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
